"""A failure is a bug only once it fails alone; otherwise it is flaky, with its culprit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

from difftest import registry  # noqa: E402
from difftest.campaign import CONFIRM_ATTEMPTS, Campaign  # noqa: E402
from difftest.case import Case  # noqa: E402
from difftest.evaluate import evaluate  # noqa: E402
from difftest.execute import run_batch  # noqa: E402
from difftest.sandbox import InProcessRunner, Outcome, SandboxRunner  # noqa: E402

TESTS = Path(__file__).resolve().parent


def _alone(impl, case: Case):
    """``case`` replayed alone, as ``difftest replay`` does: a fresh worker of its own."""
    with SandboxRunner(impl, "cpu", timeout_s=60) as runner:
        return evaluate(case, runner.run(case), stable=impl.stable)


def _pair(impl, first: Case, second: Case):
    with SandboxRunner(impl, "cpu", timeout_s=60) as runner:
        runner.submit([first, second])
        outcomes = runner.collect()
    return evaluate(second, outcomes[1], stable=impl.stable)


@pytest.mark.slow
def test_a_stateful_kernel_gives_a_flaky_pair_and_every_other_report_fails_alone(tmp_path):
    # user_impls.stale_total_after_more_experts: a wrong total right after a call with more
    # experts (stateful: passes alone), and wrong inactive blocks when B = 1 (fails alone)
    impl = registry.resolve("py:user_impls:stale_total_after_more_experts", "vllm-lora")
    with SandboxRunner(impl, "cpu", timeout_s=60) as runner:
        # a seed whose 60 cases hold both triggers, and no EP case whose ranks (each with
        # its own expert count) trip the state within one case, alone
        campaign = Campaign(impl, runner, tmp_path, seed=5)
        campaign.generate(dialects=impl.dialects, contracts=("production", "defensive"),
                          max_examples=60, seconds=None)
        campaign.shrink_and_report(shrink_seconds=10)
        result = campaign.close()
    flaky, plain = "vllm-lora--flaky--num_tokens_post_pad", "vllm-lora--mismatch--expert_ids"
    assert sorted(result.failures) == [flaky, plain]

    confirmation = result.failures[flaky].confirmation
    victim = result.failures[flaky].case
    assert confirmation.original == "vllm-lora--mismatch--num_tokens_post_pad"
    assert not confirmation.reproduced and confirmation.attempts == CONFIRM_ATTEMPTS
    assert confirmation.culprit is not None
    assert confirmation.culprit.num_experts > victim.num_experts  # the kernel's trigger
    ids = [n.case.case_id for n in confirmation.neighbours]
    assert confirmation.culprit.case_id in ids[:4]
    assert result.failures[plain].confirmation.reproduced

    # the victim keeps its verdict in cases.parquet; both cases of the pair are saved
    rows = pq.read_table(tmp_path / "cases.parquet").to_pylist()
    assert {r["verdict"] for r in rows if r["case_id"] == victim.case_id} == {"mismatch"}
    assert (tmp_path / "cases" / f"{confirmation.culprit.case_id}.json").is_file()
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["flaky"][flaky]["culprit"] == confirmation.culprit.case_id
    assert run["flaky"][flaky]["ran_before"] == ids

    # the invariant: every report's case.json fails alone with its signature, unless it
    # is flaky, whose report carries the pair that fails so
    bugs = sorted((tmp_path / "bugs").iterdir())
    assert [b.name for b in bugs] == [flaky, plain]
    for bug in bugs:
        case = Case.from_json((bug / "case.json").read_text())
        alone = _alone(impl, case)
        if "--flaky--" in bug.name:
            culprit = Case.from_json((bug / "culprit.json").read_text())
            assert alone.signature(case) != confirmation.original
            assert _pair(impl, culprit, case).signature(case) == confirmation.original
            assert culprit.num_experts > case.num_experts
            report = (bug / "report.md").read_text()
            assert f"Culprit: case `{culprit.case_id}` leaves the kernel in a state" in report
            assert f"breaks case `{case.case_id}`" in report
        else:
            assert alone.signature(case) == bug.name
            assert not (bug / "culprit.json").exists()

    # the pair's repro.py fails (the culprit first); the victim alone would pass
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    done = subprocess.run([sys.executable, str(tmp_path / "bugs" / flaky / "repro.py")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "BUG PRESENT" in done.stdout and "after the culprit" in done.stdout


def _lora(T: int, E: int, B: int) -> Case:
    return Case("vllm-lora", "production", np.zeros((T, 1), dtype=np.int32), E, B,
                max_loras=1, token_lora_mapping=np.zeros(T, dtype=np.int32))


def test_a_race_is_confirmed_by_a_later_re_run_alone(tmp_path, monkeypatch):
    # user_impls.wrong_total_every_other_call fails on every odd call (counted in a file)
    counter = tmp_path / "calls"
    monkeypatch.setenv("USER_IMPLS_CALLS", str(counter))
    impl = registry.resolve("py:user_impls:wrong_total_every_other_call", "vllm-lora")
    runner = InProcessRunner(impl, "cpu")
    campaign = Campaign(impl, runner, tmp_path / "run", seed=0)
    case = _lora(2, 2, 2)
    counter.write_text("1")
    failed = campaign.check(case)  # call 1: fails
    assert failed.signature(case) == "vllm-lora--mismatch--num_tokens_post_pad"
    confirmation = campaign.confirm(case, failed)  # call 2 passes, call 3 fails
    assert confirmation.reproduced and confirmation.attempts == 2
    assert confirmation.signature == "vllm-lora--mismatch--num_tokens_post_pad"
    assert counter.read_text() == "4"
    campaign.log.close()


def test_a_race_found_by_a_campaign_gets_a_confirmed_report(tmp_path, monkeypatch):
    monkeypatch.setenv("USER_IMPLS_CALLS", str(tmp_path / "calls"))
    impl = registry.resolve("py:user_impls:wrong_total_every_other_call", "vllm-lora")
    campaign = Campaign(impl, InProcessRunner(impl, "cpu"), tmp_path / "run", seed=0)
    campaign.generate(dialects=impl.dialects, contracts=("production",), max_examples=30,
                      seconds=None, stop_on_failure=True)
    campaign.shrink_and_report(shrink_seconds=5)
    result = campaign.close()
    sig = "vllm-lora--mismatch--num_tokens_post_pad"
    assert list(result.failures) == [sig]
    assert result.failures[sig].confirmation.reproduced
    assert [b.name for b in (tmp_path / "run" / "bugs").iterdir()] == [sig]
    minimal = Case.from_json((tmp_path / "run" / "bugs" / sig / "case.json").read_text())
    # replayed alone twice in a row (odd and even calls), one of the two fails so
    again = [campaign.check(minimal).signature(minimal) for _ in range(2)]
    assert sig in again


def test_a_case_that_passes_alone_is_flaky_and_gets_no_database_entry(tmp_path, monkeypatch):
    # the stateful kernel in this process: T=1 E=1 B=2 fails only after a call with E > 1
    import user_impls

    impl = registry.resolve("py:user_impls:stale_total_after_more_experts", "vllm-lora")
    db = tmp_path / "db"
    from difftest.campaign import FailureDatabase

    campaign = Campaign(impl, InProcessRunner(impl, "cpu"), tmp_path / "run", seed=0,
                        database=FailureDatabase(db))
    culprit, victim, after = _lora(1, 3, 2), _lora(1, 1, 2), _lora(2, 1, 2)
    monkeypatch.setitem(user_impls._STALE, "num_experts", 0)
    assert campaign.dispatch([culprit, victim, after]) == []
    evaluations = campaign.drain()
    assert [e.verdict for e in evaluations] == ["pass", "mismatch", "pass"]
    sig = "vllm-lora--flaky--num_tokens_post_pad"
    assert list(campaign.result.failures) == [sig]
    confirmation = campaign.result.failures[sig].confirmation
    assert confirmation.culprit == culprit and confirmation.attempts == CONFIRM_ATTEMPTS
    assert [n.case for n in confirmation.neighbours] == [culprit]
    assert confirmation.neighbours[0].same_batch
    assert not db.exists() or not list(db.rglob("*.json"))  # not a bug to replay next time
    campaign.log.close()


def test_a_write_into_another_cases_block_is_the_writers_failure_not_its_victims():
    # On the CPU each buffer is its own tensor; a raw pointer still reaches the batch's
    # other blocks, so the attribution CUDA gets by default is checked here, switched on.
    import _wild

    cases, writes_far = _wild.CASES, _wild.writer(_wild.store_two)
    runs = run_batch(cases, {"align": writes_far}, "cpu", attribute=True)
    verdicts = [evaluate(c, Outcome(r), stable=False) for c, r in zip(cases, runs)]
    assert [v.verdict for v in verdicts] == ["pass", "pass", "mismatch", "pass", "pass"]
    assert verdicts[2].checks_failed == ["wild_write"]
    writes = runs[2][0][0].wild_writes
    assert [(w.case_id, w.buffer, w.role, w.position, w.value) for w in writes] == _wild.WRITES
    assert not any(w.band for w in writes)
    assert verdicts[2].detail == (
        f"call: wrote outside its own buffers, into case {cases[1].case_id}'s output "
        "expert_ids[1]: value 2 (1 element(s) there changed)")
    # (without the check the CPU stages each case on its own: no batch block is shared)


def test_a_restart_gives_the_next_case_a_fresh_worker_and_is_not_counted_as_a_crash():
    impl = registry.resolve("torch", "vllm-lora")
    case = _lora(2, 2, 2)
    with SandboxRunner(impl, "cpu", timeout_s=60) as runner:
        first = runner.run(case).worker
        assert runner.run(case).worker == first  # warm
        runner.restart()
        fresh = runner.run(case)
        assert fresh.worker != first and evaluate(case, fresh, stable=False).verdict == "pass"
        assert runner.restarts == 0


def test_a_case_alone_shows_its_far_write_in_the_zone_around_its_block():
    # alone (as a failure is confirmed) the writer's far stores miss every other case's
    # block and land in the guard zones around the batch: still its wild_write
    import _wild

    writer = _wild.CASES[2]
    [runs] = run_batch([writer], {"align": _wild.writer(_wild.store_two)}, "cpu",
                       attribute=True)
    [wild] = runs[0][0].wild_writes
    assert (wild.case_id, wild.count) == (None, 8)  # bytes: two stores of 2 over GUARD
    verdict = evaluate(writer, Outcome(runs), stable=False)
    assert verdict.signature(writer) == "align--mismatch--wild_write"
    assert "into memory outside the staged batch" in verdict.detail
