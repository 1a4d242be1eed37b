"""Case surgery: the consistent edits the passes are made of.

Each function takes a case and returns the changes (a dict for
:meth:`Case.replace`) or the edited case; every input that depends on the
edited one follows it (a production ``lora_ids`` is recomputed from the
mapping, SGLang's ``seg_indptr`` and ``req_to_lora`` follow deleted tokens and
requests, EP's ``global_num_experts`` follows ``E``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np

import oracle

from ..case import Case, EPGroup
from ..errors import CaseError

INVALID = (CaseError, oracle.OracleError)
"""What building a candidate may raise when it is not a valid case (and only that)."""


def is_production_lora_ids(case: Case) -> bool:
    """vLLM ``lora_ids`` in the layout :func:`oracle.active_lora_ids` gives (kept in step)."""
    if case.dialect != "vllm-lora" or case.lora_ids is None:
        return False
    try:
        layout = oracle.active_lora_ids(case.token_lora_mapping, case.max_loras)
    except INVALID:
        return False
    return np.array_equal(case.lora_ids, layout)


def with_mapping(case: Case, mapping: np.ndarray, num_slots: int | None = None
                  ) -> dict[str, Any]:
    """Changes giving ``case`` the vLLM ``mapping``; a production ``lora_ids`` follows it."""
    changes: dict[str, Any] = {"token_lora_mapping": mapping.astype(np.int32)}
    if is_production_lora_ids(case):
        try:
            changes["lora_ids"] = oracle.active_lora_ids(mapping, num_slots or case.max_loras)
        except INVALID:
            pass
    return changes


def keep_tokens(case: Case, keep: np.ndarray) -> dict[str, Any]:
    """Changes that keep the tokens where ``keep`` (bool ``[T]``), inputs consistent.

    SGLang: each ``seg_indptr`` entry becomes the number of kept tokens before
    it, so deleting a token inside request ``r`` lowers ``seg_indptr[r+1:]``.
    """
    changes: dict[str, Any] = {"topk_ids": case.topk_ids[keep]}
    if case.token_lora_mapping is not None:
        changes.update(with_mapping(case, case.token_lora_mapping[keep]))
    if case.seg_indptr is not None:
        kept_before = np.concatenate([[0], np.cumsum(keep)])
        seg = np.clip(case.seg_indptr.astype(np.int64), 0, case.num_tokens)
        changes["seg_indptr"] = kept_before[seg].astype(np.int32)
    return changes


def without_tokens(case: Case, start: int, stop: int) -> dict[str, Any]:
    keep = np.ones(case.num_tokens, dtype=bool)
    keep[start:stop] = False
    return keep_tokens(case, keep)


def without_requests(case: Case, requests: Iterable[int]) -> dict[str, Any]:
    """Changes deleting SGLang ``requests`` together with their tokens."""
    seg = case.seg_indptr.astype(np.int64)
    drop = sorted(set(requests))
    keep = np.ones(case.num_tokens, dtype=bool)
    for r in drop:
        keep[max(seg[r], 0):max(seg[r + 1], 0)] = False
    changes = keep_tokens(case, keep)
    # each deleted request is empty now: drop its entry and its end in seg_indptr
    changes["seg_indptr"] = np.delete(changes["seg_indptr"], [r + 1 for r in drop])
    changes["req_to_lora"] = np.delete(case.req_to_lora, drop)
    return changes


def token_slots(case: Case) -> np.ndarray:
    from ..classify import token_slots

    return token_slots(case)


def used_slots(case: Case) -> list[int]:
    """Slots in ``[0, L)`` the case refers to, ascending.

    Those the mapping (``req_to_lora``) uses, those a hand-made ``lora_ids``
    lists, and listed slots whose adapter is disabled (SGLang's default
    ``lora_ids`` lists every slot).
    """
    num_slots = case.max_loras
    values = [token_slots(case)]
    if case.dialect == "sglang-lora" and case.req_to_lora is not None:
        values.append(case.req_to_lora)
    if case.lora_ids is not None and not is_production_lora_ids(case):
        values.append(case.lora_ids)
    enabled = case.adapter_enabled
    if enabled is not None:
        listed = (case.lora_ids if case.lora_ids is not None else
                  np.arange(num_slots) if case.dialect == "sglang-lora" else np.zeros(0))
        listed = listed[(listed >= 0) & (listed < min(num_slots, enabled.size))]
        values.append(listed[enabled[listed] == 0])
    used = np.unique(np.concatenate([v.astype(np.int64).reshape(-1) for v in values]))
    return [int(v) for v in used if 0 <= v < num_slots]


def relabel_slots(case: Case, keep: list[int], num_slots: int,
                   changes: dict[str, Any] | None = None,
                   keep_length: bool = False) -> Case | None:
    """``case`` with slot ``keep[i]`` renamed ``i`` and ``L = num_slots``.

    A value ``>= L`` keeps its distance past the end (``v - L + num_slots``),
    so an out-of-range slot stays out of range; a value in ``[0, L)`` not in
    ``keep`` becomes ``-1``.  ``adapter_enabled`` moves with its slots and
    keeps any surplus length; a production or default ``lora_ids`` is rebuilt.
    """
    old = case.max_loras
    changes = dict(changes or {})
    base = case.replace(**changes) if changes else case
    index = {slot: i for i, slot in enumerate(keep)}

    def relabel(values: np.ndarray) -> np.ndarray:
        out = [index.get(int(v), -1) if 0 <= v < old else
               (int(v) - old + num_slots if v >= old else int(v)) for v in values.reshape(-1)]
        return np.asarray(out, dtype=np.int32).reshape(values.shape)

    changes["max_loras"] = num_slots
    if case.dialect == "vllm-lora":
        mapping = relabel(base.token_lora_mapping)
        changes["token_lora_mapping"] = mapping
        if base.lora_ids is not None:
            if is_production_lora_ids(base):
                try:
                    changes["lora_ids"] = oracle.active_lora_ids(mapping, num_slots)
                except INVALID:
                    return None
            else:
                changes["lora_ids"] = (relabel(base.lora_ids) if keep_length else
                                       resized_lora_ids(relabel(base.lora_ids), num_slots + 1))
    else:
        changes["req_to_lora"] = relabel(base.req_to_lora)
        if base.lora_ids is not None:
            if np.array_equal(base.lora_ids, np.arange(old)):
                changes["lora_ids"] = np.arange(num_slots, dtype=np.int32)
            else:
                changes["lora_ids"] = (relabel(base.lora_ids) if keep_length else
                                       resized_lora_ids(relabel(base.lora_ids), num_slots))
    if base.adapter_enabled is not None:
        enabled = base.adapter_enabled
        length = max(num_slots + enabled.size - old, num_slots)
        moved = np.ones(length, dtype=enabled.dtype)
        for i, slot in enumerate(keep):
            if slot < enabled.size:
                moved[i] = enabled[slot]
        surplus = enabled[old:]
        moved[num_slots:num_slots + surplus.size] = surplus
        changes["adapter_enabled"] = moved
    try:
        return case.replace(**changes)
    except INVALID:
        return None


def resized_lora_ids(lora_ids: np.ndarray, length: int) -> np.ndarray:
    """``lora_ids`` padded with ``-1``, or cut by trailing ``-1`` entries, towards ``length``."""
    values = [int(v) for v in lora_ids]
    while len(values) > length and values[-1] == -1:
        values.pop()
    values += [-1] * (length - len(values))
    return np.asarray(values, dtype=np.int32)


def expert_changes(case: Case, num_experts: int) -> dict[str, Any]:
    """``E = num_experts``, with EP's ``global_num_experts`` kept equal."""
    changes: dict[str, Any] = {"num_experts": num_experts}
    if case.ep is not None:
        changes["ep"] = dataclasses.replace(case.ep, global_num_experts=num_experts)
    return changes


def expert_floor(case: Case) -> int:
    """The smallest ``E`` that keeps every in-range id in range (and ``G >= R`` under EP)."""
    flat = case.topk_ids.reshape(-1).astype(np.int64)
    valid = flat[(flat >= 0) & (flat < case.num_experts)]
    floor = int(valid.max()) + 1 if valid.size else 1
    if case.ep is not None:
        floor = max(floor, min(case.ep.ep_size, case.num_experts))
    return floor


def toward_zero(value: int, num_experts: int) -> list[int]:
    """Simpler expert ids for ``value``: 0; up to ``E``, half and one step; past it
    (or below ``-1``), the :func:`past_range` ladder."""
    if value > num_experts:
        targets = [0, *past_range(value, num_experts)]
    elif value > 0:
        targets = [0, value // 2, value - 1]
    elif value < 0:
        targets = [0, *past_range(value, -1)]
    else:
        return []
    return [t for t in dict.fromkeys(targets) if abs(t) < abs(value)]


def toward_base(value: int, num_slots: int) -> list[int]:
    """Simpler slot values for ``value``: ``-1`` (base), 0; up to ``L``, half and one
    step; past it (or below ``-1``), the :func:`past_range` ladder."""
    targets = [-1, 0]
    if value > num_slots:
        targets += past_range(value, num_slots)
    elif value >= 0:
        targets += [value // 2, value - 1]
    else:
        targets += past_range(value, -1)
    return [t for t in dict.fromkeys(targets) if abs(t + 1) < abs(value + 1)]


def past_range(value: int, end: int) -> list[int]:
    """Values between ``end`` (the first value past a range, or ``-1`` for values below
    it) and ``value``, smallest distance first: the last value in range, ``end``,
    ``end ± 1``, then the powers of two beyond them.

    A value far out of range goes to the first of these that still fails, not to its
    exact threshold: a search for the threshold would be a run per step that fails (a
    worker restart each, when the failure is a crash); this ladder costs runs that
    pass, and one that fails.
    """
    sign = 1 if value >= end else -1
    ladder = ([end - 1] if sign > 0 and end > 0 else []) + [end, end + sign]
    power = 2
    while power < abs(value):
        if power > abs(end) + 1:
            ladder.append(sign * power)
        power *= 2
    return [t for t in ladder if abs(t) < abs(value)]


def smaller_group(ep: EPGroup, size: int) -> EPGroup:
    """``ep`` with ``size`` ranks: all of them if it ran all, else the ranks that remain."""
    full = ep.ranks == tuple(range(ep.ep_size))
    ranks = tuple(r for r in ep.ranks if r < size)
    return dataclasses.replace(ep, ep_size=size,
                               ranks=tuple(range(size)) if full or not ranks else ranks)


def ids_following(case: Case, num_experts: int) -> np.ndarray:
    """``topk_ids`` for ``E = num_experts``: ids ``>= num_experts`` move down by the difference.

    The highest experts stay the highest (at least 0); ids past the old
    ``E`` stay past the new one.
    """
    d = case.num_experts - num_experts
    ids = case.topk_ids.astype(np.int64)
    moved = np.where(ids >= num_experts, np.maximum(ids - d, 0), ids)
    return moved.astype(case.topk_ids.dtype)

