"""On the GPU: the CUDA kernels against torch and the oracle; crashes and overruns."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _draw(dialect: str, n: int, seed: int):
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    from difftest.strategies import cases

    drawn = []

    @hseed(seed)
    @settings(max_examples=n, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(cases(dialects=(dialect,)))
    def collect(case):
        drawn.append(case)

    collect()
    return drawn


def _slot_past_the_rows(slot: int):
    """One route on slot 0 and ``lora_ids[1] = slot >= L = 1``: the faulty kernel
    (cuda:no-slot-upper-guard) writes row ``slot`` of one-row outputs."""
    from difftest.case import Case

    return Case("vllm-lora", "defensive", np.zeros((1, 1), dtype=np.int32), 1, 1, max_loras=1,
                token_lora_mapping=np.zeros(1, dtype=np.int32),
                lora_ids=np.array([0, slot], dtype=np.int32),
                adapter_enabled=np.ones(2, dtype=np.int32))


def _fine(num_tokens: int):
    from difftest.case import Case

    return Case("vllm-lora", "production", np.zeros((num_tokens, 1), dtype=np.int32), 1, 1,
                max_loras=1, token_lora_mapping=np.zeros(num_tokens, dtype=np.int32))


@pytest.mark.parametrize("dialect", ["vllm-lora", "sglang-lora", "align", "sglang-align"])
def test_cuda_kernels_agree_with_torch_on_the_gpu_and_with_the_oracle(dialect):
    from cuda_impl import cuda, torch_impl
    from difftest.evaluate import evaluate
    from difftest.execute import run_case
    from difftest.sandbox import Outcome

    ours, theirs = cuda.implementation(), torch_impl.implementation()
    drawn = _draw(dialect, 150, seed=7)
    assert len(drawn) == 150
    for case in drawn:
        a = run_case(case, ours, "cuda")
        b = run_case(case, theirs, "cuda")
        for runs, stable in ((a, cuda.STABLE), (b, torch_impl.STABLE)):
            ev = evaluate(case, Outcome(runs), stable=stable)
            assert ev.verdict == "pass", (case.case_id, ev.detail)
        from difftest.compare import canonical, same_canonical
        from difftest.evaluate import expected_by_rank

        expected = expected_by_rank(case)
        for ra, rb in zip(a[0], b[0]):
            assert same_canonical(canonical(case, expected[ra.rank], ra),
                                  canonical(case, expected[rb.rank], rb))


def test_row_spilling_past_its_buffer_is_caught_by_the_guard_band_on_the_gpu():
    import user_impls

    from difftest.evaluate import evaluate
    from difftest.execute import run_case
    from difftest.sandbox import Outcome

    case = _fine(4)
    runs = run_case(case, {"vllm-lora": user_impls.writes_past_last_row}, "cuda")
    ev = evaluate(case, Outcome(runs), stable=False)
    assert (ev.verdict, ev.checks_failed) == ("mismatch", ["guard_band"])
    assert ev.mismatches[0].position == case.max_loras * 4  # first element past the row


def test_illegal_address_is_a_crash_and_the_next_case_runs(tmp_path):
    from difftest import registry
    from difftest.evaluate import evaluate
    from difftest.sandbox import SandboxRunner

    impl = registry.resolve("cuda:no-slot-upper-guard", "vllm-lora")
    wild, fine = _slot_past_the_rows(1 << 28), _fine(1)
    with SandboxRunner(impl, "cuda", timeout_s=60) as runner:
        runner.warm_up()  # the worker and its spare, each with a CUDA context
        spare = runner._spares[0].pid
        crashed = evaluate(wild, runner.run(wild), stable=False)
        assert crashed.verdict == "crash", crashed.detail
        assert evaluate(fine, runner.run(fine), stable=False).verdict == "pass"
        assert runner.worker_pid == spare  # the warm spare took over
        assert (runner.restarts, runner.cold_starts) == (1, 0)


def test_a_batch_with_an_illegal_address_stops_at_its_case_and_the_rest_runs_after():
    from difftest import registry
    from difftest.evaluate import evaluate
    from difftest.sandbox import SandboxRunner

    impl = registry.resolve("cuda:no-slot-upper-guard", "vllm-lora")
    wild, fine = _slot_past_the_rows(1 << 28), _fine(2)
    cases = [fine, fine, wild, fine, fine]
    with SandboxRunner(impl, "cuda", timeout_s=60) as runner:
        runner.submit(cases)
        outcomes = runner.collect()  # pinned in the batch itself: no re-run, no fallback
        assert [evaluate(c, o, stable=False).verdict for c, o in zip(cases, outcomes)] == [
            "pass", "pass", "crash"]
        assert outcomes[2].runs[0][0].fatal and outcomes[2].runs[0][0].error
        assert runner.restarts == 1
        runner.submit(cases[3:])
        assert [evaluate(c, o, stable=False).verdict
                for c, o in zip(cases[3:], runner.collect())] == ["pass", "pass"]
        assert (runner.restarts, runner.cold_starts) == (1, 0)  # a spare ran the rest


def test_a_queued_batch_with_an_illegal_address_runs_again_and_the_crash_is_its_case():
    from difftest import registry
    from difftest.evaluate import evaluate
    from difftest.sandbox import SandboxRunner

    impl = registry.resolve("cuda:no-slot-upper-guard", "vllm-lora")
    wild, fine = _slot_past_the_rows(1 << 28), _fine(2)
    cases = [fine, fine, wild, fine, fine]
    with SandboxRunner(impl, "cuda", timeout_s=60) as runner:
        assert runner.queued_batches
        runner.submit(cases, queued=True)
        outcomes = runner.collect()  # no answer from the queued run: case by case on a spare
        assert [evaluate(c, o, stable=False).verdict for c, o in zip(cases, outcomes)] == [
            "pass", "pass", "crash"]
        assert outcomes[2].runs[0][0].fatal and outcomes[2].runs[0][0].error
        assert not any(r.queued for o in outcomes for repeat in o.runs for r in repeat)
        assert runner.restarts == 2
        runner.submit(cases[3:], queued=True)
        outcomes = runner.collect()
        assert [evaluate(c, o, stable=False).verdict
                for c, o in zip(cases[3:], outcomes)] == ["pass", "pass"]
        assert all(r.queued for o in outcomes for repeat in o.runs for r in repeat)


def test_a_queued_batch_on_the_gpu_gives_every_case_what_it_gives_case_by_case():
    # repeats, and RepeatKeys for the larger cases: their equal repeats are left out too
    from cuda_impl import cuda
    from difftest.compare import repeat_key
    from difftest.evaluate import evaluate, expected_by_rank
    from difftest.execute import run_batch
    from difftest.registry import CUDA_REPEATS
    from difftest.sandbox import Outcome

    cases = _draw("vllm-lora", 30, seed=11) + _draw("align", 30, seed=12)
    expected = [expected_by_rank(c) for c in cases]
    keys = [{rank: repeat_key(e) for rank, e in ex.items()} if c.num_routes >= 1024 else None
            for c, ex in zip(cases, expected)]
    assert any(keys) and not all(keys)
    fns = cuda.implementation()
    queued = run_batch(cases, fns, "cuda", CUDA_REPEATS, keys=keys, queued=True)
    attributed = run_batch(cases, fns, "cuda", CUDA_REPEATS, keys=keys)
    assert len(queued) == len(cases)
    left_out = 0
    for case, ex, a, b in zip(cases, expected, queued, attributed):
        assert all(r.queued for repeat in a for r in repeat)
        assert evaluate(case, Outcome(a), stable=cuda.STABLE, expected=ex).verdict == "pass"
        assert evaluate(case, Outcome(b), stable=cuda.STABLE, expected=ex).verdict == "pass"
        assert [len(repeat) for repeat in a] == [len(repeat) for repeat in b]
        left_out += sum(r.same_as_first for repeat in a for r in repeat)
    assert left_out


def test_a_crash_in_a_repeated_call_is_one_fatal_run_of_its_case():
    from difftest import registry
    from difftest.evaluate import evaluate
    from difftest.sandbox import SandboxRunner

    impl = registry.resolve("cuda:no-slot-upper-guard", "vllm-lora")
    wild, fine = _slot_past_the_rows(1 << 28), _fine(3)
    with SandboxRunner(impl, "cuda", timeout_s=60, repeats=4) as runner:
        runner.submit([fine, wild, fine])
        outcomes = runner.collect()
        assert len(outcomes) == 2  # the case after the crash did not run
        assert len(outcomes[0].runs) == 4
        assert evaluate(fine, outcomes[0], stable=False).verdict == "pass"
        # the four runs went out back to back: the error is the call's, on its first run,
        # and no run of the case has unreadable outputs to compare
        [[run]] = outcomes[1].runs
        assert run.fatal and run.rank is None and run.error
        ev = evaluate(wild, outcomes[1], stable=False)
        assert ev.verdict == "crash" and ev.checks_failed[0] == "crash", ev.detail


def test_a_batch_on_the_gpu_matches_each_case_alone_and_keeps_overruns_apart():
    import user_impls

    from cuda_impl import cuda
    from difftest.evaluate import evaluate
    from difftest.execute import run_batch, run_case
    from difftest.sandbox import Outcome

    cases = _draw("vllm-lora", 30, seed=11) + _draw("ep-remap", 10, seed=12)
    fns = cuda.implementation()
    batch = run_batch(cases, fns, "cuda", repeats=2)
    assert len(batch) == len(cases)
    for case, runs in zip(cases, batch):
        assert evaluate(case, Outcome(runs), stable=False).verdict == "pass"
        alone = run_case(case, fns, "cuda", repeats=1)[0]
        for got in runs:
            for a, b in zip(got, alone):
                assert (a.error, a.guard_damage, a.mutated_inputs) == (
                    b.error, b.guard_damage, b.mutated_inputs)
                assert a.outputs.keys() == b.outputs.keys()
                assert a.elapsed_s > 0 or a.error is not None
    spill = {"vllm-lora": user_impls.writes_past_last_row}
    first, second = (runs[0][0] for runs in run_batch([_fine(4), _fine(2)], spill, "cuda"))
    assert first.guard_damage == {"sorted_token_ids": [(4, 7)]} and second.guard_damage == {}


def test_the_sanitizer_re_run_names_a_write_one_element_past_a_row():
    from difftest import registry
    from difftest.sanitizer import SanitizerRun, find_sanitizer

    if find_sanitizer() is None:
        pytest.skip("compute-sanitizer not found")
    impl = registry.resolve("cuda:no-slot-upper-guard", "vllm-lora")
    # slot 1 = L: the faulty kernel writes row 1, just past the one-row outputs
    text = SanitizerRun.start(_slot_past_the_rows(1), impl).result(240)
    assert text.startswith("$ PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer"), text
    assert "Invalid __global__ write of size 4" in text, text[-3000:]


def test_a_crashing_cuda_kernel_holds_the_whole_run_budget(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from difftest.budget import Budget

    out, seconds = tmp_path / "run", 20.0
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "difftest", "run", "--impl",
                           "cuda:no-slot-upper-guard", "--seconds", str(seconds), "--seed", "0",
                           "--out", str(out), "--no-db"],
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 1, done.stdout + done.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["elapsed_s"] <= Budget(seconds=seconds).limit_s, run  # start-up (build) aside
    assert any((out / "bugs").iterdir())


@pytest.mark.parametrize("fault", [None, "odd-block-resets-count"])
def test_repeats_left_out_on_the_gpu_evaluate_as_if_sent_whole(fault):
    # the CUDA kernels' repeats, mid and large cases of every dialect: with RepeatKeys the
    # worker leaves out those equal to run 1 (atomics reorder segments, so most are not
    # byte for byte), and every case evaluates as it does with all its repeats sent;
    # the race of odd-block-resets-count is still seen
    from cuda_impl import cuda
    from difftest.compare import repeat_key
    from difftest.evaluate import evaluate, expected_by_rank
    from difftest.execute import run_batch
    from difftest.registry import CUDA_REPEATS
    from difftest.sandbox import Outcome

    fns = cuda.implementation(fault)  # the fault's build has its dialects only
    drawn = [c for d in ("vllm-lora", "sglang-lora", "align", "sglang-align") if d in fns
             for c in _draw(d, 100, seed=11) if c.num_routes >= 1024]
    assert len(drawn) >= 20
    left_out = reordered = 0
    verdicts = set()
    for case in drawn:
        expected = expected_by_rank(case)
        keys = [{rank: repeat_key(e) for rank, e in expected.items()}]
        runs = run_batch([case], fns, "cuda", CUDA_REPEATS, keys=keys)[0]
        whole = run_batch([case], fns, "cuda", CUDA_REPEATS)[0]
        for repeat in runs[1:]:
            left_out += sum(r.same_as_first for r in repeat)
        reordered += any(not np.array_equal(r.outputs["sorted_token_ids"],
                                            whole[0][i].outputs["sorted_token_ids"])
                         for repeat in whole[1:] for i, r in enumerate(repeat)
                         if "sorted_token_ids" in r.outputs)
        a = evaluate(case, Outcome(runs), stable=cuda.STABLE, expected=expected)
        b = evaluate(case, Outcome(whole), stable=cuda.STABLE, expected=expected)
        verdicts.add(a.verdict)
        if fault is None:
            assert a.verdict == b.verdict == "pass", (case.case_id, a.detail, b.detail)
    assert reordered and left_out, (len(drawn), reordered, left_out)
    if fault is not None:  # a race: each run of it decides alone, but it is caught
        assert "mismatch" in verdicts, verdicts
