"""The shrinker: real faults shrink to exact minimal cases, deterministically, within budget.

Predicates are built in-process from the oracle and the torch implementation
with one fault switched on: a candidate "still fails" when the checks that
fail on it include the original's primary check (the most fundamental
failed check, :data:`difftest.checks.CHECK_PRIORITY`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

import oracle
from difftest.case import Case, EPGroup
from difftest.checks import CHECK_PRIORITY
from difftest.classify import contract_of, edge_classes_of
from difftest.evaluate import evaluate
from difftest.shrink import PASSES, ShrinkResult, shrink

torch_impl = pytest.importorskip("cuda_impl.torch_impl")
from difftest.execute import run_case  # noqa: E402  (needs torch)
from difftest.sandbox import Outcome  # noqa: E402


# -- predicates ---------------------------------------------------------------------
def failed_checks(case: Case, callables: dict) -> set[str]:
    evaluation = evaluate(case, Outcome(run_case(case, callables, "cpu")), stable=False)
    return set(evaluation.checks_failed)


def fault_predicate(fault: str, case: Case) -> tuple[str, Callable[[Case], bool]]:
    """(primary check of ``case`` under ``fault``, "the candidate fails that check too")."""
    callables = torch_impl.implementation(fault)
    checks = failed_checks(case, callables)
    assert checks, f"torch:{fault} does not fail the starting case"
    primary = next(c for c in CHECK_PRIORITY if c in checks)
    return primary, lambda candidate: primary in failed_checks(candidate, callables)


def tagged(case: Case) -> Case:
    """``case`` with the contract and edge classes the classifier gives it."""
    case = case.replace(contract=contract_of(case))
    return case.replace(edge_classes=edge_classes_of(case), case_id=case.case_id)


def shrink_fault(fault: str, case: Case) -> tuple[str, ShrinkResult]:
    primary, still_fails = fault_predicate(fault, case)
    result = shrink(case, still_fails)
    assert still_fails(result.case)
    return primary, result


# -- starting cases (deterministic: no RNG) ---------------------------------------------
def big_vllm_case(*, T: int = 40, K: int = 4, E: int = 16, B: int = 16, L: int = 4) -> Case:
    """All L adapters plus base tokens: the last real slot sits at lora_ids[L]."""
    topk_ids = np.array([[(5 * t + 4 * k + t // 3) % E for k in range(K)] for t in range(T)],
                        dtype=np.int32)
    mapping = np.array([t % (L + 1) - 1 for t in range(T)], dtype=np.int32)
    return tagged(Case("vllm-lora", "production", topk_ids, E, B, max_loras=L,
                       token_lora_mapping=mapping,
                       lora_ids=oracle.active_lora_ids(mapping, L),
                       adapter_enabled=np.ones(L + 1, dtype=np.int32)))


def big_align_case(*, T: int = 24, K: int = 3, E: int = 8, B: int = 4,
                   negative: tuple = (), dtype=np.int32, padded: int | None = None) -> Case:
    topk_ids = np.array([[(3 * t + 3 * k + t // 2) % E for k in range(K)] for t in range(T)],
                        dtype=dtype)
    for t, k in negative:
        topk_ids[t, k] = -1
    return tagged(Case("align", "production", topk_ids, E, B, max_num_tokens_padded=padded))


# -- real faults ---------------------------------------------------------------------
def test_last_real_slot_failure_shrinks_to_one_base_and_one_adapter_token():
    case = big_vllm_case()
    assert case.contract == "production" and "full-slots-with-base" in case.edge_classes
    primary, result = shrink_fault("grid-skips-last-slot", case)
    m = result.case
    assert primary == "num_tokens_post_pad"  # slot 3's row is never written
    assert result.minimal
    assert (m.num_tokens, m.topk, m.num_experts, m.block_size, m.max_loras) == (2, 1, 1, 1, 1)
    # one base token and one adapter token: lora_ids = [-1, 0] puts slot 0 at index L = 1,
    # outside a launch of L entries. Neither token can go (without base tokens slot 0 sits at
    # index 0; without the adapter token nothing is listed), nor the adapter token become base.
    assert m.topk_ids.tolist() == [[0], [0]]
    assert m.token_lora_mapping.tolist() == [-1, 0]
    assert m.lora_ids.tolist() == [-1, 0]
    assert m.adapter_enabled is None and m.max_num_tokens_padded is None
    assert m.contract == "production"
    assert m.edge_classes == ("block-edges", "full-slots-with-base", "hot-expert")
    assert any(step.startswith("drop_slots: slots 4 -> ") for step in result.passes_applied)


def test_negative_expert_failure_shrinks_to_a_single_minus_one_route():
    case = big_align_case(negative=((3, 0), (11, 2), (17, 1)), dtype=np.int64, padded=200)
    assert case.contract == "defensive"
    primary, result = shrink_fault("negative-expert-kept", case)
    m = result.case
    assert primary == "num_tokens_post_pad"
    assert result.minimal
    # Minimal by the shrinker's order (N, T, K, L, E, R, B, P, sum|id|, ...): the fault needs
    # one route (T = K = 1) with a negative id. E = B = 1 are the smallest legal values and
    # still fail (-1 wraps to expert 0, counted: total 1, expected 0); P = None (production,
    # P = 1) is the smallest P; |-1| is the smallest |id| that is negative — 0 would be a
    # valid id, making the case production and passing. int32 is simpler than int64.
    assert m.topk_ids.tolist() == [[-1]] and m.topk_ids.dtype == np.int32
    assert (m.num_experts, m.block_size, m.max_num_tokens_padded) == (1, 1, None)
    assert m.contract == "defensive"
    assert m.edge_classes == ("block-edges", "invalid-expert-id")


def test_disabled_adapter_failure_shrinks_to_one_token_of_the_disabled_slot():
    base = big_vllm_case(T=30, K=2, E=16, B=8, L=4)
    enabled = np.ones(5, dtype=np.int32)
    enabled[2] = 0
    case = tagged(base.replace(adapter_enabled=enabled))
    assert case.contract == "defensive"
    primary, result = shrink_fault("sort-ignores-disabled", case)
    m = result.case
    assert primary == "unwritten_row" and result.minimal
    assert (m.num_tokens, m.topk, m.num_experts, m.block_size, m.max_loras) == (1, 1, 1, 1, 1)
    # the token must map to the disabled slot: with lora_ids from the mapping it is the only
    # way to list the slot; T = 0 would list none
    assert m.token_lora_mapping.tolist() == [0]
    assert m.lora_ids.tolist() == [0, -1]
    assert m.adapter_enabled.tolist() == [0, 1]


def test_slot_past_the_output_shrinks_to_an_empty_batch_with_a_long_row():
    base = big_vllm_case(T=30, K=2, E=16, B=8, L=4)
    case = tagged(base.replace(lora_ids=np.array([-1, 0, 1, 5, 3], dtype=np.int32)))
    assert case.contract == "defensive" and "slot-out-of-range" in case.edge_classes
    primary, result = shrink_fault("no-slot-upper-guard", case)
    m = result.case
    assert primary == "exception" and result.minimal
    # A 1-slot output of P elements sits between two 64-element guard bands and row v starts
    # v * P in: row 2 ends past the storage (torch raises, the primary check "exception")
    # iff 3P > P + 64, i.e. P >= 33. Row 1 would need P >= 65; the order ranks P before the
    # slot value, so [2] with P = 33 is smaller. P is pinned while the tokens go (an empty
    # batch still launches the row), then lowered to 33; a smaller P only hits the guard band.
    assert (m.num_tokens, m.topk, m.num_experts, m.block_size, m.max_loras) == (0, 1, 1, 1, 1)
    assert m.lora_ids.tolist() == [2]
    assert m.max_num_tokens_padded == 33
    assert "slot-out-of-range" in m.edge_classes and m.contract == "defensive"


def test_inactive_block_failure_shrinks_to_two_routes_and_a_block_of_two():
    case = big_align_case(T=40, K=4, E=16, B=16)
    assert case.contract == "production"
    primary, result = shrink_fault("inactive-blocks-zero", case)
    m = result.case
    assert primary == "expert_ids" and result.minimal
    # Production P = round_up(N + E(B - 1), B) (N * B when N < E): with N = 1, or with B = 1,
    # every block of M = P / B is active. N = 2 routes to one expert with B = 2 give P = 4,
    # M = 2 and block 1 inactive. N = 2 as one token of two routes (T = 1) beats two tokens.
    assert m.topk_ids.tolist() == [[0, 0]]
    assert (m.num_experts, m.block_size, m.max_num_tokens_padded) == (1, 2, None)
    assert m.edge_classes == ("duplicate-route", "hot-expert")


def test_uneven_ep_failure_shrinks_to_the_remainder_expert_of_three_over_two_ranks():
    topk_ids = np.array([[(7 * t + 3 * k) % 10 for k in range(4)] for t in range(20)],
                        dtype=np.int32)
    case = tagged(Case("ep-remap", "production", topk_ids, 10, 1,
                       ep=EPGroup(10, 4, "linear")))
    primary, result = shrink_fault("uneven-ep-truncates", case)
    m = result.case
    assert primary == "local_topk_ids" and result.minimal
    # G % R != 0 needs R >= 2 and G >= R + 1; linear with G = 3, R = 2: rank 0 owns {0, 1},
    # rank 1 owns {2}; the fault gives rank 1 expert 1 instead
    assert m.topk_ids.tolist() == [[1]]
    assert m.num_experts == m.ep.global_num_experts == 3
    assert (m.ep.ep_size, m.ep.strategy, m.ep.ranks) == (2, "linear", (1,))


# -- the shrinker's own guarantees ---------------------------------------------------------
def some_id_is_three(case: Case) -> bool:
    return bool((case.topk_ids == 3).any())


def test_shrinking_is_one_minimal_and_deterministic():
    case = big_align_case(T=24, K=3, E=8, B=4)
    assert some_id_is_three(case)
    seen: list[str] = []

    def still_fails(candidate: Case) -> bool:
        seen.append(candidate.case_id)
        return some_id_is_three(candidate)

    first = shrink(case, still_fails)
    assert len(seen) == len(set(seen)) == first.calls  # cached: no candidate runs twice
    second = shrink(case, some_id_is_three)
    m = first.case
    assert m.topk_ids.tolist() == [[3]]
    # E = 4 is the least E that keeps id 3 valid (production); B = 1, P = production
    assert (m.num_experts, m.block_size, m.max_num_tokens_padded) == (4, 1, None)
    assert first.minimal and second.minimal
    assert second.case.case_id == m.case_id
    assert second.passes_applied == first.passes_applied
    assert second.calls == first.calls
    # 1-minimal: shrinking the result again finds no step, without a single run
    again = shrink(m, some_id_is_three)
    assert again.case.case_id == m.case_id and again.passes_applied == [] and again.minimal
    # and here it is the global minimum: no production case of one route with E < 4 has id 3
    for e in range(1, 4):
        for g in range(e):
            assert not some_id_is_three(Case("align", "production", [[g]], e, 1))


def test_every_candidate_keeps_the_contract_and_carries_true_edge_classes():
    case = big_vllm_case(T=12, K=2, E=8, B=4, L=2)
    contracts, tags_ok = set(), []

    def still_fails(candidate: Case) -> bool:
        contracts.add(contract_of(candidate))
        tags_ok.append(candidate.edge_classes == edge_classes_of(candidate)
                       and candidate.contract == "production")
        return True  # everything "fails": the shrinker goes as far as the contract allows

    result = shrink(case, still_fails)
    m = result.case
    assert contracts == {"production"} and all(tags_ok) and result.minimal
    # T = 0 would be defensive (empty batch); one base token is the least production case
    assert m.topk_ids.tolist() == [[0]] and m.token_lora_mapping.tolist() == [-1]
    assert (m.num_experts, m.block_size, m.max_loras) == (1, 1, 1)
    assert m.lora_ids.tolist() == [-1, -1]


def test_sglang_tokens_and_requests_shrink_consistently():
    seg = np.array([0, 3, 7, 12, 16], dtype=np.int32)
    req = np.array([2, 0, 1, 2], dtype=np.int32)
    topk_ids = np.array([[(3 * t + 2 * k) % 6 for k in range(2)] for t in range(16)],
                        dtype=np.int32)
    case = tagged(Case("sglang-lora", "production", topk_ids, 6, 4, max_loras=3,
                       seg_indptr=seg, req_to_lora=req))
    assert case.contract == "production"

    def still_fails(candidate: Case) -> bool:
        # a route to expert 5 on a token of an adapter slot
        mapping = oracle.sglang_token_lora_mapping(candidate.seg_indptr,
                                                   candidate.req_to_lora, candidate.num_tokens)
        return bool(((candidate.topk_ids == 5).any(axis=1) & (mapping >= 0)).any())

    result = shrink(case, still_fails)
    m = result.case
    assert result.minimal
    assert m.topk_ids.tolist() == [[5]] and m.num_experts == 6
    assert m.seg_indptr.tolist() == [0, 1] and m.req_to_lora.tolist() == [0]
    assert m.max_loras == 1 and m.contract == "production"


def test_budget_exhaustion_returns_the_best_case_so_far_and_not_minimal():
    case = big_align_case(T=24, K=3, E=8, B=4)
    result = shrink(case, some_id_is_three, max_calls=3)
    assert not result.minimal and result.calls == 3
    assert some_id_is_three(result.case)
    assert result.case.size_key() < case.size_key()
    assert len(result.passes_applied) >= 1
    timed_out = shrink(case, some_id_is_three, max_seconds=1e-9)
    assert not timed_out.minimal and timed_out.calls == 0
    assert timed_out.case is case and timed_out.passes_applied == []


def test_passes_run_in_a_fixed_documented_order():
    assert [p.__name__ for p in PASSES] == [
        "drop_tokens", "drop_requests", "lower_topk", "drop_slots", "drop_lora_ids",
        "trade_routes_for_experts", "lower_ep", "renumber_experts", "lower_experts",
        "lower_loras", "lower_block_size", "lower_padding", "simplify_values"]
    assert all(p.__doc__ for p in PASSES)


def test_a_bad_budget_is_a_value_error_naming_it():
    case = big_align_case()
    with pytest.raises(ValueError, match="max_calls=0"):
        shrink(case, some_id_is_three, max_calls=0)
    with pytest.raises(ValueError, match="max_seconds=0"):
        shrink(case, some_id_is_three, max_seconds=0)


def test_an_exception_of_the_predicate_propagates_unchanged():
    def still_fails(candidate: Case) -> bool:
        raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        shrink(big_align_case(), still_fails)


def test_short_defensive_lora_ids_does_not_pin_max_loras():
    # EP rank 1 of 2 receives route 0 (expert 0, foreign) as the local sentinel -1;
    # the only defensive input is lora_ids = [0], shorter than L + 1. Padding it to the
    # new L + 1 would make the case production, so L is lowered with its length kept.
    from difftest.case import EPGroup

    start = tagged(Case("vllm-lora", "defensive", np.array([[0]], dtype=np.int32), 2, 1,
                        max_loras=6, token_lora_mapping=np.array([0], dtype=np.int32),
                        lora_ids=np.array([0], dtype=np.int32),
                        ep=EPGroup(2, 2, "linear", "local_ids", ranks=(1,))))
    assert start.contract == "defensive"
    _, result = shrink_fault("negative-expert-kept", start)
    assert result.case.max_loras == 1 and result.case.lora_ids.tolist() == [0]
    assert result.minimal


def test_an_unexpected_error_of_a_pass_surfaces():
    from difftest.shrink import Shrinker

    def broken_pass(s: Shrinker) -> None:
        raise IndexError("index 3 is out of bounds")

    case = big_align_case()
    shrinker = Shrinker(case, some_id_is_three, [PASSES[0], broken_pass],
                        max_seconds=60, max_calls=100)
    with pytest.raises(IndexError, match="index 3 is out of bounds"):
        shrinker.run()


def test_each_dimension_tries_its_smallest_values_before_halving():
    # halving alone keeps T and B where no half and no single step still fails
    # (T 24 -> 23 or 12, B 16 -> 8 -> ... hold only T % 3 == 2 and B % 3 == 2 by luck)
    def still_fails(candidate: Case) -> bool:
        return candidate.num_tokens % 3 == 2 and candidate.block_size % 3 == 2

    result = shrink(big_align_case(T=23, K=3, E=8, B=14), still_fails)
    m = result.case
    assert result.minimal
    assert (m.num_tokens, m.block_size) == (2, 2)
    assert "drop_tokens: T 23 -> 2" in result.passes_applied
    assert "lower_block_size: B 14 -> 2" in result.passes_applied
    assert result.calls <= 20


def test_shrink_log_compresses_a_chain_of_one_pass_and_a_long_run_of_steps():
    from difftest.shrink import compressed_log

    steps = ["drop_tokens: T 16384 -> 8192", "drop_tokens: T 8192 -> 4096",
             "drop_tokens: T 4096 -> 2 (P pinned at 9)", "lower_experts: E 8 -> 1 (T 5 -> 3)"]
    steps += [f"simplify_ids: topk_ids[0, {k}] 3 -> 0" for k in range(7)]
    steps += ["drop_tokens: T 2 -> 1"]
    assert compressed_log(steps) == [
        "drop_tokens: T 16384 → 2 in 3 steps",
        "lower_experts: E 8 -> 1 (T 5 -> 3)",
        "simplify_ids: topk_ids[0, 0] 3 -> 0",
        "simplify_ids: topk_ids[0, 1] 3 -> 0",
        "simplify_ids: … 3 more steps …",
        "simplify_ids: topk_ids[0, 5] 3 -> 0",
        "simplify_ids: topk_ids[0, 6] 3 -> 0",
        "drop_tokens: T 2 -> 1",
    ]


def test_values_past_their_range_take_the_ladder_not_single_steps():
    from difftest.shrink._surgery import toward_base, toward_zero

    # in range: half and one step, as before
    assert toward_base(5, 8) == [-1, 0, 2, 4]
    assert toward_base(8, 8) == [-1, 0, 4, 7]
    assert toward_zero(64, 64) == [0, 32, 63]
    # past L (E): the last in range, L (E), L + 1, then powers of two, never value - 1
    assert toward_base(11, 8) == [-1, 0, 7, 8, 9]
    assert toward_base(1000, 8) == [-1, 0, 7, 8, 9, 16, 32, 64, 128, 256, 512]
    assert toward_zero(70, 64) == [0, 63, 64, 65]
    assert toward_zero(2**31 - 1, 64)[-1] == 2**30
    # below -1, mirrored
    assert toward_base(-5, 8) == [-1, 0, -2, -4]
    assert toward_zero(-7, 64) == [0, -1, -2, -4]
    assert toward_base(-2**31, 4) == [-1, 0] + [-(2**j) for j in range(1, 31)]
