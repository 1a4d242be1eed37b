"""Minimised bug reports: ``DIR/bugs/<signature>/`` (DESIGN.md "Run directory").

A bug directory holds

* ``report.md`` — what failed, the minimal case as small tables, expected vs
  actual with the first difference highlighted, the edge classes and
  contract, how to reproduce, the environment, compute-sanitizer output;
* ``case.json`` — the minimal case, replayable with ``difftest replay``;
* ``repro.py`` — a standalone script (torch + the callable), executable;
* ``culprit.json`` — for a flaky failure with a culprit: the case that, run
  right before ``case.json``, makes it fail (``repro.py`` runs the pair).

Everything here works on plain dicts handed in by the caller; nothing is
recomputed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reports._files import replace_text_atomically
from reports._markdown import (
    array_table,
    code,
    fenced,
    first_difference,
    is_sequence,
    jsonable,
    one_line,
    records_table,
    shape,
    side_by_side,
    table,
    text,
)

__all__ = ["write_bug_report"]

_SIGNATURE = re.compile(r"[A-Za-z0-9._-]+")
_REQUIRED = ("title", "impl", "dialect", "contract", "case", "repro_py")
_OPTIONAL = (
    "edge_classes",
    "inputs",
    "first_difference",
    "mismatches",
    "expected_actual",
    "environment",
    "sanitizer",
    "shrink_log",
    "cases_until_failure",
    "confirmation",
    "culprit_case",
    "verdict",
    "traceback",
    "limits",
    "reproduce_note",
)
_MAX_MISMATCH_ROWS = 20
# verdicts with no output to compare, and what each means
_HAPPENED = {
    "crash": "the call crashed (the worker died, or a sticky CUDA error left the device "
             "unusable)",
    "timeout": "the call did not return within its time budget (confirmed on a fresh worker)",
    "error": "the call raised an exception",
    # an ``error`` whose first check is a CUDA error the call left pending, not a raise
    "launch_error": "the call returned but left a CUDA launch error pending",
}

_CONTRACTS = {
    "production": "inputs as a serving stack builds them (docs/SPEC.md §7)",
    "defensive": "inputs a careful kernel must survive without writing out of bounds "
                 "(docs/SPEC.md §7)",
}


def write_bug_report(
    out_dir: str | os.PathLike[str], signature: str, info: Mapping[str, Any]
) -> Path:
    """Write ``out_dir/bugs/<signature>/`` and return that directory.

    ``signature`` names the bug and must match ``[A-Za-z0-9._-]+`` (and not be
    ``.`` or ``..``), else ``ValueError``.  ``info`` must have ``title``,
    ``impl``, ``dialect``, ``contract``, ``case`` (JSON-able dict, written to
    ``case.json`` as is) and ``repro_py`` (the script's full text, written
    verbatim); it may have ``edge_classes``, ``inputs``, ``first_difference``,
    ``mismatches``, ``expected_actual``, ``environment``, ``sanitizer``,
    ``shrink_log``, ``cases_until_failure``, ``confirmation`` (lines: what re-running
    the failure alone found), ``culprit_case`` (a case dict, written to
    ``culprit.json``) and ``limits`` (the implementation's declared domain,
    ``{name: [min, max or None]}``; shown, and given to the replay command as
    ``--limit``) and ``reproduce_note`` (a paragraph the Reproduce section ends
    with).  A missing required key or an unknown key raises ``ValueError``.  An
    existing report of the same signature is overwritten.
    """
    safe = isinstance(signature, str) and _SIGNATURE.fullmatch(signature)
    if not safe or signature in {".", ".."}:
        raise ValueError(
            f"signature={signature!r} is not a filesystem-safe slug: use letters, digits, '.', '_' "
            "and '-' only (and not '.' or '..')"
        )
    _check_info(info)
    bug_dir = Path(out_dir) / "bugs" / signature
    bug_dir.mkdir(parents=True, exist_ok=True)

    case_json = json.dumps(info["case"], indent=2, default=jsonable) + "\n"
    report = render_report(info)
    replace_text_atomically(bug_dir / "case.json", case_json)
    if info.get("culprit_case") is not None:
        culprit = json.dumps(info["culprit_case"], indent=2, default=jsonable) + "\n"
        replace_text_atomically(bug_dir / "culprit.json", culprit)
    replace_text_atomically(bug_dir / "repro.py", info["repro_py"], executable=True)
    replace_text_atomically(bug_dir / "report.md", report)
    return bug_dir


def render_report(info: Mapping[str, Any]) -> str:
    """Return the text of ``report.md`` for ``info`` (see :func:`write_bug_report`)."""
    _check_info(info)
    sections = [
        f"# {text(info['title'])}",
        _what_failed(info),
        *([_confirmation(info)] if info.get("confirmation") else []),
        _minimal_case(info),
        _expected_vs_actual(info),
        _classes_and_contract(info),
        _reproduce(info),
        _environment(info.get("environment")),
    ]
    if info.get("sanitizer"):
        sections.append("## compute-sanitizer\n\n" + fenced(str(info["sanitizer"])))
    return "\n\n".join(sections) + "\n"


def _check_info(info: Mapping[str, Any]) -> None:
    if not isinstance(info, Mapping):
        raise TypeError(f"info must be a dict, got {type(info).__name__}")
    unknown = [key for key in info if key not in _REQUIRED + _OPTIONAL]
    if unknown:
        raise ValueError(
            f"info has unknown key {unknown[0]!r}; keys are: {', '.join(_REQUIRED + _OPTIONAL)}"
        )
    missing = [key for key in _REQUIRED if key not in info]
    if missing:
        raise ValueError(f"info is missing required key {missing[0]!r}")
    if not isinstance(info["repro_py"], str):
        kind = type(info["repro_py"]).__name__
        raise TypeError(f"info['repro_py'] must be the script's text (str), got {kind}")
    if not isinstance(info["case"], Mapping):
        raise TypeError(f"info['case'] must be a dict, got {type(info['case']).__name__}")
    culprit = info.get("culprit_case")
    if culprit is not None and not isinstance(culprit, Mapping):
        raise TypeError(f"info['culprit_case'] must be a dict, got {type(culprit).__name__}")


def _what_failed(info: Mapping[str, Any]) -> str:
    lines = [
        "## What failed",
        "",
        f"- Implementation: {code(info['impl'])}",
        f"- Dialect: {code(info['dialect'])}",
        f"- Contract: {code(info['contract'])}",
        f"- Declared domain: {_domain(info.get('limits'))}",
    ]
    first = info.get("first_difference") or {}
    verdict = info.get("verdict")
    happened = _happened(info)
    if verdict is not None:
        lines.append(f"- Verdict: {code(verdict)}" + (f" — {happened}" if happened else ""))
    if first.get("check") is not None:
        lines.append(f"- Check: {code(first['check'])} (what each check and verdict means: "
                     "docs/SPEC.md §9 and §12 of moe-align-difftest)")
    if info.get("cases_until_failure") is not None:
        lines.append(f"- Found after {info['cases_until_failure']} cases")
    message = str(first.get("message") or "")
    if "\n" in message.strip():
        # Comparison messages are laid out over several lines; keep that layout.
        lines += ["", "Message:", "", fenced(message)]
    elif message:
        lines.append(f"- Message: {code(message)}")
    if info.get("traceback"):
        lines += ["", "Raised at (the last frames of its traceback):", "",
                  fenced(str(info["traceback"]))]
    mismatches = list(info.get("mismatches") or [])
    if mismatches:
        shown = mismatches[:_MAX_MISMATCH_ROWS]
        noun = "mismatch" if len(mismatches) == 1 else "mismatches"
        note = f" (first {len(shown)} shown)" if len(shown) < len(mismatches) else ""
        lines += ["", f"{len(mismatches)} {noun}{note}:", "", records_table(shown)]
    return "\n".join(lines)


def _confirmation(info: Mapping[str, Any]) -> str:
    lines = [str(line) for line in info["confirmation"]]
    return "## Confirmation\n\n" + "\n".join(f"- {one_line(line)}" for line in lines)


def _minimal_case(info: Mapping[str, Any]) -> str:
    parts = ["## Minimal case"]
    inputs = info.get("inputs") or {}
    scalars = [
        [f"`{name}`", "None" if value is None else value]
        for name, value in inputs.items()
        if not is_sequence(value)
    ]
    if scalars:
        parts.append(table(["name", "value"], scalars))
    for name, value in inputs.items():
        if is_sequence(value):
            parts.append(f"{code(name)} ({shape(value)}):\n\n{array_table(value)}")
    if not inputs:
        parts.append("See `case.json`.")
    if info.get("shrink_log"):
        steps = "\n".join(f"- {text(step)}" for step in info["shrink_log"])
        parts.append(f"Shrink passes applied:\n\n{steps}")
    return "\n\n".join(parts)


def _happened(info: Mapping[str, Any]) -> str | None:
    """What happened instead of an output, for a crash, timeout or error; else None."""
    verdict = info.get("verdict")
    if verdict == "error" and (info.get("first_difference") or {}).get("check") in _HAPPENED:
        return _HAPPENED[info["first_difference"]["check"]]
    return _HAPPENED.get(verdict) if verdict in ("crash", "timeout", "error") else None


def _expected_vs_actual(info: Mapping[str, Any]) -> str:
    parts = ["## Expected vs actual"]
    first = info.get("first_difference") or {}
    happened = _happened(info)
    if happened:  # no output to compare: say what happened instead
        what = str(first.get("message") or "").strip()
        said = code(what) if "\n" not in what else "\n\n" + fenced(what)
        parts.append(f"No output to compare: {happened}." + (
            f" What happened: {said}" if what else ""))
    elif first:
        parts.append(_first_difference_line(first))
    for name, pair in (info.get("expected_actual") or {}).items():
        expected = list(pair.get("expected") or [])
        actual = list(pair.get("actual") or [])
        index = first_difference(expected, actual)
        where = "no difference" if index is None else f"first difference at index {index}"
        parts.append(f"{code(name)} ({where}):\n\n{side_by_side(expected, actual, index)}")
    if len(parts) == 1:
        parts.append("No element-wise difference recorded.")
    return "\n\n".join(parts)


def _first_difference_line(first: Mapping[str, Any]) -> str:
    check = "the output" if first.get("check") is None else code(first['check'])
    located = [key for key in ("slot", "expert", "position") if first.get(key) is not None]
    where = ", ".join(f"{key} {first[key]}" for key in located)
    said = f"First difference: {check}" + (f" at {where}" if where else "")
    if first.get("expected") is not None or first.get("actual") is not None:
        said += f": expected {code(first.get('expected'))}, actual {code(first.get('actual'))}"
    return said + "."


def _classes_and_contract(info: Mapping[str, Any]) -> str:
    contract = one_line(info["contract"])
    meaning = _CONTRACTS.get(contract)
    classes = ", ".join(code(c) for c in info.get("edge_classes") or []) or "none"
    return "\n".join(
        [
            "## Classes and contract",
            "",
            f"- Contract: `{contract}`" + (f" — {meaning}" if meaning else ""),
            f"- Edge classes: {classes}",
        ]
    )


def _reproduce(info: Mapping[str, Any]) -> str:
    impl = one_line(info["impl"])
    pair = info.get("culprit_case") is not None
    lines = [
        "## Reproduce",
        "",
        "Standalone (needs torch and the implementation under test)"
        + (": the culprit (`culprit.json`), then the victim (`case.json`)" if pair else "")
        + ":",
        "",
        "```sh",
        "python repro.py",
        "```",
        "",
        "With difftest" + (" (the victim alone, which passes: the failure needs the culprit "
                           "before it)" if pair else "") + ":",
        "",
        "```sh",
        f"difftest replay case.json --impl {impl}"
        + "".join(f" --limit {arg}" for arg in _limit_args(info.get("limits"))),
        "```",
    ]
    if info.get("reproduce_note"):
        lines += ["", text(info["reproduce_note"])]
    return "\n".join(lines)


def _limit_args(limits: Mapping[str, Any] | None) -> list[str]:
    """``NAME=MIN:MAX`` of each declared limit (an open max left empty)."""
    return [f"{one_line(name)}={low}:{'' if high is None else high}"
            for name, (low, high) in (limits or {}).items()]


def _domain(limits: Mapping[str, Any] | None) -> str:
    args = _limit_args(limits)
    return ", ".join(f"`{arg}`" for arg in args) if args else "none declared (unbounded)"


def _environment(env: Mapping[str, Any] | None) -> str:
    if not env:
        return "## Environment\n\nNot recorded."
    rows = []
    for key, value in env.items():
        if isinstance(value, Mapping):
            rows += [[f"{key} / {name}", _known(sub)] for name, sub in value.items()]
        else:
            rows.append([key, _known(value)])
    return "## Environment\n\n" + table(["item", "value"], rows)


def _known(value: Any) -> Any:
    return "n/a" if value is None else value
