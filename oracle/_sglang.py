"""SGLang's plain align (docs/SPEC.md, "sglang-align") and its production size.

SGLang's ``moe_align_block_size`` differs from vLLM's plain align (SPEC §3) in
three ways that change the answer, each a step below:

1. the kernel gets ``E + 1`` buckets: bucket 0 holds the routes whose id is
   ``-1`` (experts another EP rank owns), bucket ``e + 1`` expert ``e``; so the
   ``-1`` routes form a segment of their own, padded like any other, at the
   start of ``sorted_token_ids``, and its blocks' ``expert_ids`` are ``-1``.
   With ``ignore_invalid_expert`` the ``-1`` routes are dropped instead;
2. ``max_num_tokens_padded`` counts ``E + 1`` segments and is not rounded up
   to the block size (:func:`sglang_padded_size`);
3. ``expert_ids`` blocks from ``total / B`` on are not written: their value is
   unspecified (the oracle puts ``-1`` there; a comparison must not check them).

Ids outside ``[-1, E)`` are not part of SGLang's contract (its kernel indexes
its counters with them); the oracle drops their routes, as a careful kernel
would.  Steps 2–4 of SPEC §3 are ``_align``'s, run over the buckets.
"""

from __future__ import annotations

import numpy as np

from . import _validate
from ._align import DROPPED, Alignment, align_routes, num_m_blocks

__all__ = ["sglang_align", "sglang_padded_size"]


def sglang_padded_size(numel: int, num_experts: int, block_size: int) -> int:
    """SGLang's production ``max_num_tokens_padded`` for ``numel`` routes over ``E`` experts.

    ``numel * B`` when ``numel < E + 1``, else ``numel + (E + 1) * (B - 1)``:
    room for ``E + 1`` padded segments (the ``-1`` segment and one per expert),
    not rounded up to a multiple of ``B``.

    >>> sglang_padded_size(10, 4, 4)
    25
    >>> sglang_padded_size(3, 4, 4)
    12
    """
    n = _validate.non_negative_integer("numel", numel)
    e = _validate.non_negative_integer("num_experts", num_experts)
    b = _validate.positive_integer("block_size", block_size)
    if n < e + 1:
        return n * b
    return n + (e + 1) * (b - 1)


def sglang_align(
    topk_ids: np.ndarray,
    num_experts: int,
    block_size: int,
    *,
    max_num_tokens_padded: int | None = None,
    ignore_invalid_expert: bool = False,
) -> Alignment:
    """SGLang's plain align: ``-1`` routes first, in a segment of their own.

    ``num_experts`` is ``E``, the experts of this rank (the kernel itself is
    called with ``E + 1`` buckets). ``topk_ids`` int32 or int64 ``[T, K]``;
    ``block_size`` ``B > 0``; ``max_num_tokens_padded`` ``P``, by default
    :func:`sglang_padded_size`.

    Result (an :class:`~oracle.Alignment`): ``sorted_token_ids`` ``[P]`` holds
    the ``-1`` segment at offset 0 (empty with ``ignore_invalid_expert``),
    then expert 0, 1, ... (route indices ascending inside a segment), every
    other position the pad value ``N``; ``expert_ids`` ``[ceil(P / B)]`` holds
    ``-1`` for the blocks of the ``-1`` segment, ``e`` for expert ``e``'s, and
    ``-1`` — unspecified in SGLang's contract — from ``total / B`` on;
    ``num_tokens_post_pad`` counts the ``-1`` segment too.

    Raises ``ValueError``/``TypeError`` (one line naming the argument) for a
    bad argument, including a ``P`` smaller than the padded total.

    >>> a = sglang_align(np.array([[1, -1], [0, 1]]), 2, 2)
    >>> a.sorted_token_ids.tolist(), a.expert_ids.tolist(), a.num_tokens_post_pad
    ([1, 4, 2, 4, 0, 3, 4], [-1, 0, 1, -1], 6)
    """
    topk_ids = _validate.topk_ids_array(topk_ids)
    num_experts = _validate.non_negative_integer("num_experts", num_experts)
    block_size = _validate.positive_integer("block_size", block_size)
    if not isinstance(ignore_invalid_expert, (bool, np.bool_)):
        raise _validate.InvalidArgumentType(
            f"ignore_invalid_expert={ignore_invalid_expert!r}: must be a bool")
    num_routes = topk_ids.size
    if max_num_tokens_padded is None:
        max_num_tokens_padded = sglang_padded_size(num_routes, num_experts, block_size)
    max_num_tokens_padded = _validate.non_negative_integer(
        "max_num_tokens_padded", max_num_tokens_padded
    )

    buckets = route_buckets(topk_ids, num_experts, bool(ignore_invalid_expert))
    routes = np.arange(num_routes, dtype=np.int64)
    sorted_token_ids = np.empty(max_num_tokens_padded, dtype=np.int32)
    expert_ids = np.empty(num_m_blocks(max_num_tokens_padded, block_size), dtype=np.int32)
    total = align_routes(
        routes, buckets, num_routes, num_experts + 1, block_size, sorted_token_ids, expert_ids
    )
    active = total // block_size
    expert_ids[:active] -= 1  # bucket b holds expert b - 1; bucket 0 the -1 routes
    return Alignment(sorted_token_ids, expert_ids, total)


def route_buckets(topk_ids: np.ndarray, num_experts: int,
                  ignore_invalid_expert: bool) -> np.ndarray:
    """Step 1: each route's bucket (``id + 1``), int64 ``[N]``, or ``DROPPED``.

    ``-1`` goes to bucket 0 unless ``ignore_invalid_expert``; ids outside
    ``[-1, E)`` are dropped.
    """
    g = topk_ids.reshape(-1).astype(np.int64)
    lowest = 0 if ignore_invalid_expert else -1
    kept = (g >= lowest) & (g < num_experts)
    return np.where(kept, g + 1, DROPPED)
