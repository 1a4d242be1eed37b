"""JUnit XML for CI dashboards: one test case per bug, and the coverage that passed.

Two kinds of ``<testcase classname="difftest.<impl>.<dialect>">``:

* one per failure signature (the bug), ``name`` the signature.  Its message is
  the compact minimal case, the first difference and the bug report's path;
  ``mismatch``, ``error`` and ``flaky`` are a ``<failure>``, ``crash`` and
  ``timeout`` an ``<error>`` (the kernel did not answer);
* one passing test case per edge class × contract exercised without any
  failing case (``name="<edge class>[<contract>]"``), so the viewer still
  shows what was covered.  A case counts towards every edge class it carries
  (cases with none go to ``no-edge-class``).
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from reports.schema import NO_EDGE_CLASS, PASSING_VERDICTS

__all__ = ["write_junit"]

_ERRORS = frozenset(("crash", "timeout"))  # no answer from the kernel: <error>, not <failure>
_REQUIRED = ("signature", "impl", "dialect", "verdict", "count", "minimal", "report")
# Characters XML 1.0 cannot carry at all (sanitizer output has ANSI escapes).
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def write_junit(
    path: str | os.PathLike[str],
    cases_rows: Sequence[Mapping[str, Any]],
    failures: Sequence[Mapping[str, Any]],
) -> Path:
    """Write the JUnit XML report of a run to ``path`` and return it.

    ``cases_rows`` are case rows as recorded by :class:`reports.RunLog`
    (missing keys read as null; see :func:`reports.read_rows`).  ``failures``
    holds one dict per failure signature with ``signature``, ``impl``,
    ``dialect``, ``verdict``, ``count`` (failing cases), ``minimal`` (the
    minimal case on one line) and ``report`` (the bug directory, or ``None``),
    optionally ``contract``, ``message`` (the first difference) and
    ``first_after``; a missing key is a ``ValueError``.  The single
    ``<testsuite name="difftest">`` carries ``tests``, ``failures``,
    ``errors``, ``skipped`` and ``time`` (summed ``elapsed_s`` of the cases).
    """
    for index, failure in enumerate(failures):
        missing = [key for key in _REQUIRED if key not in failure]
        if missing:
            raise ValueError(f"failures[{index}] has no {missing[0]!r}; each needs "
                             f"{', '.join(_REQUIRED)}")
    suite = ET.Element("testsuite", name="difftest")
    counts = {"failure": 0, "error": 0}
    for failure in sorted(failures, key=lambda f: (_text(f["impl"]), _text(f["signature"]))):
        kind = "error" if failure["verdict"] in _ERRORS else "failure"
        counts[kind] += 1
        testcase = ET.SubElement(
            suite, "testcase", classname=_xml(f"difftest.{_text(failure['impl'])}."
                                              f"{_text(failure['dialect'])}"),
            name=_xml(_text(failure["signature"])), time=_seconds(0.0))
        message = _message(failure)
        element = ET.SubElement(testcase, kind, message=_xml(message),
                                type=_xml(f"difftest.{_text(failure['verdict'])}"))
        element.text = _xml(message)

    passing = _passing_groups(cases_rows)
    for (impl, dialect, edge_class, contract), rows in sorted(passing.items()):
        ET.SubElement(suite, "testcase", classname=_xml(f"difftest.{impl}.{dialect}"),
                      name=_xml(f"{edge_class}[{contract}]"), time=_seconds(_elapsed(rows)))

    suite.set("tests", str(len(failures) + len(passing)))
    suite.set("failures", str(counts["failure"]))
    suite.set("errors", str(counts["error"]))
    suite.set("skipped", "0")
    suite.set("time", _seconds(_elapsed(cases_rows)))
    ET.indent(suite)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
    return path


def _message(failure: Mapping[str, Any]) -> str:
    count = int(failure["count"])
    lines = [f"{_text(failure['verdict'])}: {count} failing case{'s' if count != 1 else ''}"
             + (f" ({_text(failure['contract'])} contract)" if failure.get("contract") else "")
             + (f", first after {failure['first_after']} cases"
                if failure.get("first_after") is not None else ""),
             f"minimal case: {_text(failure['minimal'])}"]
    if failure.get("message"):
        lines.append(f"first difference: {_text(failure['message'])}")
    lines.append(f"report: {_text(failure['report']) or '(not written)'}")
    return "\n".join(lines)


def _passing_groups(cases_rows: Iterable[Mapping[str, Any]]
                    ) -> dict[tuple[str, str, str, str], list[Mapping[str, Any]]]:
    groups: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = defaultdict(list)
    failed: set[tuple[str, str, str, str]] = set()
    for row in cases_rows:
        impl, dialect, contract = (_text(row.get(k)) for k in ("impl", "dialect", "contract"))
        for edge_class in _edge_classes(row.get("edge_classes")):
            key = (impl, dialect, edge_class, contract)
            groups[key].append(row)
            if row.get("verdict") not in PASSING_VERDICTS:
                failed.add(key)
    return {key: rows for key, rows in groups.items() if key not in failed}


def _edge_classes(value: Iterable[str] | None) -> list[str]:
    classes = sorted({str(c) for c in value}) if value is not None else []
    return classes or [NO_EDGE_CLASS]


def _elapsed(rows: Iterable[Mapping[str, Any]]) -> float:
    total = 0.0
    for row in rows:
        value = row.get("elapsed_s")
        if value is not None and value == value:  # skips NaN
            total += float(value)
    return total


def _seconds(value: float) -> str:
    return f"{value:.3f}"


def _text(value: Any) -> str:
    # Rows read back through pandas hold NaN where the log holds null.
    return "" if value is None or value != value else str(value)


def _xml(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)
