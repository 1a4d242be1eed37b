"""Each check of SPEC §9 fails on a crafted wrong output and passes on the right one."""

from __future__ import annotations

import numpy as np
import pytest

from difftest.case import Case, EPGroup
from difftest.dialects import DIALECT_INFO
from difftest.evaluate import evaluate
from difftest.execute import SENTINEL, RankRun
from difftest.sandbox import Outcome

# One base token and one adapter token, L = 2, slot 1 disabled, a -1 expert id.
#   routes: 0 -> token 0 (base) expert 1; 1 -> token 0 expert 0;
#           2 -> token 1 (slot 0) expert 1; 3 -> token 1 expert -1 (dropped)
LORA_CASE = Case(
    "vllm-lora", "defensive", np.array([[1, 0], [1, -1]], dtype=np.int32), num_experts=2,
    block_size=2, max_loras=2, token_lora_mapping=np.array([-1, 0], dtype=np.int32),
    lora_ids=np.array([-1, 0, 1], dtype=np.int32),
    adapter_enabled=np.array([1, 0, 1], dtype=np.int32), max_num_tokens_padded=6)

# Expected (by hand): slot 0 has one route (2, expert 1): P = 6, M = 3
#   sorted row 0 = [2, 4, 4, 4, 4, 4], expert_ids row 0 = [1, -1, -1], total 2
#   slot 1 is disabled: row unwritten (sentinel)
S = SENTINEL
RIGHT = {
    "sorted_token_ids": np.array([2, 4, 4, 4, 4, 4] + [S] * 6, dtype=np.int32),
    "expert_ids": np.array([1, -1, -1, S, S, S], dtype=np.int32),
    "num_tokens_post_pad": np.array([2, S], dtype=np.int32),
}


def _outcome(outputs=None, **kw) -> Outcome:
    run = RankRun(None, {k: v.copy() for k, v in (outputs or RIGHT).items()})
    for key, value in kw.items():
        setattr(run, key, value)
    return Outcome([[run]])


def _checks(case: Case, outcome: Outcome, stable: bool = False) -> tuple[str, list[str]]:
    ev = evaluate(case, outcome, stable=stable)
    return ev.verdict, ev.checks_failed


def test_reference_matches_the_hand_computed_rows():
    exp = DIALECT_INFO["vllm-lora"].reference(LORA_CASE, None)
    assert exp.sorted_token_ids[0].tolist() == [2, 4, 4, 4, 4, 4]
    assert exp.expert_ids[0].tolist() == [1, -1, -1]
    assert exp.num_tokens_post_pad.tolist()[0] == 2
    assert exp.written.tolist() == [True, False]


def test_right_outputs_pass():
    assert _checks(LORA_CASE, _outcome()) == ("pass", [])


@pytest.mark.parametrize("name, index, value, check", [
    ("num_tokens_post_pad", 0, 4, "num_tokens_post_pad"),
    ("expert_ids", 1, 0, "expert_ids"),
    ("sorted_token_ids", 0, 3, "sorted_token_ids"),
    ("sorted_token_ids", 4, 0, "pad_value"),
    ("sorted_token_ids", 7, 4, "unwritten_row"),
    ("expert_ids", 4, -1, "unwritten_row"),
    ("num_tokens_post_pad", 1, 0, "unwritten_row"),
])
def test_each_check_fails_on_one_wrong_element(name, index, value, check):
    outputs = {k: v.copy() for k, v in RIGHT.items()}
    outputs[name][index] = value
    verdict, checks = _checks(LORA_CASE, _outcome(outputs))
    assert verdict == "mismatch"
    assert checks[0] == check


def test_mismatch_record_names_slot_expert_position_expected_actual():
    outputs = {k: v.copy() for k, v in RIGHT.items()}
    outputs["sorted_token_ids"][0] = 3
    ev = evaluate(LORA_CASE, _outcome(outputs), stable=False)
    m = next(m for m in ev.mismatches if m.check == "sorted_token_ids")
    assert (m.slot, m.expert, m.position, m.expected, m.actual) == (0, 1, 0, 2, 3)
    assert m.message.splitlines()[0] == ("slot 0 / expert 1 / sorted_token_ids[0:2]: segment "
                                         "holds different routes (compared as sorted multisets)")
    assert "Mismatched elements: 1 / 2 (50.0%)" in m.message


def test_segment_order_is_free_unless_the_implementation_is_stable():
    case = Case("align", "production", np.array([[0], [0]], dtype=np.int32), 1, 2)
    # production P = round_up(2 + 1 * (2 - 1), 2) = 4, M = 2
    swapped = {"sorted_token_ids": np.array([1, 0, 2, 2], dtype=np.int32),
               "expert_ids": np.array([0, -1], dtype=np.int32),
               "num_tokens_post_pad": np.array([2], dtype=np.int32)}
    assert _checks(case, _outcome(swapped), stable=False) == ("pass", [])
    assert _checks(case, _outcome(swapped), stable=True) == ("mismatch", ["sorted_token_ids"])


def test_guard_band_damage_is_a_mismatch():
    verdict, checks = _checks(LORA_CASE, _outcome(
        guard_damage={"sorted_token_ids": [(12, 7)]}))
    assert (verdict, checks) == ("mismatch", ["guard_band"])


def test_mutated_input_is_a_mismatch():
    verdict, checks = _checks(LORA_CASE, _outcome(
        mutated_inputs={"token_lora_mapping": (0, -1, 0)}))
    assert (verdict, checks) == ("mismatch", ["input_mutated"])


def test_exception_is_an_error_and_sticky_error_a_crash():
    assert _checks(LORA_CASE, _outcome(error="RuntimeError: boom")) == ("error", ["exception"])
    verdict, checks = _checks(LORA_CASE, _outcome(
        error="AcceleratorError: an illegal memory access", fatal=True))
    assert verdict == "crash" and checks[0] == "crash"


def test_crash_and_timeout_outcomes_keep_their_verdict():
    for verdict in ("crash", "timeout"):
        ev = evaluate(LORA_CASE, Outcome(verdict=verdict, detail="x"), stable=False)
        assert (ev.verdict, ev.checks_failed) == (verdict, [verdict])
        assert ev.signature(LORA_CASE) == f"vllm-lora--{verdict}--{verdict}"


def test_repeats_that_disagree_are_a_mismatch():
    wrong = {k: v.copy() for k, v in RIGHT.items()}
    wrong["num_tokens_post_pad"][0] = 0
    runs = [[RankRun(None, RIGHT)], [RankRun(None, wrong)]]
    ev = evaluate(LORA_CASE, Outcome(runs), stable=False)
    assert ev.checks_failed == ["num_tokens_post_pad", "repeat_disagree"]


def test_a_repeat_with_run_1s_bytes_is_still_checked_for_damage_and_a_wrong_run_1_is_kept():
    wrong = {k: v.copy() for k, v in RIGHT.items()}
    wrong["expert_ids"][1] = 0
    same = [[RankRun(None, wrong)], [RankRun(None, wrong)]]
    assert _checks(LORA_CASE, Outcome(same)) == ("mismatch", ["expert_ids"])
    damaged = [[RankRun(None, RIGHT)],
               [RankRun(None, RIGHT, guard_damage={"expert_ids": [(6, 3)]})]]
    assert _checks(LORA_CASE, Outcome(damaged)) == ("mismatch", ["guard_band"])
    mutated = [[RankRun(None, RIGHT)],
               [RankRun(None, RIGHT, mutated_inputs={"topk_ids": (0, 1, 0)})]]
    assert _checks(LORA_CASE, Outcome(mutated)) == ("mismatch", ["input_mutated"])
    # segment order differs but canonically equal: no disagreement
    case = Case("align", "production", np.array([[0], [0]], dtype=np.int32), 1, 2)
    rows = {"expert_ids": np.array([0, -1], dtype=np.int32),
            "num_tokens_post_pad": np.array([2], dtype=np.int32)}
    a = RankRun(None, {"sorted_token_ids": np.array([0, 1, 2, 2], np.int32), **rows})
    b = RankRun(None, {"sorted_token_ids": np.array([1, 0, 2, 2], np.int32), **rows})
    assert _checks(case, Outcome([[a], [b], [a]])) == ("pass", [])


REMAP = Case("ep-remap", "production", np.array([[0, 9], [4, 5]], dtype=np.int32), 10, 1,
             ep=EPGroup(10, 4))


def _remap_runs(shift_rank: int | None = None) -> Outcome:
    runs = []
    for rank in range(4):
        local = DIALECT_INFO["ep-remap"].reference(REMAP, rank).local_topk_ids.reshape(-1).copy()
        if rank == shift_rank:
            local[:] = -1
        runs.append(RankRun(rank, {"local_topk_ids": local}))
    return Outcome([runs])


def test_remap_conservation_and_per_rank_checks():
    # G = 10, R = 4 linear: ranks own 3, 3, 2, 2 experts: 0-2, 3-5, 6-7, 8-9
    expected = [DIALECT_INFO["ep-remap"].reference(REMAP, r).local_topk_ids.tolist()
                for r in range(4)]
    assert expected == [[[0, -1], [-1, -1]], [[-1, -1], [1, 2]], [[-1, -1], [-1, -1]],
                        [[-1, 1], [-1, -1]]]
    assert _checks(REMAP, _remap_runs()) == ("pass", [])
    verdict, checks = _checks(REMAP, _remap_runs(shift_rank=1))
    assert verdict == "mismatch" and checks == ["local_topk_ids", "ep_conservation"]


def test_align_conservation_flags_a_route_lost_across_ranks():
    # G = 3 experts over R = 2 ranks (linear: rank 0 owns 0-1, rank 1 owns 2);
    # routes 0..3 go to experts 0, 2, 1, 2
    case = Case("align", "production", np.array([[0, 2], [1, 2]], dtype=np.int32), 3, 1,
                ep=EPGroup(3, 2, "linear", "local_ids"))
    runs = []
    for rank in (0, 1):
        exp = DIALECT_INFO["align"].reference(case, rank)
        runs.append(RankRun(rank, {"sorted_token_ids": exp.sorted_token_ids[0].copy(),
                                   "expert_ids": exp.expert_ids[0].copy(),
                                   "num_tokens_post_pad": exp.num_tokens_post_pad.copy()}))
    assert runs[1].outputs["sorted_token_ids"][:2].tolist() == [1, 3]
    assert _checks(case, Outcome([runs])) == ("pass", [])
    runs[1].outputs["sorted_token_ids"][1] = 4  # route 3 replaced by the pad value
    ev = evaluate(case, Outcome([runs]), stable=True)
    assert ev.checks_failed == ["sorted_token_ids", "ep_conservation"]
    lost = next(m for m in ev.mismatches if m.check == "ep_conservation")
    assert (lost.position, lost.expert, lost.actual) == (3, 2, 0)
    assert "1 route(s) landed on no rank; first: route 3 (global expert 2)" in lost.message
