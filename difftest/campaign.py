"""A campaign: generate → run → oracle → compare → record, within a budget.

Cases come from :func:`difftest.strategies.cases`, driven by Hypothesis in
generate-only mode (our test function never raises, so the sequence of cases
is a function of the seed alone); the budget ends the loop from outside.
Before generating, the failure database replays every case that failed for
this implementation in an earlier run (and forgets those that now pass).
After the budget, each distinct failure signature is shrunk to a minimal case
and written up as a bug report.

A failing case becomes a bug only once it is confirmed alone
(:meth:`Campaign.confirm`): the first case of each new signature is re-run
on its own — fresh staging, its own allocation, a fresh worker — up to
:data:`CONFIRM_ATTEMPTS` times (a race needs only one of them to fail the
same way). One that never fails the same way alone is ``flaky``: its own
signature ``<dialect>--flaky--<check>``, a failure all the same, reported
with the cases that ran before it in its worker and, when one of the nearest
of them run right before it reproduces the failure, that culprit: the pair
is what the report keeps, shrinks and replays.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .budget import (
    DEFAULT_MAX_EXAMPLES,
    DEFAULT_SHRINK_SECONDS,
    TIMEOUT_PURSUIT,
    Budget,
    BudgetSpent,
    Clock,
)
from .case import Case
from .classify import SIZE_CLASSES, size_class
from .compare import repeat_key
from .errors import DifftestError, InternalError, UsageError
from .evaluate import WORKER_LOST, Evaluation, evaluate, expected_by_rank
from .limits import as_json as limits_json
from .limits import describe as describe_limits
from .registry import Implementation

__all__ = ["DEFAULT_MAX_EXAMPLES", "DEFAULT_SHRINK_SECONDS", "Campaign", "CampaignResult",
           "FailureDatabase", "Progress", "Stages", "run_campaign"]

# Bounded output: per signature the first CASE_FILES_PER_SIGNATURE failing cases (and the
# minimal one) as cases/<id>.json; per case at most MISMATCH_ROWS_PER_CASE mismatch rows;
# in the failure database, a "first" case of at most DB_CASE_BYTES of JSON.
CASE_FILES_PER_SIGNATURE = 20
MISMATCH_ROWS_PER_CASE = 50
DB_CASE_BYTES = 256 * 1024
LOG_INTERVAL_S = 10.0  # a progress line this often when stderr is not a terminal
SANITIZER_TIMEOUT_S = 300.0
SANITIZER_PARALLEL = 2  # compute-sanitizer re-runs at a time, beside the shrinking
SANITIZER_SKIPPED = ("(compute-sanitizer re-run skipped: the run's budget was spent; run "
                     "repro.py under compute-sanitizer by hand, see its --exact-buffers)")
# Generated cases go to the worker in batches of one size class (classify.size_class: a
# huge case does not hold up the small ones drawn with it) of at most this many cases
# and routes (a large case is a batch of its own). In each class the first batch is one
# case and each next one twice as many, so a failure in the first cases is seen as soon
# as it would be unbatched.
BATCH_CASES = 64
BATCH_ROUTES = 1 << 16
# Batches closed while the worker still runs the one before wait for it, this many at
# most (one more is sent at once, waiting on the worker): drawing goes on meanwhile
READY_BATCHES = 2
# Cases per Hypothesis example (strategies.families): the one Hypothesis draws and up to
# this many less one siblings, its structure with the values of other seeds. A small
# case's draw and Hypothesis' engine work are most of what a campaign spends on it.
# The first FAMILY_AFTER examples of a generation are one case each: a bug that some
# structure triggers is found as soon as without siblings (they add no new structure)
FAMILY_CASES = 4
FAMILY_AFTER = 256
# a case of at least this many routes (all ranks) is sent with its RepeatKeys, so that
# its worker leaves out the repeats equal to the first run: the larger cases' outputs
# are most of what a CUDA campaign moves, and canonicalising them most of its compare
REPEAT_KEY_MIN_ROUTES = 1024
# Confirmation (Campaign.confirm): alone re-runs of a new signature's first case, each in
# a fresh worker; cases of one signature re-run so before it is taken as flaky without
# more runs; predecessors tried as the culprit of a flaky case; cases kept per worker.
CONFIRM_ATTEMPTS = 3
CONFIRM_CASES = 3
CULPRIT_CANDIDATES = 4
HISTORY = 16
# Distinct failure signatures recorded (and reported) per dialect; failures with a
# further signature are counted in CampaignResult.capped.
MAX_SIGNATURES_PER_DIALECT = 20
# With declared limits, one generated case in this many is an out-of-domain probe, and
# every run starts with PROBES_PER_RUN of them.
PROBE_ONE_IN = 50
PROBES_PER_RUN = 4


class Stages:
    """Seconds per stage and size class of a campaign's cases, for ``bench/campaign.py``.

    A :class:`Campaign` fills one only when given one (``campaign.stages``); otherwise
    no stage is timed. In this process: ``draw`` (Hypothesis drawing the case, our
    builder included), ``oracle``, ``compare`` (the rest of evaluation) and ``record``
    per size class (:func:`~difftest.classify.size_class`); per run, ``dispatch`` (the
    time generation spends handing batches to the runner and recording what comes
    back: recording included, so the wait for the worker is ``dispatch`` less
    ``oracle``, ``compare`` and ``record``). From the worker (each case's
    :class:`~difftest.execute.RankRun` times): ``stage`` (laying the case out, and its
    share of the copy to the device), ``run`` (the calls and the copy back) and
    ``inspect``.
    """

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = {}  # (stage, size class) -> seconds
        self.cases: dict[str, int] = {}  # size class -> cases recorded
        self.dispatch_s = 0.0

    def add(self, stage: str, size: str, seconds: float) -> None:
        self.seconds[stage, size] = self.seconds.get((stage, size), 0.0) + seconds

    def recorded(self, case: Case, outcome: Any) -> None:
        size = size_class(case)
        self.cases[size] = self.cases.get(size, 0) + 1
        for run in (run for runs in outcome.runs for run in runs):
            self.add("stage", size, run.setup_s)
            self.add("run", size, run.elapsed_s)
            self.add("inspect", size, run.inspect_s)


class _Interrupted(BaseException):
    """Ctrl-C seen between two cases (see :func:`_sigint_deferred`)."""


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[dict[str, bool]]:
    """While generating, the first Ctrl-C only sets ``flag["sigint"]``; the loop
    stops at its next case, with the batch in flight collected and recorded. A
    KeyboardInterrupt raised at an arbitrary point can land inside Hypothesis'
    own drawing, which does not always let it through. A second Ctrl-C raises
    at once. Off the main thread, or under a handler that is not Python's
    default, nothing changes.
    """
    flag = {"sigint": False}

    def on_sigint(signum: int, frame: Any) -> None:
        if flag["sigint"]:
            raise KeyboardInterrupt
        flag["sigint"] = True

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield flag
        return
    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class _BudgetExhausted(BaseException):
    """Ends Hypothesis' generation loop (a BaseException, so it is not a 'failure')."""


@dataclass(frozen=True)
class Neighbour:
    """A case that ran before another in the same worker."""

    case: Case
    same_batch: bool  # in the same batch (staged in the same allocation), or before it


@dataclass
class Confirmation:
    """What re-running a failing case alone found (:meth:`Campaign.confirm`)."""

    signature: str  # what the failure is recorded under: ``original``, or its flaky one
    original: str  # the signature the case had where it first failed
    reproduced: bool  # an alone re-run failed with ``original``
    attempts: int  # alone re-runs made (0: none needed, a timeout is confirmed already)
    neighbours: tuple[Neighbour, ...] = ()  # nearest first
    culprit: Case | None = None  # the neighbour that, run right before it, reproduces it
    seconds: float = 0.0

    @property
    def flaky(self) -> bool:
        return not self.reproduced


@dataclass
class Failure:
    """The first case seen with one signature, and how many cases shared it."""

    signature: str
    case: Case
    evaluation: Evaluation
    count: int = 1
    cases_until_failure: int = 0
    seconds_until_failure: float = 0.0
    confirmation: Confirmation | None = None


@dataclass
class CampaignResult:
    out_dir: Path
    cases: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    bug_dirs: dict[str, Path] = field(default_factory=dict)
    minimal: dict[str, tuple[Case, Evaluation]] = field(default_factory=dict)
    shrink_s: dict[str, float] = field(default_factory=dict)  # signature -> seconds shrinking
    internal: InternalError | None = None  # a bug of ours that ended the run (run_campaign)
    duplicates: int = 0  # drawn cases skipped: their case id ran (or was queued) already
    #: siblings never run: a case of their family (strategies.families) crashed or hung
    siblings_dropped: int = 0
    elapsed_s: float = 0.0
    replayed: int = 0
    confirm_s: float = 0.0  # spent re-running failures alone and looking for culprits
    #: failing cases whose signature was past MAX_SIGNATURES_PER_DIALECT: signature → cases
    capped: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        from reports.schema import PASSING_VERDICTS

        return sum(n for v, n in self.verdicts.items() if v not in PASSING_VERDICTS)

    def failure_records(self, impl: str) -> list[dict[str, Any]]:
        """One plain dict per failure signature, for the console, ``--json``, JUnit and
        ``run.json``: its count, verdict, contract, edge classes, the compact minimal case
        (the first failing case when it was not shrunk) and the bug report's folder."""
        from .bugreport import compact_case

        records = []
        for sig, failure in sorted(self.failures.items()):
            case, evaluation = self.minimal.get(sig, (failure.case, failure.evaluation))
            where = self.bug_dirs.get(sig)
            records.append({
                "signature": sig, "impl": impl, "dialect": case.dialect,
                "verdict": evaluation.verdict, "contract": case.contract,
                "edge_classes": list(case.edge_classes), "count": failure.count,
                "first_after": failure.cases_until_failure, "case_id": case.case_id,
                "minimal": compact_case(case), "message": " ".join(evaluation.detail.split())[:300],
                "report": None if where is None else str(where),
            })
        return records


PHASES = ("replay", "generate", "shrink", "report")
"""A run's phases, in order (:class:`Progress` names the one it is in)."""


class Progress:
    """Live progress on ``stream`` (stderr): a one-line bar on a terminal; elsewhere (a CI
    log) one plain line about every ``interval_s`` seconds. Silent when not ``enabled``.

    A line reads ``difftest: 12/60 s  generate  143 cases  12 failures  2 signatures``.
    ``state_file``: where a worker of ``difftest run --workers N`` keeps its latest
    state (JSON, rewritten at most every second) for its parent, which shows the
    workers' states summed up (:meth:`show_parts`).
    """

    STATE_INTERVAL_S = 1.0

    def __init__(self, enabled: bool = True, stream: Any = None, *, tty: bool | None = None,
                 interval_s: float = LOG_INTERVAL_S,
                 now: Callable[[], float] = time.monotonic,
                 state_file: Path | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        isatty = getattr(self.stream, "isatty", None)
        self.tty = tty if tty is not None else bool(isatty and isatty())
        self.interval_s = interval_s if not self.tty else 0.2
        self.now = now
        self.state_file = state_file
        self._last = self._saved = now()
        self._drawn = False

    def update(self, result: CampaignResult, phase: str, clock: Clock,
               force: bool = False) -> None:
        if not self.enabled and self.state_file is None:
            return
        state = {"elapsed_s": clock.elapsed(), "seconds": clock.budget.seconds,
                 "phase": phase, "cases": result.cases, "failures": result.failed,
                 "signatures": sorted(result.failures), "verdicts": dict(result.verdicts)}
        if self.state_file is not None and (force or self.now() - self._saved
                                            >= self.STATE_INTERVAL_S):
            self._saved = self.now()
            partial = self.state_file.with_name(self.state_file.name + ".part")
            partial.write_text(json.dumps(state))
            os.replace(partial, self.state_file)
        self.show(state, force)

    def show_parts(self, files: Sequence[Path], force: bool = False) -> None:
        """One line for the workers' state files together: the longest elapsed, the
        earliest phase, cases, failures and verdicts summed, signatures counted once."""
        states = []
        for path in files:
            try:
                states.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # not written yet
                continue
        if not states:
            return
        verdicts: dict[str, int] = {}
        for state in states:
            for verdict, n in state["verdicts"].items():
                verdicts[verdict] = verdicts.get(verdict, 0) + n
        self.show({"elapsed_s": max(state["elapsed_s"] for state in states),
                   "seconds": states[0]["seconds"],
                   "phase": min((state["phase"] for state in states), key=PHASES.index),
                   "cases": sum(state["cases"] for state in states),
                   "failures": sum(state["failures"] for state in states),
                   "signatures": sorted({sig for state in states
                                         for sig in state["signatures"]}),
                   "verdicts": verdicts}, force)

    def show(self, state: dict[str, Any], force: bool = False) -> None:
        """Write ``state`` (as :meth:`update` makes it) as the bar or a log line, at most
        once per ``interval_s`` unless ``force``."""
        if not self.enabled:
            return
        t = self.now()
        if not force and t - self._last < self.interval_s:
            return
        self._last = t
        budget = state["seconds"]
        elapsed = f"{state['elapsed_s']:.0f}" + (f"/{budget:g}" if budget is not None else "")
        if self.tty:
            bad = ", ".join(f"{v} {n}" for v, n in sorted(state["verdicts"].items())
                            if v not in ("pass", "rejected"))
            self.stream.write(f"\r\033[K{state['phase']} {elapsed} s | {state['cases']} cases"
                              f" | failing: {bad or 'none'}")
            self._drawn = True
        else:
            self.stream.write(f"difftest: {elapsed} s  {state['phase']}  {state['cases']} "
                              f"cases  {state['failures']} failures  "
                              f"{len(state['signatures'])} signatures\n")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


@dataclass(frozen=True)
class SavedCase:
    """One case of the failure database: ``role`` is ``minimal``, ``first`` or ``legacy``
    (a file of the flat layout of earlier versions; ``signature`` then ``None``)."""

    path: Path
    signature: str | None
    role: str
    case: Case


class FailureDatabase:
    """Cases that failed before, replayed first until they pass (``.difftest/db``).

    ``<root>/<impl>/<signature>/minimal-<case_id>.json`` and ``first-<case_id>.json``:
    per signature the minimal case and the first failing one (the first of at most
    ``DB_CASE_BYTES`` of JSON), nothing else, so the database stays small however
    many cases fail. Files directly under ``<root>/<impl>/`` (the earlier layout) are
    replayed once and removed; those that still fail are saved in the new layout.
    """

    ROLES = ("minimal", "first")

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def _dir(self, impl: str) -> Path | None:
        if self.root is None:
            return None
        return self.root / _slug(impl)

    def load(self, impl: str, dialects: tuple[str, ...]) -> list[SavedCase]:
        """Every saved case of ``impl`` in ``dialects``: signature by signature, the minimal
        case first; then the legacy files."""
        folder = self._dir(impl)
        if folder is None or not folder.is_dir():
            return []
        found = []
        for sig_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            for role in self.ROLES:
                for path in sorted(sig_dir.glob(f"{role}-*.json")):
                    found.append((path, sig_dir.name, role))
        found += [(path, None, "legacy") for path in sorted(folder.glob("*.json"))]
        out = []
        for path, sig, role in found:
            try:
                case = Case.from_json(path.read_text())
            except (OSError, UsageError):
                continue
            if case.dialect in dialects:
                out.append(SavedCase(path, sig, role, case))
        return out

    def has(self, impl: str, signature: str, role: str) -> bool:
        folder = self._dir(impl)
        return folder is not None and any((folder / signature).glob(f"{role}-*.json"))

    def save(self, impl: str, signature: str, role: str, case: Case) -> bool:
        """Keep ``case`` as the ``role`` case of ``signature`` (replacing the one there).
        A ``first`` case of more than ``DB_CASE_BYTES`` is not kept (returns ``False``)."""
        folder = self._dir(impl)
        if folder is None:
            return False
        text = case.to_json()
        if role == "first" and len(text) > DB_CASE_BYTES:
            return False
        target = folder / signature
        target.mkdir(parents=True, exist_ok=True)
        for old in target.glob(f"{role}-*.json"):
            old.unlink(missing_ok=True)
        if role == "minimal":  # one file for a first case that is minimal too
            (target / f"first-{case.case_id}.json").unlink(missing_ok=True)
        (target / f"{role}-{case.case_id}.json").write_text(text)
        return True

    def forget(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only when it is now empty

    def size_bytes(self, impl: str) -> int:
        folder = self._dir(impl)
        if folder is None or not folder.is_dir():
            return 0
        return sum(p.stat().st_size for p in folder.rglob("*.json"))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


class _StopPursuit(Exception):
    """A signature timed out ``TIMEOUT_PURSUIT`` times while shrinking: no more candidates."""


class Campaign:
    """Runs cases for one implementation and records every one of them.

    ``budget`` (a :class:`~difftest.budget.Budget`) starts the run's clock; the
    phases' deadlines come from it (:func:`run_campaign` is the whole recipe).
    A case id runs at most once: replay and generation share :attr:`ran`.
    """

    def __init__(self, impl: Implementation, runner: Any, out_dir: Path, *, seed: int | None,
                 database: FailureDatabase | None = None, progress: Progress | None = None,
                 log: Any = None, budget: Budget | None = None) -> None:
        import reports

        self.impl, self.runner, self.seed = impl, runner, seed
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log = log if log is not None else reports.RunLog(self.out_dir)
        self.database = database or FailureDatabase(None)
        self.progress = progress or Progress(enabled=False)
        self.budget = budget or Budget(seed=seed)
        self.clock = self.budget.start()
        self.result = CampaignResult(self.out_dir)
        self.case_rows: list[dict] = []
        self.mismatch_rows: list[dict] = []
        self.phase = "generate"
        self.ran: dict[str, str | None] = {}  # case_id -> its signature (None: it passed)
        self._queued: set[str] = set()
        # generated cases -> their family's number (the Hypothesis examples of the
        # campaign, counted); the families of which a case lost its worker (their
        # siblings not yet run are dropped, see dispatch)
        self._family: dict[str, int] = {}
        self._examples = 0
        self._lost_families: set[int] = set()
        self._db_first: set[str] = set()  # signatures whose first case the database holds
        self._case_files: dict[str, int] = {}  # failing cases recorded per signature
        self._inflight: list[Case] = []
        # the oracle's values of cases sent with RepeatKeys (computed before they are sent;
        # their evaluation uses them): case_id -> expected by rank
        self._expected: dict[str, dict] = {}
        self._start = self.clock.started
        self._deadline: float | None = None
        # confirmation state: recent cases per worker (with their batch number), failures
        # recorded while a batch was in flight, and what each signature turned out to be
        self._history: dict[str, deque[tuple[Case, int]]] = {}
        self._batches = 0
        self._inflight_batch = 0
        self._unsettled: list[tuple[Case, Evaluation, tuple[Neighbour, ...], int, float]] = []
        self._confirmed: set[str] = set()
        self._tries: dict[str, int] = {}
        self._flaky_ids: set[str] = set()
        self.stages: Stages | None = None  # timed only when given one (bench/campaign.py)
        self._sanitizing = _Sanitizing(impl)
        # queued batches (execute.run_batch) while nothing has failed, where the runner
        # takes them; the cases of a queued batch with a failure, to run again case by
        # case (dispatch), and those failures, kept while that run shows no wild write
        self._queue_batches = bool(getattr(runner, "queued_batches", False))
        self._redo: list[Case] = []
        self._held: dict[str, tuple[Any, Evaluation]] = {}
        # a campaign dropped without close() ends the interpreters it started all the same
        weakref.finalize(self, self._sanitizing.kill)

    # -- deadlines --------------------------------------------------------------
    def _until(self, deadline: float | None, cut: float | None = None) -> None:
        """Nothing new starts after ``deadline``; the runner's waits are cut at ``cut``
        (default: ``deadline``)."""
        self._deadline = deadline
        if hasattr(self.runner, "deadline"):
            self.runner.deadline = deadline if cut is None else cut

    def _spent(self) -> bool:
        now = self.clock.now()
        if self.phase == "generate" and self.result.failures:
            end = self.clock.generation_end(len(self.result.failures))
            if end is not None and now >= end:
                return True  # the failures found need the time to shrink (budget.py)
        return self._deadline is not None and now >= self._deadline

    def _show(self, force: bool = False) -> None:
        self.progress.update(self.result, self.phase, self.clock, force=force)

    # -- one case -------------------------------------------------------------
    def check(self, case: Case) -> Evaluation:
        """Run and evaluate one case alone without recording it (used by the shrinker)."""
        outcome = self.runner.run(case)
        self._ran(case, outcome.worker, self._next_batch())
        return evaluate(case, outcome, stable=self.impl.stable, limits=self.impl.limits)

    def check_pair(self, first: Case, second: Case) -> tuple[Evaluation, Evaluation | None]:
        """Run ``first`` then ``second`` as one batch of their own, without recording them;
        ``second``'s evaluation is ``None`` when it did not run (``first`` crashed)."""
        self.runner.submit([first, second])
        outcomes = self.runner.collect()
        batch = self._next_batch()
        evaluations: list[Evaluation | None] = []
        for case, outcome in zip((first, second), outcomes):
            self._ran(case, outcome.worker, batch)
            evaluations.append(evaluate(case, outcome, stable=self.impl.stable,
                                        limits=self.impl.limits))
        return evaluations[0], (evaluations[1] if len(evaluations) > 1 else None)

    def run_one(self, case: Case, seed: int | None = None) -> Evaluation:
        evaluation = self._finish(case, self.runner.run(case), seed, self._next_batch())
        self._settle()
        return evaluation

    def _evaluate(self, case: Case, outcome: Any) -> Evaluation:
        """Evaluate one case; with :attr:`stages`, its oracle (then computed apart from the
        comparison) and comparison are timed."""
        stages = self.stages
        start = time.perf_counter()
        expected = self._expected.get(case.case_id)
        if expected is None and stages is not None and outcome.verdict not in WORKER_LOST:
            expected = expected_by_rank(case)
        oracle_done = time.perf_counter()
        evaluation = evaluate(case, outcome, stable=self.impl.stable, limits=self.impl.limits,
                              expected=expected)
        if stages is not None:
            size = size_class(case)
            stages.add("oracle", size, oracle_done - start)
            stages.add("compare", size, time.perf_counter() - oracle_done)
        return evaluation

    def _finish(self, case: Case, outcome: Any, seed: int | None, batch: int,
                evaluation: Evaluation | None = None) -> Evaluation:
        """Record one case, evaluated first unless ``evaluation`` is given; with
        :attr:`stages`, the recording is timed."""
        if evaluation is None:
            evaluation = self._evaluate(case, outcome)
        start = time.perf_counter()
        self._expected.pop(case.case_id, None)
        self._record(case, evaluation, outcome, seed, batch)
        self._ran(case, outcome.worker, batch)
        self._family.pop(case.case_id, None)
        if self.stages is not None:
            self.stages.add("record", size_class(case), time.perf_counter() - start)
            self.stages.recorded(case, outcome)
        return evaluation

    def _finish_batch(self, cases: list[Case], outcomes: list[Any], batch: int
                      ) -> list[Evaluation]:
        """Evaluate and record the collected ``cases`` (their ``outcomes``, in order).

        A failure in a queued batch may be another case's wild write
        (:func:`difftest.execute.run_batch`): then its queued cases are not recorded
        but run again case by case (:attr:`_redo`, which :meth:`dispatch` sends next),
        no batch is queued from then on, and each queued failure is held until that run:
        where it passes and pins no wild write on any case of its batch, the held
        failure is the case's own (a race need not fail twice) and is recorded."""
        evaluations = [self._evaluate(case, outcome) for case, outcome in zip(cases, outcomes)]
        queued = [any(run.queued for repeat in outcome.runs for run in repeat)
                  for outcome in outcomes]
        if any(q and e.failed for q, e in zip(queued, evaluations)):
            self._queue_batches = False
            for case, outcome, evaluation, q in zip(cases, outcomes, evaluations, queued):
                if q:
                    self._redo.append(case)
                    if evaluation.failed:
                        self._held[case.case_id] = (outcome, evaluation)
            kept = [k for k, q in enumerate(queued) if not q]
            cases = [cases[k] for k in kept]
            outcomes = [outcomes[k] for k in kept]
            evaluations = [evaluations[k] for k in kept]
        elif self._held:
            clean = not any(run.wild_writes for outcome in outcomes
                            for repeat in outcome.runs for run in repeat)
            for k, case in enumerate(cases):
                held = self._held.pop(case.case_id, None)
                if held is not None and clean and not evaluations[k].failed:
                    outcomes[k], evaluations[k] = held
        return [self._finish(case, outcome, self.seed, batch, evaluation)
                for case, outcome, evaluation in zip(cases, outcomes, evaluations)]

    def dispatch(self, batch: list[Case]) -> list[Evaluation]:
        """Collect the batch in flight, start ``batch`` in the worker, then evaluate and
        record the collected one while the worker runs the new one. Returns the
        evaluations of the collected cases, in their order.

        When the batch in flight stopped at a crash (a sticky device error), the
        cases after it did not run: they go alone to a spare that takes over at
        once, and the crash is recorded while it runs them; ``batch`` starts
        once they have all run. So a worker is never sent more than one batch,
        however often it crashes (sending each crash the rest and every batch
        after it cost a crash-heavy run time in the square of its crashes).
        :meth:`drain` runs whatever is in flight. Failures recorded while a batch
        is in flight are confirmed (:meth:`confirm`) at the next call, while the
        worker is idle. Past the deadline nothing new starts: the collected cases
        are recorded and :class:`BudgetSpent` raised (the rest never ran and is
        not recorded).

        A new batch goes queued where the runner takes queued batches (CUDA) and nothing
        has failed yet; when a case of a queued batch fails, the batch is run again case
        by case before the next one (:meth:`_finish_batch`).

        A generated case whose family (:func:`difftest.strategies.families`) lost its
        worker on one of its cases is dropped, not run: it shares that case's structure,
        and most likely its crash or hang, at the cost of a worker (or a timeout) each.
        """
        evaluations: list[Evaluation] = []
        batch = self._undropped(batch)
        self._expect(batch)  # while the worker runs the batch in flight
        while True:
            previous, number = self._inflight, self._inflight_batch
            outcomes = self.runner.collect() if previous else []
            for case, outcome in zip(previous, outcomes):
                if outcome.verdict in WORKER_LOST and case.case_id in self._family:
                    self._lost_families.add(self._family[case.case_id])
            # a queued batch with a failure runs again case by case first (_finish_batch)
            rest = self._undropped(self._redo + previous[len(outcomes):])
            self._redo = []
            batch = self._undropped(batch)
            self._inflight = []
            self._settle()  # the worker is idle: confirm what was recorded last time

            def record() -> list[Evaluation]:
                return self._finish_batch(previous, list(outcomes), number)

            fresh = not rest
            pending = rest or batch
            if pending and self._spent():
                record()
                raise BudgetSpent(f"{len(rest) + len(batch)} case(s) not run: "
                                  "the phase's budget ended")
            if pending:
                self._inflight_batch = self._next_batch()
                try:
                    self._submit(pending, queued=fresh)
                except BaseException:
                    record()  # what ran is on record even when no worker can take the rest
                    raise
                self._inflight = pending
            if fresh:
                batch = []  # sent: a batch run again after it must not send it twice
            evaluations += record()
            if not rest and not self._redo:
                return evaluations

    def _undropped(self, cases: list[Case]) -> list[Case]:
        """``cases`` less the siblings of a family that lost its worker (see dispatch)."""
        if not self._lost_families:
            return cases
        kept = []
        for case in cases:
            if self._family.get(case.case_id) in self._lost_families:
                del self._family[case.case_id]  # never run, so never popped by _finish
                self._expected.pop(case.case_id, None)  # computed when it was to be sent
                self.result.siblings_dropped += 1
            else:
                kept.append(case)
        return kept

    def _expect(self, batch: list[Case]) -> None:
        """The oracle's values of the cases of ``batch`` to be sent with RepeatKeys (those
        of :data:`REPEAT_KEY_MIN_ROUTES` routes or more, where the runner repeats cases)."""
        if getattr(self.runner, "repeats", 1) < 2:
            return
        for case in batch:
            if (case.num_routes * len(case.ranks()) >= REPEAT_KEY_MIN_ROUTES
                    and case.case_id not in self._expected):
                start = time.perf_counter()
                self._expected[case.case_id] = expected_by_rank(case)
                if self.stages is not None:
                    self.stages.add("oracle", size_class(case), time.perf_counter() - start)

    def _submit(self, cases: list[Case], queued: bool = False) -> None:
        """Start ``cases`` in the worker, each with its RepeatKeys where :meth:`_expect`
        computed its oracle values."""
        expected = [self._expected.get(case.case_id) for case in cases]
        # a new batch is queued while nothing has failed (not a crash's rest, nor a redo)
        how = {"queued": True} if queued and self._queue_batches else {}
        if not any(e is not None for e in expected):
            self.runner.submit(cases, **how)
            return
        self.runner.submit(cases, keys=[
            None if e is None else {rank: repeat_key(value) for rank, value in e.items()}
            for e in expected], **how)

    def drain(self) -> list[Evaluation]:
        """Collect, evaluate and record every case in flight (see :meth:`dispatch`), and
        confirm the failures among them."""
        evaluations = self.dispatch([])  # it runs the rest of a crashed batch too
        self._settle()
        return evaluations

    def _record(self, case: Case, evaluation: Evaluation, outcome: Any, seed: int | None,
                batch: int = 0) -> None:
        r = self.result
        sig = evaluation.signature(case)
        self.ran[case.case_id] = sig
        r.cases += 1
        r.verdicts[evaluation.verdict] = r.verdicts.get(evaluation.verdict, 0) + 1
        sizes = case.sizes()
        ranks = case.ranks()
        row = {
            "case_id": case.case_id, "impl": self.impl.name, "dialect": case.dialect,
            "contract": case.contract, "edge_classes": list(case.edge_classes),
            **sizes, "rank": ranks[0] if len(ranks) == 1 else None,
            "dtype": str(case.topk_ids.dtype), "seed": seed, "verdict": evaluation.verdict,
            "elapsed_s": float(outcome.elapsed_s), "worker": outcome.worker or None,
            "checks_failed": evaluation.checks_failed,
        }
        self.log.add_case(row)
        self.case_rows.append(row)
        if not evaluation.failed:
            return
        self._queue_batches = False  # from now on every case is attributed as it runs
        rows = mismatch_rows(case, evaluation, self.impl.name)
        self.log.add_mismatches(rows)
        self.mismatch_rows += rows
        self._case_files[sig] = self._case_files.get(sig, 0) + 1
        if self._case_files[sig] <= CASE_FILES_PER_SIGNATURE:
            self._save_case(case)
        neighbours = tuple(Neighbour(c, b == batch)
                           for c, b in reversed(self._history.get(outcome.worker, ())))
        self._unsettled.append((case, evaluation, neighbours, r.cases,
                                time.monotonic() - self._start))

    def _save_case(self, case: Case) -> None:
        cases_dir = self.out_dir / "cases"
        cases_dir.mkdir(exist_ok=True)
        (cases_dir / f"{case.case_id}.json").write_text(case.to_json())

    # -- confirmation -----------------------------------------------------------
    def confirm(self, case: Case, evaluation: Evaluation,
                neighbours: tuple[Neighbour, ...] = ()) -> Confirmation:
        """Re-run a failing case alone; when it does not fail the same way, look for
        the neighbour that makes it fail.

        Alone means a batch of its own (fresh staging, its own allocation), the
        first time in a fresh worker (:meth:`restart` of the runner; the
        in-process runner has none), so no earlier case's memory or kernel
        state can reach it; up to :data:`CONFIRM_ATTEMPTS` times (the later ones
        in that worker, which has run nothing else), and any one failing with
        the same signature confirms it (a race fails only sometimes). A timeout is not
        re-run: the sandbox confirms every timeout on a fresh worker with a
        longer budget. Otherwise the case is flaky, and each of the nearest
        :data:`CULPRIT_CANDIDATES` ``neighbours`` (nearest first) is run right
        before it, the two as a batch of their own: the first after which it
        fails with its signature is the culprit. Needs the runner idle (no
        batch in flight); the time it takes is added to ``result.confirm_s``.
        """
        if self._inflight:
            raise RuntimeError("Campaign.confirm needs the runner idle; a batch is in flight")
        start = time.monotonic()
        original = evaluation.signature(case)
        attempts, reproduced = 0, evaluation.verdict == "timeout"
        while not reproduced and attempts < CONFIRM_ATTEMPTS:
            attempts += 1
            reproduced = self._alone(case, fresh=attempts == 1).signature(case) == original
        signature, culprit = original, None
        if not reproduced:
            signature = flaky_evaluation(evaluation).signature(case)
            for neighbour in neighbours[:CULPRIT_CANDIDATES]:
                if self._pair_signature(neighbour.case, case) == original:
                    culprit = neighbour.case
                    break
        seconds = time.monotonic() - start
        self.result.confirm_s += seconds
        return Confirmation(signature, original, reproduced, attempts, neighbours, culprit,
                            seconds)

    def _alone(self, case: Case, fresh: bool) -> Evaluation:
        if fresh:
            self.runner.restart()
        return self.check(case)

    def _pair_signature(self, first: Case, second: Case) -> str | None:
        """The signature of ``second`` run right after ``first`` (``None``: it passed or
        did not run)."""
        evaluation = self.check_pair(first, second)[1]
        return evaluation.signature(second) if evaluation is not None else None

    def _settle(self) -> None:
        """Enter the failures recorded so far into ``result.failures``, each under the
        signature its confirmation gives. Only the first cases of a signature are
        confirmed (up to :data:`CONFIRM_CASES` while none reproduces alone); once one
        has been, the later ones are counted under it as they are, and after that many
        flaky ones, under the flaky signature."""
        while self._unsettled:
            case, evaluation, neighbours, cases, seconds = self._unsettled.pop(0)
            sig = evaluation.signature(case)
            if self._over_cap(sig, case):
                continue  # counted, neither confirmed nor reported
            confirmation = None
            if sig not in self._confirmed:
                if self._tries.get(sig, 0) < CONFIRM_CASES:
                    self._tries[sig] = self._tries.get(sig, 0) + 1
                    try:
                        confirmation = self._confirm_within_budget(case, evaluation, neighbours)
                    except BudgetSpent:  # no time left to confirm it: entered unconfirmed
                        self._enter(sig, case, evaluation, None, cases, seconds)
                        continue
                    if confirmation.reproduced:
                        self._confirmed.add(sig)
                if confirmation is None or confirmation.flaky:
                    self._enter_flaky(case, evaluation, confirmation, cases, seconds)
                    continue
            self._save_first(sig, case)
            self._enter(sig, case, evaluation, confirmation, cases, seconds)

    def _confirm_within_budget(self, case: Case, evaluation: Evaluation,
                               neighbours: tuple[Neighbour, ...]) -> Confirmation:
        """:meth:`confirm`, its waits cut at the run's end (not the phase's)."""
        cut = getattr(self.runner, "deadline", None)
        if hasattr(self.runner, "deadline"):
            self.runner.deadline = self.clock.end
        try:
            return self.confirm(case, evaluation, neighbours)
        finally:
            if hasattr(self.runner, "deadline"):
                self.runner.deadline = cut

    def _save_first(self, sig: str, case: Case) -> None:
        """The failure database keeps the first failing case of each signature."""
        if sig not in self._db_first and (
                self.database.has(self.impl.name, sig, "first")
                or self.database.save(self.impl.name, sig, "first", case)):
            self._db_first.add(sig)

    def _enter_flaky(self, case: Case, evaluation: Evaluation,
                     confirmation: Confirmation | None, cases: int, seconds: float) -> None:
        flaky = flaky_evaluation(evaluation)
        sig = flaky.signature(case)
        self._flaky_ids.add(case.case_id)
        if confirmation is not None and confirmation.culprit is not None:
            self._save_case(confirmation.culprit)
        failure = self.result.failures.get(sig)
        if failure is not None and confirmation is not None and confirmation.culprit is not None \
                and (failure.confirmation is None or failure.confirmation.culprit is None):
            # a victim with a culprit explains more than one without: it becomes the report
            failure.case, failure.evaluation, failure.confirmation = case, flaky, confirmation
        self._enter(sig, case, flaky, confirmation, cases, seconds)

    def _over_cap(self, sig: str, case: Case) -> bool:
        """Whether ``sig`` is past :data:`MAX_SIGNATURES_PER_DIALECT` distinct signatures
        of its dialect; then the case is counted in ``result.capped``."""
        r = self.result
        if sig in r.failures:
            return False
        if sig not in r.capped and sum(
                f.case.dialect == case.dialect for f in r.failures.values()
        ) < MAX_SIGNATURES_PER_DIALECT:
            return False
        r.capped[sig] = r.capped.get(sig, 0) + 1
        return True

    def _enter(self, sig: str, case: Case, evaluation: Evaluation,
               confirmation: Confirmation | None, cases: int, seconds: float) -> None:
        failures = self.result.failures
        if sig in failures:
            failures[sig].count += 1
        elif self._over_cap(sig, case):
            return
        else:
            failures[sig] = failure = Failure(sig, case, evaluation, 1, cases, seconds,
                                              confirmation)
            if self._wants_sanitizer(failure):
                self._sanitizing.expect()  # its interpreter starts now, its case comes later

    def _wants_sanitizer(self, failure: Failure) -> bool:
        """Whether ``failure`` gets a compute-sanitizer re-run: a CUDA implementation's
        confirmed failure whose check asks for one (flaky ones keep their pair)."""
        from .sanitizer import wants_sanitizer

        return (str(getattr(self.runner, "device", "")).startswith("cuda")
                and failure.evaluation.verdict != "flaky" and wants_sanitizer(failure))

    def _ran(self, case: Case, worker: str, batch: int) -> None:
        self._history.setdefault(worker, deque(maxlen=HISTORY)).append((case, batch))

    def _next_batch(self) -> int:
        self._batches += 1
        return self._batches

    # -- the loop -------------------------------------------------------------
    def replay_database(self, *, deadline: float | None = None,
                        max_cases: int | None = None) -> None:
        """Replay the saved failures (minimal case first, per signature) until ``deadline``
        or ``max_cases``; forget those that pass, and a case saved under a signature it
        no longer has (it is saved under its new one, if that has none) or does not show
        alone (flaky)."""
        self.phase = "replay"
        self._until(deadline)
        try:
            for saved in self.database.load(self.impl.name, self.impl.dialects):
                if saved.case.case_id in self.ran:
                    continue  # the minimal case can be the first one too
                if self._spent() or (max_cases is not None and self.result.cases >= max_cases):
                    break
                try:
                    evaluation = self.run_one(saved.case)
                except BudgetSpent:
                    break
                self.result.replayed += 1
                if (saved.signature is None or saved.case.case_id in self._flaky_ids
                        or not evaluation.failed
                        or evaluation.signature(saved.case) != saved.signature):
                    self.database.forget(saved.path)  # fixed, moved, or not failing alone
                self._show()
        finally:
            self._until(None)

    def generate(self, *, dialects: tuple[str, ...], contracts: tuple[str, ...],
                 max_examples: int | None, seconds: float | None = None,
                 deadline: float | None = None, drain_deadline: float | None = None,
                 stop_on_failure: bool = False, classes: tuple[str, ...] | None = None) -> None:
        """Generate and run cases until ``max_examples`` cases were run in this campaign
        (replayed ones included), ``seconds`` from now or ``deadline`` (whichever comes
        first; with none of them, ``DEFAULT_MAX_EXAMPLES``), or the first failure with
        ``stop_on_failure``; the batch in flight may finish until ``drain_deadline``.
        A case id already run or queued is skipped, not run. Each Hypothesis example
        draws a family of up to :data:`FAMILY_CASES` cases
        (:func:`difftest.strategies.families`); the siblings of a case that crashed or
        hung are dropped (:meth:`dispatch`), and those dropped once drawing has ended
        are not made up for. ``classes`` focuses the cases
        (:func:`difftest.strategies.cases`)."""
        from hypothesis import HealthCheck, Phase, Verbosity, given, settings
        from hypothesis import seed as hseed
        from hypothesis import strategies as st

        from .strategies import families, probes_possible

        if seconds is not None:
            ends = time.monotonic() + seconds
            deadline = ends if deadline is None else min(deadline, ends)
        if max_examples is None and deadline is None:
            max_examples = DEFAULT_MAX_EXAMPLES
        self.phase = "generate"
        # the first generated case may run until the end of the run (not only of
        # generation), so that a run on a slow machine still runs a case
        self._until(None, self.clock.end)
        before = self.result.cases
        # one queue per size class: [cases, routes, the size that closes the next batch]
        queues: dict[str, list[Any]] = {size: [[], 0, 1] for size in SIZE_CLASSES}
        # closed batches not yet sent: they wait while the worker is busy (up to
        # READY_BATCHES of them), so that drawing goes on instead of waiting on it
        ready: list[list[Case]] = []
        busy = getattr(self.runner, "busy", lambda: False)
        state = {"stopped": False, "drawn": 0, "armed": False}
        limits = self.impl.limits
        # one case an example until FAMILY_AFTER examples were drawn, then families: which
        # of the two draws may depend on that count, as both make the same choices the
        # same way and draw the same first case
        single, grown = (families(size, dialects=dialects, contracts=contracts,
                                  classes=classes, limits=limits, out_of_domain=PROBE_ONE_IN)
                         for size in (1, FAMILY_CASES))
        # with declared limits, a run starts with a few out-of-domain probes (a run of
        # their own: which strategy draws must not depend on state outside Hypothesis);
        # the count of cases is ours (max_examples, replayed ones included): Hypothesis
        # may draw a case again, which is skipped
        room = 10**9 if max_examples is None else max(0, max_examples - self.result.cases)
        probes = min(PROBES_PER_RUN, room) if probes_possible(limits) else 0
        probe = families(1, dialects=dialects, contracts=contracts, limits=limits,
                         out_of_domain=1)
        runs: list[tuple[Callable[[], Any], int]] = [(lambda: probe, probes)] if probes else []
        runs.append((lambda: grown if state["drawn"] >= FAMILY_AFTER else single, 10**9))
        failed: list[InternalError] = []

        def internal(exc: Exception, where: str, *, broken: bool) -> _BudgetExhausted:
            """Remember a bug of ours and end the loop; the cases drawn before are run
            and recorded (unless running them is what broke)."""
            failed.append(InternalError.wrap(exc, where, seed=self.seed, draw=state["drawn"]))
            state["stopped"] = state["stopped"] or broken
            return _BudgetExhausted()

        def dispatch(batch: list[Case]) -> None:
            start = time.perf_counter()
            try:
                evaluations = self.dispatch(batch)
            except BudgetSpent:
                state["stopped"] = True
                raise _BudgetExhausted from None
            except DifftestError:
                raise  # the implementation cannot be loaded: the caller's
            except Exception as exc:  # noqa: BLE001 - running and recording cases is ours
                raise internal(exc, "running and recording cases", broken=True) from None
            finally:
                if self.stages is not None:
                    self.stages.dispatch_s += time.perf_counter() - start
            if not state["armed"] and self.result.cases > before:
                self._until(deadline, drain_deadline)
                state["armed"] = True
            self._show()
            if stop_on_failure and any(e.failed for e in evaluations):
                state["stopped"] = True
                raise _BudgetExhausted

        def driver(source: Callable[[], Any], examples: int) -> Callable[[], None]:
            @settings(max_examples=examples, phases=[Phase.generate], database=None,
                      deadline=None, suppress_health_check=list(HealthCheck),
                      verbosity=Verbosity.quiet, derandomize=False)
            @given(st.data())
            def drive(data: Any) -> None:
                # every example draws its case first: Hypothesis requires the same choices
                # to draw the same way, and a stop before the draw would not
                start = time.perf_counter()
                try:  # drawn here, so that a bug of the generator is caught as ours
                    family = data.draw(source())
                except Exception as exc:  # noqa: BLE001 - the generator is ours, not the kernel
                    if type(exc).__module__.startswith("hypothesis"):
                        raise  # Hypothesis' own control flow (a rejected draw)
                    state["drawn"] += 1  # the draw that failed
                    raise internal(exc, "the case generator", broken=False) from None
                state["drawn"] += 1
                self._examples += 1
                if self.stages is not None:
                    share = (time.perf_counter() - start) / len(family)
                    for case in family:
                        self.stages.add("draw", size_class(case), share)
                for case in family:
                    if sigint["sigint"]:
                        raise _Interrupted
                    if self._spent() or (max_examples is not None
                                         and self.result.cases + len(self._inflight)
                                         + sum(len(q[0]) for q in queues.values())
                                         + sum(len(b) for b in ready) >= max_examples):
                        raise _BudgetExhausted
                    if case.case_id in self.ran or case.case_id in self._queued:
                        self.result.duplicates += 1
                        continue  # drawn again (or a sibling equal to one): run once only
                    self._queued.add(case.case_id)
                    self._family[case.case_id] = self._examples
                    queue = queues[size_class(case)]
                    queue[0].append(case)
                    queue[1] += case.num_routes * len(case.ranks())
                    if len(queue[0]) >= queue[2] or queue[1] >= BATCH_ROUTES:
                        ready.append(queue[0])
                        queue[:] = [[], 0, min(2 * queue[2], BATCH_CASES)]
                    while ready and (len(ready) > READY_BATCHES or not busy()):
                        dispatch(ready.pop(0))

            return hseed(self.seed)(drive) if self.seed is not None else drive

        with _sigint_deferred() as sigint:
            interrupted = True
            try:
                for source, examples in runs:
                    if examples > 0:
                        try:
                            driver(source, examples)()
                        except Exception as exc:  # noqa: BLE001 - Hypothesis' own errors
                            if not failed:  # (else: about the run the bug above stopped)
                                failed.append(InternalError.wrap(
                                    exc, "the Hypothesis driver", seed=self.seed,
                                    draw=state["drawn"]))
                            raise _BudgetExhausted from None
                interrupted = False
            except _BudgetExhausted:
                interrupted = False
            except _Interrupted:
                pass
            finally:
                try:
                    # the cases generated but not yet run, then the batch in flight; after
                    # Ctrl-C or an error only the batch in flight (it is running already)
                    ready += [queue[0] for queue in queues.values() if queue[0]]
                    while ready and not (interrupted or state["stopped"]):
                        dispatch(ready.pop(0))
                    ready.clear()
                    self._drain_or_fail(failed)
                except _BudgetExhausted:
                    self._drain_or_fail(failed)
                finally:
                    self._inflight = []
                    self._until(None)
                    self._show(force=True)
        if failed:
            raise failed[0]
        if sigint["sigint"]:
            raise KeyboardInterrupt

    def _drain_or_fail(self, failed: list[InternalError]) -> None:
        """:meth:`drain`; a bug of ours while doing it is added to ``failed`` (the budget
        ending is not one: the cases in flight are then not run)."""
        try:
            self.drain()
        except BudgetSpent:
            self._inflight = []
        except DifftestError:
            raise
        except Exception as exc:  # noqa: BLE001 - see generate
            self._inflight = []
            failed.append(InternalError.wrap(exc, "running and recording cases",
                                             seed=self.seed))

    # -- after the budget -------------------------------------------------------
    def shrink_and_report(self, *, shrink_seconds: float | None = None,
                          shrink: bool = True) -> None:
        """Shrink each signature within its share of the budget (see :mod:`difftest.budget`),
        re-run crashes of a CUDA implementation under compute-sanitizer, and write the
        bug reports. ``shrink_seconds`` overrides the budget's cap per signature;
        ``shrink=False`` reports the first failing cases as they are.

        A confirmed failure shrinks alone, and its minimal case is confirmed
        alone as the original was (else the report keeps the original), so
        every report's ``case.json`` fails alone with its signature. A flaky
        failure with a culprit shrinks as the pair within its share: the victim
        with the culprit fixed, then the culprit with the victim fixed, each
        half; one without a culprit keeps its case.
        """
        self._settle()
        cap = self.budget.shrink_seconds if shrink_seconds is None else shrink_seconds
        signatures = shrink_order(self.result.failures)
        sanitizing = self._sanitizing
        try:
            for i, sig in enumerate(signatures):
                failure = self.result.failures[sig]
                share = self.clock.signature_seconds(len(signatures) - i, cap=cap)
                self.phase = "shrink"
                self._show()
                sanitizing.start_queued(self.clock)
                if failure.evaluation.verdict == "flaky":
                    self._report_pair(sig, failure, share if shrink else 0.0)
                    continue
                minimal, final, shrunk = failure.case, failure.evaluation, None
                if shrink and share > 0:
                    minimal, final, shrunk = self._shrink(failure, share)
                    self.result.shrink_s[sig] = shrunk.elapsed_s
                    if minimal is not failure.case:
                        alone = self._alone_within_budget(minimal, sig)
                        if alone is None:  # the minimal case does not fail alone: keep it
                            shrunk.passes_applied.append(
                                f"the minimal case {minimal.case_id} was not confirmed alone "
                                "(or the budget left no time to): the first failing case is "
                                "reported")
                            minimal, final = failure.case, failure.evaluation
                        else:
                            final = alone
                report = (sig, failure, minimal, final, shrunk)
                if self._wants_sanitizer(failure):
                    sanitizing.queue(report)  # reported once its re-run ends
                    sanitizing.start_queued(self.clock)
                else:
                    self._write_report(*report)
            self.phase = "report"
            self._show()
            for report, text in sanitizing.results(self.clock):
                self._write_report(*report, sanitizer=text)
        finally:
            sanitizing.kill()

    def _write_report(self, sig: str, failure: Failure, minimal: Case, final: Evaluation,
                      shrunk: Any, sanitizer: str | None = None) -> None:
        from .bugreport import write_failure_report

        self.result.minimal[sig] = (minimal, final)
        self.result.bug_dirs[sig] = write_failure_report(
            self.out_dir, sig, self.impl, minimal, final, failure=failure, shrink=shrunk,
            extra={"sanitizer": sanitizer} if sanitizer else {})
        if shrunk is not None:
            self._save_case(minimal)
            self.database.save(self.impl.name, sig, "minimal", minimal)

    def _shrink(self, failure: Failure, seconds: float) -> tuple[Case, Evaluation, Any]:
        """Shrink ``failure`` for at most ``seconds`` (cut at the deadline too): the minimal
        case, its evaluation, the :class:`~difftest.shrink.ShrinkResult`. Every failing
        candidate is kept with its evaluation, so the minimal case is not run again."""
        from .shrink import ShrinkResult, shrink

        sig = failure.signature
        found = {failure.case.case_id: (failure.case, failure.evaluation)}
        best = [failure.case]
        counts = {"calls": 0, "timeouts": 0}

        def same_signature(candidate: Case) -> bool:
            counts["calls"] += 1
            if candidate.case_id in self.ran:  # run in this campaign already
                return self.ran[candidate.case_id] == sig and candidate.case_id in found
            if counts["timeouts"] >= TIMEOUT_PURSUIT:
                raise _StopPursuit
            evaluation = self.check(candidate)
            self._show()
            self._sanitizing.start_queued(self.clock)  # a re-run slot may have come free
            counts["timeouts"] += evaluation.verdict == "timeout"
            if evaluation.signature(candidate) != sig:
                return False
            found[candidate.case_id] = (candidate, evaluation)
            best[0] = candidate
            return True

        # A hang's candidates are not confirmed one by one (each costs one timeout, not
        # five); the minimal one is confirmed alone at the end (_reproduced_alone).
        confirms = getattr(self.runner, "confirm_timeouts", False)
        hang = failure.evaluation.verdict == "timeout" and confirms
        start = time.monotonic()
        self._until(None if self.clock.end is None else self.clock.now() + seconds)
        if hang:
            self.runner.confirm_timeouts = False
        try:
            shrunk = shrink(failure.case, same_signature, max_seconds=seconds,
                            costly=failure.evaluation.verdict in WORKER_LOST)
        except (BudgetSpent, _StopPursuit) as exc:
            why = (f"stopped: {TIMEOUT_PURSUIT} candidates timed out"
                   if isinstance(exc, _StopPursuit) else "stopped: the run's budget ended")
            shrunk = ShrinkResult(best[0], [why], counts["calls"],
                                  time.monotonic() - start, False)
        finally:
            self._until(None)
            if hang:
                self.runner.confirm_timeouts = True
        case, evaluation = found.get(shrunk.case.case_id, (failure.case, failure.evaluation))
        return case, evaluation, shrunk

    def _alone_within_budget(self, case: Case, sig: str) -> Evaluation | None:
        """:meth:`_reproduced_alone`, cut at the run's end (``None`` also when cut)."""
        self._until(self.clock.end)
        try:
            return self._reproduced_alone(case, sig)
        except BudgetSpent:
            return None
        finally:
            self._until(None)

    def _reproduced_alone(self, case: Case, sig: str) -> Evaluation | None:
        """The evaluation of ``case`` re-run alone failing with ``sig`` (as
        :meth:`confirm` re-runs it), or ``None`` when no attempt does."""
        for attempt in range(1 if sig.endswith("--timeout--timeout") else CONFIRM_ATTEMPTS):
            evaluation = self._alone(case, fresh=attempt == 0)
            if evaluation.signature(case) == sig:
                return evaluation
        return None

    def _report_pair(self, sig: str, failure: Failure, shrink_seconds: float) -> None:
        """The report of a flaky failure: its culprit pair shrunk, when it has one."""
        from .bugreport import write_failure_report
        from .shrink import shrink

        confirmation = failure.confirmation
        culprit = confirmation.culprit if confirmation is not None else None
        victim, final, shrunk = failure.case, failure.evaluation, None
        if culprit is not None and shrink_seconds > 0:
            original = confirmation.original

            def victim_fails(candidate: Case) -> bool:
                return self._pair_signature(culprit, candidate) == original

            shrunk = shrink(victim, victim_fails, max_seconds=shrink_seconds / 2)

            def culprit_breaks(candidate: Case) -> bool:
                return self._pair_signature(candidate, shrunk.case) == original

            by_culprit = shrink(culprit, culprit_breaks, max_seconds=shrink_seconds / 2)
            pair = self.check_pair(by_culprit.case, shrunk.case)[1]
            if pair is not None and pair.signature(shrunk.case) == original:
                victim, culprit, final = shrunk.case, by_culprit.case, flaky_evaluation(pair)
                shrunk.passes_applied[:] = ([f"victim: {p}" for p in shrunk.passes_applied]
                                            + [f"culprit: {p}"
                                               for p in by_culprit.passes_applied])
                shrunk.calls += by_culprit.calls
                shrunk.elapsed_s += by_culprit.elapsed_s
                shrunk.minimal = shrunk.minimal and by_culprit.minimal
            else:  # the shrunk pair does not reproduce: keep the pair as found
                shrunk = None
            self._save_case(victim)
            self._save_case(culprit)
        self.result.minimal[sig] = (victim, final)
        self.result.bug_dirs[sig] = write_failure_report(
            self.out_dir, sig, self.impl, victim, final, failure=failure, shrink=shrunk,
            culprit=culprit)

    def close(self) -> CampaignResult:
        import reports

        self._sanitizing.kill()  # hosts no signature came to (and runs a failure left)
        self.phase = "report"
        self._show(force=True)
        self.progress.done()
        self.log.close()
        self.result.elapsed_s = time.monotonic() - self._start
        flaky = {sig: {"case": f.case.case_id, "original": f.confirmation.original,
                       "culprit": f.confirmation.culprit.case_id
                       if f.confirmation.culprit is not None else None,
                       "ran_before": [n.case.case_id for n in f.confirmation.neighbours]}
                 for sig, f in sorted(self.result.failures.items())
                 if f.confirmation is not None and f.confirmation.flaky}
        (self.out_dir / "run.json").write_text(json.dumps({
            "impl": self.impl.name, "seed": self.seed, "cases": self.result.cases,
            "verdicts": self.result.verdicts, "replayed": self.result.replayed,
            "signatures": sorted(self.result.failures),
            "signatures_over_cap": self.result.capped,
            "limits": limits_json(self.impl.limits),
            "domain": describe_limits(self.impl.limits),
            "elapsed_s": self.result.elapsed_s, "confirm_s": self.result.confirm_s,
            "flaky": flaky, "pid": os.getpid(),
            "failures": self.result.failure_records(self.impl.name),
            "budget": {"seconds": self.budget.seconds, "max_examples": self.budget.max_examples,
                       "shrink_seconds": self.budget.shrink_seconds},
            "duplicates_skipped": self.result.duplicates,
            "siblings_dropped": self.result.siblings_dropped,
        }, indent=1))
        reports.write_summary(self.out_dir)  # shows run.json's domain and capped signatures
        return self.result


class _Sanitizing:
    """The compute-sanitizer re-runs of a campaign's CUDA failures, in the background:
    each starts once its signature's minimal case is known, while the next signatures
    shrink, at most ``SANITIZER_PARALLEL`` at a time, and may run until
    ``SANITIZER_SHARE`` of the run's budget (:mod:`difftest.budget`); one the budget
    cuts is reported as cut. Each runs in an interpreter started under memcheck as soon
    as its signature was found (:meth:`expect`; :class:`~difftest.sanitizer.SanitizerHost`),
    so that its case runs at once when it comes: up to ``SANITIZER_PARALLEL`` of those
    wait beside the re-runs, and no more than signatures to come."""

    def __init__(self, impl: Implementation) -> None:
        self.impl = impl
        self._waiting: list[tuple] = []
        self._running: list[tuple[tuple, Any]] = []
        self._hosts: list[Any] = []  # started, waiting for a case
        self._expected = 0  # signatures whose re-run has not started (or been skipped)

    def expect(self) -> None:
        """One more signature will want a re-run: start its interpreter, room allowing."""
        self._expected += 1
        self._top_up()

    def _alive(self) -> int:
        return sum(not run.done() for _, run in self._running if run is not None)

    def _top_up(self) -> None:
        from .sanitizer import SanitizerHost

        while len(self._hosts) < min(self._expected, SANITIZER_PARALLEL):
            host = SanitizerHost.start()
            if host is None:
                return
            self._hosts.append(host)

    def queue(self, report: tuple) -> None:
        """``report``'s arguments (signature first, minimal case third) wait for a re-run."""
        self._waiting.append(report)

    def start_queued(self, clock: Any) -> None:
        from .sanitizer import SanitizerRun

        while self._waiting and self._alive() < SANITIZER_PARALLEL:
            report = self._waiting.pop(0)
            self._expected = max(0, self._expected - 1)
            if clock.left(clock.sanitizer_end) < 1.0:  # no time left for one
                self._running.append((report, None))
            else:
                host = self._hosts.pop(0) if self._hosts else None
                self._running.append((report, SanitizerRun.start(report[2], self.impl, host)))
        self._top_up()

    def results(self, clock: Any) -> Iterator[tuple[tuple, str]]:
        """Each queued report with its re-run's text, in the order they were queued
        (waiting at most until the re-runs' end of the budget, else
        ``SANITIZER_TIMEOUT_S`` each)."""
        while self._waiting or self._running:
            self.start_queued(clock)
            report, run = self._running.pop(0)
            if run is None:
                yield report, SANITIZER_SKIPPED
            else:
                yield report, run.result(min(SANITIZER_TIMEOUT_S,
                                             clock.left(clock.sanitizer_end)))

    def kill(self) -> None:
        for _, run in self._running:
            if run is not None:
                run.kill()
        for host in self._hosts:
            host.kill()
        self._hosts.clear()


def shrink_order(failures: dict[str, Any]) -> list[str]:
    """The signatures in the order they shrink: crashes and hangs last (each failing
    candidate costs a worker), so what the others leave of their shares passes to them
    (:mod:`difftest.budget`); by name within each group."""
    return sorted(failures, key=lambda sig: (
        failures[sig].evaluation.verdict in WORKER_LOST, sig))


def flaky_evaluation(evaluation: Evaluation) -> Evaluation:
    """The evaluation of a failure that did not reproduce alone: verdict ``flaky``, the
    same failed checks (its signature is ``<dialect>--flaky--<primary check>``)."""
    return Evaluation("flaky", list(evaluation.mismatches), evaluation.detail)


def mismatch_rows(case: Case, evaluation: Evaluation, impl: str) -> list[dict]:
    """The mismatch rows kept of one case: at most ``MISMATCH_ROWS_PER_CASE``, the last
    kept one saying how many more there were."""
    kept = evaluation.mismatches[:MISMATCH_ROWS_PER_CASE]
    rows = [{"case_id": case.case_id, "impl": impl, "dialect": case.dialect,
             "verdict": evaluation.verdict, **m.as_row()} for m in kept]
    more = len(evaluation.mismatches) - len(kept)
    if more:
        rows[-1]["message"] += f" (and {more} more failed check(s) of this case, not kept)"
    return rows


def run_campaign(impl: Implementation, runner: Any, out_dir: Path, budget: Budget, *,
                 dialects: tuple[str, ...] | None = None,
                 contracts: tuple[str, ...] = ("production", "defensive"),
                 database: FailureDatabase | None = None, progress: Progress | None = None,
                 shrink: bool = True, stop_on_failure: bool = False,
                 classes: tuple[str, ...] | None = None,
                 raise_internal: bool = True) -> Campaign:
    """The campaign recipe, within ``budget`` (:mod:`difftest.budget` has the rules):
    replay the failure database, generate, shrink each signature and write its bug
    report, then close (parquet, summary, ``run.json``) — also when interrupted.
    Returns the closed :class:`Campaign` (``.result`` is its :class:`CampaignResult`).
    An :class:`~difftest.errors.InternalError` (a bug of ours) is raised after the close,
    or, with ``raise_internal=False``, kept in ``result.internal``.
    """
    if hasattr(runner, "warm_up"):
        # start-up (loading, a CUDA build) is not in the budget; the spares set up while
        # the first cases run
        runner.warm_up(spares=False)
    campaign = Campaign(impl, runner, out_dir, seed=budget.seed, database=database,
                        progress=progress, budget=budget)
    clock = campaign.clock
    try:
        campaign.replay_database(deadline=clock.replay_end, max_cases=budget.max_examples)
        campaign.generate(dialects=dialects or impl.dialects, contracts=contracts,
                          max_examples=budget.max_examples, deadline=clock.generate_end,
                          drain_deadline=clock.drain_end,
                          stop_on_failure=stop_on_failure, classes=classes)
        campaign.shrink_and_report(shrink=shrink)
    except InternalError as exc:
        campaign.result.internal = exc
        if raise_internal:
            raise
    finally:  # interrupted or not: parquet and summary hold every recorded case
        campaign.close()
    return campaign
