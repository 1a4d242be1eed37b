"""Checking a callable from Python (the pytest fixture is built on this)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import limits as domain
from .campaign import Campaign, CampaignResult, FailureDatabase
from .case import CONTRACTS, DIALECTS, Case
from .errors import UsageError
from .evaluate import Evaluation
from .registry import Implementation


@dataclass
class CheckResult:
    """Outcome of :func:`check_callable`; ``str()`` is the failure report."""

    impl: str
    dialect: str
    result: CampaignResult
    minimal: dict[str, str] = field(default_factory=dict)  # signature -> case summary

    @property
    def passed(self) -> bool:
        return not self.result.failures

    def __str__(self) -> str:
        r = self.result
        head = (f"difftest: {self.impl} ({self.dialect}): {r.cases} cases, "
                + ", ".join(f"{v} {n}" for v, n in sorted(r.verdicts.items())))
        lines = [head]
        for sig, failure in sorted(r.failures.items()):
            lines.append(f"FAILED {sig} ({failure.count} case(s))")
            lines.append(self.minimal.get(sig, ""))
            if sig in r.bug_dirs:
                lines.append(f"bug report: {r.bug_dirs[sig]}")
        return "\n".join(line for line in lines if line)


def minimal_summary(case: Case, evaluation: Evaluation) -> str:
    """The minimal case's inputs and its first failure, for a test report."""
    from .bugreport import case_inputs

    rows = [f"minimal case ({case.dialect}, {case.contract}; "
            f"{', '.join(case.edge_classes) or 'no edge class'}):"]
    for name, value in case_inputs(case).items():
        rows.append(f"  {name} = {value}")
    rows.append("first failure: " + evaluation.detail.replace("\n", "\n  "))
    return "\n".join(rows)


def check_result(label: str, dialect: str, result: CampaignResult) -> CheckResult:
    check = CheckResult(label, dialect, result)
    for sig, (case, evaluation) in result.minimal.items():
        check.minimal[sig] = minimal_summary(case, evaluation)
    return check


def check_callable(fn: Callable[..., Any] | str, dialect: str, *, seconds: float | None = 5.0,
                   max_examples: int | None = None, seed: int | None = 0,
                   contracts: tuple[str, ...] = CONTRACTS, device: str = "cpu",
                   out_dir: str | os.PathLike | None = None, shrink_seconds: float = 20.0,
                   database: str | os.PathLike | None = ".difftest/db",
                   stable: bool = False, name: str | None = None,
                   load: Sequence[str] = (),
                   limits: dict[str, tuple[int | None, int | None]] | None = None
                   ) -> CheckResult:
    """Test ``fn`` (a callable in ``dialect``'s calling convention) against the oracle.

    ``fn`` may also be an implementation name (``"op:NAMESPACE::NAME"``,
    ``"torch:<fault>"``, ...; ``stable`` is then the implementation's own), with
    ``load`` the op libraries to load first. Runs
    in this process (the callable need not be importable); failures are shrunk
    and written up under ``out_dir``. Returns a :class:`CheckResult`; nothing is
    raised for a failing callable. A callable or name that cannot be called with
    ``dialect``'s arguments, or loaded, raises a ``UsageError`` before any case runs.
    ``limits`` (:mod:`difftest.limits`, e.g. ``{"num_experts": (1, 992)}``) is the
    callable's input domain, put over its ``difftest_limits`` attribute (or the
    implementation's declared limits): cases are drawn inside it, and out-of-domain
    probes that the callable rejects cleanly are the verdict ``rejected``.
    """
    from . import registry, signatures
    from .sandbox import InProcessRunner

    if dialect not in DIALECTS:
        raise UsageError(f"dialect={dialect!r}: must be one of {', '.join(DIALECTS)}")
    bad = set(contracts) - set(CONTRACTS)
    if bad:
        raise UsageError(f"contracts={tuple(contracts)!r}: allowed {CONTRACTS}")
    if isinstance(fn, str):  # a registry name: its record (op libraries included) is kept
        impl = registry.resolve(fn, dialect, load=load)
        label = name or fn
        fn = impl.load()[dialect]
    else:
        label = name or (f"py:{getattr(fn, '__module__', '?')}:"
                         f"{getattr(fn, '__qualname__', '?')}")
        signatures.check_arguments(fn, dialect, label)
        impl = Implementation(label, "py", (dialect,), ("cpu", "cuda"), stable,
                              "user callable", target=label[3:],
                              limits=domain.declared(fn, f"{label}: {domain.ATTRIBUTE}"))
    impl = impl.with_limits(domain.validate(limits, "limits"))
    out = Path(out_dir) if out_dir is not None else Path(".difftest") / "runs" / "".join(
        c if c.isalnum() or c in "._-" else "_" for c in label)
    runner = InProcessRunner(impl, device, callables={dialect: fn})
    campaign = Campaign(impl, runner, out, seed=seed,
                        database=FailureDatabase(Path(database)) if database else None)
    campaign.replay_database()
    campaign.generate(dialects=(dialect,), contracts=tuple(contracts),
                      max_examples=max_examples, seconds=seconds)
    campaign.shrink_and_report(shrink_seconds=shrink_seconds)
    return check_result(label, dialect, campaign.close())
