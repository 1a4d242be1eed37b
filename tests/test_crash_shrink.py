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


def shrink_crash(name: str, dialect: str, case: Case) -> tuple[ShrinkResult, str]:
    impl = registry.resolve(f"py:user_impls:{name}", dialect)
    with SandboxRunner(impl, "cpu", timeout_s=30) as runner:
        def signature(candidate: Case) -> str:
            return evaluate(candidate, runner.run(candidate),
                            stable=impl.stable).signature(candidate)

        original = signature(case)
        result = shrink(case, lambda candidate: signature(candidate) == original,
                        max_seconds=SHRINK_SECONDS)
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
