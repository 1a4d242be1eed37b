"""Campaigns catch users' wrong callables, and survive the ones that crash or hang."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from difftest import campaign as campaign_module
from difftest import registry
from difftest.campaign import Campaign
from difftest.case import Case
from difftest.classify import SIZE_CLASSES
from difftest.sandbox import SandboxRunner

TESTS = Path(__file__).parent
BUDGET_S = 30.0


@pytest.mark.parametrize("name, check", [
    ("skips_slot_at_index_l", "num_tokens_post_pad"),
    ("wrong_total_for_int64", "num_tokens_post_pad"),
    ("wrong_blocks_for_block_size_one", "expert_ids"),
    ("writes_past_last_row", "guard_band"),
    ("mutates_mapping", "input_mutated"),
])
def test_wrong_user_callable_is_caught_within_budget(name, check, tmp_path):
    impl = registry.resolve(f"py:user_impls:{name}", "vllm-lora")
    start = time.monotonic()
    with SandboxRunner(impl, "cpu", timeout_s=60) as runner:
        campaign = Campaign(impl, runner, tmp_path, seed=0)
        campaign.generate(dialects=impl.dialects, contracts=("production", "defensive"),
                          max_examples=None, seconds=BUDGET_S, stop_on_failure=True)
        campaign.close()
    elapsed = time.monotonic() - start
    failures = campaign.result.failures
    assert len(failures) == 1, failures
    (sig, failure), = failures.items()
    assert sig == f"vllm-lora--mismatch--{check}"
    assert elapsed < BUDGET_S + 15  # worker start-up is outside the case budget
    assert failure.seconds_until_failure < BUDGET_S


def test_align_callable_without_expert_map_support_is_an_error(tmp_path):
    impl = registry.resolve("py:user_impls:align_raises_on_expert_map")
    assert impl.dialects == ("align",)
    with SandboxRunner(impl, "cpu") as runner:
        campaign = Campaign(impl, runner, tmp_path, seed=0)
        campaign.generate(dialects=impl.dialects, contracts=("production",), max_examples=None,
                          seconds=BUDGET_S, stop_on_failure=True)
        campaign.close()
    sig = "align--error--NotImplementedError--expert_map-is-not-supported"
    assert list(campaign.result.failures) == [sig]
    failure = campaign.result.failures[sig]
    assert "NotImplementedError: expert_map is not supported" in failure.evaluation.detail


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    return subprocess.run([sys.executable, "-m", "difftest", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name, verdict", [
    ("segfaults_on_empty_batch", "crash"),
    ("hangs_on_disabled_adapter", "timeout"),
])
def test_crashing_or_hanging_callable_runs_to_the_end_of_its_budget(name, verdict, tmp_path):
    out = tmp_path / "run"
    # --seconds is the whole run: generation to 70 %, shrinking in the rest
    done = _cli("run", "--impl", f"py:user_impls:{name}", "--dialect", "vllm-lora",
                "--seconds", "40", "--seed", "0", "--timeout", "1", "--out", out, "--no-db")
    assert done.returncode == 1, done.stderr
    verdicts = pq.read_table(out / "cases.parquet").column("verdict").to_pylist()
    assert verdict in verdicts
    first_bad = verdicts.index(verdict)
    assert "pass" in verdicts[first_bad + 1:], "the campaign went on after the failure"
    kind = "sigsegv" if verdict == "crash" else "timeout"  # the crash's kind: its signal
    bug = out / "bugs" / f"vllm-lora--{verdict}--{kind}"
    minimal = Case.from_json((bug / "case.json").read_text())
    if verdict == "crash":
        # the smallest empty batch: T = 0 (K, E, B, L at their floor)
        assert (minimal.num_tokens, minimal.topk, minimal.num_experts, minimal.block_size,
                minimal.max_loras) == (0, 1, 1, 1, 1)
        assert "SIGSEGV" in (bug / "report.md").read_text()
    else:
        # still a case with a listed, disabled slot, no larger than the first one; a hang
        # is pursued for three timed-out candidates (difftest/budget.py), so it need
        # not be 1-minimal
        first_id = pq.read_table(out / "cases.parquet").column("case_id")[first_bad].as_py()
        first = Case.from_json((out / "cases" / f"{first_id}.json").read_text())
        listed = [s for s in minimal.lora_ids.tolist() if 0 <= s < minimal.max_loras]
        assert any(minimal.adapter_enabled[s] == 0 for s in listed)
        assert minimal.num_routes <= first.num_routes


class _StopsAtCrash:
    """A runner whose batches stop at the first case with T = 0 (or for which ``crashes``
    is true), as a worker does at a sticky device error; the rest of such a batch did not
    run."""

    def __init__(self, campaign_cases, crashes=lambda case: case.topk_ids.shape[0] == 0):
        self.submitted: list[list[int]] = []
        self.recorded_at_submit: list[int] = []
        self._pending: list[Case] = []
        self._recorded = campaign_cases
        self._crashes = crashes

    def restart(self):
        pass

    def run(self, case):  # a failure is confirmed alone
        self._pending = [case]
        return self.collect()[0]

    def submit(self, cases):
        self.submitted.append([c.topk_ids.shape[0] for c in cases])
        self.recorded_at_submit.append(self._recorded())
        self._pending = list(cases)

    def collect(self):
        from cuda_impl import torch_impl
        from difftest.execute import run_case
        from difftest.sandbox import Outcome

        fns = torch_impl.implementation()
        outcomes = []
        for case in self._pending:
            if self._crashes(case):
                outcomes.append(Outcome(verdict="crash", detail="sticky device error"))
                break
            outcomes.append(Outcome(run_case(case, fns, "cpu")))
        self._pending = []
        return outcomes


def test_the_rest_of_a_batch_stopped_by_a_crash_runs_alone_at_once_the_crash_recorded_meanwhile(
        tmp_path):
    pytest.importorskip("torch")
    impl = registry.resolve("torch", "vllm-lora")
    cases = [Case("vllm-lora", "production" if T else "defensive",
                  np.zeros((T, 1), dtype=np.int32), 1, 1, max_loras=1,
                  token_lora_mapping=np.zeros(T, dtype=np.int32)) for T in (1, 0, 2, 3, 4)]
    campaign = Campaign(impl, None, tmp_path, seed=0)
    runner = _StopsAtCrash(lambda: campaign.result.cases)
    campaign.runner = runner
    assert campaign.dispatch(cases[:4]) == []
    first = campaign.dispatch(cases[4:])
    assert [e.verdict for e in first] == ["pass", "crash", "pass", "pass"]
    # the rest of the stopped batch goes alone to the spare, submitted before the crash is
    # recorded (recorded while it runs; confirmed at the next collect), and the next batch
    # once the rest has run: no worker is sent more than a batch, however often it crashes
    assert runner.submitted == [[1, 0, 2, 3], [2, 3], [4]]
    assert runner.recorded_at_submit == [0, 0, 2]
    assert campaign.result.cases == 4
    assert [e.verdict for e in campaign.drain()] == ["pass"]
    assert [row["T"] for row in campaign.case_rows] == [1, 0, 2, 3, 4]
    assert campaign.result.verdicts == {"pass": 4, "crash": 1}
    campaign.log.close()


def _watch_families(monkeypatch, seen):
    """Campaigns draw their families through ``seen(size, family)`` as they draw them."""
    import difftest.strategies

    families = difftest.strategies.families
    monkeypatch.setattr(difftest.strategies, "families", lambda size, **kw: families(
        size, **kw).map(lambda family: seen(size, family) or family))


def test_the_siblings_of_a_case_that_lost_its_worker_are_dropped_not_run(tmp_path, monkeypatch):
    # a family shares its structure, so most likely its crash: once one of its cases
    # crashed, the siblings not yet run are dropped, whichever batch they are in
    pytest.importorskip("torch")
    monkeypatch.setattr(campaign_module, "FAMILY_AFTER", 0)
    drawn: list[list[str]] = []  # the case ids of each family drawn
    _watch_families(monkeypatch, lambda size, family: drawn.append(
        [c.case_id for c in family]))
    impl = registry.resolve("torch")
    campaign = Campaign(impl, None, tmp_path, seed=2)
    campaign.runner = _StopsAtCrash(lambda: campaign.result.cases,
                                    crashes=lambda case: case.topk_ids.dtype == np.int64)
    campaign.generate(dialects=impl.dialects, contracts=("production", "defensive"),
                      max_examples=300)
    campaign.close()
    verdict = {row["case_id"]: row["verdict"] for row in campaign.case_rows}
    owner: dict[str, int] = {}  # a case is of the first family that drew it
    for number, family in enumerate(drawn):
        for case_id in family:
            owner.setdefault(case_id, number)
    members = [[i for i in dict.fromkeys(f) if owner[i] == n] for n, f in enumerate(drawn)]
    crashed = [f for f in members if any(verdict.get(i) == "crash" for i in f)]
    assert len(crashed) >= 10 and all(v in ("pass", "crash") for v in verdict.values())
    dropped: set[str] = set()
    for family in members:
        ran = [i for i in family if i in verdict]
        if family in crashed:  # the first of it to run crashed; the rest never ran
            assert [verdict[i] for i in ran] == ["crash"], [verdict[i] for i in ran]
            dropped |= {i for i in family if i not in verdict and i in campaign._queued}
        else:
            assert all(verdict[i] == "pass" for i in ran)
    assert campaign.result.siblings_dropped == len(dropped) > 10


@pytest.mark.parametrize("after", [0, 30])
def test_each_example_draws_one_case_until_family_after_then_a_family(tmp_path, monkeypatch,
                                                                        after):
    pytest.importorskip("torch")
    from difftest.campaign import FAMILY_CASES
    from difftest.sandbox import InProcessRunner

    monkeypatch.setattr(campaign_module, "FAMILY_AFTER", after)
    sizes: list[int] = []  # the family size asked for, per example
    _watch_families(monkeypatch, lambda size, family: sizes.append(size))
    impl = registry.resolve("torch")
    campaign = Campaign(impl, InProcessRunner(impl, "cpu"), tmp_path, seed=1)
    campaign.generate(dialects=impl.dialects, contracts=("production", "defensive"),
                      max_examples=200)
    campaign.close()
    assert campaign.result.cases == 200
    assert sizes[:after] == [1] * after and set(sizes[after:]) == {FAMILY_CASES}
    assert len(sizes) < after + (200 - after) / 2  # families of several cases


def test_generated_batches_hold_one_size_class_each_and_grow_from_one_case(tmp_path):
    # one huge case does not hold up the small ones drawn with it: a queue per size class,
    # each closing at BATCH_CASES cases or BATCH_ROUTES routes, its first batch one case
    pytest.importorskip("torch")
    from difftest.campaign import BATCH_CASES, BATCH_ROUTES
    from difftest.classify import size_class
    from difftest.sandbox import InProcessRunner

    class Recording(InProcessRunner):
        batches: list = []

        def submit(self, cases):
            self.batches.append([size_class(c) for c in cases])
            self.routes = getattr(self, "routes", []) + [
                sum(c.num_routes * len(c.ranks()) for c in cases)]
            super().submit(cases)

    impl = registry.resolve("torch")
    runner = Recording(impl, "cpu")
    campaign = Campaign(impl, runner, tmp_path, seed=3)
    campaign.generate(dialects=impl.dialects, contracts=("production", "defensive"),
                      max_examples=300)
    campaign.close()
    batches = runner.batches
    assert sum(map(len, batches)) == campaign.result.cases
    assert all(len(set(b)) == 1 for b in batches), batches
    firsts: dict[str, int] = {}
    for batch, routes in zip(batches, runner.routes):
        firsts.setdefault(batch[0], len(batch))
        assert len(batch) <= BATCH_CASES and (len(batch) == 1 or routes < 2 * BATCH_ROUTES)
    assert set(firsts) >= {"decode", "huge"} and set(firsts.values()) == {1}
    decode = [len(b) for b in batches if b[0] == "decode"]
    assert decode[:4] == [1, 2, 4, 8]  # growing, while huge cases went in batches between


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_closed_batches_wait_while_the_worker_is_busy_and_drawing_goes_on(
        tmp_path, monkeypatch, busy):
    # a batch closed while the worker still runs the one before is not sent (drawing goes
    # on) until the worker is idle or READY_BATCHES more have closed behind it
    pytest.importorskip("torch")
    from difftest.campaign import READY_BATCHES
    from difftest.sandbox import InProcessRunner

    drawn: list[str] = []  # case ids in the order drawn (a skipped repeat included)
    ends: list[int] = []  # len(drawn) after each family

    def family_drawn(size, family):
        drawn.extend(case.case_id for case in family)
        ends.append(len(drawn))

    _watch_families(monkeypatch, family_drawn)

    class Runner(InProcessRunner):
        sent: list = []  # per submit: its case ids, and how many cases were drawn by then

        def busy(self):
            return busy and bool(self._pending)

        def submit(self, cases, keys=None):
            self.sent.append(([c.case_id for c in cases], len(drawn)))
            super().submit(cases, keys)

    impl = registry.resolve("torch")
    campaign = Campaign(impl, Runner(impl, "cpu"), tmp_path, seed=5)
    campaign.generate(dialects=impl.dialects, contracts=("production", "defensive"),
                      max_examples=400)
    campaign.close()
    sent = Runner.sent
    assert campaign.result.cases == sum(len(ids) for ids, _ in sent) == 400
    # drawn when the batch closed: the family of its last case was drawn whole by then
    closed = [min(e for e in ends if e > max(drawn.index(i) for i in ids)) for ids, _ in sent]
    lag = READY_BATCHES if busy else 0
    flushed = [k for k, (_, at) in enumerate(sent) if at == len(drawn)]  # at the end
    assert len(flushed) <= lag + len(SIZE_CLASSES) and len(sent) > len(flushed) + 10
    for k, (_, at) in enumerate(sent[:len(sent) - len(flushed)]):
        # the first is sent as soon as it closes: nothing runs before it
        assert at == closed[k + lag if k else 0], k


def test_a_campaign_given_stages_times_every_stage_of_every_case_it_records(tmp_path):
    pytest.importorskip("torch")
    from difftest.campaign import Stages
    from difftest.sandbox import InProcessRunner

    impl = registry.resolve("torch", "vllm-lora")
    campaign = Campaign(impl, InProcessRunner(impl, "cpu"), tmp_path, seed=1)
    assert campaign.stages is None  # nothing is timed unless asked
    campaign.stages = stages = Stages()
    campaign.generate(dialects=impl.dialects, contracts=("production",), max_examples=20)
    campaign.close()
    assert sum(stages.cases.values()) == campaign.result.cases == 20
    for size in stages.cases:
        for stage in ("draw", "stage", "run", "inspect", "oracle", "compare", "record"):
            assert stages.seconds[stage, size] > 0, (stage, size)
    assert stages.dispatch_s > sum(s for (stage, _), s in stages.seconds.items()
                                   if stage in ("oracle", "compare", "record"))


class _Queues:
    """A runner that takes queued batches (as a CUDA sandbox does) and says how each
    batch was sent; every batch, and a case alone, runs in one block between zones
    (attribution on, as on CUDA), so a far write lands in memory the run owns."""

    queued_batches = True

    def __init__(self, fns):
        self.fns, self.sent, self._pending = fns, [], ([], False)

    def restart(self):
        pass

    def run(self, case):
        self._pending = ([case], False)
        return self.collect()[0]

    def submit(self, cases, keys=None, queued=False):
        self.sent.append((len(cases), queued))
        self._pending = (list(cases), queued)

    def collect(self):
        from difftest.execute import run_batch
        from difftest.sandbox import Outcome

        (cases, queued), self._pending = self._pending, ([], False)
        return [Outcome(runs) for runs in run_batch(cases, self.fns, "cpu", attribute=True,
                                                     queued=queued)] if cases else []


def _queued_campaign(tmp_path, fn):
    pytest.importorskip("torch")
    campaign = Campaign(registry.resolve("torch", "align"), _Queues({"align": fn}),
                        tmp_path, seed=0)
    return campaign, campaign.runner


def test_a_queued_batch_with_a_failure_is_recorded_from_its_case_by_case_run(tmp_path):
    # the third case writes into the second's outputs, which only the case-by-case run
    # pins on the writer; the second's wrong outputs in the queued run are not recorded
    import _wild

    campaign, runner = _queued_campaign(tmp_path, _wild.writer(_wild.store_two,
                                                               behind_only=True))
    assert campaign.dispatch(list(_wild.CASES)) == []
    campaign.drain()
    assert runner.sent == [(5, True), (5, False)]
    rows = [(row["case_id"], row["verdict"], row["checks_failed"]) for row in campaign.case_rows]
    ids = [c.case_id for c in _wild.CASES]
    assert rows == [(ids[0], "pass", []), (ids[1], "pass", []),
                    (ids[2], "mismatch", ["wild_write"]), (ids[3], "pass", []),
                    (ids[4], "pass", [])]
    campaign.dispatch([_wild.align(2), _wild.align(1)])  # after a failure: case by case
    campaign.drain()
    assert runner.sent[-1] == (2, False)
    campaign.log.close()


def test_a_queued_failure_the_case_by_case_run_does_not_repeat_is_held_as_the_cases_own(
        tmp_path):
    # a race that fires once: the case-by-case run passes and pins no wild write anywhere
    import _wild

    from cuda_impl import torch_impl

    ok = torch_impl.implementation()["align"]
    fired: list = []

    def wrong_once(*args):
        ok(*args)
        if args[1] == 7 and not fired:
            fired.append(1)
            args[5].add_(1)  # num_tokens_post_pad

    campaign, runner = _queued_campaign(tmp_path, wrong_once)
    campaign.dispatch(list(_wild.CASES))
    campaign.drain()
    # then, as for any failure that does not fail again alone, pairs look for a culprit
    assert runner.sent[:2] == [(5, True), (5, False)]
    assert len(runner.sent) > 2 and set(runner.sent[2:]) == {(2, False)}
    assert [row["verdict"] for row in campaign.case_rows] == [
        "pass", "pass", "mismatch", "pass", "pass"]
    assert campaign.case_rows[2]["checks_failed"] == ["num_tokens_post_pad"]
    campaign.log.close()


def test_a_clean_queued_batch_is_recorded_once_and_batches_stay_queued(tmp_path):
    import _wild

    from cuda_impl import torch_impl

    campaign, runner = _queued_campaign(tmp_path, torch_impl.implementation()["align"])
    campaign.dispatch(list(_wild.CASES))
    campaign.dispatch([_wild.align(2), _wild.align(1)])
    campaign.drain()
    assert runner.sent == [(5, True), (2, True)]
    assert [row["verdict"] for row in campaign.case_rows] == ["pass"] * 7
    campaign.log.close()
