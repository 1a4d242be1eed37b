"""The sizes of a case (``T``, ``K``, ``E``, ``B``, ``L``, dtype, routing) for its
foci, inside the declared limits, and the out-of-domain probes that cross one."""

from __future__ import annotations

import functools

import numpy as np
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from ..classify import (
    BOUNDARY_ROUTES,
    HUGE_BATCH_MIN_ROUTES,
    KERNEL_MAX_EXPERTS,
    MANY_EXPERTS_MIN,
    SMALL_PATH_MAX_EXPERTS,
)
from ..dialects import DIALECT_INFO
from ..limits import UNBOUNDED, Limits
from ._base import ELEMENTWISE_MAX_ROUTES, _integers, _sampled_from
from ._ids import ROUTINGS
from ._plan import _bounds, _Plan, _protected_routes
from .components import BLOCK_SIZES, ODD_BLOCK_SIZES, expert_counts

#: Most tokens of an ordinary (not large) case.
DEFAULT_MAX_TOKENS = 64
#: Most tokens of a medium broad case, and of a ``huge-batch`` case.
MEDIUM_MAX_TOKENS = 2048
HUGE_MIN_TOKENS, HUGE_MAX_TOKENS = 16384, 40000
#: Largest ``L`` of a case with many routes or experts (keeps ``[L, P]`` small).
LARGE_CASE_MAX_LORAS = 8
#: Block sizes of a ``block-edges`` case with ``B > N``.
WIDE_BLOCK_SIZES = (16, 32, 64, 128)


def _draw_sizes(draw: st.DrawFn, plan: _Plan, max_tokens: int, allow_large: bool) -> None:
    """``T``, ``K``, ``E``, ``B``, ``L``, dtype and routing for the plan's foci, inside
    the plan's limits.  Each is drawn once, the way its focus asks (a value drawn and
    then overridden would make different draws give the same case)."""
    foci = plan.foci
    block = draw(_sampled_from(("one", "odd", "wide"))) if "block-edges" in foci else None
    # T and K: at most one of these foci decides them (see _CONFLICTS).
    if "huge-batch" in foci:
        topks = _huge_topks(plan.limits)
        plan.topk = draw(_integers(4, 8) if topks == (4, 5, 6, 7, 8)
                         else _sampled_from(topks))
        fewest = max(HUGE_MIN_TOKENS, -(-HUGE_BATCH_MIN_ROUTES // plan.topk))
        most = min(plan.bounds("num_tokens")[1], plan.bounds("num_routes")[1] // plan.topk)
        if most <= HUGE_MAX_TOKENS and plan.values.chance(0.25):
            plan.num_tokens = most  # at the declared bound
        else:
            most = min(most, HUGE_MAX_TOKENS if plan.values.chance(0.25) else fewest + 1024)
            plan.num_tokens = draw(_integers(max(fewest, plan.bounds("num_tokens")[0]),
                                               most))
    elif "path-boundary" in foci:
        limit = max(MEDIUM_MAX_TOKENS, max_tokens) if allow_large else max_tokens
        least_topk = 2 if "duplicate-route" in foci else 1
        routes, topk = draw(_sampled_from(
            _boundary_topks(limit, least_topk, plan.limits) or
            _boundary_topks(limit, 1, plan.limits)))
        plan.topk, plan.num_tokens = topk, routes // topk
    elif block == "wide" and "empty-batch" not in foci:  # B > N: few routes, a wide block
        plan.block_size = draw(_block_sizes_within(plan, WIDE_BLOCK_SIZES))
        plan.topk = draw(_integers(1, min(8, plan.block_size - 1)))
        most = max(1, min(max_tokens, (plan.block_size - 1) // plan.topk))
        plan.num_tokens = draw(_integers(1, most))
    else:
        if "empty-batch" in foci:
            plan.num_tokens = 0
        elif not foci and allow_large and plan.values.chance(0.1):
            plan.num_tokens = _within(draw, plan, "num_tokens", max_tokens + 1,
                                      max(MEDIUM_MAX_TOKENS, max_tokens + 1))
        else:
            plan.num_tokens = _within(draw, plan, "num_tokens", 1, max_tokens)
        plan.topk = _within(draw, plan, "topk", 1, 8)

    # the kernel of a dialect with a -1 segment sees E + 1 buckets
    extra = int(DIALECT_INFO[plan.dialect].sentinel_segment)
    low_e, high_e = plan.bounds("num_experts")
    near_path = tuple(e - extra for e in (SMALL_PATH_MAX_EXPERTS, SMALL_PATH_MAX_EXPERTS + 1)
                      if low_e <= e - extra <= high_e)
    if "many-experts" in foci:
        if high_e != UNBOUNDED and plan.values.chance(0.75):
            plan.num_experts = draw(_sampled_from(  # at the declared bound
                tuple(e for e in (high_e, high_e - 1)
                      if e >= max(low_e, MANY_EXPERTS_MIN - extra))))
        else:
            top = KERNEL_MAX_EXPERTS - extra if high_e == UNBOUNDED else high_e
            plan.num_experts = draw(_integers(max(MANY_EXPERTS_MIN - extra, low_e), top))
    elif "path-boundary" in foci and near_path and plan.values.chance(0.75):
        plan.num_experts = draw(_sampled_from(near_path))
    else:
        plan.num_experts = draw(_expert_counts_within(plan))

    if plan.dialect == "ep-remap":
        plan.block_size = 1  # ep-remap has no block size; keep the field canonical
    elif "huge-batch" in foci:
        plan.block_size = draw(_block_sizes_within(plan, BLOCK_SIZES[:-1]))
    elif block == "one":
        plan.block_size = 1
    elif block == "odd":
        plan.block_size = draw(_block_sizes_within(plan, ODD_BLOCK_SIZES))
    elif block == "wide":
        if "empty-batch" in foci:  # an empty batch has B > N already
            plan.block_size = draw(_block_sizes_within(plan, WIDE_BLOCK_SIZES))
    else:
        plan.block_size = draw(_block_sizes_within(plan, BLOCK_SIZES))
    plan.dtype = np.int64 if "int64-ids" in foci or plan.values.chance(0.25) else np.int32
    plan.routing = "uniform" if foci else draw(_sampled_from(ROUTINGS))
    if plan.lora:
        plan.max_loras = (_within(draw, plan, "max_loras", 9, 32) if plan.values.chance(0.1)
                          else _within(draw, plan, "max_loras", 1, 8))

    # Content foci, then the least sizes they need.
    if "hot-expert" in foci:
        plan.routing = "hot"
    elif "empty-expert" in foci:
        plan.routing = "missing"
    if "duplicate-route" in foci:
        plan.topk = max(plan.topk, 2)
    if "full-slots-with-base" in foci:
        # SGLang may need a request per slot, one without adapter and a gap.
        spare = 2 if plan.dialect == "sglang-lora" else 1
        plan.max_loras = max(1, min(plan.max_loras, max_tokens - spare))
        plan.num_tokens = max(plan.num_tokens, plan.max_loras + spare)
    if plan.dialect == "sglang-lora" and plan.wants("disabled-adapter") and (
            plan.contract == "production" or plan.wants("slot-out-of-range")):
        # A slot no request uses, or a lora_ids entry beside the disabled one.
        plan.max_loras = max(plan.max_loras, 2)
    if plan.routing == "hot" and plan.num_routes < 2:
        _at_least_routes(plan, 2)
    if plan.routing == "missing" or "empty-expert" in foci:
        plan.num_experts = max(plan.num_experts, 2)
    if plan.wants("invalid-expert-id"):
        # room beside the routes the foci protect: two to the hot expert, a duplicate
        # pair (with both, four routes may all be protected: five then)
        if plan.num_routes < 4:
            plan.topk = max(plan.topk, min(4, plan.bounds("topk")[1]))
        _at_least_routes(plan, int(_protected_routes(plan).sum())
                         + 2 * ("duplicate-route" in foci) + 1)
    if block == "wide" and plan.dialect != "ep-remap" and plan.block_size <= plan.num_routes:
        plan.block_size = draw(_block_sizes_within(plan, ODD_BLOCK_SIZES))  # still block-edges
    if plan.lora and (plan.num_routes > ELEMENTWISE_MAX_ROUTES
                      or plan.num_experts >= MANY_EXPERTS_MIN):
        plan.max_loras = min(plan.max_loras, LARGE_CASE_MAX_LORAS)
    if plan.limits:
        _fit_routes(plan)



# -- sizes inside declared limits ---------------------------------------------------------
def _within(draw: st.DrawFn, plan: _Plan, name: str, low: int, high: int) -> int:
    """An integer of ``[low, high]`` inside the declared bounds of ``name``; when the
    two do not meet, of the declared range's nearest stretch as wide. Without limits
    exactly ``st.integers(low, high)``."""
    lo, hi = plan.bounds(name)
    a, b = max(low, lo), min(high, hi)
    if a > b:
        a, b = (hi, hi) if hi < low else (lo, min(hi, lo + high - low))
    return draw(_integers(a, b))


def _expert_counts_within(plan: _Plan) -> SearchStrategy[int]:
    """:func:`expert_counts` of ``1..256`` inside the ``num_experts`` bounds; a declared
    maximum and the count below it are notable counts (drawn often)."""
    return _expert_counts_between(*plan.bounds("num_experts"), bool(plan.limits))


@functools.lru_cache(maxsize=1024)
def _expert_counts_between(lo: int, hi: int, limited: bool) -> SearchStrategy[int]:
    if not limited or (lo, hi) == (0, UNBOUNDED):
        return expert_counts(1, 256)
    a, b = max(1, lo), min(256, hi)
    if a > b:
        a, b = (hi, hi) if hi < 1 else (max(1, lo), min(hi, max(1, lo) + 255))
    edge = tuple(e for e in (hi, hi - 1) if hi != UNBOUNDED and max(1, lo) <= e)
    return st.one_of(expert_counts(a, b), st.sampled_from(edge)) if edge else expert_counts(a, b)


def _block_sizes_within(plan: _Plan, options: tuple[int, ...]) -> SearchStrategy[int]:
    """One of ``options`` inside the ``block_size`` bounds (the nearest bound if none)."""
    lo, hi = plan.bounds("block_size")
    inside = tuple(b for b in options if lo <= b <= hi)
    if inside:
        return _sampled_from(inside)
    return st.just(max(1, lo) if options[0] < lo else hi)


def _at_least_routes(plan: _Plan, routes: int) -> None:
    """Raise ``K`` (within its bounds, at most 8), then ``T``, until ``N >= routes``."""
    if plan.num_routes >= routes or plan.num_tokens == 0:
        return
    k_high = min(max(8, plan.topk), plan.bounds("topk")[1])
    plan.topk = max(plan.topk, min(k_high, -(-routes // plan.num_tokens)))
    if plan.num_routes < routes:
        plan.num_tokens = -(-routes // plan.topk)


def _fit_routes(plan: _Plan) -> None:
    """``T`` moved into the ``num_routes`` bounds where ``K`` allows it (a case that
    cannot fit is rejected after it is built)."""
    lo, hi = plan.bounds("num_routes")
    if plan.num_tokens and plan.num_routes > hi:
        plan.num_tokens = max(1, hi // plan.topk)
    elif plan.num_routes < lo:
        plan.num_tokens = -(-lo // plan.topk)


def _huge_topks(limits: Limits) -> tuple[int, ...]:
    """The ``K`` of ``4..8`` (or below, when ``topk`` is bounded so) a ``huge-batch`` case
    can have inside ``limits``."""
    k_lo, k_hi = _bounds(limits, "topk")
    t_hi = min(_bounds(limits, "num_tokens")[1], HUGE_MAX_TOKENS)
    n_hi = _bounds(limits, "num_routes")[1]
    ks = [k for k in range(max(1, k_lo), min(8, k_hi) + 1)]
    preferred = tuple(k for k in ks if k >= 4) or tuple(ks)
    return tuple(k for k in preferred
                 if max(HUGE_MIN_TOKENS, -(-HUGE_BATCH_MIN_ROUTES // k)) <= t_hi
                 and max(HUGE_MIN_TOKENS, -(-HUGE_BATCH_MIN_ROUTES // k)) * k <= n_hi)


#: Out-of-domain probes cross one of these limits (P and R are derived or drawn late).
_PROBED = ("num_experts", "num_tokens", "topk", "block_size", "max_loras", "num_routes")
#: Least allowed value and the most a probe goes to (a probe stays a cheap case).
_PROBE_RANGE = {"num_experts": (1, 1 << 16), "num_tokens": (1, 1 << 16), "topk": (1, 64),
                "block_size": (1, 1 << 12), "max_loras": (1, 64), "num_routes": (1, 1 << 20)}


def _probe_values(name: str, bounds: tuple[int, int]) -> tuple[int, ...]:
    """The values just outside ``bounds`` a probe of ``name`` can take."""
    if name not in _PROBED:
        return ()
    least, most = _PROBE_RANGE[name]
    low, high = bounds
    return tuple(v for v in (high + 1, low - 1) if least <= v <= most)


def _cross_a_limit(draw: st.DrawFn, plan: _Plan) -> str | None:
    """Put one size of a probe just outside its declared bound; returns the limit's
    name, or None when no bound applies to the plan."""
    options = [(name, value) for name, bounds in sorted(plan.limits.items())
               for value in _probe_values(name, bounds)
               if not (name == "max_loras" and not plan.lora)
               and not (name == "block_size" and plan.dialect == "ep-remap")]
    if not options:
        return None
    name, value = draw(_sampled_from(tuple(options)))
    plan.routing = "uniform"  # nothing protected: defensive ingredients always fit
    if name == "num_experts":
        plan.num_experts = value
    elif name == "num_tokens":
        plan.num_tokens = value
    elif name == "topk":
        plan.topk = value
    elif name == "block_size":
        plan.block_size = value
    elif name == "max_loras":
        plan.max_loras = value
    else:
        plan.num_tokens = max(1, -(-value // plan.topk))
        if plan.num_routes != value and value % plan.topk:
            plan.topk, plan.num_tokens = 1, value
    plan.limits = {}  # the rest is drawn as for any case (without EP, see _draw_ep)
    return name


def _boundary_topks(max_tokens: int, least_topk: int = 1,
                    limits: Limits | None = None) -> tuple[tuple[int, int], ...]:
    """``(N, K)`` with ``N`` at the small-path switch, ``K >= least_topk`` and
    ``N // K <= max_tokens``, inside the ``num_routes``/``topk``/``num_tokens`` bounds
    of ``limits``."""
    limits = limits or {}
    routes = BOUNDARY_ROUTES

    def inside(name: str, value: int) -> bool:
        low, high = _bounds(limits, name)
        return low <= value <= high

    return tuple((n, k) for n in routes for k in range(least_topk, 9)
                 if n % k == 0 and n // k <= max_tokens and inside("num_routes", n)
                 and inside("topk", k) and inside("num_tokens", n // k))

