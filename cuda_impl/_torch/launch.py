"""The launches: plain align (one row) and the LoRA-aware align (a pass per lora_ids entry).

Both run the passes of `passes` per row: count → write counts (num_tokens_post_pad,
expert_ids) → scatter (sorted_token_ids). Every row's layout is counted and
checked against the row length before anything is written, so a too-small
``max_num_tokens_padded`` raises ValueError with the outputs untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cuda_impl._torch import args, passes, routes
from cuda_impl._torch.switches import Switches


def align(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_pad: torch.Tensor,
    expert_map: torch.Tensor | None,
    switches: Switches,
) -> None:
    """SPEC §3 into the whole of ``sorted_token_ids`` [P] and ``expert_ids`` [M]."""
    E, B = _check_single_row(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                             num_tokens_post_pad)
    args.check_expert_map(expert_map, E)
    experts, valid = routes.effective_experts(topk_ids, E, expert_map, switches)
    _align_row(experts, valid, E, B, sorted_token_ids, expert_ids, num_tokens_post_pad,
               switches.inactive_block_id, 0, topk_ids.numel())


def _check_single_row(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                      num_tokens_post_pad) -> tuple[int, int]:
    """The checks of a one-row call; returns ``(E, B)``."""
    args.check_topk_ids(topk_ids)
    E = args.check_positive("num_experts", num_experts)
    B = args.check_positive("block_size", block_size)
    args.check_output("sorted_token_ids", sorted_token_ids, 0)
    args.check_output("expert_ids", expert_ids, 0)
    args.check_output("num_tokens_post_pad", num_tokens_post_pad, 1)
    return E, B


def _align_row(experts, valid, num_experts, block_size, sorted_token_ids, expert_ids,
               num_tokens_post_pad, inactive_block_id, first_expert, pad_value) -> None:
    """The passes over the whole of ``sorted_token_ids`` [P] and ``expert_ids`` [M]."""
    P, M = sorted_token_ids.numel(), expert_ids.numel()
    layout = passes.count_pass(experts, valid, num_experts, block_size)
    passes.check_fits(layout, P, M, block_size, "the batch")
    passes.write_counts(
        layout,
        passes.row(expert_ids, 0, M),
        passes.row(num_tokens_post_pad, 0, 1),
        block_size,
        inactive_block_id,
        first_expert,
    )
    passes.scatter_pass(layout, experts, valid, passes.row(sorted_token_ids, 0, P), pad_value)


VECTOR_INTS = 4
"""Ints per 16-byte vector store of SGLang's pad fill (the vector-tail-overrun fault)."""


def sglang_align(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_pad: torch.Tensor,
    pad_sorted_token_ids: bool,
    ignore_invalid_expert: bool,
    switches: Switches,
) -> None:
    """SGLang's plain align: ``num_experts`` buckets (``E + 1``), bucket 0 the ``-1`` routes.

    ``expert_ids`` blocks from the total on are left as they were; without
    ``pad_sorted_token_ids`` so is every position of ``sorted_token_ids``
    that holds no route.
    """
    E, B = _check_single_row(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                             num_tokens_post_pad)
    for name, flag in (("pad_sorted_token_ids", pad_sorted_token_ids),
                       ("ignore_invalid_expert", ignore_invalid_expert)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}={flag!r}: must be a bool")
    buckets, valid = routes.sglang_buckets(topk_ids, E, ignore_invalid_expert, switches)
    pad_value = topk_ids.numel() if pad_sorted_token_ids else None
    P = sorted_token_ids.numel()
    if pad_value is not None and not switches.pad_fill_stops_at_end:
        # The bug: the fill stores whole vectors of 4 ints, ceil(P / 4) of them,
        # so the last one runs 1-3 ints past the row when P % 4 != 0.
        tail = -P % VECTOR_INTS
        passes.row(sorted_token_ids, 0, P + tail)[P:] = pad_value
    # bucket b is expert b - 1; blocks from the total on are left as they were
    _align_row(buckets, valid, E, B, sorted_token_ids, expert_ids, num_tokens_post_pad,
               None, -1, pad_value)


@dataclass(frozen=True)
class LoraLaunch:
    """What both LoRA conventions hand to the per-slot passes; checked, sizes as Python ints."""

    topk_ids: torch.Tensor
    num_experts: int
    block_size: int
    max_loras: int
    max_num_tokens_padded: int
    max_num_m_blocks: int
    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_pad: torch.Tensor
    adapter_enabled: torch.Tensor
    lora_ids: torch.Tensor
    expert_map: torch.Tensor | None

    def __post_init__(self) -> None:
        args.check_topk_ids(self.topk_ids)
        for name in ("num_experts", "block_size", "max_loras"):
            object.__setattr__(self, name, args.check_positive(name, getattr(self, name)))
        # P = 0 is the production size of an empty batch (N = 0 < E: P = N * B).
        for name in ("max_num_tokens_padded", "max_num_m_blocks"):
            object.__setattr__(self, name, args.check_non_negative(name, getattr(self, name)))
        L, P, M = self.max_loras, self.max_num_tokens_padded, self.max_num_m_blocks
        args.check_expert_map(self.expert_map, self.num_experts)
        args.check_ids("lora_ids", self.lora_ids)
        args.check_ids("adapter_enabled", self.adapter_enabled, L)
        args.check_output("sorted_token_ids", self.sorted_token_ids, L * P)
        args.check_output("expert_ids", self.expert_ids, L * M)
        args.check_output("num_tokens_post_pad", self.num_tokens_post_pad, L)

    def run(self, route_slots: torch.Tensor, grid: int, switches: Switches) -> None:
        """SPEC §4: one pass per entry of ``lora_ids[:grid]``; rows of skipped slots untouched.

        ``route_slots`` (int64 [N]) is each route's slot, -1 for none.
        """
        L, P, M = self.max_loras, self.max_num_tokens_padded, self.max_num_m_blocks
        E, B, pad_value = self.num_experts, self.block_size, self.topk_ids.numel()
        experts, valid = routes.effective_experts(self.topk_ids, E, self.expert_map, switches)
        enabled = self.adapter_enabled.tolist()

        plan = []
        for slot in self.lora_ids.tolist()[:grid]:
            if slot < 0 or (switches.slot_upper_guard and slot >= L):
                continue
            # Only the unguarded (faulty) path reads past adapter_enabled; the
            # real kernel reads garbage there, which counts as enabled.
            slot_enabled = enabled[slot] != 0 if slot < len(enabled) else True
            if not slot_enabled and switches.scatter_checks_enabled:
                continue
            selected = valid & (route_slots == slot)
            layout = passes.count_pass(experts, selected, E, B)
            passes.check_fits(layout, P, M, B, f"slot {slot}")
            plan.append((slot, slot_enabled, selected, layout))

        for slot, slot_enabled, selected, layout in plan:
            if slot_enabled:
                passes.write_counts(
                    layout,
                    passes.row(self.expert_ids, slot, M),
                    passes.row(self.num_tokens_post_pad, slot, 1),
                    B,
                    switches.inactive_block_id,
                )
            sorted_row = passes.row(self.sorted_token_ids, slot, P)
            passes.scatter_pass(layout, experts, selected, sorted_row, pad_value)


def vllm_lora_align(
    topk_ids,
    token_lora_mapping,
    num_experts,
    block_size,
    max_loras,
    max_num_tokens_padded,
    max_num_m_blocks,
    sorted_token_ids,
    expert_ids,
    num_tokens_post_pad,
    adapter_enabled,
    lora_ids,
    expert_map,
    switches: Switches,
) -> None:
    """SPEC §4, vLLM convention: the grid covers all ``lora_ids.numel()`` (= L + 1) entries."""
    launch = LoraLaunch(
        topk_ids,
        num_experts,
        block_size,
        max_loras,
        max_num_tokens_padded,
        max_num_m_blocks,
        sorted_token_ids,
        expert_ids,
        num_tokens_post_pad,
        adapter_enabled,
        lora_ids,
        expert_map,
    )
    num_tokens, topk = topk_ids.shape
    args.check_ids("token_lora_mapping", token_lora_mapping, num_tokens)
    route_slots = routes.vllm_route_slots(token_lora_mapping[:num_tokens], topk)
    grid = lora_ids.numel()
    if not switches.grid_covers_all_lora_ids:
        grid = launch.max_loras  # the bug: L blocks for the L + 1 entries
    launch.run(route_slots, grid, switches)


def sglang_lora_align(
    topk_ids,
    seg_indptr,
    req_to_lora,
    num_experts,
    block_size,
    max_loras,
    max_num_tokens_padded,
    max_num_m_blocks,
    sorted_token_ids,
    expert_ids,
    num_tokens_post_pad,
    adapter_enabled,
    lora_ids,
    expert_map,
    switches: Switches,
) -> None:
    """SPEC §5, SGLang convention: the grid covers the ``lora_ids.numel()`` entries (normally L).

    The caller's work buffers (``cumsum_buffer``, ``token_mask``) are not
    needed, so they never reach this function and are left as they were.
    """
    launch = LoraLaunch(
        topk_ids,
        num_experts,
        block_size,
        max_loras,
        max_num_tokens_padded,
        max_num_m_blocks,
        sorted_token_ids,
        expert_ids,
        num_tokens_post_pad,
        adapter_enabled,
        lora_ids,
        expert_map,
    )
    args.check_ids("seg_indptr", seg_indptr)
    args.check_ids("req_to_lora", req_to_lora, max(seg_indptr.numel() - 1, 0))
    num_tokens, topk = topk_ids.shape
    route_slots = routes.sglang_route_slots(seg_indptr, req_to_lora, num_tokens, topk)
    launch.run(route_slots, lora_ids.numel(), switches)
