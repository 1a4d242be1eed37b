"""The EP remap (SPEC §6): global topk_ids → one rank's local ids, -1 where it owns none."""

from __future__ import annotations

import torch

from cuda_impl._torch import args
from cuda_impl._torch.switches import Switches

STRATEGIES = ("linear", "round_robin")


def remap(
    topk_ids: torch.Tensor,
    global_num_experts: int,
    ep_size: int,
    ep_rank: int,
    strategy: str,
    local_topk_ids: torch.Tensor,
    switches: Switches,
) -> None:
    """Write into ``local_topk_ids`` (shape and dtype of ``topk_ids``) each route's local id."""
    args.check_topk_ids(topk_ids)
    G = args.check_positive("global_num_experts", global_num_experts)
    R = args.check_positive("ep_size", ep_size)
    rank = args.check_int("ep_rank", ep_rank)
    if not 0 <= rank < R:
        raise ValueError(f"ep_rank={ep_rank!r}: must be in [0, ep_size={R})")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: must be one of {', '.join(STRATEGIES)}")
    if not isinstance(local_topk_ids, torch.Tensor):
        raise TypeError(f"local_topk_ids: expected a torch.Tensor, got {type(local_topk_ids)}")
    if local_topk_ids.shape != topk_ids.shape or local_topk_ids.dtype != topk_ids.dtype:
        raise ValueError(
            f"local_topk_ids: shape {tuple(local_topk_ids.shape)} dtype {local_topk_ids.dtype} "
            f"must match topk_ids ({tuple(topk_ids.shape)}, {topk_ids.dtype})"
        )

    g = topk_ids.long()
    base, rem = divmod(G, R)
    if not switches.ep_owns_remainder:
        # The bug: every rank gets G // R experts, so the last G % R have no owner.
        G, rem = R * base, 0
    if strategy == "linear":
        start = rank * base + min(rank, rem)
        count = base + (1 if rank < rem else 0)
        owned = (g >= start) & (g < start + count)
        local = g - start
    else:
        owned = (g >= 0) & (g < G) & (g.remainder(R) == rank)
        local = g.div(R, rounding_mode="floor")
    local_topk_ids.copy_(torch.where(owned, local, -1))
