"""JUnit XML for CI dashboards: one test case per edge class and contract.

A run's cases are grouped by implementation, dialect, edge class and
contract; each group becomes ``<testcase classname="difftest.<impl>.<dialect>"
name="<edge class>[<contract>]">``.  A case counts towards every edge class
it carries (cases with none go to ``no-edge-class``).  A group fails when any
of its cases has a verdict other than ``pass``; its ``<failure>`` quotes up to
five failing cases with their mismatch messages.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from reports.schema import NO_EDGE_CLASS

__all__ = ["write_junit"]

_QUOTED = 5
# Characters XML 1.0 cannot carry at all (sanitizer output has ANSI escapes).
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def write_junit(
    path: str | os.PathLike[str],
    cases_rows: Sequence[Mapping[str, Any]],
    mismatch_rows: Sequence[Mapping[str, Any]],
) -> Path:
    """Write the JUnit XML report of a run to ``path`` and return it.

    ``cases_rows`` and ``mismatch_rows`` are case and mismatch rows as
    recorded by :class:`reports.RunLog` (missing keys read as null; see
    :func:`reports.read_rows` to read them back from a run directory).  The
    single ``<testsuite name="difftest">`` carries ``tests`` (number of test
    cases), ``failures`` (failed test cases), ``errors``, ``skipped`` and
    ``time`` (summed ``elapsed_s`` of the distinct cases).
    """
    groups: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for row in cases_rows:
        impl, dialect, contract = (_text(row.get(k)) for k in ("impl", "dialect", "contract"))
        for edge_class in _edge_classes(row.get("edge_classes")):
            groups[(impl, dialect, edge_class, contract)].append(row)

    messages: dict[tuple[str, str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for row in mismatch_rows:
        key = tuple(_text(row.get(k)) for k in ("case_id", "impl", "dialect"))
        messages[key].append(row)

    suite = ET.Element("testsuite", name="difftest")
    failures = 0
    for (impl, dialect, edge_class, contract), rows in sorted(groups.items()):
        testcase = ET.SubElement(
            suite,
            "testcase",
            classname=_xml(f"difftest.{impl}.{dialect}"),
            name=_xml(f"{edge_class}[{contract}]"),
            time=_seconds(_elapsed(rows)),
        )
        failed = [row for row in rows if row.get("verdict") != "pass"]
        if failed:
            failures += 1
            _add_failure(testcase, rows, failed, messages)

    suite.set("tests", str(len(groups)))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", "0")
    suite.set("time", _seconds(_elapsed(cases_rows)))
    ET.indent(suite)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
    return path


def _add_failure(
    testcase: ET.Element,
    rows: list[Mapping[str, Any]],
    failed: list[Mapping[str, Any]],
    messages: Mapping[tuple[str, str, str], list[Mapping[str, Any]]],
) -> None:
    verdicts: dict[str, int] = defaultdict(int)
    for row in failed:
        verdicts[_text(row.get("verdict"))] += 1
    counts = ", ".join(f"{verdict}: {n}" for verdict, n in sorted(verdicts.items()))
    lines = []
    for row in failed[:_QUOTED]:
        case_id = _text(row.get("case_id"))
        found = messages.get((case_id, _text(row.get("impl")), _text(row.get("dialect"))), [])
        detail = "; ".join(
            f"{_text(m.get('check'))}: {_text(m.get('message'))}" for m in found[:_QUOTED]
        )
        lines.append(f"{case_id} [{_text(row.get('verdict'))}]" + (f" {detail}" if detail else ""))
    if len(failed) > _QUOTED:
        lines.append(f"... and {len(failed) - _QUOTED} more failing cases")
    failure = ET.SubElement(
        testcase,
        "failure",
        message=_xml(f"{len(failed)} of {len(rows)} cases failed ({counts}); first: {lines[0]}"),
        type="difftest.failure",
    )
    failure.text = _xml("\n".join(lines))


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
