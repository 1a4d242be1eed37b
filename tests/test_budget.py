"""The whole-run budget: one resolver, its split, and runs that hold it; bounded output."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from difftest.budget import Budget, resolve_budget
from difftest.campaign import (
    CASE_FILES_PER_SIGNATURE,
    CampaignResult,
    FailureDatabase,
    Progress,
    mismatch_rows,
)
from difftest.compare import Mismatch
from difftest.errors import UsageError
from difftest.evaluate import Evaluation
from difftest.profiles import PROFILES

TESTS = Path(__file__).parent
# Starting the parent interpreter and the first worker (torch imports) is not in the
# budget; this is a generous allowance for it on a loaded machine, not a tuned number.
START_UP_ALLOWANCE_S = 60.0


class _FakeTime:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_split_of_a_budget_is_replay_25_generate_70_drain_80_shrink_90():
    now = _FakeTime(1000.0)
    clock = Budget(seconds=100.0, shrink_seconds=30.0).start(now)
    assert (clock.replay_end, clock.generate_end, clock.drain_end, clock.shrink_end,
            clock.end) == (1025.0, 1070.0, 1080.0, 1090.0, 1100.0)
    assert Budget(seconds=100.0).limit_s == 125.0
    now.t = 1070.0  # shrinking begins: 20 s left for 2 signatures
    assert clock.signature_seconds(2) == 10.0
    now.t = 1085.0  # the last one gets what is left, at most --shrink-seconds
    assert clock.signature_seconds(1) == 5.0
    now.t = 1050.0
    assert clock.signature_seconds(1) == 30.0
    assert clock.signature_seconds(1, cap=5.0) == 5.0
    now.t = 1200.0
    assert clock.signature_seconds(2) == 0.0
    # no time budget: each signature gets its cap
    assert Budget(max_examples=10, shrink_seconds=7.0).start(now).signature_seconds(4) == 7.0


def test_the_resolver_takes_explicit_values_then_the_profile_then_the_defaults():
    assert resolve_budget("ci") == Budget(seconds=60.0, max_examples=500, shrink_seconds=20.0,
                                          seed=0)
    assert resolve_budget("ci", seconds=30.0, seed=5, shrink_seconds=3.0) == Budget(
        seconds=30.0, max_examples=500, shrink_seconds=3.0, seed=5)
    assert resolve_budget("dev", default_seconds=5.0) == Budget(seconds=20.0,
                                                                shrink_seconds=30.0)
    assert resolve_budget(default_seconds=5.0) == Budget(seconds=5.0)
    assert resolve_budget() == Budget(max_examples=1000)
    assert resolve_budget(max_examples=7) == Budget(max_examples=7)
    with pytest.raises(UsageError, match="profile='fast': must be one of ci, dev, nightly"):
        resolve_budget("fast")
    with pytest.raises(UsageError, match="seconds=0: must be > 0"):
        resolve_budget(seconds=0)


def test_profiles_state_the_totals_they_hold():
    assert PROFILES["ci"].describe() == (
        "ci: 500 cases or 60 s (the whole run; ends within 75 s plus start-up); seed 0")
    assert PROFILES["nightly"].describe() == (
        "nightly: 3600 s (the whole run; ends within 4500 s plus start-up); a fresh seed")


def test_progress_without_a_terminal_is_a_plain_line_about_every_interval():
    now, stream = _FakeTime(), io.StringIO()
    progress = Progress(stream=stream, tty=False, interval_s=10.0, now=now)
    clock = Budget(seconds=60.0).start(now)
    result = CampaignResult(Path("."), cases=143, verdicts={"pass": 131, "mismatch": 12},
                            failures={"a": None, "b": None})
    for t in (1.0, 5.0, 9.9):
        now.t = t
        progress.update(result, "generate", clock)
    assert stream.getvalue() == ""
    now.t = 12.0
    progress.update(result, "generate", clock)
    now.t = 13.0
    progress.update(result, "shrink", clock)  # too soon for another line
    progress.update(result, "report", clock, force=True)
    progress.done()
    assert stream.getvalue() == (
        "difftest: 12/60 s  generate  143 cases  12 failures  2 signatures\n"
        "difftest: 13/60 s  report  143 cases  12 failures  2 signatures\n")


def test_workers_keep_their_state_in_a_file_and_the_parent_shows_them_as_one(tmp_path):
    # difftest run --workers N: each child keeps its latest state, the parent sums them up
    now = _FakeTime()
    files = [tmp_path / "worker-0.json", tmp_path / "worker-1.json", tmp_path / "worker-2.json"]
    clock = Budget(seconds=60.0).start(now)
    children = [Progress(enabled=False, now=now, state_file=path) for path in files[:2]]
    now.t = 12.0
    children[0].update(CampaignResult(Path("."), cases=100, verdicts={"pass": 90, "crash": 10},
                                      failures={"a": None, "b": None}), "shrink", clock)
    now.t = 12.5
    children[1].update(CampaignResult(Path("."), cases=40, verdicts={"pass": 37, "crash": 3},
                                      failures={"b": None}), "generate", clock)
    children[1].update(CampaignResult(Path("."), cases=41, verdicts={"pass": 38, "crash": 3},
                                      failures={"b": None}), "generate", clock)  # < 1 s later
    assert json.loads(files[1].read_text())["cases"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worker-0.json", "worker-1.json"]
    stream = io.StringIO()
    parent = Progress(stream=stream, tty=False, interval_s=10.0, now=now)
    parent.show_parts(files)  # too soon for a line
    now.t = 13.0
    parent.show_parts(files, force=True)  # worker-2 has written nothing yet
    assert stream.getvalue() == (
        "difftest: 12/60 s  generate  140 cases  13 failures  2 signatures\n")
    bar = io.StringIO()
    Progress(stream=bar, tty=True, now=now).show_parts(files, force=True)
    assert bar.getvalue() == "\r\x1b[Kgenerate 12/60 s | 140 cases | failing: crash 13"


def test_mismatch_rows_of_a_case_are_capped_with_a_count_of_the_rest():
    import numpy as np

    from difftest.case import Case

    case = Case("align", "production", np.zeros((1, 1), dtype=np.int32), 1, 1)
    evaluation = Evaluation("mismatch", [Mismatch("expert_ids", f"block {i}", position=i)
                                         for i in range(120)])
    rows = mismatch_rows(case, evaluation, "torch")
    assert len(rows) == 50
    assert [r["position"] for r in rows] == list(range(50))
    assert rows[-1]["message"] == "block 49 (and 70 more failed check(s) of this case, not kept)"
    assert rows[0]["message"] == "block 0"


def _difftest(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    return subprocess.run([sys.executable, "-m", "difftest", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", ["hangs_on_disabled_adapter", "segfaults_on_odd_tokens"])
def test_a_hanging_or_crashing_kernel_holds_the_whole_run_budget(name, tmp_path):
    seconds = 8.0
    out = tmp_path / "run"
    start = time.monotonic()
    done = _difftest("run", "--impl", f"py:user_impls:{name}", "--dialect", "vllm-lora",
                     "--seconds", seconds, "--timeout", "1", "--seed", "0", "--out", out,
                     "--no-db")
    wall = time.monotonic() - start
    assert done.returncode in (0, 1), done.stderr
    run = json.loads((out / "run.json").read_text())
    # the documented rule: the run ends within 1.25 x S, start-up aside
    assert run["elapsed_s"] <= Budget(seconds=seconds).limit_s, run
    assert wall <= Budget(seconds=seconds).limit_s + START_UP_ALLOWANCE_S
    ids = pq.read_table(out / "cases.parquet").column("case_id").to_pylist()
    assert len(ids) == len(set(ids)) == run["cases"], "a case id ran twice"
    # without a terminal the log gets plain progress lines, then the summary
    assert "difftest: " in done.stderr and " cases " in done.stderr
    assert f"{len(ids)} cases in " in done.stdout


def test_failure_database_keeps_the_minimal_and_first_case_per_signature(tmp_path):
    db = tmp_path / "db"
    impl = "py:user_impls:fails_every_written_slot"
    first = _difftest("run", "--impl", impl, "--dialect", "vllm-lora", "--max-examples", "45",
                      "--shrink-seconds", "3", "--seed", "0", "--out", tmp_path / "a",
                      "--db", db, "--in-process")
    assert first.returncode == 1, first.stderr
    a = json.loads((tmp_path / "a" / "run.json").read_text())
    failing = sum(n for v, n in a["verdicts"].items() if v != "pass")
    assert failing > CASE_FILES_PER_SIGNATURE, a  # enough to exercise the caps
    folder = FailureDatabase(db)._dir(impl)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.json"))
    sigs = sorted({f.split("/")[0] for f in files})
    assert sigs == a["signatures"]
    for sig in sigs:
        roles = sorted(f.split("/")[1].split("-")[0] for f in files if f.startswith(sig + "/"))
        assert roles in (["first", "minimal"], ["minimal"], ["first"]), files
    assert FailureDatabase(db).size_bytes(impl) < 5 * 2**20
    # per signature at most the first K failing cases and the minimal one as JSON
    assert len(list((tmp_path / "a" / "cases").glob("*.json"))) <= len(sigs) * (
        CASE_FILES_PER_SIGNATURE + 1)
    # the next run replays just those, each once
    second = _difftest("run", "--impl", impl, "--dialect", "vllm-lora", "--max-examples",
                       "10", "--seed", "1", "--out", tmp_path / "b", "--db", db,
                       "--in-process", "--no-shrink")
    assert second.returncode == 1, second.stderr
    b = json.loads((tmp_path / "b" / "run.json").read_text())
    assert b["replayed"] == len(files)
    ids = pq.read_table(tmp_path / "b" / "cases.parquet").column("case_id").to_pylist()
    assert sorted(ids[:len(files)]) == sorted(Path(f).stem.split("-", 1)[1] for f in files)
    assert len(ids) == len(set(ids))


def test_a_case_id_runs_once_however_often_it_is_drawn_or_saved(tmp_path, monkeypatch):
    import numpy as np
    from hypothesis import strategies as st

    from difftest import registry, strategies
    from difftest.campaign import Campaign
    from difftest.case import Case
    from difftest.sandbox import InProcessRunner

    pytest.importorskip("torch")
    drawn = [Case("align", "production", np.full((t, 1), 0, dtype=np.int32), 2, 1)
             for t in (1, 2, 3)]
    # many draws, three distinct cases: Hypothesis draws each again and again
    again = st.tuples(st.sampled_from(drawn), st.sampled_from(drawn),
                      st.integers(0, 1000)).map(lambda t: list(t[:2]))  # families of two
    monkeypatch.setattr(strategies, "families", lambda size, **kw: again)
    impl = registry.resolve("torch", "align")
    db = FailureDatabase(tmp_path / "db")
    db.save(impl.name, "align--mismatch--expert_ids", "first", drawn[0])
    campaign = Campaign(impl, InProcessRunner(impl, "cpu"), tmp_path / "run", seed=0,
                        database=db)
    campaign.replay_database()
    assert campaign.result.replayed == 1
    campaign.generate(dialects=("align",), contracts=("production",), max_examples=50)
    campaign.close()
    ids = [row["case_id"] for row in campaign.case_rows]
    assert sorted(ids) == sorted(c.case_id for c in drawn)  # each once, replay included
    assert ids[0] == drawn[0].case_id


class _AlwaysHangs:
    """A runner on which every case times out (and says so at once)."""

    device = "cpu"

    def __init__(self) -> None:
        self.runs = 0

    def restart(self) -> None:
        pass

    def run(self, case):
        from difftest.sandbox import Outcome

        self.runs += 1
        return Outcome(verdict="timeout", detail="no answer within 1 s; worker killed")


def test_a_signature_is_not_pursued_after_three_timed_out_candidates(tmp_path):
    import numpy as np

    from difftest import registry
    from difftest.budget import TIMEOUT_PURSUIT
    from difftest.campaign import Campaign
    from difftest.case import Case

    impl = registry.resolve("torch", "align")
    runner = _AlwaysHangs()
    campaign = Campaign(impl, runner, tmp_path, seed=0, budget=Budget(shrink_seconds=60.0))
    case = Case("align", "production", np.arange(40, dtype=np.int32).reshape(10, 4) % 8, 8, 4)
    campaign.run_one(case)
    assert runner.runs == 1 and list(campaign.result.failures) == ["align--timeout--timeout"]
    campaign.shrink_and_report()
    campaign.close()
    # the first case, three timed-out candidates, and the smallest of them confirmed alone
    assert runner.runs == 1 + TIMEOUT_PURSUIT + 1 == 5
    report = (tmp_path / "bugs" / "align--timeout--timeout" / "report.md").read_text()
    assert "stopped: 3 candidates timed out" in report


def test_generation_yields_to_the_shrinking_its_failures_need_but_not_before_40_percent():
    clock = Budget(seconds=100.0, shrink_seconds=30.0).start(_FakeTime(0.0))
    assert clock.generation_end(0) == clock.generate_end == 70.0
    assert clock.generation_end(1) == 60.0  # 90 - 30: one signature's full shrink
    assert clock.generation_end(2) == 40.0  # 90 - 60 = 30 is below 40 %: 40 %
    assert Budget(seconds=100.0, shrink_seconds=5.0).start(_FakeTime()).generation_end(3) == 70.0
    assert Budget(max_examples=5).start(_FakeTime()).generation_end(2) is None


class _OneSecondPerCase:
    """An in-process runner on a fake clock that advances one second per case run;
    remembers the time each batch was submitted, and the time it took."""

    def __init__(self, runner, now: _FakeTime) -> None:
        self.runner, self.now, self.submitted, self.sizes = runner, now, [], []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def submit(self, cases):
        self.submitted.append(self.now.t)
        self.sizes.append(len(cases))
        self.now.t += len(cases)
        self.runner.submit(cases)

    def run(self, case):
        self.now.t += 1
        return self.runner.run(case)


@pytest.mark.parametrize("impl_name, last_start", [
    ("torch", (60.0, 70.0)),  # passes: generation goes on to 70 % of S
    ("py:user_impls:fails_every_written_slot", (50.0, 60.0)),  # one signature: to 60 %
])
def test_once_a_failure_is_on_record_generation_ends_earlier(impl_name, last_start, tmp_path,
                                                              monkeypatch):
    from difftest import registry
    from difftest.campaign import Campaign
    from difftest.sandbox import InProcessRunner

    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(TESTS))
    # batches of at most 8 cases (8 fake seconds), whatever sizes the generator draws
    monkeypatch.setattr("difftest.campaign.BATCH_CASES", 8)
    impl = registry.resolve(impl_name, "vllm-lora")
    now = _FakeTime(0.0)
    runner = _OneSecondPerCase(InProcessRunner(impl, "cpu"), now)
    budget = Budget(seconds=100.0, shrink_seconds=30.0, seed=0)
    campaign = Campaign(impl, runner, tmp_path / "run", seed=0, budget=budget)
    campaign.clock = budget.start(now)
    campaign.generate(dialects=("vllm-lora",), contracts=("production",), max_examples=None,
                      deadline=campaign.clock.generate_end,
                      drain_deadline=campaign.clock.drain_end)
    campaign.close()
    low, high = last_start
    # the last batch started before generation's end, and generation ran until then
    # (that batch's cases drawn before it, run after: one second each on this clock)
    start, size = runner.submitted[-1], runner.sizes[-1]
    assert start < high and start + size >= low, (runner.submitted, runner.sizes)
    assert bool(campaign.result.failures) == (impl_name != "torch")


def test_crashes_and_hangs_shrink_after_the_other_signatures():
    from types import SimpleNamespace

    from difftest.campaign import shrink_order

    def failing(verdict):
        return SimpleNamespace(evaluation=SimpleNamespace(verdict=verdict))

    failures = {"a--crash--x": failing("crash"), "b--mismatch--y": failing("mismatch"),
                "a--timeout--timeout": failing("timeout"), "c--error--z": failing("error")}
    assert shrink_order(failures) == ["b--mismatch--y", "c--error--z", "a--crash--x",
                                      "a--timeout--timeout"]
