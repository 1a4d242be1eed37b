"""Hypothesis strategies for MoE alignment cases (SPEC §7 contracts, §8 edge classes).

:func:`cases` is what tests draw from, :func:`families` (a case and its siblings:
its structure with other values) what campaigns draw from; the component strategies
(:func:`block_sizes`, :func:`expert_counts`, :func:`topk_ids_arrays`,
:func:`lora_layouts`, :func:`ep_groups`) are the pieces they are made of, public so
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

Structure and values.  Hypothesis draws only a case's structure — dialect,
contract, foci, ingredients, sizes (``T``, ``K``, ``E``, ``B``, ``L``, ``P``),
dtype, routing, EP group, the LoRA layout's decisions (how tokens map to slots,
how many requests, where a gap goes) — and one seed, kept in ``Case.seed``.
Every array is expanded from that seed by NumPy
(:class:`~difftest.strategies._base.Values`): the expert ids, the invalid ids and
where they go, the forced duplicate, slots, request boundaries, permutations,
``adapter_enabled`` flags, a case-level ``expert_map``; so are the weighted coin
flips of the structure (int64 one case in four, EP one in five, the
``sglang-align`` flags...), which come out at their exact rates and never let two
choice sequences that differ in a coin's unused bits draw the same case.  So a
draw costs a dozen or two choices, for one route or 40,000 tokens, and a
campaign draws few cases twice.  A case of up to
:data:`ELEMENTWISE_MAX_ROUTES` routes also draws a value style
(:data:`~difftest.strategies._base.VALUE_STYLES`: values near the low end of
their range with many repeats — expert 0, slot -1 and 0 —, only the range's
boundary values, uniform, or each value in one of those), which keeps the bias
towards small and boundary values that Hypothesis gave ids drawn one by one; a
larger case is uniform.  Hypothesis shrinks the structure (fewer tokens, the
``"small"`` style, seed 0); the values of a failing case are simplified by
difftest's own shrinker (:mod:`difftest.shrink`).

The parts: :mod:`.components` (the public component strategies),
:mod:`._case` (:func:`cases`: foci, ingredients, EP, assembly), :mod:`._sizes`
(sizes for the foci, inside declared limits, out-of-domain probes),
:mod:`._plan` (what the builder has decided), :mod:`._ids` (expert ids),
:mod:`._lora` (LoRA layouts), :mod:`._base` (the seeded values).
"""

from ._base import ELEMENTWISE_MAX_ROUTES
from ._case import (
    DEFENSIVE_ONLY,
    EDGE_FOCUS,
    cases,
    families,
    focus_classes,
    probes_possible,
)
from ._ids import ROUTINGS
from ._lora import LORA_FEATURES, LoraLayout
from ._sizes import DEFAULT_MAX_TOKENS
from .components import (
    BLOCK_SIZES,
    block_sizes,
    ep_groups,
    expert_counts,
    lora_layouts,
    topk_ids_arrays,
)

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
    "families",
    "focus_classes",
    "lora_layouts",
    "probes_possible",
    "topk_ids_arrays",
]
