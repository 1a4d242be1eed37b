"""The edge classes (SPEC §8) and the contract (SPEC §7) of a case, read from its data.

Tags are computed from the arrays of a :class:`~difftest.case.Case`, never from
what a generator meant to build, so a tag is always true of the case it sits
on — also after a shrinker has changed the case.  Both functions accept any
well-formed case (hand-written, replayed, shrunk) and never raise for odd
values: an input outside the production layout is simply defensive.

Definitions.  ``N = T * K``; "valid route": a route whose ``topk_ids`` value is
in ``[0, E)`` with ``E = case.num_experts`` (``G`` under EP); "kernel ``E``":
the expert count one rank's call receives (the local count under the
``local_ids`` dispatch, else ``E``); "mapping": the per-token slot
(``token_lora_mapping`` for vLLM; for SGLang, ``req_to_lora`` spread over
``seg_indptr``, ``-1`` for tokens outside every request).

=========================  ====================================================
``full-slots-with-base``   LoRA: the mapping uses all ``L`` slots and has base
                           tokens (``-1``); vLLM also needs a real slot at
                           ``lora_ids[L]`` (so the production layout puts one
                           there)
``base-only``              LoRA, ``T > 0``: every token's mapping is ``-1``
``disabled-adapter``       LoRA: some ``l`` in ``lora_ids`` with ``0 <= l < L``
                           has ``adapter_enabled[l] == 0``
``slot-out-of-range``      LoRA: ``lora_ids`` holds a value ``>= L``
``ep-sentinel``            EP, ``ep-remap`` or the ``local_ids`` dispatch: some
                           rank of ``ep.ranks`` gets a ``-1`` route (a route
                           foreign to it, or an id outside ``[0, G)``);
                           ``sglang-align``: also a ``-1`` id of the case's own
``expert-map``             not ``ep-remap``: some rank's call gets an
                           ``expert_map`` with ``-1`` entries (EP ``expert_map``
                           dispatch, or the case's own ``expert_map``)
``non-divisible-experts``  EP with ``G % R != 0``
``path-boundary``          not ``ep-remap``: ``N`` in {1023, 1024, 1025}, or a
                           kernel ``E`` in {64, 65} with ``1000 <= N <= 1100``
                           (:data:`SMALL_PATH_MAX_ROUTES`,
                           :data:`SMALL_PATH_MAX_EXPERTS`: our kernels switch
                           paths there)
``hot-expert``             at least 2 valid routes, all to one expert
``empty-expert``           some expert in ``[0, E)`` gets no valid route while
                           another gets one
``block-edges``            not ``ep-remap``: ``B == 1``, ``B > N`` or ``B`` not a
                           power of two
``empty-batch``            ``T == 0``
``int64-ids``              ``topk_ids`` is int64
``many-experts``           a kernel ``E >=`` :data:`MANY_EXPERTS_MIN` (close to
                           :data:`KERNEL_MAX_EXPERTS`)
``duplicate-route``        a token has the same valid expert id twice
``loose-padding``          not ``ep-remap``: ``max_num_tokens_padded`` is given
                           and larger than some rank's production size
``huge-batch``             ``N > 65535`` (:data:`HUGE_BATCH_MIN_ROUTES`)
``invalid-expert-id``      some ``topk_ids`` value outside ``[0, E)`` — the
                           case's own ids; the ``-1`` a ``local_ids`` dispatch
                           creates is ``ep-sentinel``, not this (``sglang-align``:
                           outside ``[-1, E)``, its contract routes ``-1``)
``request-gap``            SGLang, ``T > 0``: a token outside every request
=========================  ====================================================

Contract: a case is ``defensive`` when :func:`defensive_reasons` finds any of
``T == 0``; an invalid expert id (``sglang-align``: outside ``[-1, E)``); an
explicit ``P`` other than the production size; for vLLM a mapping value outside
``[-1, L)``, ``lora_ids`` other than ``oracle.active_lora_ids(mapping, L)``,
``adapter_enabled`` shorter than ``L + 1`` or a listed slot disabled; for
SGLang ``seg_indptr`` not covering ``[0, T)`` (a request gap, or not
non-decreasing), a ``req_to_lora`` value outside ``[0, L)``, ``lora_ids`` other
than ``arange(L)``, ``adapter_enabled`` shorter than ``L``, or a slot the batch
uses disabled (SGLang may disable slots no request uses: that stays
``production``). Otherwise it is ``production``.
"""

from __future__ import annotations

import functools

import numpy as np

import oracle
import oracle.ep
from cuda_impl.declared import SMALL_PATH_MAX_EXPERTS, SMALL_PATH_MAX_ROUTES

from .case import LORA_DIALECTS, Case, production_padded_size
from .dialects import DIALECT_INFO

__all__ = [
    "HUGE_BATCH_MIN_ROUTES",
    "KERNEL_MAX_EXPERTS",
    "MANY_EXPERTS_MIN",
    "SMALL_PATH_MAX_EXPERTS",
    "SMALL_PATH_MAX_ROUTES",
    "BOUNDARY_ROUTES",
    "contract_of",
    "defensive_reasons",
    "edge_classes_of",
    "kernel_num_experts",
    "size_class",
]

# Our CUDA kernels' path switch (declared in cuda_impl.declared, read here without torch):
# a batch of at most SMALL_PATH_MAX_ROUTES (1023) routes and at most SMALL_PATH_MAX_EXPERTS
# (64) experts takes the small path; the sizes around both are ``path-boundary``.
#: The routes ``N`` of ``path-boundary``: the small path's last, the large path's first
#: and the next.
BOUNDARY_ROUTES = (SMALL_PATH_MAX_ROUTES, SMALL_PATH_MAX_ROUTES + 1, SMALL_PATH_MAX_ROUTES + 2)
#: The most experts ``many-experts`` cases have when the implementation declares no
#: ``num_experts`` limit (``difftest.limits``; the usual kernel maximum, e.g. our CUDA
#: kernels' ``MAX_EXPERTS``). With a declared maximum they aim at it instead.
KERNEL_MAX_EXPERTS = 1024
#: From here on a kernel ``E`` counts as ``many-experts``.
MANY_EXPERTS_MIN = 896
#: ``N`` from here on is ``huge-batch`` (past a 16-bit grid dimension).
HUGE_BATCH_MIN_ROUTES = 65536

#: The size classes of a case (:func:`size_class`), smallest first.
SIZE_CLASSES = ("decode", "mid", "huge")

_BOUNDARY_EXPERTS = (SMALL_PATH_MAX_EXPERTS, SMALL_PATH_MAX_EXPERTS + 1)
_BOUNDARY_ROUTE_WINDOW = (1000, 1100)


def size_class(case: Case) -> str:
    """``decode`` (``N`` up to :data:`SMALL_PATH_MAX_ROUTES`, 1023: a decode step, the
    kernels' small path), ``huge`` (``huge-batch``: ``N`` from :data:`HUGE_BATCH_MIN_ROUTES`, a
    long prefill) or ``mid`` (between: a short prefill); campaigns batch cases per size
    class, and ``bench/campaign.py`` reports per class."""
    n = case.num_routes
    if n <= SMALL_PATH_MAX_ROUTES:
        return "decode"
    return "huge" if n >= HUGE_BATCH_MIN_ROUTES else "mid"


def edge_classes_of(case: Case) -> tuple[str, ...]:
    """The SPEC §8 edge classes ``case`` exercises, sorted (see the module docstring)."""
    ids = case.topk_ids
    flat = ids.reshape(-1)
    n = flat.size
    num_experts = case.num_experts
    remap = case.dialect == "ep-remap"
    all_valid = _all_in_range(flat, num_experts)
    valid_ids = flat if all_valid else flat[(flat >= 0) & (flat < num_experts)]
    counts = np.bincount(valid_ids, minlength=num_experts)  # routes per expert
    experts_used = int(np.count_nonzero(counts))
    kernel_experts = kernel_num_experts(case)
    found: list[str] = []

    if case.num_tokens == 0:
        found.append("empty-batch")
    if ids.dtype == np.int64:
        found.append("int64-ids")
    if n > HUGE_BATCH_MIN_ROUTES - 1:
        found.append("huge-batch")
    if not (all_valid or _only_sentinels(case, flat)):
        found.append("invalid-expert-id")
    if max(kernel_experts) >= MANY_EXPERTS_MIN:
        found.append("many-experts")
    if valid_ids.size >= 2 and experts_used == 1:
        found.append("hot-expert")
    if 0 < experts_used < num_experts:
        found.append("empty-expert")
    if _has_duplicate_route(ids, num_experts, all_valid):
        found.append("duplicate-route")
    if not remap:
        b = case.block_size
        if b == 1 or b > n or b & (b - 1):
            found.append("block-edges")
        low, high = _BOUNDARY_ROUTE_WINDOW
        if n in BOUNDARY_ROUTES or (
            low <= n <= high and any(e in _BOUNDARY_EXPERTS for e in kernel_experts)
        ):
            found.append("path-boundary")
        padded = case.max_num_tokens_padded
        if padded is not None and padded > min(_production_padded_sizes(case)):
            found.append("loose-padding")
        if _has_expert_map_with_gaps(case):
            found.append("expert-map")
    if case.ep is not None:
        if case.ep.global_num_experts % case.ep.ep_size:
            found.append("non-divisible-experts")
        if (remap or case.ep.dispatch == "local_ids") and _some_rank_gets_sentinel(
                case, counts if all_valid and num_experts == case.ep.global_num_experts
                else None):
            found.append("ep-sentinel")
    if (DIALECT_INFO[case.dialect].sentinel_segment and "ep-sentinel" not in found
            and (flat == -1).any()):
        found.append("ep-sentinel")
    if case.dialect in LORA_DIALECTS:
        found.extend(_lora_classes(case))
    return tuple(sorted(found))


def contract_of(case: Case) -> str:
    """``"defensive"`` when :func:`defensive_reasons` finds anything, else ``"production"``."""
    return "defensive" if defensive_reasons(case) else "production"


def defensive_reasons(case: Case) -> tuple[str, ...]:
    """Why ``case`` is outside the production contract (SPEC §7); empty when it is not.

    Each reason is a short phrase naming the input, e.g. ``"lora_ids not the
    production layout"``.
    """
    reasons: list[str] = []
    flat = case.topk_ids.reshape(-1)
    if case.num_tokens == 0:
        reasons.append("empty batch")
    if DIALECT_INFO[case.dialect].sentinel_segment:
        if not _all_in_range(flat + 1, case.num_experts + 1):
            reasons.append("expert id outside [-1, E)")
    elif not _all_in_range(flat, case.num_experts):
        reasons.append("expert id outside [0, E)")
    if case.dialect != "ep-remap" and case.max_num_tokens_padded is not None:
        if any(case.max_num_tokens_padded != p for p in _production_padded_sizes(case)):
            reasons.append("max_num_tokens_padded not the production size")
    if case.dialect == "vllm-lora":
        reasons.extend(_vllm_reasons(case))
    elif case.dialect == "sglang-lora":
        reasons.extend(_sglang_reasons(case))
    return tuple(reasons)


# -- LoRA ---------------------------------------------------------------------
def _lora_classes(case: Case) -> list[str]:
    found: list[str] = []
    num_slots = case.max_loras
    mapping = token_slots(case)
    lora_ids = _lora_ids(case)
    enabled = case.adapter_enabled
    if mapping.size:
        base = mapping == -1
        if base.all():
            found.append("base-only")
        elif base.any():
            real = mapping[(mapping >= 0) & (mapping < num_slots)]
            uses_all = np.count_nonzero(np.bincount(real, minlength=num_slots)) == num_slots
            real_at_end = case.dialect != "vllm-lora" or (
                lora_ids is not None and lora_ids.size > num_slots
                and 0 <= lora_ids[num_slots] < num_slots)
            if uses_all and real_at_end:
                found.append("full-slots-with-base")
    if lora_ids is not None and lora_ids.size:
        if (lora_ids >= num_slots).any():
            found.append("slot-out-of-range")
        if enabled is not None:
            listed = lora_ids[(lora_ids >= 0) & (lora_ids < min(num_slots, enabled.size))]
            if listed.size and (enabled[listed] == 0).any():
                found.append("disabled-adapter")
    if case.dialect == "sglang-lora" and case.num_tokens and not _requests_cover_all(case):
        found.append("request-gap")
    return found


def token_slots(case: Case) -> np.ndarray:
    """The slot of every token of a LoRA case, int64 ``[T]`` (``-1``: no adapter).

    vLLM: ``token_lora_mapping``.  SGLang: request ``r`` covers tokens
    ``seg_indptr[r] <= t < seg_indptr[r + 1]`` with slot ``req_to_lora[r]``;
    tokens outside every request get ``-1`` (SPEC §5).  Works on malformed
    request tables too (a later request wins where requests overlap).
    """
    num_tokens = case.num_tokens
    if case.dialect == "vllm-lora":
        if case.token_lora_mapping is None:
            return np.full(num_tokens, -1, dtype=np.int64)
        return case.token_lora_mapping.astype(np.int64).reshape(-1)
    seg = _seg_indptr(case)
    req = np.zeros(0, np.int64) if case.req_to_lora is None else case.req_to_lora.astype(np.int64)
    mapping = np.full(num_tokens, -1, dtype=np.int64)
    if _non_decreasing(seg) and req.size >= seg.size - 1:
        # One lookup per token: the last request starting at or before it.
        tokens = np.arange(num_tokens)
        r = np.searchsorted(seg, tokens, side="right") - 1
        inside = (r >= 0) & (r < seg.size - 1)
        inside[inside] &= tokens[inside] < seg[r[inside] + 1]
        mapping[inside] = req[r[inside]]
    else:
        for r in range(min(seg.size - 1, req.size)):
            mapping[max(seg[r], 0) : max(seg[r + 1], 0)] = req[r]
    return mapping


def _vllm_reasons(case: Case) -> list[str]:
    reasons: list[str] = []
    num_slots = case.max_loras
    mapping = token_slots(case)
    if num_slots < 1:
        return ["max_loras < 1"]
    if mapping.size != case.num_tokens:
        return ["token_lora_mapping does not have one entry per token"]
    if not _all_in_range(mapping + 1, num_slots + 1):
        reasons.append("token_lora_mapping outside [-1, L)")
    elif case.lora_ids is not None:
        if not np.array_equal(case.lora_ids, production_lora_ids(mapping, num_slots)):
            reasons.append("lora_ids not the production layout")
    enabled = case.adapter_enabled
    if enabled is not None:
        if enabled.size < num_slots + 1:
            reasons.append("adapter_enabled shorter than L + 1")
        listed = _lora_ids(case)
        if listed is not None:
            listed = listed[(listed >= 0) & (listed < min(num_slots, enabled.size))]
            if listed.size and (enabled[listed] == 0).any():
                reasons.append("a listed adapter is disabled")
    return reasons


def _sglang_reasons(case: Case) -> list[str]:
    reasons: list[str] = []
    num_slots = case.max_loras
    if num_slots < 1:
        return ["max_loras < 1"]
    seg = _seg_indptr(case)
    req = case.req_to_lora
    if req is None or req.size != max(seg.size - 1, 0):
        reasons.append("req_to_lora does not have one entry per request")
    elif req.size and ((req < 0) | (req >= num_slots)).any():
        reasons.append("req_to_lora outside [0, L)")
    if not _requests_cover_all(case):
        reasons.append("requests do not cover every token")
    if case.lora_ids is not None and not np.array_equal(
            case.lora_ids, np.arange(num_slots)):
        reasons.append("lora_ids not arange(L)")
    enabled = case.adapter_enabled
    if enabled is not None:
        if enabled.size < num_slots:
            reasons.append("adapter_enabled shorter than L")
        mapping = token_slots(case)
        used = np.unique(mapping[(mapping >= 0) & (mapping < min(num_slots, enabled.size))])
        listed = _lora_ids(case)
        used = np.intersect1d(used, listed)
        if used.size and (enabled[used] == 0).any():
            reasons.append("an adapter the batch uses is disabled")
    return reasons


def _lora_ids(case: Case) -> np.ndarray | None:
    """``lora_ids`` as the call receives it (the dialect's default when ``None``)."""
    if case.lora_ids is not None:
        return case.lora_ids.astype(np.int64).reshape(-1)
    if case.dialect == "sglang-lora":
        return np.arange(case.max_loras, dtype=np.int64)
    mapping = token_slots(case)
    if case.max_loras < 1 or not _all_in_range(mapping + 1, case.max_loras + 1):
        return None
    return production_lora_ids(mapping, case.max_loras)


def production_lora_ids(token_lora_mapping: np.ndarray, max_loras: int) -> np.ndarray:
    """``oracle.active_lora_ids`` (SPEC §4) for a valid mapping, int64, by counting.

    Counting slots is several times faster than the oracle's ``np.unique`` on
    a large batch; the tests pin that both agree.
    """
    present = np.flatnonzero(np.bincount(token_lora_mapping + 1, minlength=max_loras + 1)) - 1
    lora_ids = np.full(max_loras + 1, -1, dtype=np.int64)
    lora_ids[: present.size] = present
    return lora_ids


def _seg_indptr(case: Case) -> np.ndarray:
    if case.seg_indptr is None:
        return np.zeros(1, dtype=np.int64)
    return case.seg_indptr.astype(np.int64).reshape(-1)


def _non_decreasing(seg: np.ndarray) -> bool:
    return bool(seg.size == 0 or (np.diff(seg) >= 0).all())


def _requests_cover_all(case: Case) -> bool:
    """Requests form one non-decreasing table starting at 0 and ending at ``T``."""
    seg = _seg_indptr(case)
    if not seg.size or not _non_decreasing(seg):
        return False
    if case.num_tokens == 0:
        return True
    return int(seg[0]) <= 0 and int(seg[-1]) >= case.num_tokens


# -- experts --------------------------------------------------------------------
def _all_in_range(values: np.ndarray, high: int) -> bool:
    """Every value in ``[0, high)`` (true for no value); two passes, no temporaries."""
    return values.size == 0 or (int(values.min()) >= 0 and int(values.max()) < high)


def _only_sentinels(case: Case, flat: np.ndarray) -> bool:
    """sglang-align: every id outside ``[0, E)`` is ``-1`` (part of its contract)."""
    return DIALECT_INFO[case.dialect].sentinel_segment and _all_in_range(
        flat + 1, case.num_experts + 1)


def _has_duplicate_route(ids: np.ndarray, num_experts: int, all_valid: bool) -> bool:
    # Column pairs (K <= 8: at most 28) beat sorting every row.
    num_tokens, topk = ids.shape
    if topk < 2 or num_tokens == 0:
        return False
    columns = np.ascontiguousarray(ids.T)
    valid = None if all_valid else (columns >= 0) & (columns < num_experts)
    for i in range(topk - 1):
        for j in range(i + 1, topk):
            same = columns[i] == columns[j]
            if valid is not None:
                same &= valid[i]
            if same.any():
                return True
    return False


@functools.lru_cache(maxsize=256)
def _placement(global_num_experts: int, ep_size: int, strategy: str
               ) -> tuple[tuple[int, ...], np.ndarray]:
    """Local expert count of every rank, and the owning rank of every global expert."""
    counts = []
    owner = np.zeros(global_num_experts, dtype=np.int64)
    for rank in range(ep_size):
        owned = oracle.ep.owned_experts(global_num_experts, ep_size, rank, strategy)
        counts.append(int(owned.size))
        owner[owned] = rank
    owner.setflags(write=False)
    return tuple(counts), owner


def _rank_num_experts(case: Case) -> tuple[int, ...]:
    """The experts ``E`` of each rank's call (one entry without EP)."""
    ep = case.ep
    if ep is None or case.dialect == "ep-remap" or ep.dispatch != "local_ids":
        return (case.num_experts,)
    counts, _ = _placement(ep.global_num_experts, ep.ep_size, ep.strategy)
    return tuple(counts[r] for r in ep.ranks)


def kernel_num_experts(case: Case) -> tuple[int, ...]:
    """The ``num_experts`` each rank's kernel receives: ``E``, or ``E + 1`` buckets for
    a dialect whose ``-1`` routes form a segment of their own (sglang-align)."""
    extra = int(DIALECT_INFO[case.dialect].sentinel_segment)
    return tuple(e + extra for e in _rank_num_experts(case))


def _production_padded_sizes(case: Case) -> tuple[int, ...]:
    n, b = case.num_routes, case.block_size
    return tuple(production_padded_size(case.dialect, n, max(e, 1), b)
                 for e in _rank_num_experts(case))


def _has_expert_map_with_gaps(case: Case) -> bool:
    ep = case.ep
    if ep is None:
        return case.expert_map is not None and bool((case.expert_map == -1).any())
    if ep.dispatch != "expert_map" or ep.ep_size == 1:
        return False  # rank_inputs passes no map then
    counts, _ = _placement(ep.global_num_experts, ep.ep_size, ep.strategy)
    return any(counts[r] < ep.global_num_experts for r in ep.ranks)


def _some_rank_gets_sentinel(case: Case, counts: np.ndarray | None) -> bool:
    """``counts``: routes per global expert when every id is in ``[0, G)``, else None."""
    ep = case.ep
    flat = case.topk_ids.reshape(-1)
    if flat.size == 0 or not ep.ranks:
        return False
    if counts is None:
        if not _all_in_range(flat, ep.global_num_experts):
            return True  # every rank gets -1 for an id outside [0, G)
        counts = np.bincount(flat, minlength=ep.global_num_experts)
    _, owner = _placement(ep.global_num_experts, ep.ep_size, ep.strategy)
    owners = np.zeros(ep.ep_size, dtype=bool)
    owners[owner[counts > 0]] = True
    # Every rank except a route's owner sees that route as -1.
    return any(not owners[r] or owners.sum() > 1 for r in ep.ranks)
