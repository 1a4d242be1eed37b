"""Batches: one staged array per batch gives every case exactly what it gets alone."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import user_impls  # noqa: E402  (needs torch)
from _wild import store_two as _store_two  # noqa: E402

from cuda_impl import torch_impl  # noqa: E402
from difftest.case import Case  # noqa: E402
from difftest.dialects import DIALECT_INFO  # noqa: E402
from difftest.execute import ALIGN, GUARD, GUARD_LEN, SENTINEL, Staged, run_batch, run_case  # noqa: E402


def _draw(n: int, seed: int) -> list[Case]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    from difftest.strategies import cases

    drawn: list[Case] = []

    @hseed(seed)
    @settings(max_examples=n, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(cases(max_tokens=40, allow_large=False))
    def collect(case: Case) -> None:
        drawn.append(case)

    collect()
    return drawn


def _vllm(T: int) -> Case:
    return Case("vllm-lora", "production", np.zeros((T, 1), dtype=np.int32), 1, 1,
                max_loras=1, token_lora_mapping=np.zeros(T, dtype=np.int32))


def _same(a, b) -> None:
    assert (a.rank, a.error, a.fatal) == (b.rank, b.error, b.fatal)
    assert a.guard_damage == b.guard_damage and a.mutated_inputs == b.mutated_inputs
    assert a.outputs.keys() == b.outputs.keys()
    for name in a.outputs:
        np.testing.assert_array_equal(a.outputs[name], b.outputs[name])


@pytest.mark.parametrize("queued", [False, True])
def test_a_batch_gives_every_case_what_it_gives_alone(queued):
    cases = _draw(40, seed=4)  # a seed whose 40 draws hold every dialect, and EP cases
    assert {c.dialect for c in cases} == {"align", "vllm-lora", "sglang-lora", "ep-remap",
                                          "sglang-align"}
    assert any(len(c.ranks()) > 1 for c in cases)
    fns = torch_impl.implementation()
    batch = run_batch(cases, fns, "cpu", repeats=2, queued=queued)
    assert len(batch) == len(cases)
    assert all(run.queued is queued for runs in batch for repeat in runs for run in repeat)
    for case, runs in zip(cases, batch):
        alone = run_case(case, fns, "cpu", repeats=2)
        assert len(runs) == 2 and [len(r) for r in runs] == [len(case.ranks())] * 2
        for got, want in zip(runs, alone):
            for a, b in zip(got, want):
                _same(a, b)


def test_an_overrun_and_an_error_stay_with_their_own_case():
    fns = {"vllm-lora": user_impls.writes_past_last_row}
    # T > 3 writes 7 one element past sorted_token_ids; T = 2 does not
    batch = run_batch([_vllm(4), _vllm(2), _vllm(5)], fns, "cpu")
    first, second, third = (runs[0][0] for runs in batch)
    assert first.guard_damage == {"sorted_token_ids": [(first.outputs["sorted_token_ids"].size,
                                                         7)]}
    assert second.guard_damage == {} and second.error is None
    assert third.guard_damage == {"sorted_token_ids": [(third.outputs["sorted_token_ids"].size,
                                                         7)]}
    raising = {"align": user_impls.align_raises_on_expert_map}
    plain = Case("align", "production", np.array([[0, 1]], dtype=np.int32), 2, 2)
    mapped = plain.replace(expert_map=np.array([0, -1], dtype=np.int32))
    batch = run_batch([plain, mapped, plain], raising, "cpu")
    errors = [runs[0][0].error for runs in batch]
    assert errors[0] is None and errors[2] is None
    assert errors[1] == "NotImplementedError: expert_map is not supported"
    assert batch[2][0][0].outputs["num_tokens_post_pad"].tolist() == [4]


def test_a_mutated_input_is_reported_for_the_case_that_mutated_it():
    fns = {"vllm-lora": user_impls.mutates_mapping}
    clean = _vllm(2)
    negative = clean.replace(token_lora_mapping=np.array([0, -1], dtype=np.int32))
    batch = run_batch([clean, negative, clean], fns, "cpu")
    mutated = [runs[0][0].mutated_inputs for runs in batch]
    assert mutated == [{}, {"token_lora_mapping": (1, -1, 0)}, {}]


def test_every_byte_of_a_staged_block_outside_the_data_is_guard_band():
    case = Case("vllm-lora", "defensive", np.array([[3, 1], [0, 2]], dtype=np.int64), 4, 3,
                max_loras=2, token_lora_mapping=np.array([1, -1], dtype=np.int32),
                lora_ids=np.array([1, -1, 0], dtype=np.int32),
                adapter_enabled=np.array([1, 0, 1], dtype=np.int32))
    plan = DIALECT_INFO[case.dialect].plan(case, None)
    staged = Staged(plan)
    data = np.zeros(staged.nbytes, dtype=bool)
    for buf in staged.buffers:
        size = buf.numel * buf.dtype.itemsize
        assert buf.start % ALIGN == 0 and buf.data % ALIGN == 0 and buf.end % ALIGN == 0
        assert buf.lead >= GUARD_LEN
        assert (buf.end - buf.data - size) >= GUARD_LEN * buf.dtype.itemsize
        region = staged.block[buf.data:buf.data + size].view(buf.dtype).reshape(buf.shape)
        if buf.role == "input":
            np.testing.assert_array_equal(region, plan.inputs[buf.name])
        else:
            assert (region == (SENTINEL if buf.role == "output" else 0)).all()
        band = np.concatenate([staged.block[buf.start:buf.data],
                               staged.block[buf.data + size:buf.end]]).view(buf.dtype)
        assert (band == np.array(GUARD).astype(buf.dtype)).all()
        data[buf.data:buf.data + size] = True
    assert staged.buffers[0].start == 0 and staged.buffers[-1].end == staged.nbytes
    assert all(a.end == b.start for a, b in zip(staged.buffers, staged.buffers[1:]))
    assert plan.inputs["topk_ids"].dtype == np.int64  # both item sizes are staged
    # what a call may change and what it must leave as staged split the block exactly
    may = np.zeros(staged.nbytes, dtype=int)
    for lo, hi in staged.writable + staged.fixed:
        may[lo:hi] += 1
    assert (may == 1).all()
    for buf in staged.buffers:
        size = buf.numel * buf.dtype.itemsize
        inside = any(lo <= buf.data and buf.data + size <= hi for lo, hi in staged.fixed)
        assert inside == (buf.role == "input"), buf.name


def test_a_write_into_a_guard_band_between_outputs_makes_only_its_call_a_suspect():
    from difftest.execute import RankRun, _Call, _calls_with_stray_changes

    staged = Staged(DIALECT_INFO["vllm-lora"].plan(_vllm(3), None))
    calls = [_Call(0, None, staged, k * staged.nbytes, RankRun(None)) for k in range(3)]
    pristine = np.concatenate([staged.block] * 3)
    back = pristine.copy()
    for lo, hi in staged.writable:  # every output written: no call is suspect
        back[staged.nbytes + lo:staged.nbytes + hi] = 1
    assert _calls_with_stray_changes(calls, back, 0) == set()
    lo, hi = staged.fixed[-1]  # the band after the last buffer of the second call
    back[staged.nbytes + lo] ^= 0xFF
    assert _calls_with_stray_changes(calls, back, 0) == {1}
    first_input = staged.buffers[0]
    back[2 * staged.nbytes + first_input.data] ^= 0x01  # an input of the third call
    assert _calls_with_stray_changes(calls, back, 0) == {1, 2}


def test_a_sticky_error_at_the_copy_back_goes_to_the_call_that_was_repeated():
    from difftest.execute import RankRun, _Call, _fatal_at_copy

    staged = Staged(DIALECT_INFO["vllm-lora"].plan(_vllm(2), None))
    repeated = [_Call(k, None, staged, 0, RankRun(None)) for k in range(3)]
    _fatal_at_copy(repeated, RuntimeError("CUDA error: an illegal memory access"))
    assert repeated[0].run.fatal and "after the 3 runs of the call" in repeated[0].run.error
    assert not any(c.run.fatal or c.run.error for c in repeated[1:])
    ranks = [_Call(0, r, staged, 0, RankRun(r)) for r in range(2)]  # each synchronised
    _fatal_at_copy(ranks, RuntimeError("CUDA error: an illegal memory access"))
    assert [c.run.fatal for c in ranks] == [False, True]
    assert ranks[1].run.error == "RuntimeError: CUDA error: an illegal memory access"


# -- attribution: after each case, the rest of the batch compared -----------------------
def _counted(fn, calls: list):
    def counted(*args):
        calls.append(args[1])  # num_experts: which case of the _wild batch
        return fn(*args)

    return counted


def test_a_clean_batch_with_attribution_runs_once_and_gives_what_each_case_gives_alone():
    import _wild

    calls: list = []
    streamed: list = []
    counted = _counted(torch_impl.implementation()["align"], calls)

    def fn(*args):  # each case is streamed before the next one runs
        assert len(streamed) == len(calls)
        return counted(*args)

    runs = run_batch(_wild.CASES, {"align": fn}, "cpu", attribute=True,
                     on_case=streamed.append)
    assert calls == [3, 3, 7, 3, 3]
    assert len(streamed) == 5 and all(s is r for s, r in zip(streamed, runs))
    for case, case_runs in zip(_wild.CASES, runs):
        assert not case_runs[0][0].wild_writes
        _same(case_runs[0][0], run_case(case, torch_impl.implementation(), "cpu")[0][0])


def test_a_wild_write_is_pinned_on_its_writer_as_it_is_streamed():
    import _wild

    from difftest.evaluate import evaluate
    from difftest.sandbox import Outcome

    calls: list = []
    streamed: list = []
    fn = _counted(_wild.writer(_store_two), calls)
    runs = run_batch(_wild.CASES, {"align": fn}, "cpu", attribute=True,
                     on_case=streamed.append)
    assert calls == [3, 3, 7, 3, 3]  # each case once
    for outcomes in ([Outcome(r) for r in runs], [Outcome(r) for r in streamed]):
        verdicts = [evaluate(c, o, stable=False) for c, o in zip(_wild.CASES, outcomes)]
        assert [v.verdict for v in verdicts] == ["pass", "pass", "mismatch", "pass", "pass"]
        writes = outcomes[2].runs[0][0].wild_writes
        assert [(w.case_id, w.buffer, w.role, w.position, w.value)
                for w in writes] == _wild.WRITES


def test_a_write_its_victim_overwrites_is_still_the_writers_wild_write():
    # the third case stores into the fourth's sorted_token_ids[0] before the fourth runs;
    # the fourth writes that element itself, so only the check before it runs sees it
    import _wild

    from difftest.evaluate import evaluate
    from difftest.sandbox import Outcome

    staged = [Staged(DIALECT_INFO["align"].plan(c, None)) for c in _wild.CASES]
    bases = np.cumsum([0] + [s.nbytes for s in staged])

    def data(k: int) -> int:
        return int(bases[k] + next(b.data for b in staged[k].buffers
                                   if b.name == "sorted_token_ids"))

    ok = torch_impl.implementation()["align"]

    def writes_ahead(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                     num_tokens_post_pad, expert_map=None):
        ok(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
           num_tokens_post_pad, expert_map)
        if num_experts == 7:
            _store_two(sorted_token_ids, data(3) - data(2))

    runs = run_batch(_wild.CASES, {"align": writes_ahead}, "cpu", attribute=True)
    verdicts = [evaluate(c, Outcome(r), stable=False) for c, r in zip(_wild.CASES, runs)]
    assert [v.verdict for v in verdicts] == ["pass", "pass", "mismatch", "pass", "pass"]
    [w] = runs[2][0][0].wild_writes
    assert (w.case_id, w.buffer, w.role, w.position, w.value) == (
        _wild.CASES[3].case_id, "sorted_token_ids", "output", 0, 2)


def _not_queued(runs) -> bool:
    return not any(run.queued for case in runs for repeat in case for run in repeat)


def test_a_clean_queued_batch_runs_every_call_once_then_streams_what_each_case_gives_alone():
    import _wild

    calls: list = []
    streamed: list = []
    counted = _counted(torch_impl.implementation()["align"], calls)

    def fn(*args):  # every call is made before the first case is read back
        assert not streamed
        return counted(*args)

    runs = run_batch(_wild.CASES, {"align": fn}, "cpu", queued=True, on_case=streamed.append)
    assert calls == [3, 3, 7, 3, 3]
    assert len(streamed) == 5 and all(s is r for s, r in zip(streamed, runs))
    for case, case_runs in zip(_wild.CASES, runs):
        assert case_runs[0][0].queued and not case_runs[0][0].wild_writes
        _same(case_runs[0][0], run_case(case, torch_impl.implementation(), "cpu")[0][0])


def test_a_queued_batch_with_a_changed_input_runs_again_case_by_case_and_pins_the_write():
    import _wild

    calls: list = []
    streamed: list = []
    fn = _counted(_wild.writer(_store_two), calls)
    runs = run_batch(_wild.CASES, {"align": fn}, "cpu", queued=True, on_case=streamed.append)
    assert calls == [3, 3, 7, 3, 3] * 2  # queued, then case by case on a fresh staging
    assert len(streamed) == 5 and all(s is r for s, r in zip(streamed, runs))
    assert _not_queued(runs)
    assert [(w.case_id, w.buffer, w.role, w.position, w.value)
            for w in runs[2][0][0].wild_writes] == _wild.WRITES


def test_an_error_stays_in_its_queued_batch_and_an_overrun_runs_it_again_case_by_case():
    raising = {"align": user_impls.align_raises_on_expert_map}
    plain = Case("align", "production", np.array([[0, 1]], dtype=np.int32), 2, 2)
    mapped = plain.replace(expert_map=np.array([0, -1], dtype=np.int32))
    batch = run_batch([plain, mapped, plain], raising, "cpu", queued=True)
    assert all(runs[0][0].queued for runs in batch)
    assert [runs[0][0].error for runs in batch] == [
        None, "NotImplementedError: expert_map is not supported", None]
    assert batch[1][0][0].frames and batch[2][0][0].outputs["num_tokens_post_pad"].tolist() == [4]
    fns = {"vllm-lora": user_impls.writes_past_last_row}  # T > 3 overruns by one element
    batch = run_batch([_vllm(2), _vllm(4), _vllm(2)], fns, "cpu", queued=True)
    assert _not_queued(batch)
    damage = [runs[0][0].guard_damage for runs in batch]
    assert damage == [{}, {"sorted_token_ids": [(batch[1][0][0].outputs[
        "sorted_token_ids"].size, 7)]}, {}]


def test_a_queued_batch_does_not_see_a_write_into_another_cases_outputs():
    # what the campaign runs again case by case when a case of the batch fails
    import _wild

    # the second case's expert_ids[1], read back already
    writes_behind = _wild.writer(_store_two, behind_only=True)
    queued = run_batch(_wild.CASES, {"align": writes_behind}, "cpu", queued=True)
    assert not any(run.wild_writes for case in queued for repeat in case for run in repeat)
    assert queued[1][0][0].queued and queued[1][0][0].outputs["expert_ids"][1] == 2
    attributed = run_batch(_wild.CASES, {"align": writes_behind}, "cpu", attribute=True)
    assert [(w.case_id, w.buffer, w.position) for w in attributed[2][0][0].wild_writes] == [
        (_wild.CASES[1].case_id, "expert_ids", 1)]


def test_a_queued_batch_with_a_write_into_a_zone_runs_again_case_by_case_and_names_it():
    import _wild

    staged = [Staged(DIALECT_INFO["align"].plan(c, None)) for c in _wild.CASES]
    origin = sum(s.nbytes for s in staged[:2]) + next(
        b.data for b in staged[2].buffers if b.name == "sorted_token_ids")
    ok = torch_impl.implementation()["align"]
    calls: list = []

    def writes_before_the_batch(*args):
        calls.append(args[1])
        ok(*args)
        if args[1] == 7:
            _store_two(args[3], -64 - origin)

    runs = run_batch(_wild.CASES, {"align": writes_before_the_batch}, "cpu", queued=True)
    assert calls == [3, 3, 7, 3, 3] * 2 and _not_queued(runs)
    assert [(w.case_id, w.count) for w in runs[2][0][0].wild_writes] == [(None, 4)]  # bytes
