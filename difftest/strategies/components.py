"""The component strategies :func:`~difftest.strategies.cases` is made of, public so
that a test can draw just the part it needs."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from ..case import DISPATCH_FORMS, LORA_DIALECTS, STRATEGIES, EPGroup
from ..errors import UsageError
from ._base import _check_choice, _draw_seed, _draw_style, _rank_counts
from ._ids import ROUTINGS, _routed_ids
from ._lora import LORA_FEATURES, LoraLayout, _sglang_layout, _vllm_layout

#: Block sizes drawn by default; 1 first, so examples shrink towards no padding.
BLOCK_SIZES = (1, 2, 3, 4, 8, 16, 32, 64, 128)
#: Block sizes that are not powers of two (``block-edges``).
ODD_BLOCK_SIZES = (3, 5, 6, 7, 12, 24, 48, 96)
#: Expert counts worth hitting on purpose (powers of two and their neighbours).
NOTABLE_EXPERT_COUNTS = (1, 2, 3, 8, 16, 63, 64, 65, 127, 128, 255, 256)


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
    experts 0..2, ``"missing"`` every expert but one, ``"hot"`` one expert for
    every route.  The dtype, the routing, a seed and (up to
    :data:`~difftest.strategies.ELEMENTWISE_MAX_ROUTES` routes) a value style
    (:data:`~difftest.strategies.VALUE_STYLES`) are drawn; the ids come from the
    seed.  Shrinks towards int32, ``"uniform"``, the ``"small"`` style (ids near
    0) and seed 0.
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
        values = _draw_style(draw, _draw_seed(draw), num_tokens * topk)
        return _routed_ids(values, num_tokens, topk, num_experts, dtype, routing)

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

    Hypothesis draws the layout's decisions (vLLM: mixed, adapters only or one
    slot; SGLang: the number of requests, where a gap goes) and a seed; slots,
    request boundaries and flags come from the seed.  Shrinks towards a vLLM
    batch mixing base and adapter tokens, or one SGLang request, the ``"small"``
    value style (slots near -1 and 0), every adapter enabled.
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
    build = _vllm_layout if dialect == "vllm-lora" else _sglang_layout

    @st.composite
    def layouts(draw: st.DrawFn) -> LoraLayout:
        values = _draw_style(draw, _draw_seed(draw), num_tokens)
        return build(draw, values, num_tokens, max_loras, wanted)

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
