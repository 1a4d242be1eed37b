"""``DIR/summary.html``: one self-contained page describing a run.

The page has a headline (cases, failures, verdicts, implementations), in
words an implementation that passes one contract and fails the other, the
bug reports under ``DIR/bugs/`` first, then the pass/fail table by
implementation × edge class × contract, mismatch counts by check and
implementation, the failing cases (one row per distinct case), and three
plots rendered with matplotlib's Agg canvas and embedded as PNG data URIs.
No external asset is referenced; every string from the run is HTML-escaped.
A run with no cases still gives a valid page.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
import pyarrow as pa

from reports._files import replace_text_atomically
from reports._plots import plots
from reports.contracts import contract_split
from reports.log import read_tables
from reports.schema import NO_EDGE_CLASS, PASSING_VERDICTS, VERDICTS

__all__ = ["write_summary"]

_UNKNOWN = "(unknown)"
_MAX_FAILING_CASES = 100
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td.label, th.label { text-align: left; }
td.fail { background: #f8d0d0; font-weight: bold; }
td.pass { background: #e3f2d9; }
td.empty { color: #aaa; }
.headline { font-size: 1.2em; }
.bad { color: #b00; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
"""


def write_summary(out_dir: str | os.PathLike[str]) -> Path:
    """Write ``out_dir/summary.html`` from the run's logs and return its path.

    Rows come from the journals, else the parquet files (see
    :func:`reports.read_rows`); bug reports from ``out_dir/bugs/*/``.
    ``ValueError`` if ``out_dir`` is not a directory.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"out_dir={str(out_dir)!r} is not a directory")
    case_table, mismatch_table = read_tables(out_dir)
    cases, mismatches = _frame(case_table), _frame(mismatch_table)
    cases["failed"] = ~cases["verdict"].isin(PASSING_VERDICTS)
    by_class = cases.assign(edge_class=cases["edge_classes"].map(_classes)).explode("edge_class")

    body = [
        f"<h1>difftest run summary: {_esc(out_dir.resolve().name)}</h1>",
        _headline(cases, mismatches, _run_info(out_dir)),
        _contract_split(cases),
        "<h2>Bug reports</h2>",
        _bug_list(out_dir),
        "<h2>Pass/fail by implementation × edge class × contract</h2>",
        _pass_fail_table(by_class),
        "<h2>Mismatches by check</h2>",
        _mismatch_table(mismatches),
        "<h2>Failing cases</h2>",
        _failing_cases(cases, out_dir),
        "<h2>Plots</h2>",
        plots(cases, by_class),
    ]
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>difftest summary: {_esc(out_dir.resolve().name)}</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
    path = out_dir / "summary.html"
    replace_text_atomically(path, page)
    return path


def _frame(table: pa.Table) -> pd.DataFrame:
    frame = table.to_pandas()
    for column in ("impl", "dialect", "contract", "verdict", "check"):
        if column in frame:
            frame[column] = frame[column].astype(object).where(frame[column].notna(), _UNKNOWN)
    return frame


def _classes(value: Any) -> list[str]:
    classes = sorted(set(value)) if value is not None else []
    return classes or [NO_EDGE_CLASS]


def _run_info(out_dir: Path) -> dict[str, Any]:
    """``run.json`` of the run (its declared domain, capped signatures), or ``{}``."""
    try:
        info = json.loads((out_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _headline(cases: pd.DataFrame, mismatches: pd.DataFrame, run: dict[str, Any]) -> str:
    total = len(cases)
    failed = int(cases["failed"].sum())
    counts = cases["verdict"].value_counts()
    order = [v for v in VERDICTS if v in counts.index] + sorted(
        v for v in counts.index if v not in VERDICTS
    )
    verdicts = ", ".join(f"{_esc(v)}: {int(counts[v])}" for v in order) or "none"
    impls = ", ".join(_esc(i) for i in sorted(cases["impl"].unique())) or "none"
    elapsed = float(cases["elapsed_s"].astype("float64").sum()) if total else 0.0
    failures = f'<span class="bad">{failed} failures</span>' if failed else "0 failures"
    return (
        f'<p class="headline">{total} cases, {failures}</p>\n<ul>\n'
        f"<li>Verdicts: {verdicts}</li>\n"
        f"<li>Implementations: {impls}</li>\n"
        f"<li>Mismatch rows: {len(mismatches)}</li>\n"
        f"<li>Time in cases: {elapsed:.2f} s</li>\n"
        + _domain_line(run, int(counts.get("rejected", 0)))
        + _capped_line(run)
        + "</ul>"
    )


def _contract_split(cases: pd.DataFrame) -> str:
    sentences = contract_split(cases[["impl", "contract", "verdict"]].to_dict("records"))
    return "\n".join(f'<p class="bad">{_esc(s)}.</p>' for s in sentences)
def _domain_line(run: dict[str, Any], rejected: int) -> str:
    limits = run.get("limits") or {}
    if not isinstance(limits, dict) or not limits:
        return "<li>Declared domain: none (unbounded)</li>\n"
    spans = ", ".join(
        f"{_esc(name)} {_esc(bounds[0])}..{'' if bounds[1] is None else _esc(bounds[1])}"
        for name, bounds in limits.items()
        if isinstance(bounds, (list, tuple)) and len(bounds) == 2
    )
    return (f"<li>Declared domain: {spans}; out-of-domain probes rejected cleanly: "
            f"{rejected}</li>\n")


def _capped_line(run: dict[str, Any]) -> str:
    capped = run.get("signatures_over_cap") or {}
    if not isinstance(capped, dict) or not capped:
        return ""
    names = ", ".join(_esc(name) for name in sorted(capped)[:10])
    more = f" and {len(capped) - 10} more" if len(capped) > 10 else ""
    return (f'<li class="bad">{len(capped)} failure signature(s) past the per-dialect cap '
            f"({sum(int(n) for n in capped.values())} case(s), not reported): "
            f"{names}{more}</li>\n")


def _pass_fail_table(by_class: pd.DataFrame) -> str:
    if by_class.empty:
        return "<p>No cases recorded.</p>"
    grouped = by_class.groupby(["impl", "edge_class", "contract"])["failed"].agg(["sum", "count"])
    contracts = sorted(by_class["contract"].unique())
    head = "".join(f"<th>{_esc(c)}</th>" for c in contracts)
    lines = [
        "<table>",
        f'<tr><th class="label">implementation</th><th class="label">edge class</th>{head}'
        "<th>all</th></tr>",
    ]
    for impl, edge_class in sorted({(i, e) for i, e, _ in grouped.index}):
        cells, failed_all, total_all = [], 0, 0
        for contract in contracts:
            key = (impl, edge_class, contract)
            if key in grouped.index:
                failed, total = (int(x) for x in grouped.loc[key])
                failed_all, total_all = failed_all + failed, total_all + total
                cells.append(_cell(failed, total))
            else:
                cells.append('<td class="empty">—</td>')
        cells.append(_cell(failed_all, total_all))
        lines.append(
            f'<tr><td class="label">{_esc(impl)}</td><td class="label">{_esc(edge_class)}</td>'
            + "".join(cells)
            + "</tr>"
        )
    lines.append("</table>")
    return "\n".join(lines)


def _cell(failed: int, total: int) -> str:
    return f'<td class="{"fail" if failed else "pass"}">{failed}/{total}</td>'


def _mismatch_table(mismatches: pd.DataFrame) -> str:
    if mismatches.empty:
        return "<p>No mismatches recorded.</p>"
    counts = pd.crosstab(mismatches["check"], mismatches["impl"])
    counts["total"] = counts.sum(axis=1)
    counts = counts.sort_values(["total"], ascending=False, kind="stable")
    impls = [c for c in counts.columns if c != "total"]
    head = "".join(f"<th>{_esc(i)}</th>" for i in impls)
    lines = ["<table>", f'<tr><th class="label">check</th>{head}<th>total</th></tr>']
    for check, row in counts.iterrows():
        cells = "".join(f"<td>{int(row[i])}</td>" for i in impls + ["total"])
        lines.append(f'<tr><td class="label">{_esc(check)}</td>{cells}</tr>')
    lines.append("</table>")
    return "\n".join(lines)


def _failing_cases(cases: pd.DataFrame, out_dir: Path) -> str:
    # one row per distinct failing case (a case replayed or run by two workers is one)
    failing = cases[cases["failed"]].drop_duplicates(subset=["case_id", "impl"])
    if failing.empty:
        return "<p>None.</p>"
    lines = [
        "<table>",
        '<tr><th class="label">case</th><th class="label">implementation</th>'
        '<th class="label">dialect</th><th class="label">contract</th>'
        '<th class="label">verdict</th><th class="label">checks failed</th></tr>',
    ]
    for row in failing.head(_MAX_FAILING_CASES).itertuples(index=False):
        case_id = "" if pd.isna(row.case_id) else str(row.case_id)
        link = f"cases/{case_id}.json"
        shown = _esc(case_id)
        if case_id and (out_dir / link).is_file():
            shown = f'<a href="{_esc(quote(link))}">{shown}</a>'
        checks = ", ".join(row.checks_failed) if row.checks_failed is not None else ""
        lines.append(
            f'<tr><td class="label">{shown}</td><td class="label">{_esc(row.impl)}</td>'
            f'<td class="label">{_esc(row.dialect)}</td><td class="label">{_esc(row.contract)}</td>'
            f'<td class="label">{_esc(row.verdict)}</td><td class="label">{_esc(checks)}</td></tr>'
        )
    lines.append("</table>")
    if len(failing) > _MAX_FAILING_CASES:
        lines.append(f"<p>… and {len(failing) - _MAX_FAILING_CASES} more.</p>")
    return "\n".join(lines)


def _bug_list(out_dir: Path) -> str:
    bugs_dir = out_dir / "bugs"
    bug_dirs = sorted(p for p in bugs_dir.iterdir() if p.is_dir()) if bugs_dir.is_dir() else []
    if not bug_dirs:
        return "<p>None.</p>"
    items = []
    for bug in bug_dirs:
        title = _title(bug / "report.md")
        links = " ".join(
            f'<a href="{_esc(quote(f"bugs/{bug.name}/{name}"))}">{name}</a>'
            for name in ("report.md", "case.json", "repro.py")
            if (bug / name).is_file()
        )
        items.append(f"<li><code>{_esc(bug.name)}</code>: {_esc(title)} ({links})</li>")
    return "<ul>\n" + "\n".join(items) + "\n</ul>"


def _title(report: Path) -> str:
    if not report.is_file():
        return "(no report.md)"
    with open(report, encoding="utf-8", errors="replace") as file:
        first = file.readline().strip()
    return first.lstrip("#").strip() or "(untitled)"


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)
