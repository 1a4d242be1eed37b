"""Per-route inputs of the passes: each route's effective expert, and its slot.

Route ``i`` is ``topk_ids.flatten()[i]`` and belongs to token ``i // K``.
Everything is computed on the device of ``topk_ids``, without host syncs.
"""

from __future__ import annotations

import torch

from cuda_impl._torch.switches import Switches


def effective_experts(
    topk_ids: torch.Tensor,
    num_experts: int,
    expert_map: torch.Tensor | None,
    switches: Switches,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(experts, valid)``, both ``[N]``: SPEC §3 step 1.

    ``experts`` (int64) is meaningful only where ``valid``. A route is valid
    when ``0 <= g < E`` and, with an ``expert_map``, ``expert_map[g] != -1``.
    """
    g = topk_ids.reshape(-1).long()
    if switches.drop_negative_experts:
        valid = (g >= 0) & (g < num_experts)
        index = torch.where(valid, g, 0)
    else:
        # The bug: only `g < E` is checked and the id is used as an index;
        # torch's negative indexing wraps -1 to the last expert.
        valid = g < num_experts
        index = torch.where(valid & (g < 0), g + num_experts, torch.where(valid, g, 0))
        if bool((index < 0).any()):
            raise IndexError(f"expert id below -num_experts={-num_experts} used as an index")
    if expert_map is None:
        return index, valid
    experts = expert_map.long()[index]
    return experts, valid & (experts != -1)


def sglang_buckets(
    topk_ids: torch.Tensor,
    num_buckets: int,
    ignore_invalid_expert: bool,
    switches: Switches,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(buckets, valid)``, both ``[N]``, for SGLang's plain align (``E + 1`` buckets).

    Route ``i`` goes to bucket ``g + 1``: a ``-1`` id to bucket 0 (the ``-1``
    segment) unless ``ignore_invalid_expert`` drops it; ids outside ``[-1, E)``
    are dropped (``E = num_buckets - 1``).
    """
    g = topk_ids.reshape(-1).long()
    lowest = 0 if ignore_invalid_expert and switches.drop_negative_experts else -1
    valid = (g >= lowest) & (g < num_buckets - 1)
    bucket = torch.where(valid, g + 1, 0)
    if not switches.drop_negative_experts:
        # The bug: only g < E is checked; a negative id below -1 indexes the bucket
        # table from its end, as in effective_experts.
        below = g < -1
        valid = valid | below
        bucket = torch.where(below, g + 1 + num_buckets, bucket)
        if bool((bucket < 0).any()):
            raise IndexError(f"expert id below -num_experts={-num_buckets} used as an index")
    return bucket, valid


def vllm_route_slots(token_lora_mapping: torch.Tensor, topk: int) -> torch.Tensor:
    """Each route's slot, ``token_lora_mapping[i // K]`` (``-1``: base model), int64 ``[N]``."""
    return token_lora_mapping.long().repeat_interleave(topk)


def sglang_route_slots(
    seg_indptr: torch.Tensor, req_to_lora: torch.Tensor, num_tokens: int, topk: int
) -> torch.Tensor:
    """Each route's slot under SPEC §5, int64 ``[N]``.

    Token ``t`` belongs to the request ``r`` with ``seg_indptr[r] <= t <
    seg_indptr[r + 1]`` and gets ``req_to_lora[r]``; a token outside every
    request gets ``-1`` (no adapter), as does a request whose slot is ``-1``.
    """
    num_requests = seg_indptr.numel() - 1
    device = seg_indptr.device
    if num_requests <= 0:
        return torch.full((num_tokens * topk,), -1, dtype=torch.int64, device=device)
    tokens = torch.arange(num_tokens, dtype=torch.int64, device=device)
    # Last request starting at or before t; a token past the last request's
    # end lands on index num_requests, one before the first request on -1.
    request = torch.searchsorted(seg_indptr.long(), tokens, right=True) - 1
    inside = (request >= 0) & (request < num_requests)
    lora = req_to_lora[:num_requests].long()[request.clamp(0, num_requests - 1)]
    token_slot = torch.where(inside, lora, -1)
    return token_slot.repeat_interleave(topk)
