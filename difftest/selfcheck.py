"""``difftest selfcheck``: prove the gate catches every shipped fault here.

For each fault of the current device (torch faults always; CUDA faults too
where a GPU is present) a campaign (:func:`difftest.campaign.run_campaign`)
runs until the first failure, shrinks it and writes the bug report, all within
the budget of that fault; a clean run of the correct
implementation shows there is no false alarm. The table says, per fault:
caught or not, cases and seconds until caught, the minimal case, and where
the report is. Any escaped fault (or a false alarm) makes the exit non-zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .case import Case

SHRINK_SECONDS = 60.0  # per signature, within each fault's budget


@dataclass
class SelfcheckRow:
    impl: str
    expect_failure: bool
    caught: bool
    cases: int
    seconds: float
    minimal: str
    shrink_s: float
    report: str

    @property
    def ok(self) -> bool:
        return self.caught == self.expect_failure


def minimal_size(case: Case) -> str:
    s = case.sizes()
    parts = [f"T={s['T']}", f"K={s['K']}", f"E={s['E']}", f"B={s['B']}"]
    if s["L"]:
        parts.append(f"L={s['L']}")
    if s["R"]:
        parts.append(f"R={s['R']}")
    return " ".join(parts)


def _run_one(name: str, device: str, seconds: float, seed: int, out: Path,
             expect_failure: bool, clean_examples: int) -> SelfcheckRow:
    from . import registry
    from .budget import Budget
    from .campaign import run_campaign
    from .sandbox import SandboxRunner

    impl = registry.resolve(name)
    budget = Budget(seconds=seconds, max_examples=None if expect_failure else clean_examples,
                    shrink_seconds=SHRINK_SECONDS, seed=seed)
    with SandboxRunner(impl, device, timeout_s=30.0) as runner:
        result = run_campaign(impl, runner, out / name.replace(":", "_"), budget,
                              stop_on_failure=expect_failure).result
    caught = bool(result.failures)
    minimal, shrink_s, report = "-", 0.0, "-"
    if caught:
        sig = sorted(result.failures)[0]
        shrink_s = sum(result.shrink_s.values())
        report = str(result.bug_dirs.get(sig, "-"))
        minimal = minimal_size(result.minimal[sig][0]) if sig in result.minimal else "-"
    first = min((f.cases_until_failure for f in result.failures.values()), default=0)
    secs = min((f.seconds_until_failure for f in result.failures.values()),
               default=result.elapsed_s)
    return SelfcheckRow(name, expect_failure, caught, first if caught else result.cases,
                        secs, minimal, shrink_s, report)


def selfcheck(*, device: str, seconds: float, seed: int, out: Path,
              faults: list[str] | None = None, clean_examples: int = 300) -> bool:
    from cuda_impl import FAULTS

    from .errors import UsageError

    backends = ["torch"] + (["cuda"] if device == "cuda" else [])
    if faults:
        unknown = sorted(set(faults) - set(FAULTS))
        if unknown:
            raise UsageError(f"--faults: unknown {unknown}; allowed: {', '.join(FAULTS)}")
    names = [(b, None) for b in backends]
    names += [(b, f) for b in backends for f, info in FAULTS.items()
              if b in info.backends and (not faults or f in faults)]
    rows: list[SelfcheckRow] = []
    print(f"selfcheck on {device}: {len(names)} implementations, budget {seconds:g} s each; "
          f"run directories under {out}", flush=True)
    for backend, fault in names:
        name = backend if fault is None else f"{backend}:{fault}"
        run_device = "cuda" if backend == "cuda" else "cpu"
        row = _run_one(name, run_device, seconds, seed, out, fault is not None, clean_examples)
        rows.append(row)
        status = ("caught" if row.caught else "ESCAPED") if row.expect_failure else (
            "clean" if not row.caught else "FALSE ALARM")
        print(f"  {name:36s} {status}", flush=True)
    header = ("implementation", "expect", "result", "cases", "seconds", "minimal case",
              "shrink s")
    table = [(r.impl, "failure" if r.expect_failure else "clean",
              ("caught" if r.caught else "ESCAPED") if r.expect_failure else (
                  "clean" if not r.caught else "FALSE ALARM"),
              str(r.cases), f"{r.seconds:.2f}", r.minimal, f"{r.shrink_s:.1f}") for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print()
    print(line)
    print("-" * len(line))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))
    for r in rows:
        if r.report != "-":
            print(f"report {r.impl}: {r.report}")
    ok = all(r.ok for r in rows)
    print("selfcheck: " + ("every fault caught, no false alarm" if ok else "FAILED"))
    return ok
