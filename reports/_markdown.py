"""Small markdown tables for bug reports: escaped cells, long sequences cut to
their first 32 and last 8 elements (plus a window around a first difference).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

_HEAD, _TAIL = 32, 8  # long sequences show their first 32 and last 8 elements
_AROUND = 3  # ... and this many either side of the first difference
_MISSING = "—"


def table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; ``None`` shows as an empty cell."""
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def records_table(records: Sequence[Mapping[str, Any]]) -> str:
    """A table of dicts, one column per key in order of first appearance."""
    columns: list[str] = []
    for record in records:
        columns += [key for key in record if key not in columns]
    return table(columns, [[record.get(c) for c in columns] for record in records])


def array_table(value: Sequence[Any]) -> str:
    """A list as an index/value table, a list of lists as a row-per-item table."""
    if not value:
        return "(empty)"
    if all(is_sequence(row) for row in value):
        width = max(len(row) for row in value)
        columns = shown_indices(width)
        header = ["row"] + ["…" if c is None else c for c in columns]
        rows = []
        for r in shown_indices(len(value)):
            if r is None:
                rows.append(["…"] * len(header))
            else:
                rows.append([r] + [_shown(value[r], c) for c in columns])
        return table(header, rows)
    columns = shown_indices(len(value))
    return table(
        ["index"] + ["…" if c is None else c for c in columns],
        [["value"] + [_shown(value, c) for c in columns]],
    )


def side_by_side(expected: list[Any], actual: list[Any], first: int | None) -> str:
    """Rows "expected" and "actual"; differing values in bold, index ``first`` too."""
    length = max(len(expected), len(actual))
    if length == 0:
        return "(both empty)"
    columns = shown_indices(length, around=first)
    header: list[Any] = ["index"]
    rows: list[list[Any]] = [["expected"], ["actual"]]
    for c in columns:
        if c is None:
            header.append("…")
            rows[0].append("…")
            rows[1].append("…")
            continue
        header.append(f"**{c}**" if c == first else c)
        differs = element(expected, c) != element(actual, c)
        for row, seq in zip(rows, (expected, actual)):
            text = plain(element(seq, c))
            row.append(f"**{text}**" if differs else text)
    return table(header, rows)


def shown_indices(length: int, around: int | None = None) -> list[int | None]:
    """Indices to show of a sequence of ``length``; ``None`` marks a gap."""
    if length <= _HEAD + _TAIL:
        return list(range(length))
    keep = set(range(_HEAD)) | set(range(length - _TAIL, length))
    if around is not None:
        keep |= set(range(max(0, around - _AROUND), min(length, around + _AROUND + 1)))
    shown: list[int | None] = []
    for index in sorted(keep):
        if shown and shown[-1] is not None and index != shown[-1] + 1:
            shown.append(None)
        shown.append(index)
    return shown


def first_difference(expected: list[Any], actual: list[Any]) -> int | None:
    """Index of the first differing element (a missing one differs), or None."""
    for index in range(max(len(expected), len(actual))):
        if element(expected, index) != element(actual, index):
            return index
    return None


def element(seq: Sequence[Any], index: int) -> Any:
    return seq[index] if index < len(seq) else _MISSING


def _shown(seq: Sequence[Any], index: int | None) -> Any:
    return "…" if index is None else element(seq, index)


def is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def shape(value: Sequence[Any]) -> str:
    if value and all(is_sequence(row) for row in value):
        widths = {len(row) for row in value}
        width = widths.pop() if len(widths) == 1 else "ragged"
        return f"shape {len(value)} × {width}"
    return f"length {len(value)}"


def cell(value: Any) -> str:
    """``value`` as the text of one table cell: HTML escaped (a kernel's message is
    never live HTML) and pipes escaped (it never breaks the table)."""
    return text(plain(value)).replace("|", "\\|")


def text(value: Any) -> str:
    """``value`` on one line as markdown prose: ``&`` and ``<`` as entities, so text
    from a kernel reads as text, never as HTML (no tag opens without ``<``; ``->``
    stays readable)."""
    return one_line(value).replace("&", "&amp;").replace("<", "&lt;")


def code(value: Any) -> str:
    """``value`` on one line as a code span (literal text, whatever it holds)."""
    body = one_line(value)
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if body.startswith("`") or body.endswith("`") or not body.strip() else ""
    return f"{fence}{pad}{body}{pad}{fence}"


def plain(value: Any) -> str:
    """``value`` on one line: ``None`` as empty, containers as JSON."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        value = json.dumps(value, default=jsonable)
    return one_line(value)


def one_line(value: Any) -> str:
    return " ".join(str(value).split())


def fenced(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text.rstrip()}\n{fence}"


def jsonable(value: Any) -> Any:
    """``json.dumps`` default: NumPy scalars and arrays, without importing NumPy."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
