"""LoRA-aware align: vLLM calling convention (SPEC §4), SGLang's map (SPEC §5).

:func:`lora_align` reads like SPEC §4: find the processed slots ``S``
(:func:`processed_slots`), give every route its token's slot
(:func:`route_slots`), then apply SPEC §3 to each slot's routes with the
batch-wide route indices and pad value ``N``.  Rows of slots outside ``S``
are never written; :attr:`LoraAlignment.written` says which rows are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _validate
from ._align import align_routes, effective_experts, num_m_blocks, padded_size

__all__ = ["LoraAlignment", "active_lora_ids", "lora_align", "sglang_token_lora_mapping"]

#: What the oracle puts in rows it does not write.  Not part of the result:
#: a kernel must leave those rows as the caller filled them (SPEC §4).
UNWRITTEN = -1


@dataclass(frozen=True, eq=False)
class LoraAlignment:
    """The result of :func:`lora_align`: one SPEC §3 alignment per slot.

    ``sorted_token_ids`` int32 ``[L, P]``, ``expert_ids`` int32 ``[L, M]``,
    ``num_tokens_post_pad`` int32 ``[L]``, ``written`` bool ``[L]``.
    Row ``l`` is defined only where ``written[l]``; every other row (and its
    ``num_tokens_post_pad`` entry) holds no defined value — a kernel must not
    touch it at all, so compare it against what was there before the call.
    """

    sorted_token_ids: np.ndarray
    expert_ids: np.ndarray
    num_tokens_post_pad: np.ndarray
    written: np.ndarray


def active_lora_ids(token_lora_mapping: np.ndarray, max_loras: int) -> np.ndarray:
    """Production ``lora_ids`` (SPEC §4): sorted unique slots, then ``-1`` up to ``L + 1``.

    ``token_lora_mapping`` values must be in ``[-1, L)``; anything else is a
    caller error (``ValueError``).  With base tokens present the result
    starts with ``-1`` and a real slot may sit at index ``L``.

    >>> active_lora_ids(np.array([1, -1, 0, 1]), max_loras=2).tolist()
    [-1, 0, 1]
    """
    max_loras = _validate.positive_integer("max_loras", max_loras)
    mapping = _validate.integer_array("token_lora_mapping", token_lora_mapping, ndim=1)
    _validate.values_in(
        "token_lora_mapping", mapping, -1, max_loras, f"-1 or a slot, max_loras={max_loras}"
    )
    lora_ids = np.full(max_loras + 1, -1, dtype=np.int32)
    present = np.unique(mapping)
    lora_ids[: present.size] = present
    return lora_ids


def lora_align(
    topk_ids: np.ndarray,
    token_lora_mapping: np.ndarray,
    num_experts: int,
    block_size: int,
    max_loras: int,
    *,
    lora_ids: np.ndarray | None = None,
    adapter_enabled: np.ndarray | None = None,
    expert_map: np.ndarray | None = None,
    max_num_tokens_padded: int | None = None,
) -> LoraAlignment:
    """Align each processed slot's routes separately (SPEC §4).

    Inputs: ``topk_ids`` int32/int64 ``[T, K]``; ``token_lora_mapping``
    integer ``[T]`` (``-1`` = base model; a value outside ``[0, L)`` matches
    no slot); ``num_experts >= 0``; ``block_size``, ``max_loras`` positive;
    ``lora_ids`` integer ``[any length]``, default :func:`active_lora_ids`
    (vLLM passes ``L + 1`` entries, SGLang ``arange(L)``);
    ``adapter_enabled`` integer or bool with at least ``L`` entries, default
    all enabled; ``expert_map`` as in :func:`oracle.align`;
    ``max_num_tokens_padded`` ``P`` per row, default :func:`padded_size` of
    the whole batch.

    Processed slots ``S = {l in lora_ids : 0 <= l < L, adapter_enabled[l] != 0}``.
    Route indices and the pad value ``N = T * K`` refer to the whole batch.
    Raises ``ValueError``/``TypeError`` for a bad argument, including a ``P``
    smaller than some processed slot's padded total.
    """
    topk_ids = _validate.topk_ids_array(topk_ids)
    num_tokens, topk = topk_ids.shape
    mapping = _validate.integer_array("token_lora_mapping", token_lora_mapping, ndim=1)
    _validate.exact_shape(
        "token_lora_mapping", mapping, (num_tokens,), "one entry per token of topk_ids"
    )
    num_experts = _validate.non_negative_integer("num_experts", num_experts)
    block_size = _validate.positive_integer("block_size", block_size)
    max_loras = _validate.positive_integer("max_loras", max_loras)
    if lora_ids is None:
        lora_ids = active_lora_ids(mapping, max_loras)
    lora_ids = _validate.integer_array("lora_ids", lora_ids, ndim=1)
    if adapter_enabled is None:
        adapter_enabled = np.ones(max_loras + 1, dtype=np.int32)
    adapter_enabled = _validate.integer_array(
        "adapter_enabled", adapter_enabled, ndim=1, allow_bool=True
    )
    if adapter_enabled.size < max_loras:
        raise _validate.InvalidArgument(
            f"adapter_enabled.shape={adapter_enabled.shape}: must have at least "
            f"max_loras={max_loras} entries"
        )
    if expert_map is not None:
        expert_map = _validate.expert_map_array(expert_map, num_experts)
    num_routes = topk_ids.size
    if max_num_tokens_padded is None:
        max_num_tokens_padded = padded_size(num_routes, num_experts, block_size)
    max_num_tokens_padded = _validate.non_negative_integer(
        "max_num_tokens_padded", max_num_tokens_padded
    )
    max_num_m_blocks = num_m_blocks(max_num_tokens_padded, block_size)

    slots = processed_slots(lora_ids, adapter_enabled, max_loras)
    experts = effective_experts(topk_ids, num_experts, expert_map)  # SPEC §3 step 1
    slot_of_route = route_slots(mapping, topk)

    written = np.zeros(max_loras, dtype=bool)
    written[slots] = True
    # Rows are filled in place: unwritten rows get UNWRITTEN, each processed
    # row is written once by SPEC §3 (an [L, P] result can be large).
    sorted_token_ids = np.empty((max_loras, max_num_tokens_padded), dtype=np.int32)
    expert_ids = np.empty((max_loras, max_num_m_blocks), dtype=np.int32)
    num_tokens_post_pad = np.full(max_loras, UNWRITTEN, dtype=np.int32)
    sorted_token_ids[~written] = UNWRITTEN
    expert_ids[~written] = UNWRITTEN
    for slot in slots:
        # Every route whose token maps to another slot is dropped from this row.
        routes = np.flatnonzero(slot_of_route == slot)
        num_tokens_post_pad[slot] = align_routes(
            routes,
            experts[routes],
            num_routes,
            num_experts,
            block_size,
            sorted_token_ids[slot],
            expert_ids[slot],
            slot=slot,
        )
    return LoraAlignment(sorted_token_ids, expert_ids, num_tokens_post_pad, written)


def processed_slots(lora_ids: np.ndarray, adapter_enabled: np.ndarray, max_loras: int) -> list[int]:
    """SPEC §4: ``S = {l in lora_ids : 0 <= l < L and adapter_enabled[l] != 0}``, ascending.

    ``-1`` (base model), a value ``>= L`` and a disabled adapter are skipped;
    a slot listed twice is processed once.
    """
    in_range = {int(l) for l in lora_ids if 0 <= l < max_loras}
    return sorted(l for l in in_range if adapter_enabled[l] != 0)


def route_slots(token_lora_mapping: np.ndarray, topk: int) -> np.ndarray:
    """The slot of every flat route: route ``i`` belongs to token ``i // K``."""
    return np.repeat(token_lora_mapping.astype(np.int64), topk)


def sglang_token_lora_mapping(
    seg_indptr: np.ndarray, req_to_lora: np.ndarray, num_tokens: int
) -> np.ndarray:
    """Per-token adapter from SGLang's requests (SPEC §5), int32 ``[num_tokens]``.

    Request ``r`` covers tokens ``seg_indptr[r] <= t < seg_indptr[r + 1]``
    and uses adapter ``req_to_lora[r]`` (``-1``: none).  Tokens outside every
    request get ``-1``.  ``seg_indptr`` must be non-decreasing with entries in
    ``[0, num_tokens]``, and ``req_to_lora`` one entry shorter.

    >>> sglang_token_lora_mapping(np.array([1, 3, 4]), np.array([2, 0]), 6).tolist()
    [-1, 2, 2, 0, -1, -1]
    """
    num_tokens = _validate.non_negative_integer("num_tokens", num_tokens)
    seg_indptr = _validate.integer_array("seg_indptr", seg_indptr, ndim=1)
    req_to_lora = _validate.integer_array("req_to_lora", req_to_lora, ndim=1)
    if seg_indptr.size == 0:
        raise _validate.InvalidArgument(
            "seg_indptr.shape=(0,): must have at least one entry (num_requests + 1)"
        )
    num_requests = seg_indptr.size - 1
    _validate.exact_shape(
        "req_to_lora", req_to_lora, (num_requests,), "one entry per request of seg_indptr"
    )
    _validate.values_in(
        "seg_indptr", seg_indptr, 0, num_tokens + 1, f"token offsets, num_tokens={num_tokens}"
    )
    steps_down = np.flatnonzero(np.diff(seg_indptr) < 0)
    if steps_down.size:
        r = int(steps_down[0])
        raise _validate.InvalidArgument(
            f"seg_indptr[{r + 1}]={int(seg_indptr[r + 1])}: must be at least "
            f"seg_indptr[{r}]={int(seg_indptr[r])} (non-decreasing)"
        )

    mapping = np.full(num_tokens, -1, dtype=np.int32)
    for r in range(num_requests):
        mapping[seg_indptr[r] : seg_indptr[r + 1]] = req_to_lora[r]
    return mapping
