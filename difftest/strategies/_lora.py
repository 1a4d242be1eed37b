"""LoRA layouts (vLLM and SGLang, SPEC §4/§5): Hypothesis draws the layout's
decisions (how slots are mapped, how many requests, which feature goes how), the
case's :class:`~._base.Values` every per-token and per-request value."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st

import oracle

from ._base import ELEMENTWISE_MAX_ROUTES, Values, _integers, _sampled_from

#: Features :func:`~.components.lora_layouts` can build in (see its docstring).
LORA_FEATURES = (
    "full-slots-with-base", "base-only", "disable-listed", "disable-unused", "disable-used",
    "slot-out-of-range", "lora-layout", "request-gap", "unassigned-request",
)
#: Most requests of an SGLang batch of up to :data:`~._base.ELEMENTWISE_MAX_ROUTES`
#: tokens, and of a larger one.
MAX_REQUESTS, MAX_REQUESTS_LARGE = 16, 64


class LoraLayout(NamedTuple):
    """The LoRA inputs of one case; fields of the other dialect are ``None``."""

    token_lora_mapping: np.ndarray | None  # vLLM, int32 [T]
    seg_indptr: np.ndarray | None  # SGLang, int32 [requests + 1]
    req_to_lora: np.ndarray | None  # SGLang, int32 [requests]
    lora_ids: np.ndarray  # int32, vLLM [L + 1], SGLang [L]
    adapter_enabled: np.ndarray  # int32, vLLM [L + 1], SGLang [L]


def _vllm_layout(draw: st.DrawFn, values: Values, num_tokens: int, num_slots: int,
                 features: frozenset[str]) -> LoraLayout:
    if "base-only" in features:
        mapping = np.full(num_tokens, -1, dtype=np.int64)
    elif "full-slots-with-base" in features:
        mapping = np.concatenate([np.arange(-1, num_slots),
                                  values.ints(num_tokens - num_slots - 1, -1, num_slots - 1)])
        mapping = mapping[values.permutation(num_tokens)]
    else:
        kind = draw(_sampled_from(("mixed", "adapters", "single")))
        if kind == "single":
            mapping = np.full(num_tokens, values.one(0, num_slots - 1), dtype=np.int64)
        else:
            mapping = values.ints(num_tokens, -1 if kind == "mixed" else 0, num_slots - 1)
    if "disable-listed" in features and num_tokens and not (mapping >= 0).any():
        mapping[0] = values.one(0, num_slots - 1)
    lora_ids = oracle.active_lora_ids(mapping, num_slots).astype(np.int64)
    enabled = _enabled_flags(values, num_slots + 1,
                             used=np.unique(mapping[mapping >= 0]))

    real = lora_ids[lora_ids >= 0]
    if "disable-listed" in features and real.size:
        enabled[values.subset(real, 1, real.size)] = 0
    if "lora-layout" in features:
        lora_ids = _break_vllm_layout(draw, values, lora_ids, mapping, num_slots)
    if "slot-out-of-range" in features:
        # Keep a real slot at index L where the focus put one there, and the
        # disabled slots listed (at least one -1 entry is always free).
        keep = (num_slots,) if "full-slots-with-base" in features else ()
        lora_ids = _out_of_range_slots(values, lora_ids, num_slots,
                                       keep + _disabled_positions(lora_ids, enabled))
    return LoraLayout(mapping.astype(np.int32), None, None, lora_ids.astype(np.int32),
                      enabled.astype(np.int32))


def _break_vllm_layout(draw: st.DrawFn, values: Values, lora_ids: np.ndarray,
                       mapping: np.ndarray, num_slots: int) -> np.ndarray:
    """``lora_ids`` that a careless caller builds: a duplicate, unsorted, a stale slot."""
    lora_ids = lora_ids.copy()
    real = np.flatnonzero(lora_ids >= 0)
    pads = np.flatnonzero(lora_ids < 0)
    unused = np.setdiff1d(np.arange(num_slots), mapping)
    options = []
    if real.size and pads.size:
        options.append("duplicate")
    if real.size >= 2:
        options.append("unsorted")
    if unused.size and pads.size:
        options.append("stale")
    if not options:
        return _out_of_range_slots(values, lora_ids, num_slots, ())
    kind = draw(_sampled_from(tuple(options)))
    if kind == "duplicate":
        lora_ids[pads[-1]] = lora_ids[values.pick(real)]
    elif kind == "unsorted":
        lora_ids[real] = lora_ids[real[::-1]]
    else:
        lora_ids[pads[-1]] = values.pick(unused)
    return lora_ids


_DISABLING = frozenset(("disable-unused", "disable-used"))


def _disabled_positions(lora_ids: np.ndarray, enabled: np.ndarray) -> tuple[int, ...]:
    """Positions of ``lora_ids`` that list a disabled slot."""
    listed = (lora_ids >= 0) & (lora_ids < enabled.size)
    return tuple(int(p) for p in np.flatnonzero(listed)
                 if enabled[lora_ids[p]] == 0)


def _out_of_range_slots(values: Values, lora_ids: np.ndarray, num_slots: int,
                        keep: tuple[int, ...]) -> np.ndarray:
    lora_ids = lora_ids.copy()
    positions = [p for p in range(lora_ids.size) if p not in keep]
    if not positions:  # everything is worth keeping: give up all but the first
        positions = [p for p in range(lora_ids.size) if p != keep[0]]
    where = values.subset(positions, 1, 2)
    lora_ids[where] = values.pick((num_slots, num_slots + 1, num_slots + 7,
                                   int(np.iinfo(np.int32).max)), where.size)
    return lora_ids


def _enabled_flags(values: Values, size: int, used: np.ndarray) -> np.ndarray:
    """1 for every used slot; sometimes 0 for slots the batch does not use."""
    enabled = np.ones(size, dtype=np.int64)
    if values.chance(0.3):
        off = values.ints(size, 0, 1).astype(bool)
        off[used[used < size]] = False
        enabled[off] = 0
    return enabled


def _sglang_layout(draw: st.DrawFn, values: Values, num_tokens: int, num_slots: int,
                   features: frozenset[str]) -> LoraLayout:
    full = "full-slots-with-base" in features
    base_only = "base-only" in features
    # How full/base-only batches get their base tokens: a gap or a -1 request.
    base_by = draw(_sampled_from(("unassigned", "gap"))) if full or base_only else None
    gap = "request-gap" in features or base_by == "gap"
    min_reqs = num_slots + (base_by == "unassigned") if full else 1

    if num_tokens == 0:
        seg = [0, 0] if draw(st.booleans()) else [0]
        start = stop = 0
    elif base_only and gap:
        start = stop = values.one(0, num_tokens)  # every token in the gap
        seg = [start, stop]
    else:
        min_len = min_reqs if full else 0  # an empty span: one empty request
        start, stop = _covered_span(draw, values, num_tokens, min_len) if gap else (
            0, num_tokens)
        seg = _request_bounds(draw, values, start, stop, min_reqs)
    seg = np.asarray(seg, dtype=np.int64)
    num_reqs = seg.size - 1

    unused_slot = None
    if base_only:
        req = np.full(num_reqs, -1, dtype=np.int64)
        if gap:
            req[:] = values.one(0, num_slots - 1)  # the request is empty
    elif full:
        req = np.concatenate([values.permutation(num_slots),
                              values.ints(num_reqs - num_slots, 0, num_slots - 1)])
        if base_by == "unassigned":
            req[-1] = -1
        req = req[values.permutation(num_reqs)]
    elif "disable-unused" in features:
        unused_slot = values.one(0, num_slots - 1)
        req = values.ints(num_reqs, 0, num_slots - 2)
        req += req >= unused_slot
    else:
        req = values.ints(num_reqs, 0, num_slots - 1)
    if "unassigned-request" in features and num_reqs and not full:
        req[values.one(0, num_reqs - 1)] = -1

    lens = np.diff(seg)
    used = np.unique(req[(req >= 0) & (lens[: req.size] > 0)]) if num_reqs else req
    enabled = _enabled_flags(values, num_slots, used=used)
    if unused_slot is not None:
        enabled[unused_slot] = 0
    if "disable-used" in features:
        if not used.size and num_reqs and lens.max() > 0:
            busiest = int(np.argmax(lens))
            req[busiest] = values.one(0, num_slots - 1)
            used = req[busiest: busiest + 1]
        if used.size:
            enabled[values.pick(used)] = 0
        else:  # no request holds a token (all in a gap, or T = 0): defensive already;
            enabled[values.one(0, num_slots - 1)] = 0  # a listed slot is disabled
    lora_ids = np.arange(num_slots, dtype=np.int64)
    if "slot-out-of-range" in features:
        keep = _disabled_positions(lora_ids, enabled) if features & _DISABLING else ()
        lora_ids = _out_of_range_slots(values, lora_ids, num_slots, keep)
    return LoraLayout(None, seg.astype(np.int32), req.astype(np.int32),
                      lora_ids.astype(np.int32), enabled.astype(np.int32))


def _covered_span(draw: st.DrawFn, values: Values, num_tokens: int,
                  min_len: int) -> tuple[int, int]:
    """``[start, stop)`` with at least ``min_len`` tokens, leaving a gap before or after."""
    kinds = ("head", "tail") + (("both",) if num_tokens >= min_len + 2 else ())
    kind = draw(_sampled_from(kinds))
    if kind == "head":
        return values.one(1, num_tokens - min_len), num_tokens
    if kind == "tail":
        return 0, values.one(min_len, num_tokens - 1)
    start = values.one(1, num_tokens - 1 - min_len)
    return start, values.one(start + min_len, num_tokens - 1)


def _request_bounds(draw: st.DrawFn, values: Values, start: int, stop: int,
                    min_reqs: int) -> list[int]:
    """``seg_indptr`` of requests of at least one token each, tiling ``[start, stop)``;
    the count is drawn, the cuts come from ``values``."""
    span = stop - start
    most = MAX_REQUESTS if span <= ELEMENTWISE_MAX_ROUTES else MAX_REQUESTS_LARGE
    count = draw(_integers(min_reqs, max(min_reqs, min(span, most))))
    cuts = np.sort(values.rng.choice(span - 1, size=count - 1, replace=False) + start + 1
                   ).tolist() if count > 1 else []
    return [start, *cuts, stop]
