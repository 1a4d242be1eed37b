"""Crashes shrink to small cases in the sandbox within a 30 s shrink budget.

The kernels (``tests/user_impls.py``) segfault; every candidate runs in a
sandbox worker, and a candidate "still fails" when its signature is the
original's (``<dialect>--crash--...``), as in a campaign.
"""

from __future__ import annotations

import numpy as np
import pytest

from difftest import registry
from difftest.case import Case
from difftest.classify import contract_of, edge_classes_of
from difftest.evaluate import evaluate
from difftest.sandbox import SandboxRunner
from difftest.shrink import ShrinkResult, shrink

pytest.importorskip("torch")

SHRINK_SECONDS = 30.0


def tagged(case: Case) -> Case:
    case = case.replace(contract=contract_of(case))
    return case.replace(edge_classes=edge_classes_of(case), case_id=case.case_id)


def shrink_crash(name: str, dialect: str, case: Case, *, costly: bool = False,
                 crashes: list[str] | None = None) -> tuple[ShrinkResult, str]:
    """Shrink ``case`` against ``name`` in a sandbox; ``crashes`` collects the signature of
    every candidate that crashed (each one a worker lost)."""
    impl = registry.resolve(f"py:user_impls:{name}", dialect)
    with SandboxRunner(impl, "cpu", timeout_s=30) as runner:
        def signature(candidate: Case) -> str:
            evaluation = evaluate(candidate, runner.run(candidate), stable=impl.stable)
            if crashes is not None and evaluation.verdict == "crash":
                crashes.append(evaluation.signature(candidate))
            return evaluation.signature(candidate)

        original = signature(case)
        result = shrink(case, lambda candidate: signature(candidate) == original,
                        max_seconds=SHRINK_SECONDS, costly=costly)
        assert signature(result.case) == original  # the minimal case crashes alone
    return result, original


def test_a_segfault_on_t_mod_3_equal_2_shrinks_to_two_tokens():
    T, K, E, L = 16832, 4, 16, 4
    topk_ids = np.array([[(5 * t + 4 * k + t // 3) % E for k in range(K)] for t in range(T)],
                        dtype=np.int32)
    mapping = np.array([t % (L + 1) - 1 for t in range(T)], dtype=np.int32)
    case = tagged(Case("vllm-lora", "production", topk_ids, E, 16, max_loras=L,
                       token_lora_mapping=mapping))
    result, signature = shrink_crash("segfaults_when_tokens_mod_3_is_2", "vllm-lora", case)
    assert signature.startswith("vllm-lora--crash--")
    m = result.case
    assert result.minimal
    # the halves (8416 tokens) do not crash; then T = 0 (defensive: refused), 1, 2
    assert any(step.startswith("drop_tokens: T 16832 -> 2") for step in result.passes_applied)
    assert (m.num_tokens, m.topk, m.num_experts, m.block_size, m.max_loras) == (2, 1, 1, 1, 1)
    assert m.contract == "production"


def test_a_costly_shrink_takes_every_floor_in_one_crash():
    # A far slot crashes whatever the rest: E, R, L, B, the dtype and the disabled adapter
    # each cost a crash one step at a time; composed into one candidate, one crash
    from difftest.case import EPGroup

    topk_ids = np.zeros((0, 1), dtype=np.int64)
    case = tagged(Case("vllm-lora", "defensive", topk_ids, 6, 64, max_loras=3,
                       token_lora_mapping=np.zeros(0, dtype=np.int32),
                       lora_ids=np.array([2**31 - 2], dtype=np.int32),
                       adapter_enabled=np.array([1, 0, 1, 1], dtype=np.int32),
                       ep=EPGroup(6, 3, ranks=(0, 1, 2))))
    runs: dict[bool, list[str]] = {False: [], True: []}
    results = {costly: shrink_crash("segfaults_on_a_far_slot", "vllm-lora", case,
                                    costly=costly, crashes=runs[costly])[0]
               for costly in (False, True)}
    plain, costly = results[False], results[True]
    assert plain.minimal and costly.minimal
    assert costly.case.case_id == plain.case.case_id  # the same minimal case
    m = costly.case
    assert (m.num_experts, m.max_loras, m.block_size, m.ep, m.adapter_enabled,
            m.lora_ids.tolist()) == (1, 1, 1, None, None, [2**21])
    [leap] = [step for step in costly.passes_applied if step.startswith("leap_to_floors: ")]
    assert "lower_block_size: B 64 -> 1" in leap and "EP removed" in leap
    # the runs that crashed: the original, the minimal case alone, and one per accepted
    # step: 7 single steps (R twice, E, L, B, dtype, adapters) then the ladder's and a
    # lora_ids deletion's, against the leap, the ladder's and the deletion's
    assert len(plain.passes_applied) == 9 and len(runs[False]) == 11, plain.passes_applied
    assert len(costly.passes_applied) == 3 and len(runs[True]) == 5, costly.passes_applied


def test_a_large_path_crash_on_a_minus_one_route_trades_routes_for_experts():
    T, K, E = 600, 4, 8
    topk_ids = np.array([[(5 * t + 3 * k) % E for k in range(K)] for t in range(T)],
                        dtype=np.int32)
    topk_ids[123, 2] = topk_ids[400, 1] = -1
    case = tagged(Case("align", "defensive", topk_ids, E, 16))
    result, signature = shrink_crash("segfaults_on_large_path_with_invalid_route", "align", case)
    assert signature.startswith("align--crash--")
    m = result.case
    assert result.minimal
    # deletions stop at 1024 routes (fewer take the small path); one token with E = 65
    # takes the large path too, and then one column of it
    assert any(step.startswith("trade_routes_for_experts: T 256 -> 1")
               for step in result.passes_applied)
    assert m.num_routes <= 4
    assert m.topk_ids.tolist() == [[-1]]
    assert (m.num_experts, m.block_size, m.max_num_tokens_padded) == (65, 1, None)
    assert m.contract == "defensive"


def test_a_slot_far_past_l_goes_to_the_first_power_of_two_that_still_crashes():
    # the crash needs lora_ids[i] >= L + 2**20; a step-by-step walk down from 2**31 - 2
    # would be a crash (a worker restart) per step, the ladder is runs that pass and one
    # that crashes: -1, 0, L, L + 1, 2, 4, ..., 2**20 pass, 2**21 crashes
    case = tagged(Case("vllm-lora", "defensive", np.zeros((0, 1), dtype=np.int64), 1, 64,
                       max_loras=1, token_lora_mapping=np.zeros(0, dtype=np.int32),
                       lora_ids=np.array([2**31 - 2], dtype=np.int32),
                       adapter_enabled=np.array([1, 1], dtype=np.int32)))
    result, signature = shrink_crash("segfaults_on_a_far_slot", "vllm-lora", case)
    assert signature == "vllm-lora--crash--sigsegv"
    m = result.case
    assert result.minimal
    assert "simplify_values: lora_ids[0] 2147483646 -> 2097152" in result.passes_applied
    assert m.lora_ids.tolist() == [2**21]
    assert (m.num_tokens, m.block_size, m.adapter_enabled) == (0, 1, None)
    assert result.calls <= 40
