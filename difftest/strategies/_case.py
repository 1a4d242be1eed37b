"""The case builder: :func:`cases`, the foci it builds a case around, the defensive
ingredients it adds, its EP group, and the assembly of one :class:`~difftest.case.Case`."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
from hypothesis import reject
from hypothesis import strategies as st
from hypothesis.errors import UnsatisfiedAssumption
from hypothesis.strategies import SearchStrategy

from ..case import (
    CONTRACTS,
    DIALECTS,
    DISPATCH_FORMS,
    EDGE_CLASSES,
    Case,
    EPGroup,
    production_padded_size,
)
from ..classify import MANY_EXPERTS_MIN, contract_of, defensive_reasons, edge_classes_of
from ..dialects import DIALECT_INFO
from ..errors import UsageError
from ..limits import Limits, in_domain, validate, violations
from ._base import (
    Diverged,
    Tape,
    Values,
    _check_choice,
    _draw_seed,
    _draw_style,
    _integers,
    _rank_counts,
    _sampled_from,
)
from ._ids import _direct_map, _force_duplicate, _inject_invalid_ids, _invalid_ids, _routed_ids
from ._lora import _sglang_layout, _vllm_layout
from ._plan import _bounds, _Plan, _protected_routes
from ._sizes import (
    DEFAULT_MAX_TOKENS,
    MEDIUM_MAX_TOKENS,
    _boundary_topks,
    _cross_a_limit,
    _draw_sizes,
    _huge_topks,
    _probe_values,
)
from .components import ep_groups

#: Edge classes a case of each dialect can be built around (any contract);
#: each dialect's ``DialectInfo.edge_focus``.
EDGE_FOCUS: dict[str, tuple[str, ...]] = {d: i.edge_focus for d, i in DIALECT_INFO.items()}

#: Edge classes that only defensive inputs have, per dialect (SPEC §7);
#: each dialect's ``DialectInfo.defensive_only``.
DEFENSIVE_ONLY: dict[str, tuple[str, ...]] = {
    d: i.defensive_only for d, i in DIALECT_INFO.items()}

_CLASHES = {("base-only", "disabled-adapter"), ("full-slots-with-base", "lora-layout")}


# -- focus ----------------------------------------------------------------------
def focus_classes(dialect: str, contract: str, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                  allow_large: bool = True,
                  limits: Limits | None = None) -> tuple[str, ...]:
    """The classes :func:`cases` builds cases of ``dialect`` and ``contract`` around.

    :data:`EDGE_FOCUS` of the dialect, without :data:`DEFENSIVE_ONLY` classes
    for ``production``, and without the classes the size limits rule out
    (``huge-batch`` needs ``allow_large``; ``path-boundary`` needs
    ``allow_large`` or ``max_tokens >= 128``; LoRA ``full-slots-with-base``
    needs ``max_tokens >= 2``), nor those the declared ``limits``
    (:mod:`difftest.limits`) rule out (``many-experts`` needs
    ``num_experts`` up to :data:`MANY_EXPERTS_MIN`, ``empty-batch`` allows
    ``T = 0``, ``huge-batch`` and ``path-boundary`` need their sizes).
    """
    _check_choice("dialect", dialect, DIALECTS)
    _check_choice("contract", contract, CONTRACTS)
    limits = validate(limits)
    out = []
    for name in EDGE_FOCUS[dialect]:
        if contract == "production" and name in DEFENSIVE_ONLY[dialect]:
            continue
        if name == "huge-batch" and not (allow_large and _huge_topks(limits)):
            continue
        limit = max(MEDIUM_MAX_TOKENS, max_tokens) if allow_large else max_tokens
        if name == "path-boundary" and not _boundary_topks(limit, 1, limits):
            continue
        if name == "full-slots-with-base" and max_tokens < 2:
            continue
        if not _reachable(name, limits):
            continue
        out.append(name)
    return tuple(out)



def _reachable(name: str, limits: Limits) -> bool:
    """Whether focus ``name`` can be built inside ``limits`` (sizes aside, see callers)."""
    if not limits:
        return True
    if name == "many-experts":
        return _bounds(limits, "num_experts")[1] >= MANY_EXPERTS_MIN
    if name == "empty-batch":
        return _bounds(limits, "num_tokens")[0] == 0 == _bounds(limits, "num_routes")[0]
    if name == "duplicate-route":
        return _bounds(limits, "topk")[1] >= 2
    return True


def probes_possible(limits: Limits | None) -> bool:
    """Whether ``limits`` have a bound an out-of-domain probe can cross (see :func:`cases`)."""
    return any(_probe_values(name, bounds) for name, bounds in validate(limits).items())


def cases(dialects: Sequence[str] | None = None,
          contracts: Sequence[str] = CONTRACTS, *,
          max_tokens: int = DEFAULT_MAX_TOKENS,
          allow_large: bool = True,
          classes: Sequence[str] | None = None,
          limits: Limits | None = None,
          out_of_domain: int = 0) -> SearchStrategy[Case]:
    """Cases of the given ``dialects`` (default: all) and ``contracts``, each built
    around a focus edge class (see the module docstring).

    ``max_tokens`` bounds ``T`` of ordinary cases;
    with ``allow_large`` some cases are larger on purpose (``path-boundary``
    up to 1025 tokens, broad cases up to :data:`MEDIUM_MAX_TOKENS`,
    ``huge-batch`` 16384..40000 tokens with ``K`` 4..8).  Every case has
    ``edge_classes == edge_classes_of(case)`` and ``contract ==
    contract_of(case)``, one of ``contracts``.

    ``classes`` focuses the cases on those edge classes: every case is built
    around at least one of them (no ``"broad"`` case), and only the dialects
    and contracts that can reach one of them are drawn. A class that is not an
    edge class, or that none of ``dialects`` × ``contracts`` can focus on, is a
    :class:`~difftest.errors.UsageError`.
    ``limits`` (:mod:`difftest.limits`) is the implementation's declared domain:
    every case is inside it, and the boundary classes aim at its bounds
    (``many-experts`` at ``E = max`` and ``max - 1``, ``huge-batch`` and
    ``path-boundary`` within the ``T``/``K``/``N`` bounds; plain cases often
    get ``E = max``). With ``out_of_domain = n`` one case in ``n`` (``1``:
    every case) is instead an *out-of-domain probe*: a broad case with one
    declared bound of ``num_tokens``, ``topk``, ``num_experts``,
    ``block_size``, ``max_loras`` or ``num_routes`` crossed by one (never
    ``max_num_tokens_padded`` or ``ep_size``), its note
    ``"out-of-domain probe: num_experts=993 > 992"``.

    Shrinks towards the first dialect and contract, a ``"broad"`` focus, one
    token with one route to expert 0, ``B = 1``, int32 ids, no EP, one
    adapter slot, seed 0 and the ``"small"`` value style (the values themselves
    shrink with :mod:`difftest.shrink`).
    """
    return _strategy(_cases, dialects, contracts, max_tokens, allow_large, classes, limits,
                     out_of_domain)


def families(size: int, dialects: Sequence[str] | None = None,
             contracts: Sequence[str] = CONTRACTS, *,
             max_tokens: int = DEFAULT_MAX_TOKENS,
             allow_large: bool = True,
             classes: Sequence[str] | None = None,
             limits: Limits | None = None,
             out_of_domain: int = 0) -> SearchStrategy[list[Case]]:
    """Families of up to ``size`` cases, each of them a case of :func:`cases` (same
    arguments): the first is the case :func:`cases` draws from the same choices, the
    others its *siblings*, built from the same draws and the same coin flips of the
    structure (:meth:`~._base.Values.chance`) with values of other seeds
    (:meth:`~._base.Values.sibling`) — the same dialect, contract, foci, sizes, EP
    group and layout decisions, other ids, slots, positions.  A sibling equal to a case
    of its family (nothing to vary: an empty batch, a one-route case) is built again
    with its integer draws (``K``, ``L``, ``T`` where drawn so) drawn anew in their
    ranges; it may still be equal to one.  A sibling whose values (or sizes) steer the
    builder to a draw or coin its first case did not make, or outside ``limits``, is
    left out.

    A family costs Hypothesis one example: its draws and engine work are what a
    campaign spends most of its time on for a small case (``bench/campaign.py``)."""
    if not isinstance(size, int) or size < 1:
        raise UsageError(f"size={size!r}: must be an integer >= 1 (cases per family)")
    return _strategy(functools.partial(_families, size), dialects, contracts, max_tokens,
                     allow_large, classes, limits, out_of_domain)


def _strategy(build: Any, dialects: Sequence[str] | None, contracts: Sequence[str],
              max_tokens: int, allow_large: bool, classes: Sequence[str] | None,
              limits: Limits | None, out_of_domain: int) -> SearchStrategy:
    """``build`` (:func:`_cases` or :func:`_families` of a size) for the arguments,
    checked."""
    dialects = tuple(DIALECTS if dialects is None else dialects)
    contracts = tuple(contracts)
    if not dialects:
        raise UsageError("dialects=(): name at least one dialect")
    if not contracts:
        raise UsageError("contracts=(): name at least one contract")
    for name in dialects:
        _check_choice("dialects", name, DIALECTS)
    for name in contracts:
        _check_choice("contracts", name, CONTRACTS)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise UsageError(f"max_tokens={max_tokens!r}: must be an integer >= 1")
    if not isinstance(out_of_domain, int) or out_of_domain < 0:
        raise UsageError(f"out_of_domain={out_of_domain!r}: must be an integer >= 0 "
                         "(one case in that many is a probe; 0: none)")
    limits = validate(limits)
    probes = out_of_domain if probes_possible(limits) else 0
    items = tuple(sorted(limits.items()))
    if classes is None:
        return build(dialects, contracts, max_tokens, bool(allow_large),
                     limit_items=items, out_of_domain=probes)
    focus = _focus_of(classes, dialects, contracts, max_tokens, bool(allow_large), limits)
    return st.sampled_from(sorted(focus)).flatmap(
        lambda pair: build((pair[0],), (pair[1],), max_tokens, bool(allow_large),
                           focus[pair], limit_items=items, out_of_domain=probes))


def _focus_of(classes: Sequence[str], dialects: tuple[str, ...], contracts: tuple[str, ...],
              max_tokens: int, allow_large: bool,
              limits: Limits | None = None) -> dict[tuple[str, str], tuple[str, ...]]:
    """Per (dialect, contract) that can reach one of ``classes``, the ones it can reach."""
    classes = tuple(classes)
    if not classes:
        raise UsageError("classes=(): name at least one edge class")
    for name in classes:
        _check_choice("classes", name, EDGE_CLASSES)
    focus = {}
    for dialect in dialects:
        for contract in contracts:
            reachable = focus_classes(dialect, contract, max_tokens=max_tokens,
                                      allow_large=allow_large, limits=limits)
            wanted = tuple(c for c in reachable if c in classes)
            if wanted:
                focus[(dialect, contract)] = wanted
    missed = [c for c in classes if not any(c in w for w in focus.values())]
    if not focus or missed:
        reachable = sorted({c for d in dialects for k in contracts for c in focus_classes(
            d, k, max_tokens=max_tokens, allow_large=allow_large, limits=limits)})
        raise UsageError(
            f"classes={list(classes)}: no case of {', '.join(dialects)} "
            f"({', '.join(contracts)}) can be built around {', '.join(missed or classes)}; "
            f"these can: {', '.join(reachable)}")
    return focus




# -- the case builder -----------------------------------------------------------------
# Focus pairs one case cannot have at once (sizes, dispatch or slots contradict).
_CONFLICTS = frozenset(frozenset(pair) for pair in (
    ("huge-batch", "path-boundary"), ("huge-batch", "many-experts"),
    ("huge-batch", "block-edges"), ("path-boundary", "block-edges"),
    ("ep-sentinel", "expert-map"), ("ep-sentinel", "many-experts"),
    ("full-slots-with-base", "base-only"), ("base-only", "disabled-adapter"),
))
# Classes random data hits often anyway (int64 one case in four, B = 1 or
# odd or > N, K >= 2 over few experts): drawn as a focus less often.
_OFTEN = frozenset(("int64-ids", "block-edges", "duplicate-route", "empty-expert"))
# Foci kept only this often when drawn (not with cases(classes=...)): a huge-batch
# case costs the time of ~100 others to run; kept every time, it would be a quarter
# of the distinct cases, twice the share of the next largest class of sizes.
_KEPT = {"huge-batch": 0.7}
# Foci that need at least one token; they exclude empty-batch.
_NEEDS_TOKENS = frozenset((
    "huge-batch", "path-boundary", "hot-expert", "empty-expert", "duplicate-route",
    "invalid-expert-id", "ep-sentinel", "full-slots-with-base", "base-only", "request-gap",
    "disabled-adapter",
))


def _compatible(first: str, second: str, dialect: str) -> bool:
    if "broad" in (first, second) or first == second:
        return True
    if (DIALECT_INFO[dialect].sentinel_segment and "many-experts" in (first, second)
            and {first, second} & {"ep-sentinel", "non-divisible-experts"}):
        return False  # EP reaches it only as local ids: the kernel sees the local count
    if "empty-batch" in (first, second):
        return not {first, second} & _NEEDS_TOKENS
    return frozenset((first, second)) not in _CONFLICTS



@st.composite
def _cases(draw: st.DrawFn, *args: Any, **kwargs: Any) -> Case:
    return _build(draw, None, *args, **kwargs)[0]


@st.composite
def _families(draw: st.DrawFn, size: int, *args: Any, **kwargs: Any) -> list[Case]:
    tape = Tape(draw)
    first, values = _build(tape.record, None, *args, **kwargs)
    family, ids = [first], {first.case_id}
    for index in range(1, size):
        try:
            sibling = _build(tape.replay(), values.sibling(index), *args, **kwargs)[0]
            if sibling.case_id in ids:  # no values to vary (an empty batch): vary the sizes
                vary = np.random.default_rng([values.seed, index, 1])
                sibling = _build(tape.replay(vary), values.sibling(index), *args,
                                 **kwargs)[0]
        except (Diverged, UnsatisfiedAssumption):
            continue  # the sibling's values led elsewhere, or out of the declared domain
        family.append(sibling)
        ids.add(sibling.case_id)
    return family


def _build(draw: Any, sibling: Values | None, dialects: tuple[str, ...],
           contracts: tuple[str, ...], max_tokens: int, allow_large: bool,
           only: tuple[str, ...] | None = None, limit_items: tuple = (),
           out_of_domain: int = 0) -> tuple[Case, Values]:
    """One case from ``draw`` (Hypothesis', or a :class:`~._base.Tape`'s) and its values;
    with ``sibling``, the seed drawn is replaced by those values."""
    dialect = draw(_sampled_from(dialects))
    contract = draw(_sampled_from(contracts))
    limits: Limits = dict(limit_items)
    # the seed first: the weighted coin flips of the structure come from it too
    values = _draw_seed(draw)
    if sibling is not None:
        values = sibling
    probe = out_of_domain == 1 or (out_of_domain > 1 and values.chance(1 / out_of_domain))
    # Hypothesis does not draw one sampled_from evenly: over a few hundred
    # examples some options get a third of their share.  So a case gets up to
    # three foci — one of any class, two more of the classes random data seldom
    # hits (not in _OFTEN) — each kept when it fits those before it.  With
    # ``only`` (cases(classes=...)) the first focus is one of those, never broad.
    options = focus_classes(dialect, contract, max_tokens=max_tokens, allow_large=allow_large,
                            limits=limits)
    if only is not None:
        options = tuple(f for f in options if f in only)
    seldom = tuple(f for f in options if f not in _OFTEN)
    chosen: list[str] = []
    if not probe:  # a probe is a broad case with one size out of the domain
        drawn = [draw(_sampled_from(options if only is not None else ("broad",) + options))]
        drawn += [draw(_sampled_from(("broad",) + seldom)) for _ in range(2)]
        for name in drawn:
            if (name != "broad" and all(_compatible(name, other, dialect) for other in chosen)
                    and (only is not None or values.chance(_KEPT.get(name, 1.0)))):
                chosen.append(name)
    foci = frozenset(chosen)
    plan = _Plan(dialect, contract, foci, limits=limits, probe=probe, values=values)
    _draw_ingredients(draw, plan)
    _draw_sizes(draw, plan, max_tokens, allow_large)
    crossed = _cross_a_limit(draw, plan) if probe else None
    _draw_ep(draw, plan)

    # the structure is drawn: every value of the case comes from the seed
    _draw_style(draw, values, plan.num_routes)
    ids = _routed_ids(values, plan.num_tokens, plan.topk, plan.num_experts, plan.dtype,
                      plan.routing)
    protected = _protected_routes(plan)
    if "duplicate-route" in foci:
        protected |= _force_duplicate(values, ids)
    sentinel_ok = DIALECT_INFO[dialect].sentinel_segment
    if plan.wants("invalid-expert-id"):
        _inject_invalid_ids(values, ids, protected, plan.num_experts,
                            _invalid_ids(plan.num_experts, plan.dtype, sentinel_ok))
        flat = ids.reshape(-1)
        protected |= (flat < 0) | (flat >= plan.num_experts)  # not undone by the -1 below
    if sentinel_ok and plan.ep is None and plan.values.chance(0.25):
        _inject_invalid_ids(values, ids, protected, plan.num_experts, (-1,))  # production

    fields: dict = {}
    if plan.lora:
        _lora_features(plan)
        layout = (_vllm_layout if dialect == "vllm-lora" else _sglang_layout)(
            draw, values, plan.num_tokens, plan.max_loras, frozenset(plan.lora_features))
        fields.update(layout._asdict())
    if plan.direct_map:
        fields["expert_map"] = _direct_map(values, plan.num_experts)
    padded = None
    if plan.wants("loose-padding") and dialect != "ep-remap":
        padded = _loose_padded_size(draw, plan)
    if dialect == "sglang-align":
        # SGLang's own callers pass True; older callers and its tests also False
        fields["pad_sorted_token_ids"] = not plan.values.chance(0.25)
        fields["ignore_invalid_expert"] = plan.values.chance(0.25)

    note = "focus=" + ("+".join(sorted(foci)) if foci else "broad")
    case = Case(dialect=dialect, contract=contract, topk_ids=ids,
                num_experts=plan.num_experts, block_size=plan.block_size,
                max_loras=plan.max_loras, max_num_tokens_padded=padded, ep=plan.ep,
                seed=values.seed, note=note, **fields)
    actual = contract_of(case)
    if actual != contract and contract == "defensive" and dialect != "ep-remap":
        # A defensive ingredient that came out void (no route left to make
        # invalid): loose padding is defensive for every case with a P.
        case = case.replace(max_num_tokens_padded=_loose_padded_size(draw, plan))
        actual = contract_of(case)
    if actual != contract:
        raise AssertionError(  # a bug of this module, never of the input
            f"generated a {actual} case for contract={contract!r} ({note}, "
            f"reasons={defensive_reasons(case)})")
    outside = violations(case, limits) if crossed else []
    if outside:
        note = f"out-of-domain probe: {', '.join(outside)}; {note}"
    elif limits and not in_domain(case, limits):
        reject()  # a size derived from the others (P, N, a rank's E) left the domain
    return case.replace(edge_classes=edge_classes_of(case), note=note,
                        case_id=case.case_id), values


def _loose_padded_size(draw: st.DrawFn, plan: _Plan) -> int:
    """Production ``P`` of the whole batch with ``G`` experts, plus 1..3B (any multiple)."""
    base = production_padded_size(plan.dialect, plan.num_routes, plan.num_experts,
                                  plan.block_size)
    return base + draw(_integers(1, 3 * plan.block_size))



def _draw_ingredients(draw: st.DrawFn, plan: _Plan) -> None:
    """Defensive inputs for a defensive case none of whose foci is one."""
    self_defensive = set(DEFENSIVE_ONLY[plan.dialect])
    if plan.dialect == "sglang-lora":
        self_defensive.add("disabled-adapter")  # built as a used slot disabled
    if plan.contract != "defensive" or plan.foci & self_defensive:
        return
    pool = tuple(i for i in DIALECT_INFO[plan.dialect].ingredients
                 if not any((f, i) in _CLASHES for f in plan.foci))
    plan.ingredients = frozenset(draw(_ingredient_lists(pool)))


@functools.lru_cache(maxsize=256)
def _ingredient_lists(pool: tuple[str, ...]) -> SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(pool), min_size=1, max_size=2, unique=True)


def _draw_ep(draw: st.DrawFn, plan: _Plan) -> None:
    """An EP group (or a case-level ``expert_map``) when a focus needs one, or by chance."""
    foci = plan.foci
    dispatches: tuple[str, ...] = DISPATCH_FORMS
    if plan.probe and plan.dialect != "ep-remap":
        return  # a rank's local expert count would hide a crossed num_experts
    if plan.dialect == "ep-remap":
        wanted, dispatches = True, ("expert_map",)  # dispatch plays no part in remap
    elif "ep-sentinel" in foci:
        wanted, dispatches = True, ("local_ids",)
    elif "expert-map" in foci:
        plan.direct_map = ("non-divisible-experts" not in foci and plan.num_experts <= 256
                           and plan.values.chance(0.25))
        wanted, dispatches = not plan.direct_map, ("expert_map",)
    elif "non-divisible-experts" in foci:
        wanted = True
    else:
        wanted = plan.values.chance(0.2)
        if not wanted and not foci and plan.num_experts <= 256:
            plan.direct_map = plan.values.chance(0.05)
    if plan.dialect == "sglang-align":
        # SGLang's align takes no expert_map: EP reaches it as local ids with -1
        plan.direct_map, dispatches = False, ("local_ids",)
        wanted = wanted and "many-experts" not in foci  # the kernel must see all G experts
    if not wanted:
        return
    if "many-experts" in foci:
        dispatches = ("expert_map",)  # the kernel must see all G experts
    ep_foci = {"ep-sentinel", "expert-map", "non-divisible-experts"}
    min_ranks = 2 if foci & ep_foci else 1
    non_divisible = True if "non-divisible-experts" in foci else None
    if dispatches == ("local_ids",):
        plan.num_experts = max(plan.num_experts, 3 if non_divisible else 2)
    if non_divisible and not any(plan.num_experts % r for r in range(2, 9)):
        plan.num_experts += 1  # e.g. 840 is divisible by every ep_size in 2..8
    max_ranks = 8
    if plan.limits:  # ep_size inside its declared bounds, or no EP where none fits
        low, high = plan.bounds("ep_size")
        min_ranks, max_ranks = max(min_ranks, low), min(max_ranks, high)
        if not any(_rank_counts(plan.num_experts, d, min_ranks, max_ranks, non_divisible)
                   for d in dispatches):
            if plan.dialect == "ep-remap" or foci & ep_foci:
                reject()
            return
    plan.ep = draw(_ep_groups(plan.num_experts, min_ranks, tuple(dispatches), non_divisible,
                              max_ranks))


@functools.lru_cache(maxsize=4096)
def _ep_groups(num_experts: int, min_ranks: int, dispatches: tuple[str, ...],
               non_divisible: bool | None, max_ranks: int = 8) -> SearchStrategy[EPGroup]:
    # building a composite strategy inspects its function: once per argument set
    return ep_groups(num_experts, min_ranks=min_ranks, max_ranks=max_ranks,
                     dispatches=dispatches, non_divisible=non_divisible)


def _lora_features(plan: _Plan) -> None:
    features, sglang = plan.lora_features, plan.dialect == "sglang-lora"
    for name in ("full-slots-with-base", "base-only", "slot-out-of-range", "request-gap",
                 "lora-layout", "unassigned-request"):
        if plan.wants(name):
            features.add(name)
    if plan.wants("disabled-adapter"):
        if not sglang:
            features.add("disable-listed")
        else:
            features.add("disable-unused" if plan.contract == "production" else "disable-used")

