"""Plain align (SPEC §3) and the production size of its output (SPEC §2).

Read next to SPEC §3: :func:`align` checks its arguments and then runs the
four steps, one function each —

1. :func:`effective_experts`  a route's expert, or ``DROPPED``;
2. :func:`segment_layout`     counts, padded sizes, offsets, total;
3. :func:`fill_sorted_token_ids` route indices per segment, pad value ``N``;
4. :func:`fill_expert_ids`    one expert per block, ``-1`` for inactive blocks.

Steps 2–4 take an arbitrary subset of the batch's routes, so LoRA-aware align
(``_lora.py``) reuses them per slot.  The oracle is *stable*: inside a
segment the route indices ascend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _validate

__all__ = ["Alignment", "align", "padded_size"]

#: Effective expert of a route that SPEC §3 step 1 drops.
DROPPED = -1


@dataclass(frozen=True, eq=False)
class Alignment:
    """The result of :func:`align` (SPEC §3).

    ``sorted_token_ids``: int32 ``[P]``, each expert's segment holds its route
    indices in ascending order, every other position the pad value ``N``.
    ``expert_ids``: int32 ``[M]``, ``M = ceil(P / B)``, ``-1`` past the last
    active block.  ``num_tokens_post_pad``: the padded total.  Frozen means
    the fields cannot be rebound; the arrays themselves are ordinary arrays.
    """

    sorted_token_ids: np.ndarray
    expert_ids: np.ndarray
    num_tokens_post_pad: int


def padded_size(numel: int, num_experts: int, block_size: int) -> int:
    """Production ``max_num_tokens_padded`` for ``numel`` routes (SPEC §2).

    ``round_up(N + E * (B - 1), B)``, except ``N * B`` when ``N < E``.
    Always at least the padded total of any routing of ``N`` routes: each
    non-empty expert adds at most ``B - 1`` pad positions, and when
    ``N < E`` at most ``N`` experts are non-empty, each padded to at most
    ``count * B``.  ``num_experts`` may be 0 (a rank that owns no expert):
    every route is then dropped.

    >>> padded_size(10, 4, 4)
    24
    """
    n = _validate.non_negative_integer("numel", numel)
    e = _validate.non_negative_integer("num_experts", num_experts)
    b = _validate.positive_integer("block_size", block_size)
    if n < e:
        return n * b
    return round_up(n + e * (b - 1), b)


def round_up(value, multiple):
    """Smallest multiple of ``multiple`` not below ``value`` (ints or integer arrays)."""
    return -(-value // multiple) * multiple


def num_m_blocks(max_num_tokens_padded: int, block_size: int) -> int:
    """``M = ceil(P / B)``, the length of an ``expert_ids`` row (SPEC §2)."""
    return -(-max_num_tokens_padded // block_size)


def align(
    topk_ids: np.ndarray,
    num_experts: int,
    block_size: int,
    *,
    expert_map: np.ndarray | None = None,
    max_num_tokens_padded: int | None = None,
) -> Alignment:
    """Sort routes by expert and pad each expert's segment to a multiple of ``B``.

    Inputs (SPEC §3): ``topk_ids`` int32 or int64 ``[T, K]``; ``num_experts``
    ``E >= 0`` (0: a rank without experts, every route dropped);
    ``block_size`` ``B > 0``; ``expert_map`` optional integer
    ``[E]`` with entries in ``[-1, E)``; ``max_num_tokens_padded`` ``P``,
    by default :func:`padded_size`.  Routes to an expert outside ``[0, E)``
    or mapped to ``-1`` are dropped.

    Raises ``ValueError``/``TypeError`` (one line naming the argument) for a
    bad argument, including a ``P`` smaller than the padded total.

    >>> a = align(np.array([[1, 0], [1, 1]]), 2, 2, max_num_tokens_padded=8)
    >>> a.sorted_token_ids.tolist(), a.expert_ids.tolist(), a.num_tokens_post_pad
    ([1, 4, 0, 2, 3, 4, 4, 4], [0, 1, 1, -1], 6)
    """
    topk_ids = _validate.topk_ids_array(topk_ids)
    num_experts = _validate.non_negative_integer("num_experts", num_experts)
    block_size = _validate.positive_integer("block_size", block_size)
    if expert_map is not None:
        expert_map = _validate.expert_map_array(expert_map, num_experts)
    num_routes = topk_ids.size
    if max_num_tokens_padded is None:
        max_num_tokens_padded = padded_size(num_routes, num_experts, block_size)
    max_num_tokens_padded = _validate.non_negative_integer(
        "max_num_tokens_padded", max_num_tokens_padded
    )

    experts = effective_experts(topk_ids, num_experts, expert_map)
    routes = np.arange(num_routes, dtype=np.int64)
    sorted_token_ids = np.empty(max_num_tokens_padded, dtype=np.int32)
    expert_ids = np.empty(num_m_blocks(max_num_tokens_padded, block_size), dtype=np.int32)
    total = align_routes(
        routes, experts, num_routes, num_experts, block_size, sorted_token_ids, expert_ids
    )
    return Alignment(sorted_token_ids, expert_ids, total)


def effective_experts(
    topk_ids: np.ndarray, num_experts: int, expert_map: np.ndarray | None
) -> np.ndarray:
    """SPEC §3 step 1: the effective expert of every flat route, int64 ``[N]``.

    ``g = topk_ids.flat[i]``; ``g`` outside ``[0, E)`` is dropped; with an
    ``expert_map`` the expert is ``expert_map[g]``, dropped when that is
    ``-1``.  Dropped routes get ``DROPPED``.
    """
    g = topk_ids.reshape(-1).astype(np.int64)
    in_range = (g >= 0) & (g < num_experts)
    experts = np.full(g.shape, DROPPED, dtype=np.int64)
    if expert_map is None:
        experts[in_range] = g[in_range]
    else:
        experts[in_range] = expert_map[g[in_range]]  # a -1 entry keeps it DROPPED
    return experts


def align_routes(
    routes: np.ndarray,
    experts: np.ndarray,
    num_routes: int,
    num_experts: int,
    block_size: int,
    sorted_token_ids: np.ndarray,
    expert_ids: np.ndarray,
    *,
    slot: int | None = None,
) -> int:
    """SPEC §3 steps 2–4 for the given routes (ascending indices) and their experts.

    Fills the rows ``sorted_token_ids`` (``[P]``) and ``expert_ids``
    (``[M]``) completely and returns ``num_tokens_post_pad``.  ``num_routes``
    is ``N`` of the whole batch, the pad value.  ``slot`` only names the
    LoRA slot in the message of a too-small ``P``.
    """
    kept = experts != DROPPED
    routes, experts = routes[kept], experts[kept]
    counts, padded, offsets, total = segment_layout(experts, num_experts, block_size)
    if total > sorted_token_ids.size:
        where = "" if slot is None else f" of slot {slot}"
        raise _validate.InvalidArgument(
            f"max_num_tokens_padded={sorted_token_ids.size}: must be at least {total}, "
            f"the padded total{where} (block_size={block_size})"
        )
    fill_sorted_token_ids(sorted_token_ids, routes, experts, counts, offsets, num_routes)
    fill_expert_ids(expert_ids, padded, total, block_size)
    return total


def segment_layout(
    experts: np.ndarray, num_experts: int, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """SPEC §3 step 2: ``count``, ``padded``, ``offset`` per expert, and ``total``.

    ``experts`` holds no dropped route.  ``padded[e] = ceil(count[e]/B)*B``;
    ``offset`` is the exclusive prefix sum of ``padded`` in expert order.
    """
    counts = np.bincount(experts, minlength=num_experts).astype(np.int64)
    padded = round_up(counts, block_size)
    offsets = np.cumsum(padded) - padded
    total = int(padded.sum())
    return counts, padded, offsets, total


def fill_sorted_token_ids(
    sorted_token_ids: np.ndarray,
    routes: np.ndarray,
    experts: np.ndarray,
    counts: np.ndarray,
    offsets: np.ndarray,
    num_routes: int,
) -> None:
    """SPEC §3 step 3: segment ``e`` starts with its routes, ascending; pad value ``N``.

    A stable sort by expert keeps the routes of one expert in ascending
    order; the ``j``-th route of expert ``e`` goes to ``offset[e] + j``.
    Every other position of the row, up to ``P``, holds ``N``.
    """
    sorted_token_ids[:] = num_routes
    # A key as narrow as the expert count lets NumPy's stable sort use radix sort.
    order = np.argsort(experts.astype(np.min_scalar_type(counts.size)), kind="stable")
    first_of_expert = np.cumsum(counts) - counts  # in the sorted order
    # the i-th route in sorted order, of expert e: offset[e] + (i - first_of_expert[e])
    positions = np.repeat(offsets - first_of_expert, counts) + np.arange(order.size)
    sorted_token_ids[positions] = routes[order]


def fill_expert_ids(
    expert_ids: np.ndarray, padded: np.ndarray, total: int, block_size: int
) -> None:
    """SPEC §3 step 4: block ``b`` of expert ``e``'s segment holds ``e``; later blocks ``-1``."""
    active = total // block_size
    expert_ids[:active] = np.repeat(np.arange(padded.size), padded // block_size)
    expert_ids[active:] = -1
