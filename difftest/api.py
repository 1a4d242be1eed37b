"""Checking a callable from Python (the pytest fixture is built on this)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import limits as domain
from .budget import nothing_checked, resolve_budget
from .campaign import CampaignResult, FailureDatabase
from .case import CONTRACTS, DIALECTS, Case
from .errors import UsageError
from .evaluate import Evaluation
from .registry import Implementation

DEFAULT_CHECK_SECONDS = 5.0  # the budget of a check_callable / difftest_check call


@dataclass
class CheckResult:
    """Outcome of :func:`check_callable`; ``str()`` is the failure report."""

    impl: str
    dialect: str
    result: CampaignResult
    minimal: dict[str, str] = field(default_factory=dict)  # signature -> case summary

    @property
    def passed(self) -> bool:
        """No failure, and at least one case ran (a check of no case proves nothing)."""
        return not self.result.failures and self.result.cases > 0

    def __str__(self) -> str:
        r = self.result
        head = (f"difftest: {self.impl} ({self.dialect}): {r.cases} cases, "
                + ", ".join(f"{v} {n}" for v, n in sorted(r.verdicts.items())))
        lines = [head]
        if not r.cases:
            lines.append(nothing_checked(r.elapsed_s))
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


def importable_target(fn: Callable[..., Any]) -> str | None:
    """``"module:name"`` when a fresh interpreter with this ``sys.path`` can import ``fn``
    by name (what a sandbox worker does), else ``None`` (a local function, a lambda, a
    method, a function of ``__main__`` or of a module found only through ``sys.modules``)."""
    import importlib.machinery
    import sys

    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not name or "." in name or module == "__main__":
        return None
    if getattr(sys.modules.get(module), name, None) is not fn:
        return None
    top = module.partition(".")[0]
    if importlib.machinery.PathFinder.find_spec(top, sys.path) is None:
        return None
    return f"{module}:{name}"


def check_callable(fn: Callable[..., Any] | str, dialect: str, *,
                   seconds: float | None = None,
                   max_examples: int | None = None, seed: int | None = 0,
                   contracts: tuple[str, ...] = CONTRACTS, device: str = "cpu",
                   out_dir: str | os.PathLike | None = None,
                   shrink_seconds: float | None = None, profile: str | None = None,
                   database: str | os.PathLike | None = ".difftest/db",
                   stable: bool = False, name: str | None = None,
                   load: Sequence[str] = (),
                   limits: dict[str, tuple[int | None, int | None]] | None = None,
                   in_process: bool = True, timeout: float | None = None) -> CheckResult:
    """Test ``fn`` (a callable in ``dialect``'s calling convention) against the oracle.

    ``fn`` may also be an implementation name (``"op:NAMESPACE::NAME"``,
    ``"torch:<fault>"``, ...; ``stable`` is then the implementation's own), with
    ``load`` the op libraries to load first. The budget is resolved by
    :func:`difftest.budget.resolve_budget` (``seconds`` is the whole check, default
    ``DEFAULT_CHECK_SECONDS`` unless ``profile`` sets one). ``in_process=True`` runs
    ``fn`` in this process (it need not be importable, but a crash takes this process
    down and a hang never ends); ``in_process=False`` runs it in a sandbox worker
    (``timeout`` seconds a case, default 10), which needs a callable importable by
    name (:func:`importable_target`; else a ``UsageError`` says so). Failures are
    shrunk and written up under ``out_dir``. Returns a :class:`CheckResult`; nothing
    is raised for a failing callable. A callable or name that cannot be called with
    ``dialect``'s arguments, or loaded, raises a ``UsageError`` before any case runs.
    ``limits`` (:mod:`difftest.limits`, e.g. ``{"num_experts": (1, 992)}``) is the
    callable's input domain, put over its ``difftest_limits`` attribute (or the
    implementation's declared limits): cases are drawn inside it, and out-of-domain
    probes that the callable rejects cleanly are the verdict ``rejected``.
    """
    from . import registry, signatures
    from .campaign import run_campaign
    from .sandbox import DEFAULT_TIMEOUT_S, InProcessRunner, SandboxRunner

    if dialect not in DIALECTS:
        raise UsageError(f"dialect={dialect!r}: must be one of {', '.join(DIALECTS)}")
    bad = set(contracts) - set(CONTRACTS)
    if bad:
        raise UsageError(f"contracts={tuple(contracts)!r}: allowed {CONTRACTS}")
    budget = resolve_budget(profile, seconds=seconds, max_examples=max_examples,
                            shrink_seconds=shrink_seconds, seed=seed,
                            default_seconds=DEFAULT_CHECK_SECONDS if max_examples is None
                            else None)
    if isinstance(fn, str):  # a registry name: its record (op libraries included) is kept
        impl = registry.resolve(fn, dialect, load=load)
        label = name or fn
        fn = impl.load()[dialect] if in_process else None
    else:
        label = name or (f"py:{getattr(fn, '__module__', '?')}:"
                         f"{getattr(fn, '__qualname__', '?')}")
        signatures.check_arguments(fn, dialect, label)
        target = importable_target(fn)
        if target is None and not in_process:
            raise UsageError(
                f"{getattr(fn, '__qualname__', fn)!r} of module "
                f"{getattr(fn, '__module__', '?')!r} cannot be imported by name in a sandbox "
                "worker (a local function, lambda, method or __main__ function?): define it "
                "at module level, or pass in_process=True (no crash isolation)")
        impl = Implementation(label, "py", (dialect,), ("cpu", "cuda"), stable,
                              "user callable", target=target or label[3:],
                              limits=domain.declared(fn, f"{label}: {domain.ATTRIBUTE}"))
    impl = impl.with_limits(domain.validate(limits, "limits"))
    out = Path(out_dir) if out_dir is not None else Path(".difftest") / "runs" / "".join(
        c if c.isalnum() or c in "._-" else "_" for c in label)
    if in_process:
        runner: Any = InProcessRunner(impl, device, callables={dialect: fn})
    else:
        runner = SandboxRunner(impl, device, timeout_s=timeout or DEFAULT_TIMEOUT_S)
    with runner:
        campaign = run_campaign(impl, runner, out, budget, dialects=(dialect,),
                                contracts=tuple(contracts),
                                database=FailureDatabase(Path(database)) if database else None)
    return check_result(label, dialect, campaign.result)
