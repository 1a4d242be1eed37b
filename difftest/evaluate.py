"""From an :class:`~difftest.sandbox.Outcome` to a verdict, mismatches and a signature.

The verdicts (SPEC §9): ``pass``, ``mismatch`` (a check failed), ``error``
(the call raised), ``crash`` (the worker died, or a sticky CUDA error such as an
illegal address), ``timeout`` (no answer in time), and ``rejected``: a case
outside the implementation's declared limits (:mod:`difftest.limits`) that every
call rejected cleanly — an exception, outputs still sentinel, guard bands and
inputs intact, no device error. ``rejected`` is not a failure; a rejection that is
not clean is the check ``unclean_rejection``, and an out-of-domain case that runs
and gives the right answer passes.

A failure's *signature* (:meth:`Evaluation.signature`) is
``<dialect>--<verdict>--<class>``: what shrinking preserves and what names a bug
report, so distinct bugs get distinct reports. The class is the primary failed
check for ``mismatch``; for ``error`` the exception type and a slug of its
message with numbers, addresses and paths masked (:func:`error_class`,
``RuntimeError--padded_num_experts-must-be-less-than-N``); for ``crash`` its kind
(:func:`crash_kind`: ``cuda-illegal-address``, ``sigsegv``, ``exit-1``, ...);
``timeout`` for a timeout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

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
from .limits import violations

#: Longest message slug of an error signature.
SLUG_MAX = 60

@dataclass
class Evaluation:
    verdict: str
    mismatches: list[Mismatch] = field(default_factory=list)
    detail: str = ""
    frames: str = ""  # error: the last frames of the first raising call's traceback
    #: what the first failing call raised, as ``Type: message`` (error verdicts)
    error: str = ""

    @property
    def failed(self) -> bool:
        """Whether the verdict is a failure (``pass`` and ``rejected`` are not)."""
        from reports.schema import PASSING_VERDICTS

        return self.verdict not in PASSING_VERDICTS

    @property
    def checks_failed(self) -> list[str]:
        seen = {m.check for m in self.mismatches}
        return [c for c in CHECK_PRIORITY if c in seen]

    @property
    def primary_check(self) -> str | None:
        checks = self.checks_failed
        return checks[0] if checks else None

    def signature(self, case: Case) -> str | None:
        """``<dialect>--<verdict>--<class>`` (module docstring); ``None`` when not failed."""
        if not self.failed:
            return None
        if self.verdict == "crash":
            kind = crash_kind(self.detail)
        elif self.verdict == "error" and self.primary_check == "launch_error":
            text = (self.error or self.detail).split("by the call:", 1)[-1]
            kind = f"launch_error--{slug(text) or 'error'}"
        elif self.verdict == "error":
            kind = error_class(self.error or self.detail)
            if self.primary_check not in (None, "exception"):
                kind = f"{self.primary_check}--{kind}"
        elif self.verdict == "timeout":
            kind = "timeout"
        else:
            kind = self.primary_check or self.verdict
        return f"{case.dialect}--{self.verdict}--{kind}"


# -- signature classes ------------------------------------------------------------------
_PATH = re.compile(r"(?<![\w.])(?:~|\.{1,2})?/[^\s'\"`:,;()\[\]{}<>]+")
_ADDRESS = re.compile(r"\b0[xX][0-9a-fA-F]+\b")
_NUMBER = re.compile(r"(?<![A-Za-z_0-9])\d+(?:\.\d+)?")
_TYPE_AND_MESSAGE = re.compile(r"^([A-Za-z_][\w.]*)(?::\s*(.*))?$")


def slug(text: str, limit: int = SLUG_MAX) -> str:
    """``text`` masked and made a directory-name part: paths → ``PATH``, hex addresses
    → ``ADDR``, numbers → ``N``, every run of other characters than letters, digits and
    ``_`` → ``-``; at most ``limit`` characters (cut at a ``-``)."""
    text = _PATH.sub("PATH", text)
    text = _ADDRESS.sub("ADDR", text)
    text = _NUMBER.sub("N", text)
    text = re.sub(r"[^A-Za-z0-9_]+", "-", text).strip("-")
    if len(text) > limit:
        cut = text[:limit + 1]
        text = cut[:cut.rfind("-")] if "-" in cut else text[:limit]
    return text.strip("-")


def error_class(text: str) -> str:
    """``<ExceptionType>--<message slug>`` of a raised ``"Type: message"`` (the first
    line; a dotted type keeps its last part), e.g. ``RuntimeError--padded_num_experts-
    must-be-less-than-N``; a text that names no type gives its slug alone."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    first = lines[0] if lines else ""
    match = _TYPE_AND_MESSAGE.match(first)
    if match and (match.group(2) is not None or " " not in first):
        kind, message = match.group(1).rsplit(".", 1)[-1], match.group(2) or ""
        rest = slug(message)
        return f"{slug(kind)}--{rest}" if rest else slug(kind)
    return slug(first) or "exception"


# CUDA error texts as the runtime prints them → the kind of a crash. A wild address is one
# kind whichever error it gives: the same out-of-bounds write faults as an illegal address
# or as cudaErrorInvalidAddressSpace depending on where the address falls, which depends on
# where the run's buffers lie (on the H200 one case gave both, run after run).
_CUDA_KINDS = (
    ("illegal memory access", "cuda-illegal-address"),
    ("illegal address", "cuda-illegal-address"),
    ("global/shared address space", "cuda-illegal-address"),
    ("illegal instruction", "cuda-illegal-instruction"),
    ("misaligned address", "cuda-misaligned-address"),
    ("unspecified launch failure", "cuda-launch-failure"),
    ("launch failure", "cuda-launch-failure"),
    ("device-side assert triggered", "cuda-device-side-assert"),
)
_CUDA_NAMED_KINDS = {"InvalidAddressSpace": "cuda-illegal-address"}
_SIGNALS = {"SIGSEGV": "sigsegv", "SIGBUS": "sigbus", "SIGABRT": "sigabrt", "SIGKILL": "killed"}


def crash_kind(detail: str) -> str:
    """The kind of a crash from its detail: the CUDA error (``cuda-illegal-address``,
    which ``cudaErrorInvalidAddressSpace`` is too, ``cuda-illegal-instruction``,
    ``cuda-misaligned-address``, ``cuda-launch-failure``, ``cuda-device-side-assert``,
    ``cuda-<other error>``), else the signal that killed the worker (``sigsegv``,
    ``sigbus``, ``sigabrt``, ``killed`` for SIGKILL, ``sig<name>``) or its exit code
    (``exit-N``); ``crash`` when the detail says none of these.

    The hints torch appends to every CUDA error ("Compile with `TORCH_USE_CUDA_DSA` to
    enable device-side assertions") name no kind: a device-side assert is the runtime's
    "device-side assert triggered"."""
    text = detail or ""
    lowered = text.lower()
    for marker, kind in _CUDA_KINDS:
        if marker in lowered:
            return kind
    named = re.search(r"cudaError([A-Z]\w*)", text)
    if named:
        return _CUDA_NAMED_KINDS.get(named.group(1)) or (
            "cuda-" + re.sub(r"(?<!^)(?=[A-Z])", "-", named.group(1)).lower())
    cuda = re.search(r"CUDA error:\s*([^\n]+)", text)
    if cuda:
        message = re.sub(r"\s*was encountered.*$", "", cuda.group(1).strip())
        message = re.sub(r"^(an?|the)\s+", "", message, flags=re.IGNORECASE)
        message = re.split(r"\s+(?:Search for|CUDA kernel errors|For debugging|Compile with)\b",
                           message)[0]
        return "cuda-" + (slug(message.lower(), 40) or "error")
    signal = re.search(r"killed by signal (SIG[A-Z0-9]+|\d+)", text)
    if signal:
        name = signal.group(1)
        return _SIGNALS.get(name, name.lower() if name.startswith("SIG") else f"signal-{name}")
    code = re.search(r"exit code (-?\d+)", text)
    if code:
        return f"exit-{code.group(1)}"
    return "crash"


def faults_where_it_lands(signature: str | None) -> bool:
    """Whether ``signature`` is a CUDA illegal address: it faults only where the stray
    access lands in unmapped memory, so another process (``repro.py``'s) may not see it."""
    return bool(signature) and signature.endswith("--crash--cuda-illegal-address")


#: Verdicts of a run whose worker was lost (it died, or was killed when it hung): there
#: are no outputs to compare, and each failing run costs a new worker.
WORKER_LOST = ("crash", "timeout")


def expected_by_rank(case: Case) -> dict[int | None, Any]:
    info = DIALECT_INFO[case.dialect]
    return {rank: info.reference(case, rank) for rank in case.ranks()}


def evaluate(case: Case, outcome: Any, *, stable: bool,
             expected: dict[int | None, Any] | None = None,
             limits: Mapping[str, tuple[int, int]] | None = None) -> Evaluation:
    """Every check of SPEC §9 over every repeat and rank of one case.

    ``limits`` is the implementation's declared domain: a case outside it may be
    rejected (an exception, nothing written) — the verdict ``rejected``.
    """
    outside = violations(case, limits)
    if outcome.verdict in WORKER_LOST:
        found = [Mismatch(outcome.verdict, outcome.detail)]
        if outside:
            found.append(_unclean(outside, None, f"the worker did not survive it "
                                  f"({outcome.verdict})"))
        return Evaluation(outcome.verdict, found, outcome.detail)
    expected = expected if expected is not None else expected_by_rank(case)
    found: list[Mismatch] = []
    seen: set[tuple] = set()
    fatal = None
    first_canon: dict = {}
    first_run: dict = {}
    orders = {rank: RowOrder(e) for rank, e in expected.items() if isinstance(e, RowsExpected)}
    disagree: list[Mismatch] = []
    # canonical forms (order inside segments removed) are for comparing repeats only,
    # and not needed for those the worker found equal to run 1 (``same_as_first``)
    repeated = any(not run.same_as_first
                   for runs in outcome.runs[1:] for run in runs)
    for repeat, runs in enumerate(outcome.runs):
        candidates: list[Mismatch] = []
        compared = False
        for run in runs:
            if run.fatal:
                fatal = run
            if repeat == 0:
                first_run[run.rank] = run
            elif run.same_as_first:
                continue  # run 1's outputs after canonicalisation (set-up intact): checked there
            elif (run.error is None and not (run.guard_damage or run.mutated_inputs)
                  and _same_bytes(run, first_run.get(run.rank))):
                continue  # byte for byte run 1's outputs: checked there
            canon = (canonical(case, expected[run.rank], run, orders.get(run.rank))
                     if repeated else None)
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
            rows = (canon[0] if repeated and run.rank in orders and run.error is None
                    else None)
            candidates += compare_run(case, expected[run.rank], run, stable=stable,
                                      sentinel=SENTINEL, order=orders.get(run.rank),
                                      have_rows=rows)
        if compared and len(runs) == len(case.ranks()):
            # a rank whose outputs were left out has run 1's, canonically
            candidates += compare_conservation(
                case, [first_run[run.rank] if run.same_as_first else run
                       for run in runs], expected)
        for m in candidates + disagree:
            key = (m.check, m.rank, m.slot, m.expert)
            if key not in seen:  # one record per failed check and place, not per repeat
                seen.add(key)
                found.append(m)
        disagree = []
    raised = [run for runs in outcome.runs for run in runs if run.error is not None]
    if fatal is not None:
        crash = Mismatch("crash", f"sticky device error (the context is unusable): {fatal.error}",
                         fatal.rank)
        if outside:
            found.append(_unclean(outside, fatal.rank, "left the device unusable"))
        return Evaluation("crash", [crash] + found, fatal.error or "")
    if outside:  # an exception is allowed here, if nothing was written
        found = [m for m in found if m.check != "exception"]
        ranks_seen: set = set()
        for run in raised:
            reason = _dirty(run)
            if reason and run.rank not in ranks_seen:
                ranks_seen.add(run.rank)
                found.append(_unclean(outside, run.rank, reason))
        if not found:
            if not raised:
                return Evaluation("pass")
            return Evaluation("rejected", detail=(
                f"outside the declared limits ({', '.join(outside)}): rejected with "
                f"{raised[0].error}"), error=raised[0].error or "")
    if not found:
        return Evaluation("pass")
    # the detail is the first record of the check the signature is named after
    first = next(m for check in CHECK_PRIORITY for m in found if m.check == check)
    verdict = "error" if first.check in ("exception", "launch_error") else "mismatch"
    frames = next((run.frames for runs in outcome.runs for run in runs
                   if run.error is not None and getattr(run, "frames", None)), "")
    return Evaluation(verdict, found, first.message, frames if verdict == "error" else "",
                      error=raised[0].error or "" if raised else "")


def _unclean(outside: list[str], rank: int | None, reason: str) -> Mismatch:
    return Mismatch("unclean_rejection",
                    f"{breadcrumb(rank) or 'call'}: an input outside the declared limits "
                    f"({', '.join(outside)}) was not rejected cleanly: {reason}", rank)


def _dirty(run: Any) -> str:
    """What a call that raised changed although it should have left everything alone
    (empty when it left outputs at the sentinel, guard bands and inputs intact)."""
    if getattr(run, "launch_error", False) or "left a launch error pending" in (run.error or ""):
        return "it left a CUDA launch error pending"
    if run.guard_damage:
        name, places = next(iter(run.guard_damage.items()))
        return f"it wrote outside {name} (offset {places[0][0]})"
    if run.mutated_inputs:
        name, (i, before, after) = next(iter(run.mutated_inputs.items()))
        return f"it modified input {name}[{i}] ({before} -> {after})"
    for name, value in run.outputs.items():
        written = np.flatnonzero(value.reshape(-1) != SENTINEL)
        if written.size:
            return (f"it wrote {name}[{int(written[0])}] = {int(value.reshape(-1)[written[0]])} "
                    f"({written.size} element(s) written) before raising")
    return ""


def _same_bytes(run: Any, first: Any) -> bool:
    """``run`` returned exactly the outputs of ``first`` (an error-free run)."""
    if first is None or first.error is not None or run.outputs.keys() != first.outputs.keys():
        return False
    return all(np.array_equal(v, first.outputs[k]) for k, v in run.outputs.items())
