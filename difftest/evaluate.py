"""From an :class:`~difftest.sandbox.Outcome` to a verdict, mismatches and a signature.

The verdicts (SPEC §9): ``pass``, ``mismatch`` (a check failed), ``error``
(the call raised), ``crash`` (the worker died, or a sticky CUDA error such as an
illegal address), ``timeout`` (no answer in time). A failure's *signature* is
its dialect, verdict and primary failed check — what shrinking preserves and
what names a bug report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .case import Case
from .checks import CHECK_PRIORITY
from .compare import (
    Mismatch,
    RowOrder,
    breadcrumb,
    canonical,
    compare_conservation,
    compare_run,
    same_canonical,
)
from .dialects import DIALECT_INFO, RowsExpected
from .execute import SENTINEL


@dataclass
class Evaluation:
    verdict: str
    mismatches: list[Mismatch] = field(default_factory=list)
    detail: str = ""
    frames: str = ""  # error: the last frames of the first raising call's traceback

    @property
    def checks_failed(self) -> list[str]:
        seen = {m.check for m in self.mismatches}
        return [c for c in CHECK_PRIORITY if c in seen]

    @property
    def primary_check(self) -> str | None:
        checks = self.checks_failed
        return checks[0] if checks else None

    def signature(self, case: Case) -> str | None:
        if self.verdict == "pass":
            return None
        return f"{case.dialect}--{self.verdict}--{self.primary_check or self.verdict}"


def expected_by_rank(case: Case) -> dict[int | None, Any]:
    info = DIALECT_INFO[case.dialect]
    return {rank: info.reference(case, rank) for rank in case.ranks()}


def evaluate(case: Case, outcome: Any, *, stable: bool,
             expected: dict[int | None, Any] | None = None) -> Evaluation:
    """Every check of SPEC §9 over every repeat and rank of one case."""
    if outcome.verdict in ("crash", "timeout"):
        return Evaluation(outcome.verdict, [Mismatch(outcome.verdict, outcome.detail)],
                          outcome.detail)
    expected = expected if expected is not None else expected_by_rank(case)
    found: list[Mismatch] = []
    seen: set[tuple] = set()
    fatal = None
    first_canon: dict = {}
    first_run: dict = {}
    orders = {rank: RowOrder(e) for rank, e in expected.items() if isinstance(e, RowsExpected)}
    disagree: list[Mismatch] = []
    for repeat, runs in enumerate(outcome.runs):
        candidates: list[Mismatch] = []
        compared = False
        for run in runs:
            if run.fatal:
                fatal = run
            if repeat == 0:
                first_run[run.rank] = run
            elif (run.error is None and not (run.guard_damage or run.mutated_inputs)
                  and _same_bytes(run, first_run.get(run.rank))):
                continue  # byte for byte run 1's outputs: checked there
            canon = canonical(case, expected[run.rank], run, orders.get(run.rank))
            if repeat == 0:
                first_canon[run.rank] = canon
            elif same_canonical(canon, first_canon.get(run.rank)):
                # same outputs as run 1 (checked there); only the set-up checks remain
                if not (run.guard_damage or run.mutated_inputs):
                    continue
            else:
                disagree.append(Mismatch(
                    "repeat_disagree",
                    f"{breadcrumb(run.rank) or 'call'}: run {repeat + 1} of the same case "
                    "differs from run 1 after canonicalisation (a race or uninitialised read)",
                    run.rank))
            compared = True
            rows = canon[0] if run.rank in orders and run.error is None else None
            candidates += compare_run(case, expected[run.rank], run, stable=stable,
                                      sentinel=SENTINEL, order=orders.get(run.rank),
                                      have_rows=rows)
        if compared and len(runs) == len(case.ranks()):
            candidates += compare_conservation(case, runs, expected)
        for m in candidates + disagree:
            key = (m.check, m.rank, m.slot, m.expert)
            if key not in seen:  # one record per failed check and place, not per repeat
                seen.add(key)
                found.append(m)
        disagree = []
    if fatal is not None:
        crash = Mismatch("crash", f"sticky device error (the context is unusable): {fatal.error}",
                         fatal.rank)
        return Evaluation("crash", [crash] + found, fatal.error or "")
    if not found:
        return Evaluation("pass")
    # the detail is the first record of the check the signature is named after
    first = next(m for check in CHECK_PRIORITY for m in found if m.check == check)
    verdict = "error" if first.check in ("exception", "launch_error") else "mismatch"
    frames = next((run.frames for runs in outcome.runs for run in runs
                   if run.error is not None and getattr(run, "frames", None)), "")
    return Evaluation(verdict, found, first.message, frames if verdict == "error" else "")


def _same_bytes(run: Any, first: Any) -> bool:
    """``run`` returned exactly the outputs of ``first`` (an error-free run)."""
    if first is None or first.error is not None or run.outputs.keys() != first.outputs.keys():
        return False
    return all(np.array_equal(v, first.outputs[k]) for k, v in run.outputs.items())
