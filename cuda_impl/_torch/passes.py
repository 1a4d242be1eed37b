"""The passes of one slot row: counting, then writing the counts, then the scatter.

A slot row is a window of ``length`` elements at ``slot * length`` in an
output's storage, exactly as a kernel computes its row pointer. Correct
callers only ask for rows inside the view; the ``no-slot-upper-guard`` fault
asks for rows past it and so writes into whatever follows in the storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def row(output: torch.Tensor, slot: int, length: int) -> torch.Tensor:
    """Row ``slot`` of a contiguous output: ``length`` elements at storage offset ``slot*length``.

    Past the end of the storage torch raises (RuntimeError), like an illegal
    memory access; inside it (a guard band) the write silently lands there.
    """
    return output.as_strided((length,), (1,), output.storage_offset() + slot * length)


@dataclass(frozen=True)
class Layout:
    """The padded segment layout of one row (SPEC §3 step 2), int64 tensors ``[E]``."""

    counts: torch.Tensor
    padded: torch.Tensor
    offsets: torch.Tensor
    total: torch.Tensor  # 0-d


def count_pass(
    experts: torch.Tensor, selected: torch.Tensor, num_experts: int, block_size: int
) -> Layout:
    """Routes per expert among ``selected``, padded to a multiple of B, exclusive offsets."""
    # Unselected routes go to a spill bucket E that is cut off afterwards.
    buckets = torch.where(selected, experts, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=experts.device)
    counts.index_add_(0, buckets, torch.ones_like(buckets))
    counts = counts[:num_experts]
    padded = (counts + block_size - 1) // block_size * block_size
    offsets = torch.cumsum(padded, 0) - padded
    return Layout(counts, padded, offsets, padded.sum())


def check_fits(layout: Layout, padded_len: int, num_blocks: int, block_size: int, where: str):
    """A row may not be written past its end: a too-small P is the caller's error."""
    total = int(layout.total)
    if total > padded_len or total > num_blocks * block_size:
        raise ValueError(
            f"max_num_tokens_padded={padded_len}, max_num_m_blocks={num_blocks}: "
            f"{where} needs {total} padded positions ({total // block_size} blocks); "
            "pass a larger max_num_tokens_padded"
        )


def write_counts(
    layout: Layout,
    expert_ids_row: torch.Tensor,
    num_tokens_post_pad_row: torch.Tensor,
    block_size: int,
    inactive_block_id: int | None,
    first_expert: int = 0,
) -> None:
    """``num_tokens_post_pad`` and ``expert_ids`` of one row (SPEC §3 steps 2 and 4).

    Block ``b`` of segment ``e`` gets ``first_expert + e`` (SGLang's plain align:
    ``-1`` for its bucket 0); blocks from the total on get ``inactive_block_id``,
    or stay as they are when that is ``None``.
    """
    num_tokens_post_pad_row.copy_(layout.total.reshape(1))
    device = layout.padded.device
    block_starts = torch.arange(expert_ids_row.numel(), device=device, dtype=torch.int64)
    block_starts *= block_size
    ends = layout.offsets + layout.padded
    # First expert whose padded segment ends after the block's start owns it;
    # `right=True` steps over empty experts (segments of length 0).
    owner = torch.searchsorted(ends, block_starts, right=True) + first_expert
    active = block_starts < layout.total
    if inactive_block_id is None:
        expert_ids_row.copy_(torch.where(active, owner, expert_ids_row.long()))
    else:
        expert_ids_row.copy_(torch.where(active, owner, inactive_block_id))


def scatter_pass(
    layout: Layout,
    experts: torch.Tensor,
    selected: torch.Tensor,
    sorted_row: torch.Tensor,
    pad_value: int | None,
) -> None:
    """Fill the row with the pad value, then put each selected route in its expert's segment.

    Stable: inside a segment routes are in ascending route index. With
    ``pad_value`` ``None`` only the routes' places are written.
    """
    padded_len = sorted_row.numel()
    # Only this slot's routes are sorted (nonzero keeps them in ascending route
    # order, and the stable sort keeps that order inside each expert).
    route_idx = torch.nonzero(selected).flatten()
    expert_sorted, order = torch.sort(experts[route_idx], stable=True)
    route = route_idx[order]
    # Rank of a route inside its segment = its position in the sorted order
    # minus the position of its expert's first route.
    first = torch.cumsum(layout.counts, 0) - layout.counts
    rank = torch.arange(route.numel(), device=route.device) - first[expert_sorted]
    position = layout.offsets[expert_sorted] + rank
    if pad_value is None:
        sorted_row[position] = route.to(sorted_row.dtype)
        return
    staged = torch.full((padded_len,), pad_value, dtype=torch.int64, device=route.device)
    staged[position] = route
    sorted_row.copy_(staged)
