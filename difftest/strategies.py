"""Hypothesis strategies for MoE alignment cases (SPEC §7 contracts, §8 edge classes).

:func:`cases` is what campaigns draw from; the component strategies
(:func:`block_sizes`, :func:`expert_counts`, :func:`topk_ids_arrays`,
:func:`lora_layouts`, :func:`ep_groups`) are the pieces it is made of, public so
that a test can draw just the part it needs.

How a case is built.  Edge classes that matter are rare under uniform random
data (a batch using *all* ``L`` adapters plus base tokens, ``N = 1024``, a
foreign route under EP), so :func:`cases` does not wait for luck: it draws up
to three *foci* — edge classes of :data:`EDGE_FOCUS` that the dialect and
contract can reach (:func:`focus_classes`), or ``"broad"`` for none — keeps
those that fit together, and builds the case around them: sizes, the routing
of the expert ids, the LoRA layout and the EP group are drawn so that every
focus class holds.  (Three draws, because Hypothesis does not spread one
``sampled_from`` evenly: over a few hundred examples an option may get a third
of its share; the union of three draws is even enough for every class to be
frequent.)  Everything the foci leave open is drawn broadly (``T``, ``K``
1..8, ``E`` 1..256, ``B``, ``L`` 1..8 and sometimes up to 32, int32/int64, EP
on one case in five), so that bugs nobody listed are found too.  A defensive
case none of whose foci is a defensive input gets one or two defensive
*ingredients* (loose ``P``, invalid expert ids, ``lora_ids >= L``, a disabled
adapter, a broken ``lora_ids`` layout, an SGLang request gap or request without
adapter) chosen so as not to undo a focus.  Finally the case is tagged from its
data by :func:`difftest.classify.edge_classes_of` and
:func:`~difftest.classify.contract_of` — tags are never the generator's
intention; ``Case.note`` records the foci (``"focus=hot-expert+int64-ids"``) —
and a case whose contract is not the one asked for is a bug of this module
(``AssertionError``).

Small and large cases.  Up to :data:`ELEMENTWISE_MAX_ROUTES` routes every id,
slot and request boundary is its own Hypothesis choice, so the shrinker can
simplify each one (ids towards 0, slots towards 0, fewer requests).  Larger
cases (path boundaries, medium and huge batches) are built by NumPy from a
drawn seed (``np.random.default_rng``, kept in ``Case.seed``) and a few drawn
parameters, so they take milliseconds; they shrink through those parameters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
from hypothesis import reject
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

import oracle

from .case import (
    CONTRACTS,
    DIALECTS,
    DISPATCH_FORMS,
    EDGE_CLASSES,
    LORA_DIALECTS,
    STRATEGIES,
    Case,
    EPGroup,
    production_padded_size,
)
from .classify import (
    HUGE_BATCH_MIN_ROUTES,
    KERNEL_MAX_EXPERTS,
    MANY_EXPERTS_MIN,
    SMALL_PATH_MAX_EXPERTS,
    SMALL_PATH_MAX_ROUTES,
    contract_of,
    defensive_reasons,
    edge_classes_of,
)
from .dialects import DIALECT_INFO
from .errors import UsageError
from .limits import UNBOUNDED, Limits, in_domain, validate, violations

__all__ = [
    "BLOCK_SIZES",
    "DEFAULT_MAX_TOKENS",
    "DEFENSIVE_ONLY",
    "EDGE_FOCUS",
    "ELEMENTWISE_MAX_ROUTES",
    "LORA_FEATURES",
    "LoraLayout",
    "ROUTINGS",
    "block_sizes",
    "cases",
    "ep_groups",
    "expert_counts",
    "focus_classes",
    "lora_layouts",
    "probes_possible",
    "topk_ids_arrays",
]

#: Most tokens of an ordinary (not large) case.
DEFAULT_MAX_TOKENS = 64
#: Up to this many routes ids are drawn one by one (shrinkable); above, from a seed.
ELEMENTWISE_MAX_ROUTES = 512
#: Block sizes drawn by default; 1 first, so examples shrink towards no padding.
BLOCK_SIZES = (1, 2, 3, 4, 8, 16, 32, 64, 128)
#: Block sizes that are not powers of two (``block-edges``).
ODD_BLOCK_SIZES = (3, 5, 6, 7, 12, 24, 48, 96)
#: Expert counts worth hitting on purpose (powers of two and their neighbours).
NOTABLE_EXPERT_COUNTS = (1, 2, 3, 8, 16, 63, 64, 65, 127, 128, 255, 256)
#: How expert ids are spread: all experts, the first three, all but one, one.
ROUTINGS = ("uniform", "low", "missing", "hot")
#: Most tokens of a medium (seeded) broad case, and of a ``huge-batch`` case.
MEDIUM_MAX_TOKENS = 2048
HUGE_MIN_TOKENS, HUGE_MAX_TOKENS = 16384, 40000
#: Largest ``L`` of a case with many routes or experts (keeps ``[L, P]`` small).
LARGE_CASE_MAX_LORAS = 8

#: Edge classes a case of each dialect can be built around (any contract);
#: each dialect's ``DialectInfo.edge_focus``.
EDGE_FOCUS: dict[str, tuple[str, ...]] = {d: i.edge_focus for d, i in DIALECT_INFO.items()}

#: Edge classes that only defensive inputs have, per dialect (SPEC §7);
#: each dialect's ``DialectInfo.defensive_only``.
DEFENSIVE_ONLY: dict[str, tuple[str, ...]] = {
    d: i.defensive_only for d, i in DIALECT_INFO.items()}

_CLASHES = {("base-only", "disabled-adapter"), ("full-slots-with-base", "lora-layout")}

#: Features :func:`lora_layouts` can build in (see its docstring).
LORA_FEATURES = (
    "full-slots-with-base", "base-only", "disable-listed", "disable-unused", "disable-used",
    "slot-out-of-range", "lora-layout", "request-gap", "unassigned-request",
)


class LoraLayout(NamedTuple):
    """The LoRA inputs of one case; fields of the other dialect are ``None``."""

    token_lora_mapping: np.ndarray | None  # vLLM, int32 [T]
    seg_indptr: np.ndarray | None  # SGLang, int32 [requests + 1]
    req_to_lora: np.ndarray | None  # SGLang, int32 [requests]
    lora_ids: np.ndarray  # int32, vLLM [L + 1], SGLang [L]
    adapter_enabled: np.ndarray  # int32, vLLM [L + 1], SGLang [L]


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


def _bounds(limits: Limits, name: str) -> tuple[int, int]:
    return limits.get(name, (0, UNBOUNDED))


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


# -- component strategies -----------------------------------------------------------
def block_sizes(*, edges: bool = False) -> SearchStrategy[int]:
    """Block sizes from :data:`BLOCK_SIZES`, or with ``edges`` 1 and sizes that are
    not powers of two (:data:`ODD_BLOCK_SIZES`).  Shrinks towards 1."""
    return st.sampled_from((1,) + ODD_BLOCK_SIZES if edges else BLOCK_SIZES)


def expert_counts(min_value: int = 1, max_value: int = 256) -> SearchStrategy[int]:
    """Expert counts in ``[min_value, max_value]``, often one of
    :data:`NOTABLE_EXPERT_COUNTS` (64, 65, 128, ...).  Shrinks towards ``min_value``."""
    if not 1 <= min_value <= max_value:
        raise UsageError(f"min_value={min_value}, max_value={max_value}: need "
                         "1 <= min_value <= max_value")
    notable = tuple(e for e in NOTABLE_EXPERT_COUNTS if min_value <= e <= max_value)
    plain = st.integers(min_value, max_value)
    return st.one_of(plain, st.sampled_from(notable)) if notable else plain


def topk_ids_arrays(num_tokens: int, topk: int, num_experts: int, *,
                    dtypes: Sequence[type] = (np.int32, np.int64),
                    routings: Sequence[str] = ROUTINGS) -> SearchStrategy[np.ndarray]:
    """``topk_ids`` arrays ``[num_tokens, topk]`` with ids in ``[0, num_experts)``.

    ``routings`` (:data:`ROUTINGS`): ``"uniform"`` any expert, ``"low"`` only
    experts 0..2, ``"missing"`` every expert but one drawn expert, ``"hot"``
    one expert for every route.  Up to :data:`ELEMENTWISE_MAX_ROUTES` routes
    each id is drawn alone and shrinks towards 0 (and the array towards int32,
    ``"uniform"``); larger arrays come from a drawn NumPy seed.
    """
    for dtype in dtypes:
        if np.dtype(dtype) not in (np.dtype(np.int32), np.dtype(np.int64)):
            raise UsageError(f"dtypes contains {dtype!r}: topk_ids are int32 or int64")
    for routing in routings:
        _check_choice("routing", routing, ROUTINGS)
    if num_tokens < 0 or topk < 1 or num_experts < 1:
        raise UsageError(f"num_tokens={num_tokens}, topk={topk}, num_experts={num_experts}: "
                         "need num_tokens >= 0, topk >= 1, num_experts >= 1")

    @st.composite
    def arrays(draw: st.DrawFn) -> np.ndarray:
        dtype = draw(st.sampled_from(tuple(dtypes)))
        routing = draw(st.sampled_from(tuple(routings)))
        if routing == "missing" and num_experts < 2:
            routing = "uniform"
        rng = _generator(draw)[1] if num_tokens * topk > ELEMENTWISE_MAX_ROUTES else None
        return _draw_ids(draw, num_tokens, topk, num_experts, dtype, routing, rng)

    return arrays()


def lora_layouts(num_tokens: int, max_loras: int, *, dialect: str = "vllm-lora",
                 features: Sequence[str] = ()) -> SearchStrategy[LoraLayout]:
    """The LoRA inputs (:class:`LoraLayout`) of a ``dialect`` batch of ``num_tokens``.

    Without ``features`` the layout is production (SPEC §4/§5): vLLM slots in
    ``[-1, L)`` with ``lora_ids = oracle.active_lora_ids``; SGLang requests
    covering every token with slots in ``[0, L)`` and ``lora_ids = arange(L)``;
    ``adapter_enabled`` is 1 for every slot the batch uses (others 0 or 1).
    ``features`` (:data:`LORA_FEATURES`) build in: ``"full-slots-with-base"``
    (all ``L`` slots and base tokens), ``"base-only"``, ``"disable-listed"``
    (vLLM: a listed slot disabled), ``"disable-unused"`` (SGLang: a slot no
    request uses disabled — production), ``"disable-used"`` (SGLang),
    ``"slot-out-of-range"`` (``lora_ids`` entries ``>= L``), ``"lora-layout"``
    (vLLM ``lora_ids`` duplicated, unsorted or listing an unused slot),
    ``"request-gap"`` and ``"unassigned-request"`` (SGLang, ``req_to_lora = -1``).

    Small batches shrink towards every token on slot 0 (vLLM) or one request
    on slot 0 (SGLang), every adapter enabled; batches of more than
    :data:`DEFAULT_MAX_TOKENS` tokens come from a drawn seed.
    """
    _check_choice("dialect", dialect, LORA_DIALECTS)
    for name in features:
        _check_choice("features", name, LORA_FEATURES)
    if num_tokens < 0 or max_loras < 1:
        raise UsageError(f"num_tokens={num_tokens}, max_loras={max_loras}: need "
                         "num_tokens >= 0 and max_loras >= 1")
    wanted = frozenset(features)
    least_tokens = 1 if wanted & {"base-only", "disable-listed", "disable-used",
                                  "request-gap"} else 0
    if "full-slots-with-base" in wanted:
        least_tokens = max_loras + (2 if dialect == "sglang-lora" else 1)
    if num_tokens < least_tokens or ("disable-unused" in wanted and max_loras < 2):
        raise UsageError(f"num_tokens={num_tokens}, max_loras={max_loras}: too small for "
                         f"features={tuple(features)}")

    @st.composite
    def layouts(draw: st.DrawFn) -> LoraLayout:
        rng = _generator(draw)[1] if num_tokens > DEFAULT_MAX_TOKENS else None
        if dialect == "vllm-lora":
            return _draw_vllm_layout(draw, num_tokens, max_loras, wanted, rng)
        return _draw_sglang_layout(draw, num_tokens, max_loras, wanted, rng)

    return layouts()


def ep_groups(global_num_experts: int, *, min_ranks: int = 1, max_ranks: int = 8,
              dispatches: Sequence[str] = DISPATCH_FORMS,
              strategies: Sequence[str] = STRATEGIES,
              non_divisible: bool | None = None) -> SearchStrategy[EPGroup]:
    """EP groups over ``global_num_experts`` experts; ``ranks`` is every rank, so
    conservation (SPEC §6) can be checked.

    ``ep_size`` is in ``[min_ranks, max_ranks]``, usually 2..4; with the
    ``local_ids`` dispatch at most ``G`` (a rank needs an expert to have a
    local count); ``non_divisible`` ``True``/``False`` asks for
    ``G % ep_size != 0`` / ``== 0``.  Shrinks towards the smallest allowed
    ``ep_size`` in 2..4, ``"linear"`` placement and the first dispatch form.
    Raises :class:`~difftest.errors.UsageError` when no ``ep_size`` fits.
    """
    num_global = int(global_num_experts)
    for name in dispatches:
        _check_choice("dispatches", name, DISPATCH_FORMS)
    for name in strategies:
        _check_choice("strategies", name, STRATEGIES)
    options = {d: _rank_counts(num_global, d, min_ranks, max_ranks, non_divisible)
               for d in dispatches}
    usable = tuple(d for d in dispatches if options[d])
    if num_global < 1 or not usable:
        raise UsageError(
            f"global_num_experts={num_global}, min_ranks={min_ranks}, max_ranks={max_ranks}, "
            f"dispatches={tuple(dispatches)}, non_divisible={non_divisible}: no ep_size fits")

    @st.composite
    def groups(draw: st.DrawFn) -> EPGroup:
        dispatch = draw(st.sampled_from(usable))
        counts = options[dispatch]
        usual = tuple(r for r in counts if 2 <= r <= 4) or counts
        ep_size = draw(st.one_of(st.sampled_from(usual), st.sampled_from(counts)))
        strategy = draw(st.sampled_from(tuple(strategies)))
        return EPGroup(num_global, ep_size, strategy, dispatch, tuple(range(ep_size)))

    return groups()


def cases(dialects: Sequence[str] | None = None,
          contracts: Sequence[str] = CONTRACTS, *,
          max_tokens: int = DEFAULT_MAX_TOKENS,
          allow_large: bool = True,
          classes: Sequence[str] | None = None,
          limits: Limits | None = None,
          out_of_domain: int = 0) -> SearchStrategy[Case]:
    """Cases of the given ``dialects`` (default: all) and ``contracts``, each built
    around a focus edge class (see the module docstring).

    ``max_tokens`` bounds ``T`` of ordinary cases (drawn element by element);
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
    adapter slot.
    """
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
        return _cases(dialects, contracts, max_tokens, bool(allow_large),
                      limit_items=items, out_of_domain=probes)
    focus = _focus_of(classes, dialects, contracts, max_tokens, bool(allow_large), limits)
    return st.sampled_from(sorted(focus)).flatmap(
        lambda pair: _cases((pair[0],), (pair[1],), max_tokens, bool(allow_large),
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


@dataclass
class _Plan:
    """What the builder has decided so far about one case."""

    dialect: str
    contract: str
    foci: frozenset[str]
    num_tokens: int = 1
    topk: int = 1
    num_experts: int = 1
    block_size: int = 1
    max_loras: int = 0
    dtype: type = np.int32
    routing: str = "uniform"
    ep: EPGroup | None = None
    direct_map: bool = False
    ingredients: frozenset[str] = frozenset()
    lora_features: set[str] = field(default_factory=set)
    limits: Limits = field(default_factory=dict)
    probe: bool = False  # an out-of-domain probe (see cases)

    def bounds(self, name: str) -> tuple[int, int]:
        """The declared ``(min, max)`` of limit ``name`` (``(0, UNBOUNDED)`` when none)."""
        return _bounds(self.limits, name)

    @property
    def num_routes(self) -> int:
        return self.num_tokens * self.topk

    @property
    def lora(self) -> bool:
        return self.dialect in LORA_DIALECTS

    def wants(self, name: str) -> bool:
        """Whether a focus or an ingredient asks for ``name``."""
        return name in self.foci or name in self.ingredients


@st.composite
def _cases(draw: st.DrawFn, dialects: tuple[str, ...], contracts: tuple[str, ...],
           max_tokens: int, allow_large: bool, only: tuple[str, ...] | None = None,
           limit_items: tuple = (), out_of_domain: int = 0) -> Case:
    dialect = draw(st.sampled_from(dialects))
    contract = draw(st.sampled_from(contracts))
    limits: Limits = dict(limit_items)
    probe = bool(out_of_domain) and (out_of_domain == 1 or
                                     draw(st.integers(0, out_of_domain - 1)) == out_of_domain - 1)
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
        drawn = [draw(st.sampled_from(options if only is not None else ("broad",) + options))]
        drawn += [draw(st.sampled_from(("broad",) + seldom)) for _ in range(2)]
        for name in drawn:
            if name != "broad" and all(_compatible(name, other, dialect) for other in chosen):
                chosen.append(name)
    foci = frozenset(chosen)
    plan = _Plan(dialect, contract, foci, limits=limits, probe=probe)
    _draw_ingredients(draw, plan)
    _draw_sizes(draw, plan, max_tokens, allow_large)
    crossed = _cross_a_limit(draw, plan) if probe else None
    _draw_ep(draw, plan)

    large = plan.num_routes > ELEMENTWISE_MAX_ROUTES or plan.num_tokens > max_tokens
    seed, rng = _generator(draw) if large else (None, None)
    ids = _draw_ids(draw, plan.num_tokens, plan.topk, plan.num_experts, plan.dtype,
                    plan.routing, rng)
    protected = _protected_routes(plan)
    if "duplicate-route" in foci:
        protected |= _force_duplicate(draw, ids, rng)
    sentinel_ok = DIALECT_INFO[dialect].sentinel_segment
    if plan.wants("invalid-expert-id"):
        _inject_invalid_ids(draw, ids, protected, plan.num_experts, rng,
                            _invalid_ids(plan.num_experts, plan.dtype, sentinel_ok))
        flat = ids.reshape(-1)
        protected |= (flat < 0) | (flat >= plan.num_experts)  # not undone by the -1 below
    if sentinel_ok and plan.ep is None and _sometimes(draw, 25):
        _inject_invalid_ids(draw, ids, protected, plan.num_experts, rng, (-1,))  # production

    fields: dict = {}
    if plan.lora:
        _lora_features(plan)
        layout = (_draw_vllm_layout if dialect == "vllm-lora" else _draw_sglang_layout)(
            draw, plan.num_tokens, plan.max_loras, frozenset(plan.lora_features), rng)
        fields.update(layout._asdict())
    if plan.direct_map:
        fields["expert_map"] = _draw_direct_map(draw, plan.num_experts, rng)
    padded = None
    if plan.wants("loose-padding") and dialect != "ep-remap":
        padded = _loose_padded_size(draw, plan)
    if dialect == "sglang-align":
        # SGLang's own callers pass True; older callers and its tests also False
        fields["pad_sorted_token_ids"] = not _sometimes(draw, 25)
        fields["ignore_invalid_expert"] = _sometimes(draw, 25)

    note = "focus=" + ("+".join(sorted(foci)) if foci else "broad")
    case = Case(dialect=dialect, contract=contract, topk_ids=ids,
                num_experts=plan.num_experts, block_size=plan.block_size,
                max_loras=plan.max_loras, max_num_tokens_padded=padded, ep=plan.ep,
                seed=seed, note=note, **fields)
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
    return case.replace(edge_classes=edge_classes_of(case), note=note, case_id=case.case_id)


def _loose_padded_size(draw: st.DrawFn, plan: _Plan) -> int:
    """Production ``P`` of the whole batch with ``G`` experts, plus 1..3B (any multiple)."""
    base = production_padded_size(plan.dialect, plan.num_routes, plan.num_experts,
                                  plan.block_size)
    return base + draw(st.integers(1, 3 * plan.block_size))


def _draw_sizes(draw: st.DrawFn, plan: _Plan, max_tokens: int, allow_large: bool) -> None:
    """``T``, ``K``, ``E``, ``B``, ``L``, dtype and routing for the plan's foci, inside
    the plan's limits."""
    foci = plan.foci
    plan.num_tokens = _within(draw, plan, "num_tokens", 1, max_tokens)
    if not foci and allow_large and _sometimes(draw, 10):
        plan.num_tokens = _within(draw, plan, "num_tokens", max_tokens + 1,
                                  max(MEDIUM_MAX_TOKENS, max_tokens + 1))
    plan.topk = _within(draw, plan, "topk", 1, 8)
    plan.num_experts = draw(_expert_counts_within(plan))
    plan.block_size = draw(_block_sizes_within(plan, BLOCK_SIZES))
    plan.dtype = np.int64 if "int64-ids" in foci or _sometimes(draw, 25) else np.int32
    plan.routing = "uniform" if foci else draw(st.sampled_from(ROUTINGS))
    if plan.lora:
        plan.max_loras = _within(draw, plan, "max_loras", 1, 8)
        if _sometimes(draw, 10):
            plan.max_loras = _within(draw, plan, "max_loras", 9, 32)

    # Sizes: at most one of these foci (see _CONFLICTS).
    if "empty-batch" in foci:
        plan.num_tokens = 0
    elif "huge-batch" in foci:
        topks = _huge_topks(plan.limits)
        plan.topk = draw(st.integers(4, 8) if topks == (4, 5, 6, 7, 8)
                         else st.sampled_from(topks))
        fewest = max(HUGE_MIN_TOKENS, -(-HUGE_BATCH_MIN_ROUTES // plan.topk))
        most = min(plan.bounds("num_tokens")[1], plan.bounds("num_routes")[1] // plan.topk)
        if most <= HUGE_MAX_TOKENS and _sometimes(draw, 25):
            plan.num_tokens = most  # at the declared bound
        else:
            most = min(most, HUGE_MAX_TOKENS if _sometimes(draw, 25) else fewest + 1024)
            plan.num_tokens = draw(st.integers(max(fewest, plan.bounds("num_tokens")[0]),
                                               most))
        plan.block_size = draw(_block_sizes_within(plan, BLOCK_SIZES[:-1]))
    elif "path-boundary" in foci:
        limit = max(MEDIUM_MAX_TOKENS, max_tokens) if allow_large else max_tokens
        least_topk = 2 if "duplicate-route" in foci else 1
        routes, topk = draw(st.sampled_from(
            _boundary_topks(limit, least_topk, plan.limits) or
            _boundary_topks(limit, 1, plan.limits)))
        plan.topk, plan.num_tokens = topk, routes // topk
    # the kernel of a dialect with a -1 segment sees E + 1 buckets
    extra = int(DIALECT_INFO[plan.dialect].sentinel_segment)
    low_e, high_e = plan.bounds("num_experts")
    if "many-experts" in foci:
        if high_e != UNBOUNDED and _sometimes(draw, 75):
            plan.num_experts = draw(st.sampled_from(  # at the declared bound
                tuple(e for e in (high_e, high_e - 1)
                      if e >= max(low_e, MANY_EXPERTS_MIN - extra))))
        else:
            top = KERNEL_MAX_EXPERTS - extra if high_e == UNBOUNDED else high_e
            plan.num_experts = draw(st.integers(max(MANY_EXPERTS_MIN - extra, low_e), top))
    elif "path-boundary" in foci and _sometimes(draw, 75):
        options = tuple(e - extra for e in (SMALL_PATH_MAX_EXPERTS, SMALL_PATH_MAX_EXPERTS + 1)
                        if low_e <= e - extra <= high_e)
        if options:
            plan.num_experts = draw(st.sampled_from(options))
    wide_block = False
    if "block-edges" in foci:
        kind = draw(st.sampled_from(("one", "odd", "wide")))
        if kind == "one":
            plan.block_size = 1
        elif kind == "odd":
            plan.block_size = draw(_block_sizes_within(plan, ODD_BLOCK_SIZES))
        else:  # B > N: few routes, a wide block
            wide_block = True
            plan.block_size = draw(_block_sizes_within(plan, (16, 32, 64, 128)))
            if plan.num_tokens:  # an empty batch has B > N already
                plan.topk = draw(st.integers(1, min(8, plan.block_size - 1)))
                most = max(1, min(max_tokens, (plan.block_size - 1) // plan.topk))
                plan.num_tokens = draw(st.integers(1, most))

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
    if plan.dialect == "ep-remap":
        plan.block_size = 1  # ep-remap has no block size; keep the field canonical
    elif wide_block and plan.block_size <= plan.num_routes:
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
    return draw(st.integers(a, b))


def _expert_counts_within(plan: _Plan) -> SearchStrategy[int]:
    """:func:`expert_counts` of ``1..256`` inside the ``num_experts`` bounds; a declared
    maximum and the count below it are notable counts (drawn often)."""
    lo, hi = plan.bounds("num_experts")
    if not plan.limits or (lo, hi) == (0, UNBOUNDED):
        return expert_counts(1, 256)
    a, b = max(1, lo), min(256, hi)
    if a > b:
        a, b = (hi, hi) if hi < 1 else (max(1, lo), min(hi, max(1, lo) + 255))
    edge = tuple(e for e in (hi, hi - 1) if hi != UNBOUNDED and max(1, lo) <= e)
    return st.one_of(expert_counts(a, b), st.sampled_from(edge)) if edge else expert_counts(a, b)


def _block_sizes_within(plan: _Plan, options: Sequence[int]) -> SearchStrategy[int]:
    """One of ``options`` inside the ``block_size`` bounds (the nearest bound if none)."""
    lo, hi = plan.bounds("block_size")
    inside = tuple(b for b in options if lo <= b <= hi)
    if inside:
        return st.sampled_from(inside)
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
    name, value = draw(st.sampled_from(options))
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
def _draw_ingredients(draw: st.DrawFn, plan: _Plan) -> None:
    """Defensive inputs for a defensive case none of whose foci is one."""
    self_defensive = set(DEFENSIVE_ONLY[plan.dialect])
    if plan.dialect == "sglang-lora":
        self_defensive.add("disabled-adapter")  # built as a used slot disabled
    if plan.contract != "defensive" or plan.foci & self_defensive:
        return
    pool = tuple(i for i in DIALECT_INFO[plan.dialect].ingredients
                 if not any((f, i) in _CLASHES for f in plan.foci))
    plan.ingredients = frozenset(draw(st.lists(st.sampled_from(pool), min_size=1,
                                               max_size=2, unique=True)))


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
                           and _sometimes(draw, 25))
        wanted, dispatches = not plan.direct_map, ("expert_map",)
    elif "non-divisible-experts" in foci:
        wanted = True
    else:
        wanted = _sometimes(draw, 20)
        if not wanted and not foci and plan.num_experts <= 256:
            plan.direct_map = _sometimes(draw, 5)
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


# -- expert ids -------------------------------------------------------------------------
def _generator(draw: st.DrawFn) -> tuple[int, np.random.Generator]:
    """A drawn seed and the NumPy generator it starts (for data too large to draw)."""
    seed = draw(st.integers(0, 2**32 - 1))
    return seed, np.random.default_rng(seed)


def _draw_ids(draw: st.DrawFn, num_tokens: int, topk: int, num_experts: int, dtype: type,
              routing: str, rng: np.random.Generator | None) -> np.ndarray:
    n = num_tokens * topk
    if routing == "hot":
        flat = np.full(n, draw(st.integers(0, num_experts - 1)), dtype=np.int64)
    elif routing == "missing":
        missing = draw(st.integers(0, num_experts - 1))
        flat = _ints(draw, rng, n, 0, num_experts - 2)
        flat += flat >= missing
    else:
        high = min(num_experts, 3) - 1 if routing == "low" else num_experts - 1
        flat = _ints(draw, rng, n, 0, high)
    return flat.astype(dtype).reshape(num_tokens, topk)


def _ints(draw: st.DrawFn, rng: np.random.Generator | None, size: int, low: int,
          high: int) -> np.ndarray:
    """``size`` integers in ``[low, high]``: one choice each, or from ``rng``."""
    if rng is not None:
        return rng.integers(low, high + 1, size=size, dtype=np.int64)
    element = st.integers(low, high)  # one choice per value (a list adds one per "more")
    return np.asarray([draw(element) for _ in range(size)], dtype=np.int64).reshape(size)


def _protected_routes(plan: _Plan) -> np.ndarray:
    """Routes the focus relies on; defensive changes leave them alone."""
    protected = np.zeros(plan.num_routes, dtype=bool)
    if plan.routing == "hot":
        protected[:2] = True  # two routes to the hot expert
    elif plan.routing == "missing":
        protected[:1] = True  # some expert still gets a route
    return protected


def _force_duplicate(draw: st.DrawFn, ids: np.ndarray,
                     rng: np.random.Generator | None) -> np.ndarray:
    """Make one token route twice to one expert; returns the two routes as a mask."""
    num_tokens, topk = ids.shape
    if rng is None:
        token = draw(st.integers(0, num_tokens - 1))
        first = draw(st.integers(0, topk - 1))
        second = draw(st.integers(0, topk - 2))
    else:
        token, first, second = (int(v) for v in rng.integers(0, (num_tokens, topk, topk - 1)))
    second += second >= first
    ids[token, second] = ids[token, first]
    mask = np.zeros(ids.size, dtype=bool)
    mask[[token * topk + first, token * topk + second]] = True
    return mask


def _invalid_ids(num_experts: int, dtype: type, sentinel_ok: bool = False) -> tuple[int, ...]:
    """Ids outside ``[0, E)``; -1 first (left out with ``sentinel_ok``: a dialect whose
    contract routes ``-1``).  int64 adds ids that truncate to valid int32."""
    i32 = np.iinfo(np.int32)
    values = (-1, num_experts, -2, num_experts + 1, num_experts + 1000, int(i32.max),
              int(i32.min))
    if np.dtype(dtype) == np.int64:
        values += (2**32, 2**32 + 1, 2**31, -(2**32))
    return values[1:] if sentinel_ok else values


def _inject_invalid_ids(draw: st.DrawFn, ids: np.ndarray, protected: np.ndarray,
                        num_experts: int, rng: np.random.Generator | None,
                        values: tuple[int, ...] | None = None) -> None:
    """Some unprotected routes get an id of ``values`` (default: :func:`_invalid_ids`)."""
    free = np.flatnonzero(~protected)
    if free.size == 0:
        return  # contract check falls back to loose padding
    if values is None:
        values = _invalid_ids(num_experts, ids.dtype.type)
    flat = ids.reshape(-1)
    if rng is None:
        where = draw(st.lists(st.sampled_from(free.tolist()), min_size=1,
                              max_size=min(3, free.size), unique=True))
        flat[where] = [draw(st.sampled_from(values)) for _ in where]
    else:
        count = min(int(rng.integers(1, 17)), free.size)
        where = rng.choice(free, size=count, replace=False)
        flat[where] = rng.choice(np.asarray(values, dtype=np.int64), size=count)


def _draw_direct_map(draw: st.DrawFn, num_experts: int,
                     rng: np.random.Generator | None) -> np.ndarray:
    """A case-level ``expert_map``: some experts dropped (-1), the rest numbered in order."""
    if rng is None:
        kept = np.asarray(draw(st.lists(st.booleans(), min_size=num_experts,
                                        max_size=num_experts)), dtype=bool)
    else:
        kept = rng.random(num_experts) < 0.5
    kept[draw(st.integers(0, num_experts - 1))] = False  # at least one -1 entry
    local = np.cumsum(kept) - 1
    return np.where(kept, local, -1).astype(np.int32)


# -- LoRA layouts ------------------------------------------------------------------------
def _draw_vllm_layout(draw: st.DrawFn, num_tokens: int, num_slots: int,
                      features: frozenset[str], rng: np.random.Generator | None) -> LoraLayout:
    if "base-only" in features:
        mapping = np.full(num_tokens, -1, dtype=np.int64)
    elif "full-slots-with-base" in features:
        mapping = np.concatenate([np.arange(-1, num_slots),
                                  _ints(draw, rng, num_tokens - num_slots - 1, -1,
                                        num_slots - 1)])
        mapping = mapping[_permutation(draw, rng, num_tokens)]
    else:
        kind = draw(st.sampled_from(("mixed", "adapters", "single")))
        if kind == "single":
            mapping = np.full(num_tokens, draw(st.integers(0, num_slots - 1)), dtype=np.int64)
        else:
            mapping = _ints(draw, rng, num_tokens, -1 if kind == "mixed" else 0, num_slots - 1)
    if "disable-listed" in features and num_tokens and not (mapping >= 0).any():
        mapping[0] = draw(st.integers(0, num_slots - 1))
    lora_ids = oracle.active_lora_ids(mapping, num_slots).astype(np.int64)
    enabled = _enabled_flags(draw, num_slots + 1, used=np.unique(mapping[mapping >= 0]))

    real = lora_ids[lora_ids >= 0]
    if "disable-listed" in features and real.size:
        for slot in draw(st.lists(st.sampled_from(real.tolist()), min_size=1,
                                  max_size=real.size, unique=True)):
            enabled[slot] = 0
    if "lora-layout" in features:
        lora_ids = _break_vllm_layout(draw, lora_ids, mapping, num_slots)
    if "slot-out-of-range" in features:
        # Keep a real slot at index L where the focus put one there, and the
        # disabled slots listed (at least one -1 entry is always free).
        keep = (num_slots,) if "full-slots-with-base" in features else ()
        lora_ids = _out_of_range_slots(draw, lora_ids, num_slots,
                                       keep + _disabled_positions(lora_ids, enabled))
    return LoraLayout(mapping.astype(np.int32), None, None, lora_ids.astype(np.int32),
                      enabled.astype(np.int32))


def _break_vllm_layout(draw: st.DrawFn, lora_ids: np.ndarray, mapping: np.ndarray,
                       num_slots: int) -> np.ndarray:
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
        return _out_of_range_slots(draw, lora_ids, num_slots, ())
    kind = draw(st.sampled_from(options))
    if kind == "duplicate":
        lora_ids[pads[-1]] = lora_ids[draw(st.sampled_from(real.tolist()))]
    elif kind == "unsorted":
        lora_ids[real] = lora_ids[real[::-1]]
    else:
        lora_ids[pads[-1]] = draw(st.sampled_from(unused.tolist()))
    return lora_ids


_DISABLING = frozenset(("disable-unused", "disable-used"))


def _disabled_positions(lora_ids: np.ndarray, enabled: np.ndarray) -> tuple[int, ...]:
    """Positions of ``lora_ids`` that list a disabled slot."""
    listed = (lora_ids >= 0) & (lora_ids < enabled.size)
    return tuple(int(p) for p in np.flatnonzero(listed)
                 if enabled[lora_ids[p]] == 0)


def _out_of_range_slots(draw: st.DrawFn, lora_ids: np.ndarray, num_slots: int,
                        keep: tuple[int, ...]) -> np.ndarray:
    lora_ids = lora_ids.copy()
    positions = [p for p in range(lora_ids.size) if p not in keep]
    if not positions:  # everything is worth keeping: give up all but the first
        positions = [p for p in range(lora_ids.size) if p != keep[0]]
    values = (num_slots, num_slots + 1, num_slots + 7, int(np.iinfo(np.int32).max))
    for p in draw(st.lists(st.sampled_from(positions), min_size=1, max_size=2, unique=True)):
        lora_ids[p] = draw(st.sampled_from(values))
    return lora_ids


def _enabled_flags(draw: st.DrawFn, size: int, used: np.ndarray) -> np.ndarray:
    """1 for every used slot; sometimes 0 for slots the batch does not use."""
    enabled = np.ones(size, dtype=np.int64)
    if _sometimes(draw, 30):
        off = np.asarray(draw(st.lists(st.booleans(), min_size=size, max_size=size)), bool)
        off[used[used < size]] = False
        enabled[off] = 0
    return enabled


def _draw_sglang_layout(draw: st.DrawFn, num_tokens: int, num_slots: int,
                        features: frozenset[str], rng: np.random.Generator | None
                        ) -> LoraLayout:
    full = "full-slots-with-base" in features
    base_only = "base-only" in features
    # How full/base-only batches get their base tokens: a gap or a -1 request.
    base_by = draw(st.sampled_from(("unassigned", "gap"))) if full or base_only else None
    gap = "request-gap" in features or base_by == "gap"
    min_reqs = num_slots + (base_by == "unassigned") if full else 1

    if num_tokens == 0:
        seg = [0, 0] if draw(st.booleans()) else [0]
        start = stop = 0
    elif base_only and gap:
        start = stop = draw(st.integers(0, num_tokens))  # every token in the gap
        seg = [start, stop]
    else:
        min_len = min_reqs if full else 0  # an empty span: one empty request
        start, stop = _covered_span(draw, num_tokens, min_len) if gap else (0, num_tokens)
        seg = _request_bounds(draw, rng, start, stop, min_reqs)
    seg = np.asarray(seg, dtype=np.int64)
    num_reqs = seg.size - 1

    unused_slot = None
    if base_only:
        req = np.full(num_reqs, -1, dtype=np.int64)
        if gap:
            req[:] = draw(st.integers(0, num_slots - 1))  # the request is empty
    elif full:
        req = np.concatenate([_permutation(draw, rng, num_slots),
                              _ints(draw, rng, num_reqs - num_slots, 0, num_slots - 1)])
        if base_by == "unassigned":
            req[-1] = -1
        req = req[_permutation(draw, rng, num_reqs)]
    elif "disable-unused" in features:
        unused_slot = draw(st.integers(0, num_slots - 1))
        req = _ints(draw, rng, num_reqs, 0, num_slots - 2)
        req += req >= unused_slot
    else:
        req = _ints(draw, rng, num_reqs, 0, num_slots - 1)
    if "unassigned-request" in features and num_reqs and not full:
        req[draw(st.integers(0, num_reqs - 1))] = -1

    lens = np.diff(seg)
    used = np.unique(req[(req >= 0) & (lens[: req.size] > 0)]) if num_reqs else req
    enabled = _enabled_flags(draw, num_slots, used=used)
    if unused_slot is not None:
        enabled[unused_slot] = 0
    if "disable-used" in features:
        if not used.size and num_reqs and lens.max() > 0:
            busiest = int(np.argmax(lens))
            req[busiest] = draw(st.integers(0, num_slots - 1))
            used = req[busiest: busiest + 1]
        if used.size:
            enabled[draw(st.sampled_from(used.tolist()))] = 0
        else:  # no request holds a token (all in a gap, or T = 0): defensive already;
            enabled[draw(st.integers(0, num_slots - 1))] = 0  # a listed slot is disabled
    lora_ids = np.arange(num_slots, dtype=np.int64)
    if "slot-out-of-range" in features:
        keep = _disabled_positions(lora_ids, enabled) if features & _DISABLING else ()
        lora_ids = _out_of_range_slots(draw, lora_ids, num_slots, keep)
    return LoraLayout(None, seg.astype(np.int32), req.astype(np.int32),
                      lora_ids.astype(np.int32), enabled.astype(np.int32))


def _covered_span(draw: st.DrawFn, num_tokens: int, min_len: int) -> tuple[int, int]:
    """``[start, stop)`` with at least ``min_len`` tokens, leaving a gap before or after."""
    kinds = ["head", "tail"] + (["both"] if num_tokens >= min_len + 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "head":
        return draw(st.integers(1, num_tokens - min_len)), num_tokens
    if kind == "tail":
        return 0, draw(st.integers(min_len, num_tokens - 1))
    start = draw(st.integers(1, num_tokens - 1 - min_len))
    return start, draw(st.integers(start + min_len, num_tokens - 1))


def _request_bounds(draw: st.DrawFn, rng: np.random.Generator | None, start: int,
                    stop: int, min_reqs: int) -> list[int]:
    """``seg_indptr`` of requests of at least one token each, tiling ``[start, stop)``."""
    span = stop - start
    if rng is None:
        count = draw(st.integers(min_reqs, max(min_reqs, min(span, 16))))
        cuts = sorted(draw(st.lists(st.integers(start + 1, stop - 1), min_size=count - 1,
                                    max_size=count - 1, unique=True))) if count > 1 else []
    else:
        count = int(rng.integers(min_reqs, max(min_reqs, min(span, 64)) + 1))
        cuts = sorted((rng.choice(span - 1, size=count - 1, replace=False) + start + 1)
                      .tolist()) if count > 1 else []
    return [start, *cuts, stop]


def _permutation(draw: st.DrawFn, rng: np.random.Generator | None, size: int) -> np.ndarray:
    if rng is not None:
        return rng.permutation(size)
    return np.asarray(draw(st.permutations(range(size))), dtype=np.int64).reshape(size)


# -- helpers ---------------------------------------------------------------------------------
def _sometimes(draw: st.DrawFn, percent: int) -> bool:
    """True with about ``percent``% probability; shrinks towards False."""
    return draw(st.integers(0, 99)) >= 100 - percent


def _boundary_topks(max_tokens: int, least_topk: int = 1,
                    limits: Limits | None = None) -> tuple[tuple[int, int], ...]:
    """``(N, K)`` with ``N`` at the small-path switch, ``K >= least_topk`` and
    ``N // K <= max_tokens``, inside the ``num_routes``/``topk``/``num_tokens`` bounds
    of ``limits``."""
    limits = limits or {}
    routes = (SMALL_PATH_MAX_ROUTES - 1, SMALL_PATH_MAX_ROUTES, SMALL_PATH_MAX_ROUTES + 1)

    def inside(name: str, value: int) -> bool:
        low, high = _bounds(limits, name)
        return low <= value <= high

    return tuple((n, k) for n in routes for k in range(least_topk, 9)
                 if n % k == 0 and n // k <= max_tokens and inside("num_routes", n)
                 and inside("topk", k) and inside("num_tokens", n // k))


def _rank_counts(num_global: int, dispatch: str, min_ranks: int, max_ranks: int,
                 non_divisible: bool | None) -> tuple[int, ...]:
    high = max_ranks if dispatch == "expert_map" else min(max_ranks, num_global)
    return tuple(r for r in range(max(min_ranks, 1), high + 1)
                 if non_divisible is None or bool(num_global % r) == non_divisible)


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise UsageError(f"{name}={value!r}: must be one of {tuple(allowed)}")
