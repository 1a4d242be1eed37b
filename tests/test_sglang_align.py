"""The sglang-align dialect: SGLang's plain align, end to end on the CPU.

Oracle vectors are worked out by hand from SGLang's contract (docs/SPEC.md,
"sglang-align"): ``E + 1`` buckets, the ``-1`` routes first in a segment of
their own, ``P = N + (E + 1)(B - 1)`` (``N * B`` when ``N < E + 1``), the
``expert_ids`` blocks past the total unspecified.
"""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import oracle
from difftest import adapters, registry
from difftest.adapters import Source
from difftest.campaign import Campaign
from difftest.case import Case, EPGroup
from difftest.compare import compare_rows
from difftest.dialects import DIALECT_INFO, SENTINEL, TensorArg
from difftest.errors import CaseError
from difftest.evaluate import evaluate
from difftest.sandbox import InProcessRunner, SandboxRunner
from difftest.strategies import cases

INFO = DIALECT_INFO["sglang-align"]


def _case(ids, num_experts, block_size, **options):
    return Case("sglang-align", "production", np.asarray(ids, dtype=np.int32), num_experts,
                block_size, **options)


# ---- oracle -----------------------------------------------------------------------------


def test_padded_size_counts_e_plus_one_segments_without_rounding_up():
    assert oracle.sglang_padded_size(8, 256, 64) == 8 * 64  # N < E + 1: N * B
    assert oracle.sglang_padded_size(300, 256, 64) == 300 + 257 * 63  # 16491, not a multiple
    assert oracle.sglang_padded_size(4, 3, 2) == 4 + 4 * 1
    assert oracle.sglang_padded_size(0, 4, 4) == 0


def test_experts_follow_an_empty_minus_one_segment():
    a = oracle.sglang_align(np.array([[2, 0], [2, 1]]), 3, 2)
    assert a.sorted_token_ids.tolist() == [1, 4, 3, 4, 0, 2, 4, 4]
    assert a.expert_ids.tolist() == [0, 1, 2, -1]
    assert a.num_tokens_post_pad == 6


def test_minus_one_routes_form_the_first_segment_under_expert_minus_one():
    a = oracle.sglang_align(np.array([[-1, 1], [0, -1]]), 2, 3)
    assert a.sorted_token_ids.tolist() == [0, 3, 4, 2, 4, 4, 1, 4, 4, 4]
    assert a.expert_ids.tolist() == [-1, 0, 1, -1]
    assert a.num_tokens_post_pad == 9


def test_ignore_invalid_expert_drops_the_minus_one_routes():
    a = oracle.sglang_align(np.array([[-1, 1], [0, -1]]), 2, 3, ignore_invalid_expert=True)
    assert a.sorted_token_ids.tolist() == [2, 4, 4, 1, 4, 4, 4, 4, 4, 4]
    assert a.expert_ids.tolist() == [0, 1, -1, -1]
    assert a.num_tokens_post_pad == 6


def test_ids_outside_minus_one_to_e_are_dropped():
    a = oracle.sglang_align(np.array([[5, -2]], dtype=np.int64), 2, 1)
    assert a.sorted_token_ids.tolist() == [2, 2]
    assert a.expert_ids.tolist() == [-1, -1]
    assert a.num_tokens_post_pad == 0


def test_bad_oracle_arguments_name_the_argument():
    with pytest.raises(TypeError, match="ignore_invalid_expert='yes'"):
        oracle.sglang_align(np.zeros((1, 1), dtype=np.int32), 2, 2,
                            ignore_invalid_expert="yes")
    with pytest.raises(ValueError, match="max_num_tokens_padded=1: must be at least 2"):
        oracle.sglang_align(np.zeros((1, 1), dtype=np.int32), 2, 2, max_num_tokens_padded=1)


# ---- case, plan, registry -----------------------------------------------------------


def test_case_options_round_trip_and_old_ids_are_unchanged():
    case = _case([[0, -1]], 4, 2, pad_sorted_token_ids=False, ignore_invalid_expert=True)
    back = Case.from_json(case.to_json())
    assert (back.pad_sorted_token_ids, back.ignore_invalid_expert) == (False, True)
    assert back.case_id == case.case_id != _case([[0, -1]], 4, 2).case_id
    # options at their defaults stay out of the content id (ids of saved cases hold)
    assert Case("align", "production", np.array([[1, 0]], np.int32), 2, 2).case_id == (
        "align-0d1910022398")
    old = case.to_dict()
    del old["pad_sorted_token_ids"], old["ignore_invalid_expert"]
    assert Case.from_dict(old).pad_sorted_token_ids is True


@pytest.mark.parametrize("build, match", [
    (lambda: Case("align", "production", np.zeros((1, 1), np.int32), 2, 2,
                  pad_sorted_token_ids=False), "only sglang-align"),
    (lambda: _case([[0]], 2, 2, expert_map=np.array([0, -1])), "takes none"),
    (lambda: _case([[0]], 4, 2, ep=EPGroup(4, 2, dispatch="expert_map")), "local_ids"),
    (lambda: _case([[0]], 2, 2, ignore_invalid_expert=1), "must be true or false"),
])
def test_malformed_sglang_align_cases_are_case_errors(build, match):
    with pytest.raises(CaseError, match=match):
        build()


def test_plan_passes_e_plus_one_buckets_the_scratch_and_both_flags():
    case = _case([[0, 1], [1, 1]], 3, 4, pad_sorted_token_ids=False)
    plan = INFO.plan(case, None)
    assert plan.arguments[1:3] == (4, 4)
    assert plan.arguments[7:] == (False, False)
    assert [a.name for a in plan.arguments if isinstance(a, TensorArg)] == [
        "topk_ids", "sorted_token_ids", "expert_ids", "num_tokens_post_pad", "cumsum_buffer"]
    assert plan.outputs["sorted_token_ids"][0] == (4 * 4,)  # N = 4 = E + 1: P = N * B
    assert plan.scratch["cumsum_buffer"][0] == (3 + 2,)
    assert INFO.arity == 9 and INFO.arguments[4] == "experts_ids"


def _sgl(topk_ids, num_experts, block_size, sorted_token_ids, experts_ids,
         num_tokens_post_pad, cumsum_buffer, pad_sorted_token_ids, ignore_invalid_expert):
    """A callable named as sgl_kernel names its parameters."""


def _own_names(topk, e, b, out, blocks, total, work, pad, ignore):
    """A callable with nine parameters named its own way."""


def _vllm_align(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                num_tokens_post_pad, expert_map=None):
    """vLLM's plain align."""


@pytest.mark.parametrize("fn, dialect", [
    (_sgl, "sglang-align"), (_own_names, "sglang-align"), (_vllm_align, "align")])
def test_dialect_of_a_callable_is_told_from_its_signature(fn, dialect):
    assert registry.dialect_of(fn, "py:m:f") == dialect


# ---- comparison ---------------------------------------------------------------------


def _outputs(expected):
    return {"sorted_token_ids": expected.sorted_token_ids.copy(),
            "expert_ids": expected.expert_ids.copy(),
            "num_tokens_post_pad": expected.num_tokens_post_pad.copy()}


def test_expert_ids_past_the_total_are_not_checked_but_blocks_inside_are():
    expected = INFO.reference(_case([[-1, 1], [0, -1]], 2, 3), None)
    assert expected.checked_blocks.tolist() == [3]
    got = _outputs(expected)
    got["expert_ids"][0, 3] = SENTINEL  # SGLang leaves it unwritten
    assert compare_rows(expected, got, stable=True, sentinel=SENTINEL) == []
    got["expert_ids"][0, 0] = 0  # the -1 segment's block named expert 0
    found = compare_rows(expected, got, stable=True, sentinel=SENTINEL)
    assert [(m.check, m.position, m.expected, m.actual) for m in found] == [
        ("expert_ids", 0, -1, 0)]
    assert "Mismatched elements: 1 / 3 " in found[0].message  # the 3 specified blocks


def test_positions_past_the_total_are_not_checked_with_the_pad_flag():
    expected = INFO.reference(_case([[-1, 1], [0, -1]], 2, 3), None)
    assert expected.checked_positions.tolist() == [9]
    got = _outputs(expected)
    got["sorted_token_ids"][0, 9] = SENTINEL  # an older SGLang's fill stops near the total
    assert compare_rows(expected, got, stable=True, sentinel=SENTINEL) == []
    got["sorted_token_ids"][0, 8] = SENTINEL  # a pad position inside expert 1's segment
    found = compare_rows(expected, got, stable=True, sentinel=SENTINEL)
    assert [(m.check, m.expert) for m in found] == [("sorted_token_ids", 1)]


def test_minus_one_segment_is_compared_as_a_segment_of_its_own():
    expected = INFO.reference(_case([[-1, 1], [0, -1]], 2, 3), None)
    got = _outputs(expected)
    got["sorted_token_ids"][0, :3] = [3, 0, 4]  # same routes, other order: fine unstable
    assert compare_rows(expected, got, stable=False, sentinel=SENTINEL) == []
    got["sorted_token_ids"][0, :2] = [2, 3]  # route 2 (expert 0) put in the -1 segment
    checks = {m.check for m in compare_rows(expected, got, stable=False, sentinel=SENTINEL)}
    assert checks == {"sorted_token_ids"}


def test_without_pad_flag_the_pad_positions_must_stay_unwritten():
    expected = INFO.reference(_case([[0, 1]], 2, 2, pad_sorted_token_ids=False), None)
    # N = 2 < E + 1 = 3: P = N * B = 4; routes at 0 and 2, every other position untouched
    assert expected.sorted_token_ids.tolist() == [[0, SENTINEL, 1, SENTINEL]]
    got = _outputs(expected)
    assert compare_rows(expected, got, stable=True, sentinel=SENTINEL) == []
    got["sorted_token_ids"][0, 1] = 2  # the pad value written anyway
    found = compare_rows(expected, got, stable=True, sentinel=SENTINEL)
    assert [m.check for m in found] == ["sorted_token_ids"]


# ---- the torch implementation and its faults -------------------------------------------


def _run(impl_name, case):
    impl = registry.resolve(impl_name, "sglang-align")
    outcome = InProcessRunner(impl, "cpu").run(case)
    return evaluate(case, outcome, stable=impl.stable)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True)
@given(cases(["sglang-align"], max_tokens=16, allow_large=False))
def test_torch_implementation_equals_the_oracle(case):
    evaluation = _run("torch", case)
    assert evaluation.verdict == "pass", evaluation.detail


def test_torch_writes_only_inside_the_segments_and_leaves_the_rest():
    import torch

    fn = registry.resolve("torch", "sglang-align").load()["sglang-align"]
    srt = torch.full((10,), SENTINEL, dtype=torch.int32)
    eid = torch.full((4,), SENTINEL, dtype=torch.int32)
    total = torch.zeros(1, dtype=torch.int32)
    fn(torch.tensor([[-1, 1], [0, -1]]), 3, 3, srt, eid, total,
       torch.zeros(4, dtype=torch.int32), False, False)
    s = SENTINEL
    assert srt.tolist() == [0, 3, s, 2, s, s, 1, s, s, s]
    assert eid.tolist() == [-1, 0, 1, s]
    assert total.tolist() == [9]


@pytest.mark.parametrize("fault, case, check", [
    ("vector-tail-overrun", _case([[0]], 1, 1), "guard_band"),  # P = 1: 3 ints past it
    ("negative-expert-kept", _case([[-1, 0]], 2, 2, ignore_invalid_expert=True),
     "num_tokens_post_pad"),
])
def test_each_torch_fault_is_caught_on_a_minimal_case(fault, case, check):
    assert _run("torch", case).verdict == "pass"
    evaluation = _run(f"torch:{fault}", case)
    assert (evaluation.verdict, evaluation.primary_check) == ("mismatch", check)


def test_vector_tail_overrun_is_harmless_when_p_is_a_multiple_of_four():
    case = _case([[0, 1]], 2, 2)  # P = N * B = 4
    assert _run("torch:vector-tail-overrun", case).verdict == "pass"


@pytest.mark.slow
@pytest.mark.parametrize("name, failing", [
    ("torch", False), ("torch:vector-tail-overrun", True), ("torch:negative-expert-kept", True)])
def test_campaign_over_both_contracts(name, failing, tmp_path):
    impl = registry.resolve(name, "sglang-align")
    with SandboxRunner(impl, "cpu", timeout_s=60) as runner:
        campaign = Campaign(impl, runner, tmp_path, seed=0)
        campaign.generate(dialects=impl.dialects, contracts=("production", "defensive"),
                          max_examples=None if failing else 150, seconds=60.0,
                          stop_on_failure=failing)
        campaign.close()
    failures = campaign.result.failures
    assert bool(failures) == failing, failures
    assert all(sig.startswith("sglang-align--") for sig in failures)


# ---- the sglang adapter -----------------------------------------------------------------

FAKE = '''
from cuda_impl import torch_impl
_ok = torch_impl.implementation()["sglang-align"]
CALLS = []

def moe_align_block_size({params}):
    CALLS.append(({names}))
    _ok({names}{tail})
'''

NEWEST = ("topk_ids", "num_experts", "block_size", "sorted_token_ids", "experts_ids",
          "num_tokens_post_pad", "cumsum_buffer", "pad_sorted_token_ids",
          "ignore_invalid_expert")


@pytest.mark.parametrize("params, tail", [(NEWEST, ""), (NEWEST[:-1], ", False")],
                         ids=["2026", "2025"])
def test_sglang_adapter_calls_moe_align_block_size_of_every_version(
        params, tail, tmp_path, monkeypatch):
    module = f"fake_sgl_align_{len(params)}"  # one module per version: imports are cached
    (tmp_path / f"{module}.py").write_text(FAKE.format(
        params=", ".join(params), names=", ".join(params), tail=tail))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(adapters, "SOURCES", {"sglang": {
        "sglang-align": [Source("missing_jit_module", "moe_align_block_size", NEWEST, newer=1),
                         Source(module, "moe_align_block_size", NEWEST, newer=1)]}})
    fake_sgl_align = importlib.import_module(module)

    assert tuple(inspect.signature(fake_sgl_align.moe_align_block_size).parameters) == params
    impl = registry.resolve("sglang")
    assert impl.dialects == ("sglang-align",)
    case = _case([[-1, 1], [0, -1]], 2, 3)
    runner = InProcessRunner(impl, "cpu")
    assert evaluate(case, runner.run(case), stable=impl.stable).verdict == "pass"
    assert fake_sgl_align.CALLS[-1][1] == 3 and len(fake_sgl_align.CALLS[-1]) == len(params)
    ignoring = _case([[-1, 1]], 2, 3, ignore_invalid_expert=True)
    verdict = evaluate(ignoring, runner.run(ignoring), stable=impl.stable)
    if len(params) == 8:
        assert verdict.verdict == "error" and "no ignore_invalid_expert" in verdict.detail
    else:
        assert verdict.verdict == "pass"
