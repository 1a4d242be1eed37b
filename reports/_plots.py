"""The plots of ``summary.html``, as ``<img>`` tags with PNG data URIs.

Figures are bare :class:`matplotlib.figure.Figure` objects on an Agg canvas:
no pyplot, so no global state, no GUI backend and nothing to close.
"""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from reports.schema import VERDICTS

__all__ = ["plots"]

_VERDICT_COLOURS = {
    "pass": "#4c9a2a",
    "mismatch": "#d62728",
    "error": "#ff7f0e",
    "crash": "#9467bd",
    "timeout": "#7f7f7f",
}


def plots(cases: pd.DataFrame, by_class: pd.DataFrame) -> str:
    """``<img>`` tags for a run's plots; ``cases`` has a boolean ``failed``
    column, ``by_class`` has one row per case and edge class (``edge_class``).
    """
    if cases.empty:
        return "<p>No cases recorded.</p>"
    images = [
        _failures_per_edge_class(by_class),
        _verdicts_per_impl(cases),
    ]
    elapsed = cases["elapsed_s"].dropna().astype("float64")
    if not elapsed.empty:
        images.append(_elapsed_histogram(elapsed))
    return "\n".join(images)


def _failures_per_edge_class(by_class: pd.DataFrame) -> str:
    failures = by_class.groupby("edge_class")["failed"].sum().sort_index(ascending=False)
    figure = _figure(height=1.0 + 0.3 * len(failures))
    axes = figure.add_subplot()
    positions = range(len(failures))
    axes.barh(positions, [int(v) for v in failures.values], color="#d62728")
    axes.set_yticks(positions, labels=[_label(c) for c in failures.index])
    axes.set_xlabel("failing cases")
    axes.set_title("Failures per edge class")
    return _img(figure, "failures per edge class")


def _verdicts_per_impl(cases: pd.DataFrame) -> str:
    counts = pd.crosstab(cases["impl"], cases["verdict"])
    impls = [_label(i) for i in counts.index]
    figure = _figure(height=3.5)
    axes = figure.add_subplot()
    bottom = [0] * len(impls)
    verdicts = [v for v in VERDICTS if v in counts.columns]
    verdicts += sorted(v for v in counts.columns if v not in VERDICTS)
    for verdict in verdicts:
        values = [int(v) for v in counts[verdict]]
        axes.bar(
            range(len(impls)),
            values,
            bottom=bottom,
            label=_label(verdict),
            color=_VERDICT_COLOURS.get(verdict, "#17becf"),
        )
        bottom = [b + v for b, v in zip(bottom, values)]
    axes.set_xticks(range(len(impls)), labels=impls, rotation=30, ha="right")
    axes.set_ylabel("cases")
    axes.set_title("Verdicts per implementation")
    axes.legend()
    return _img(figure, "verdicts per implementation")


def _elapsed_histogram(elapsed: pd.Series) -> str:
    figure = _figure(height=3.0)
    axes = figure.add_subplot()
    axes.hist(elapsed.to_numpy(), bins=min(40, max(1, len(elapsed))), color="#1f77b4")
    axes.set_xlabel("elapsed per case (s)")
    axes.set_ylabel("cases")
    axes.set_title("Elapsed time per case")
    return _img(figure, "elapsed time distribution")


def _label(value: object) -> str:
    # A run's names are text, never mathtext: "$" must not switch math mode on.
    return str(value).replace("$", r"\$")


def _figure(height: float) -> Figure:
    # Imported here: matplotlib costs most of a second and only summaries need it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, min(height, 12.0)), dpi=96)
    FigureCanvasAgg(figure)
    return figure


def _img(figure: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
