"""A campaign: generate → run → oracle → compare → record, within a budget.

Cases come from :func:`difftest.strategies.cases`, driven by Hypothesis in
generate-only mode (our test function never raises, so the sequence of cases
is a function of the seed alone); the budget ends the loop from outside.
Before generating, the failure database replays every case that failed for
this implementation in an earlier run (and forgets those that now pass).
After the budget, each distinct failure signature is shrunk to a minimal case
and written up as a bug report.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .case import Case
from .errors import UsageError
from .evaluate import Evaluation, evaluate
from .registry import Implementation

DEFAULT_MAX_EXAMPLES = 1000
DEFAULT_SHRINK_SECONDS = 30.0
# Generated cases go to the worker in batches of at most this many cases and routes
# (a large case is a batch of its own). The first batch is one case and each next one
# twice as many, so a failure in the first cases is seen as soon as it would be unbatched.
BATCH_CASES = 64
BATCH_ROUTES = 1 << 16


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


@dataclass
class Failure:
    """The first case seen with one signature, and how many cases shared it."""

    signature: str
    case: Case
    evaluation: Evaluation
    count: int = 1
    cases_until_failure: int = 0
    seconds_until_failure: float = 0.0


@dataclass
class CampaignResult:
    out_dir: Path
    cases: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    bug_dirs: dict[str, Path] = field(default_factory=dict)
    minimal: dict[str, tuple[Case, Evaluation]] = field(default_factory=dict)
    elapsed_s: float = 0.0
    replayed: int = 0

    @property
    def failed(self) -> int:
        return sum(n for v, n in self.verdicts.items() if v != "pass")


class Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, enabled: bool | None = None, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = 0.0

    def update(self, result: CampaignResult, budget: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        bad = ", ".join(f"{v} {n}" for v, n in sorted(result.verdicts.items()) if v != "pass")
        self.stream.write(f"\r\033[K{result.cases} cases {budget} | failing: {bad or 'none'}")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


class FailureDatabase:
    """Cases that failed before, replayed first until they pass (``.difftest/db``)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def _dir(self, impl: str) -> Path | None:
        if self.root is None:
            return None
        slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in impl)
        return self.root / slug

    def load(self, impl: str, dialects: tuple[str, ...]) -> list[tuple[Path, Case]]:
        folder = self._dir(impl)
        if folder is None or not folder.is_dir():
            return []
        out = []
        for path in sorted(folder.glob("*.json")):
            try:
                case = Case.from_json(path.read_text())
            except (OSError, UsageError):
                continue
            if case.dialect in dialects:
                out.append((path, case))
        return out

    def save(self, impl: str, case: Case) -> None:
        folder = self._dir(impl)
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{case.case_id}.json").write_text(case.to_json())

    def forget(self, path: Path) -> None:
        path.unlink(missing_ok=True)


class Campaign:
    """Runs cases for one implementation and records every one of them."""

    def __init__(self, impl: Implementation, runner: Any, out_dir: Path, *, seed: int | None,
                 database: FailureDatabase | None = None, progress: Progress | None = None,
                 log: Any = None) -> None:
        import reports

        self.impl, self.runner, self.seed = impl, runner, seed
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log = log if log is not None else reports.RunLog(self.out_dir)
        self.database = database or FailureDatabase(None)
        self.progress = progress or Progress(enabled=False)
        self.result = CampaignResult(self.out_dir)
        self.case_rows: list[dict] = []
        self.mismatch_rows: list[dict] = []
        self._inflight: list[Case] = []
        self._start = time.monotonic()

    # -- one case -------------------------------------------------------------
    def check(self, case: Case) -> Evaluation:
        """Run and evaluate one case without recording it (used by the shrinker)."""
        outcome = self.runner.run(case)
        return evaluate(case, outcome, stable=self.impl.stable)

    def run_one(self, case: Case, seed: int | None = None) -> Evaluation:
        return self._finish(case, self.runner.run(case), seed)

    def _finish(self, case: Case, outcome: Any, seed: int | None) -> Evaluation:
        evaluation = evaluate(case, outcome, stable=self.impl.stable)
        self._record(case, evaluation, outcome, seed)
        return evaluation

    def dispatch(self, batch: list[Case]) -> list[Evaluation]:
        """Collect the batch in flight, start ``batch`` in the worker, then evaluate and
        record the collected one while the worker runs the new one. Returns the
        evaluations of the collected cases, in their order.

        When the batch in flight stopped at a crash (a sticky device error), the
        cases after it did not run: they go in front of ``batch``, and the
        collected cases are recorded first, so that the crash is on record
        before the worker restarts. :meth:`drain` runs whatever is in flight.
        """
        previous = self._inflight
        outcomes = self.runner.collect() if previous else []
        rest = previous[len(outcomes):]

        def record() -> list[Evaluation]:
            return [self._finish(case, outcome, self.seed)
                    for case, outcome in zip(previous, outcomes)]

        recorded = record() if rest else None  # a submit after a crash restarts the worker
        self._inflight = rest + list(batch)
        if self._inflight:
            self.runner.submit(self._inflight)
        return recorded if recorded is not None else record()

    def drain(self) -> list[Evaluation]:
        """Collect, evaluate and record every case in flight (see :meth:`dispatch`)."""
        evaluations: list[Evaluation] = []
        while self._inflight:
            evaluations += self.dispatch([])
        return evaluations

    def _record(self, case: Case, evaluation: Evaluation, outcome: Any, seed: int | None) -> None:
        r = self.result
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
        if evaluation.verdict == "pass":
            return
        rows = [{"case_id": case.case_id, "impl": self.impl.name, "dialect": case.dialect,
                 "verdict": evaluation.verdict, **m.as_row()} for m in evaluation.mismatches]
        self.log.add_mismatches(rows)
        self.mismatch_rows += rows
        cases_dir = self.out_dir / "cases"
        cases_dir.mkdir(exist_ok=True)
        (cases_dir / f"{case.case_id}.json").write_text(case.to_json())
        self.database.save(self.impl.name, case)
        sig = evaluation.signature(case)
        if sig in r.failures:
            r.failures[sig].count += 1
        else:
            r.failures[sig] = Failure(sig, case, evaluation, 1, r.cases,
                                      time.monotonic() - self._start)

    # -- the loop -------------------------------------------------------------
    def replay_database(self) -> None:
        for path, case in self.database.load(self.impl.name, self.impl.dialects):
            self.result.replayed += 1
            if self.run_one(case).verdict == "pass":
                self.database.forget(path)

    def generate(self, *, dialects: tuple[str, ...], contracts: tuple[str, ...],
                 max_examples: int | None, seconds: float | None,
                 stop_on_failure: bool = False) -> None:
        from hypothesis import HealthCheck, Phase, Verbosity, given, settings
        from hypothesis import seed as hseed

        from .strategies import cases

        limit = max_examples if max_examples is not None else (
            10**9 if seconds is not None else DEFAULT_MAX_EXAMPLES)
        deadline = time.monotonic() + seconds if seconds is not None else None
        budget = (f"of {limit}" if max_examples is not None or seconds is None else "") + (
            f" in {seconds:g}s" if seconds is not None else "")

        queue: list[Case] = []
        state = {"routes": 0, "size": 1, "stopped": False}

        def dispatch(batch: list[Case]) -> None:
            evaluations = self.dispatch(batch)
            self.progress.update(self.result, budget)
            if stop_on_failure and any(e.verdict != "pass" for e in evaluations):
                state["stopped"] = True
                raise _BudgetExhausted

        @settings(max_examples=limit, phases=[Phase.generate], database=None, deadline=None,
                  suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
                  derandomize=False)
        @given(cases(dialects=dialects, contracts=contracts))
        def drive(case: Case) -> None:
            if sigint["sigint"]:
                raise _Interrupted
            if deadline is not None and time.monotonic() >= deadline:
                raise _BudgetExhausted
            queue.append(case)
            state["routes"] += case.num_routes * len(case.ranks())
            if len(queue) >= state["size"] or state["routes"] >= BATCH_ROUTES:
                batch = queue[:]
                queue.clear()
                state["routes"], state["size"] = 0, min(2 * state["size"], BATCH_CASES)
                dispatch(batch)

        if self.seed is not None:
            drive = hseed(self.seed)(drive)
        with _sigint_deferred() as sigint:
            interrupted = True
            try:
                drive()
                interrupted = False
            except _BudgetExhausted:
                interrupted = False
            except _Interrupted:
                pass
            finally:
                try:
                    # the cases generated but not yet run, then the batch in flight; after
                    # Ctrl-C or an error only the batch in flight (it is running already)
                    if queue and not (interrupted or state["stopped"]):
                        dispatch(queue[:])
                    self.drain()
                except _BudgetExhausted:
                    self.drain()
                finally:
                    self.progress.update(self.result, budget, force=True)
                    self.progress.done()
        if sigint["sigint"]:
            raise KeyboardInterrupt

    # -- after the budget -------------------------------------------------------
    def shrink_and_report(self, *, shrink_seconds: float = DEFAULT_SHRINK_SECONDS,
                          extra: Callable[[Failure, Case], dict] | None = None) -> None:
        from .bugreport import write_failure_report
        from .shrink import shrink

        if extra is None and str(getattr(self.runner, "device", "")).startswith("cuda"):
            from .sanitizer import sanitizer_extra

            extra = sanitizer_extra(self.impl)  # crashes get a compute-sanitizer re-run

        for sig, failure in sorted(self.result.failures.items()):
            def same_signature(candidate: Case, sig: str = sig) -> bool:
                return self.check(candidate).signature(candidate) == sig

            shrunk = shrink(failure.case, same_signature, max_seconds=shrink_seconds)
            minimal = shrunk.case
            final = self.check(minimal)
            if final.signature(minimal) != sig:  # a flaky failure: keep the original
                minimal, final = failure.case, failure.evaluation
            self.result.minimal[sig] = (minimal, final)
            self.result.bug_dirs[sig] = write_failure_report(
                self.out_dir, sig, self.impl, minimal, final, failure=failure, shrink=shrunk,
                extra=extra(failure, minimal) if extra else None)

    def close(self) -> CampaignResult:
        import reports

        self.log.close()
        reports.write_summary(self.out_dir)
        self.result.elapsed_s = time.monotonic() - self._start
        (self.out_dir / "run.json").write_text(json.dumps({
            "impl": self.impl.name, "seed": self.seed, "cases": self.result.cases,
            "verdicts": self.result.verdicts, "replayed": self.result.replayed,
            "signatures": sorted(self.result.failures), "elapsed_s": self.result.elapsed_s,
            "pid": os.getpid(),
        }, indent=1))
        return self.result
