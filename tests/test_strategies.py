"""Tests of difftest.classify (edge classes and contract from the data) and of
difftest.strategies (cases that validate, carry the asked contract, true tags, and
reach every edge class often)."""

from __future__ import annotations

import collections
import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from difftest.case import CONTRACTS, DIALECTS, EDGE_CLASSES, Case, EPGroup
from difftest.classify import (
    contract_of,
    defensive_reasons,
    edge_classes_of,
    production_lora_ids,
)
from difftest.errors import UsageError
from difftest.strategies import (
    DEFENSIVE_ONLY,
    EDGE_FOCUS,
    block_sizes,
    cases,
    ep_groups,
    focus_classes,
    lora_layouts,
    topk_ids_arrays,
)

#: Draws per dialect × contract, and the least share of them every reachable
#: edge class must have.  Foci make each class ~10% or more of the draws;
#: Hypothesis spreads draws unevenly, so the bar sits well below that.
DRAWS = 300
MIN_SHARE = 0.03

# Drawing is CPU bound, with no timing-sensitive code under test.
DRAW_SETTINGS = settings(max_examples=DRAWS, database=None, derandomize=True, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])


# -- hand-built cases ---------------------------------------------------------------------
def _ids(rows, dtype=np.int32):
    return np.asarray(rows, dtype=dtype).reshape(len(rows), -1)


# Eight routes, one per expert, B = 4 a power of two <= N: no edge class at all.
PLAIN_IDS = [[0, 1], [2, 3], [4, 5], [6, 7]]


def plain_align(**changes) -> Case:
    fields = dict(dialect="align", contract="production", topk_ids=_ids(PLAIN_IDS),
                  num_experts=8, block_size=4)
    fields.update(changes)
    return Case(**fields)


def plain_vllm(**changes) -> Case:
    mapping = np.array([0, 1, 0, 1], dtype=np.int32)
    fields = dict(dialect="vllm-lora", contract="production", topk_ids=_ids(PLAIN_IDS),
                  num_experts=8, block_size=4, max_loras=2, token_lora_mapping=mapping,
                  lora_ids=np.array([0, 1, -1], dtype=np.int32),
                  adapter_enabled=np.ones(3, dtype=np.int32))
    fields.update(changes)
    return Case(**fields)


def plain_sglang(**changes) -> Case:
    fields = dict(dialect="sglang-lora", contract="production", topk_ids=_ids(PLAIN_IDS),
                  num_experts=8, block_size=4, max_loras=2,
                  seg_indptr=np.array([0, 2, 4], dtype=np.int32),
                  req_to_lora=np.array([0, 1], dtype=np.int32),
                  lora_ids=np.arange(2, dtype=np.int32),
                  adapter_enabled=np.ones(2, dtype=np.int32))
    fields.update(changes)
    return Case(**fields)


def plain_remap(**changes) -> Case:
    fields = dict(dialect="ep-remap", contract="production", topk_ids=_ids(PLAIN_IDS),
                  num_experts=8, block_size=1, ep=EPGroup(8, 1))
    fields.update(changes)
    return Case(**fields)


CRAFTED = {
    "full-slots-with-base": lambda: plain_vllm(
        token_lora_mapping=np.array([-1, 0, 1, 1], np.int32),
        lora_ids=np.array([-1, 0, 1], np.int32)),
    "base-only": lambda: plain_vllm(token_lora_mapping=np.full(4, -1, np.int32),
                                    lora_ids=np.full(3, -1, np.int32)),
    "disabled-adapter": lambda: plain_vllm(adapter_enabled=np.array([1, 0, 1], np.int32)),
    "slot-out-of-range": lambda: plain_vllm(lora_ids=np.array([0, 1, 2], np.int32)),
    "ep-sentinel": lambda: plain_align(ep=EPGroup(8, 2, dispatch="local_ids")),
    "expert-map": lambda: plain_align(ep=EPGroup(8, 2, dispatch="expert_map")),
    "non-divisible-experts": lambda: plain_remap(ep=EPGroup(8, 3)),
    "path-boundary": lambda: plain_align(topk_ids=_ids(np.arange(1024) % 8)),
    "hot-expert": lambda: plain_align(topk_ids=_ids([[3, 3]] * 4)),
    "empty-expert": lambda: plain_align(num_experts=9),
    "block-edges": lambda: plain_align(block_size=3),
    "empty-batch": lambda: plain_align(topk_ids=np.zeros((0, 2), np.int32), block_size=1),
    "int64-ids": lambda: plain_align(topk_ids=_ids(PLAIN_IDS, np.int64)),
    "many-experts": lambda: plain_align(num_experts=900),
    "duplicate-route": lambda: plain_align(topk_ids=_ids([[0, 0], [2, 3], [4, 5], [6, 7]])),
    "loose-padding": lambda: plain_align(max_num_tokens_padded=100),
    "huge-batch": lambda: plain_align(topk_ids=_ids(np.arange(65536).reshape(-1, 4) % 8)),
    "invalid-expert-id": lambda: plain_align(topk_ids=_ids([[0, 1], [2, 3], [4, 5], [6, -1]])),
    "request-gap": lambda: plain_sglang(seg_indptr=np.array([1, 2, 4], np.int32)),
}


@pytest.mark.parametrize("plain", [plain_align, plain_vllm, plain_sglang, plain_remap])
def test_plain_cases_have_no_edge_class_and_are_production(plain):
    case = plain()
    assert edge_classes_of(case) == ()
    assert contract_of(case) == "production"


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_each_edge_class_is_detected_on_a_crafted_case(name):
    assert name in edge_classes_of(CRAFTED[name]())


def test_crafted_cases_cover_every_edge_class():
    assert sorted(CRAFTED) == sorted(EDGE_CLASSES)


def test_full_slots_needs_every_slot_and_a_base_token():
    one_slot = plain_vllm(token_lora_mapping=np.array([-1, 0, 0, 0], np.int32),
                          lora_ids=np.array([-1, 0, -1], np.int32))
    assert "full-slots-with-base" not in edge_classes_of(one_slot)
    no_base = plain_vllm()  # uses both slots, no -1
    assert "full-slots-with-base" not in edge_classes_of(no_base)


def test_full_slots_for_vllm_needs_the_real_slot_at_index_L():
    reordered = CRAFTED["full-slots-with-base"]().replace(
        lora_ids=np.array([0, 1, -1], np.int32))
    assert "full-slots-with-base" not in edge_classes_of(reordered)
    assert contract_of(reordered) == "defensive"  # not the production layout


def test_ep_sentinel_is_the_local_dispatch_of_a_foreign_or_invalid_route():
    single_rank = plain_align(ep=EPGroup(8, 1, dispatch="local_ids"))
    assert "ep-sentinel" not in edge_classes_of(single_rank)
    invalid = single_rank.replace(topk_ids=_ids([[0, 1], [2, 3], [4, 5], [6, 9]]))
    assert {"ep-sentinel", "invalid-expert-id"} <= set(edge_classes_of(invalid))
    # Every route owned by rank 0 of 2: rank 1 still sees only -1.
    owned_by_zero = plain_align(topk_ids=_ids([[0, 1], [2, 3]]),
                                ep=EPGroup(8, 2, dispatch="local_ids"))
    assert "ep-sentinel" in edge_classes_of(owned_by_zero)
    only_rank_zero_runs = owned_by_zero.replace(ep=EPGroup(8, 2, dispatch="local_ids",
                                                           ranks=(0,)))
    assert "ep-sentinel" not in edge_classes_of(only_rank_zero_runs)
    assert "ep-sentinel" not in edge_classes_of(plain_align(ep=EPGroup(8, 2)))


def test_ep_remap_foreign_routes_are_sentinels_and_block_size_plays_no_part():
    remap = plain_remap(ep=EPGroup(8, 2, strategy="round_robin"))
    assert edge_classes_of(remap) == ("ep-sentinel",)


def test_case_level_expert_map_with_a_gap_is_expert_map():
    mapped = plain_align(expert_map=np.array([0, 1, 2, 3, -1, 4, 5, 6], np.int32))
    assert "expert-map" in edge_classes_of(mapped)
    assert contract_of(mapped) == "production"


def test_path_boundary_by_expert_count_needs_a_route_count_near_the_switch():
    near = plain_align(topk_ids=_ids(np.arange(1050) % 8), num_experts=65)
    assert "path-boundary" in edge_classes_of(near)
    far = plain_align(topk_ids=_ids(np.arange(2000) % 8), num_experts=65)
    assert "path-boundary" not in edge_classes_of(far)


@settings(max_examples=50, database=None, deadline=None)
@given(st.integers(1, 40), st.data())
def test_production_lora_ids_agree_with_the_oracle(slots, data):
    import oracle

    mapping = np.asarray(data.draw(st.lists(st.integers(-1, slots - 1), max_size=60)),
                         dtype=np.int64)
    assert np.array_equal(production_lora_ids(mapping, slots),
                          oracle.active_lora_ids(mapping, slots))


@pytest.mark.parametrize("case, reason", [
    (plain_align(topk_ids=np.zeros((0, 2), np.int32)), "empty batch"),
    (CRAFTED["invalid-expert-id"](), "expert id"),
    (plain_align(max_num_tokens_padded=100), "max_num_tokens_padded"),
    (plain_vllm(lora_ids=np.array([0, 1, 2], np.int32)), "lora_ids"),
    (plain_vllm(lora_ids=np.array([1, 0, -1], np.int32)), "lora_ids"),
    (plain_vllm(adapter_enabled=np.array([1, 0, 1], np.int32)), "disabled"),
    (plain_sglang(req_to_lora=np.array([0, -1], np.int32)), "req_to_lora"),
    (plain_sglang(seg_indptr=np.array([0, 2, 3], np.int32)), "cover"),
    (plain_sglang(lora_ids=np.array([0, 5], np.int32)), "lora_ids"),
    (plain_sglang(adapter_enabled=np.array([1, 0], np.int32)), "disabled"),
])
def test_defensive_inputs_make_the_case_defensive(case, reason):
    assert contract_of(case) == "defensive"
    assert any(reason in r for r in defensive_reasons(case)), defensive_reasons(case)


def test_production_allows_what_serving_stacks_build():
    # SGLang may disable a slot no request uses; EP local ids hold -1 by design.
    sglang = plain_sglang(max_loras=3, lora_ids=np.arange(3, dtype=np.int32),
                          adapter_enabled=np.array([1, 1, 0], np.int32))
    assert "disabled-adapter" in edge_classes_of(sglang)
    assert contract_of(sglang) == "production"
    assert contract_of(CRAFTED["ep-sentinel"]()) == "production"
    assert contract_of(CRAFTED["full-slots-with-base"]()) == "production"
    # The production P stated explicitly is still production.
    assert contract_of(plain_align(max_num_tokens_padded=32)) == "production"


# -- component strategies ------------------------------------------------------------------
@settings(max_examples=60, database=None, deadline=None)
@given(st.data())
def test_topk_ids_arrays_have_the_shape_dtype_and_range_asked_for(data):
    tokens, topk, experts = (data.draw(st.integers(0, 80)), data.draw(st.integers(1, 8)),
                             data.draw(st.integers(1, 300)))
    ids = data.draw(topk_ids_arrays(tokens, topk, experts, dtypes=(np.int64,)))
    assert ids.shape == (tokens, topk) and ids.dtype == np.int64
    assert ((ids >= 0) & (ids < experts)).all()


@settings(max_examples=60, database=None, deadline=None)
@given(st.data())
def test_ep_groups_list_every_rank_and_honour_the_split_asked_for(data):
    experts = data.draw(st.integers(1, 300))
    group = data.draw(ep_groups(experts, dispatches=("local_ids",), non_divisible=None))
    assert group.ranks == tuple(range(group.ep_size)) and group.ep_size <= experts
    uneven = data.draw(ep_groups(experts, non_divisible=True))
    assert uneven.global_num_experts % uneven.ep_size != 0


@settings(max_examples=60, database=None, deadline=None)
@given(st.data())
def test_production_lora_layouts_follow_spec_4_and_5(data):
    import oracle

    tokens, slots = data.draw(st.integers(1, 80)), data.draw(st.integers(1, 8))
    vllm = data.draw(lora_layouts(tokens, slots, dialect="vllm-lora"))
    assert np.array_equal(vllm.lora_ids, oracle.active_lora_ids(vllm.token_lora_mapping, slots))
    assert (vllm.adapter_enabled[vllm.lora_ids[vllm.lora_ids >= 0]] == 1).all()
    sglang = data.draw(lora_layouts(tokens, slots, dialect="sglang-lora"))
    assert sglang.seg_indptr[0] == 0 and sglang.seg_indptr[-1] == tokens
    assert np.array_equal(sglang.lora_ids, np.arange(slots))
    assert ((sglang.req_to_lora >= 0) & (sglang.req_to_lora < slots)).all()


def test_block_sizes_shrink_towards_one():
    assert find(block_sizes(), lambda b: True) == 1
    assert find(block_sizes(edges=True), lambda b: b > 1) == 3


def test_bad_arguments_name_the_argument():
    with pytest.raises(UsageError, match="dialects='bogus'"):
        cases(dialects=("bogus",))
    with pytest.raises(UsageError, match="contracts="):
        cases(contracts=())
    with pytest.raises(UsageError, match="max_tokens=0"):
        cases(max_tokens=0)
    with pytest.raises(UsageError, match="no ep_size fits"):
        ep_groups(840, min_ranks=2, non_divisible=True)


# -- cases ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def drawn(dialect: str, contract: str) -> tuple[Case, ...]:
    """``DRAWS`` cases of one dialect and contract, the same on every run."""
    found: list[Case] = []

    @DRAW_SETTINGS
    @given(cases(dialects=(dialect,), contracts=(contract,)))
    def collect(case: Case) -> None:
        found.append(case)

    collect()
    assert len(found) >= DRAWS
    return tuple(found)


COMBINATIONS = [(d, c) for d in DIALECTS for c in CONTRACTS]


@pytest.mark.parametrize("dialect, contract", COMBINATIONS)
def test_drawn_cases_carry_the_contract_asked_for_and_true_tags(dialect, contract):
    for case in drawn(dialect, contract):
        assert case.dialect == dialect
        assert case.contract == contract == contract_of(case), defensive_reasons(case)
        assert case.edge_classes == edge_classes_of(case)
        foci = case.note.removeprefix("focus=").split("+")
        assert set(foci) - {"broad"} <= set(case.edge_classes), (case.note, case.edge_classes)
        if contract == "production":
            assert not set(case.edge_classes) & set(DEFENSIVE_ONLY[dialect])


@pytest.mark.parametrize("dialect, contract", COMBINATIONS)
def test_drawn_cases_validate_against_the_oracle(dialect, contract):
    from difftest.dialects import DIALECT_INFO  # runs the oracle for one rank

    reference = DIALECT_INFO[dialect].reference
    for case in drawn(dialect, contract):
        for rank in case.ranks():
            reference(case, rank)  # raises for a case the oracle calls malformed


@pytest.mark.parametrize("dialect, contract", COMBINATIONS)
def test_every_reachable_edge_class_is_drawn_often(dialect, contract):
    cases_ = drawn(dialect, contract)
    counts = collections.Counter(name for case in cases_ for name in case.edge_classes)
    reachable = focus_classes(dialect, contract)
    assert set(reachable) <= set(EDGE_FOCUS[dialect])
    rare = {name: counts[name] / len(cases_) for name in reachable
            if counts[name] < MIN_SHARE * len(cases_)}
    assert not rare, f"classes under {MIN_SHARE:.0%} of {len(cases_)} draws: {rare}"


def test_small_only_cases_stay_within_max_tokens():
    found: list[Case] = []

    @settings(max_examples=100, database=None, derandomize=True, deadline=None)
    @given(cases(max_tokens=16, allow_large=False))
    def collect(case: Case) -> None:
        found.append(case)

    collect()
    assert max(case.num_tokens for case in found) <= 16
    assert not any("huge-batch" in case.edge_classes for case in found)
    assert {case.dialect for case in found} == set(DIALECTS)


def test_a_full_slots_case_shrinks_to_two_tokens_on_one_slot():
    case = find(cases(dialects=("vllm-lora",), contracts=("production",)),
                lambda c: "full-slots-with-base" in c.edge_classes,
                settings=settings(database=None, derandomize=True, max_examples=500))
    assert (case.num_tokens, case.max_loras) == (2, 1)
    assert sorted(case.token_lora_mapping.tolist()) == [-1, 0]


# -- structure and values ---------------------------------------------------------------
def test_a_case_costs_a_few_dozen_choices_whatever_its_size():
    from hypothesis import Phase

    choices: list[tuple[int, int]] = []  # (routes, Hypothesis choices of the draw)

    @settings(max_examples=300, database=None, derandomize=True, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.data())
    def collect(data):
        before = len(data.conjecture_data.nodes)
        case = data.draw(cases())
        choices.append((case.num_routes, len(data.conjecture_data.nodes) - before))

    collect()
    assert max(n for _, n in choices) <= 40
    assert max(r for r, _ in choices) >= 65536  # huge cases among them, at that cost


def test_values_follow_their_style_and_seed_0_flips_no_coin():
    from difftest.strategies._base import Values

    edges = Values(7, "edges").ints(1000, -1, 9)
    assert set(edges.tolist()) == {-1, 0, 8, 9}
    small = Values(7, "small").ints(1000, 0, 255)
    assert (small == 0).mean() > 0.4 and (small <= 3).mean() > 0.9
    assert Values(7, "uniform").ints(1000, 0, 3).tolist() == Values(7).ints(1000, 0, 3).tolist()
    plain, seeded = Values(0), Values(1)
    assert not any(plain.chance(0.99) for _ in range(100))
    assert sum(seeded.chance(0.25) for _ in range(4000)) in range(900, 1100)


# -- families -----------------------------------------------------------------------
def _structure(case: Case) -> tuple:
    return (case.dialect, case.contract, case.note, case.num_tokens, case.topk,
            case.num_experts, case.block_size, case.max_loras, case.ep, case.topk_ids.dtype)


def _generated(strategy, examples: int = 150) -> list:
    from hypothesis import Phase

    found: list = []

    @settings(max_examples=examples, database=None, derandomize=True, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(drawn):
        found.append(drawn)

    collect()
    return found


def test_a_family_is_the_case_cases_draws_and_siblings_of_its_structure_with_other_values():
    from difftest.strategies import families

    firsts = [case.case_id for case in _generated(cases())]
    family_list = _generated(families(4))
    assert [family[0].case_id for family in family_list] == firsts
    assert sum(len(family) == 4 for family in family_list) > 0.9 * len(family_list)
    distinct, same = 0, collections.Counter()
    for family in family_list:
        for sibling in family[1:]:
            # the same structure; or, where that gave a case of the family again (no
            # values to vary), other sizes: the same dialect, contract and foci
            same[_structure(sibling) == _structure(family[0])] += 1
            assert _structure(sibling)[:3] == _structure(family[0])[:3]
            assert sibling.contract == contract_of(sibling)
            assert sibling.edge_classes == edge_classes_of(sibling)
            foci = set(sibling.note.removeprefix("focus=").split("+")) - {"broad"}
            assert foci <= set(sibling.edge_classes), (sibling.note, sibling.edge_classes)
            assert sibling.seed != family[0].seed
        distinct += len({case.case_id for case in family}) == len(family)
    assert distinct > 0.9 * len(family_list) and same[True] > 3 * same[False] > 0


def test_the_siblings_of_an_empty_batch_vary_its_sizes():
    from difftest.strategies import families

    empty = [f for f in _generated(families(4, classes=("empty-batch",)), 60)]
    assert all(case.num_tokens == 0 for family in empty for case in family)
    assert sum(len({case.case_id for case in family}) >= 3 for family in empty) > 0.8 * len(
        empty)
    for family in empty:  # without LoRA an empty batch has no values: its sizes differ
        if family[0].max_loras == 0 and len({case.case_id for case in family}) > 1:
            assert len({case.topk for case in family}) > 1


def test_a_sibling_flips_the_coins_of_its_first_case_and_draws_its_draws_or_diverges():
    from difftest.strategies._base import Diverged, Tape, Values

    first = Values(5)
    ps = (0.5, 0.5, 0.9, 0.1, 0.5)
    coins = [first.chance(p) for p in ps]
    ids = first.ints(64, 0, 9).tolist()
    sibling = first.sibling(1)
    assert [sibling.chance(p) for p in ps] == coins and True in coins and False in coins
    assert sibling.ints(64, 0, 9).tolist() != ids
    again = first.sibling(1)
    assert again.seed == sibling.seed and again.ints(64, 0, 9).tolist() == Values(
        sibling.seed).ints(64, 0, 9).tolist()  # a sibling's arrays are its seed's
    with pytest.raises(Diverged):
        first.sibling(2).chance(0.3)  # another coin than the first case's first
    extra = first.sibling(3)
    [extra.chance(p) for p in ps]
    with pytest.raises(Diverged):
        extra.chance(0.5)  # a coin more than the first case flipped

    from difftest.strategies._base import _integers

    numbers, flags = _integers(0, 9), st.booleans()
    tape = Tape(lambda strategy: 7 if strategy is numbers else True)
    assert (tape.record(numbers), tape.record(flags)) == (7, True)
    replay = tape.replay()
    assert (replay(numbers), replay(flags)) == (7, True)
    with pytest.raises(Diverged):
        replay(numbers)  # a draw more than the first case made
    with pytest.raises(Diverged):
        tape.replay()(flags)  # another strategy than the first case's first draw
    with pytest.raises(Diverged):
        tape.replay()(st.sampled_from((7, 8)))  # another strategy than an integer one
    # an integer draw whose range moved keeps its value, moved into the range
    assert [tape.replay()(_integers(a, b)) for a, b in ((0, 3), (8, 20), (2, 9))] == [3, 8, 7]
    varied = [tape.replay(np.random.default_rng(i))(_integers(0, 99)) for i in range(20)]
    assert len(set(varied)) > 10 and all(0 <= v <= 99 for v in varied)


def test_families_of_bad_size_are_refused():
    from difftest.strategies import families

    for size in (0, -1, 2.0):
        with pytest.raises(UsageError, match=r"size=.*integer >= 1"):
            families(size)
