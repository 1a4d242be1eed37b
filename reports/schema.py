"""The two record types of a run directory and their fixed Arrow schemas.

A *case row* describes one executed case (DESIGN.md "cases.parquet"); a
*mismatch row* describes one failed check of one case ("mismatches.parquet").
Rows are plain dicts.  :func:`normalise_case` / :func:`normalise_mismatch`
turn a caller's dict into the canonical form that is journalled and written
to parquet: every column present in schema order, missing keys as ``None``,
NumPy scalars as Python values, tuples as lists.

What can go wrong, by design loudly and at the caller's line:

* a key that is not a column -> ``ValueError`` naming it (catches typos such
  as ``edge_class`` for ``edge_classes``);
* a value of the wrong type -> ``TypeError`` naming the column;
* a ``verdict`` outside :data:`VERDICTS` -> ``ValueError``.

Every Arrow field is nullable, because a missing key is recorded as null.
"""

from __future__ import annotations

import difflib
import math
import numbers
import operator
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

__all__ = [
    "CASE_COLUMNS",
    "CASES_SCHEMA",
    "MISMATCH_COLUMNS",
    "MISMATCHES_SCHEMA",
    "NO_EDGE_CLASS",
    "PASSING_VERDICTS",
    "VERDICTS",
    "normalise_case",
    "normalise_mismatch",
]

#: The verdicts of SPEC §9 item 7, ``pass`` first; ``rejected`` is an input outside the
#: implementation's declared limits that it rejected cleanly.
VERDICTS = ("pass", "mismatch", "error", "crash", "timeout", "rejected")

#: The verdicts that are not failures (a case with any other verdict failed).
PASSING_VERDICTS = ("pass", "rejected")

#: The edge class under which summaries count cases that carry none.
NO_EDGE_CLASS = "no-edge-class"

_STR = pa.string()
_INT = pa.int64()
_STR_LIST = pa.list_(pa.string())

CASES_SCHEMA = pa.schema(
    [
        ("case_id", _STR),
        ("impl", _STR),
        ("dialect", _STR),
        ("contract", _STR),
        ("edge_classes", _STR_LIST),
        ("T", _INT),
        ("K", _INT),
        ("E", _INT),
        ("B", _INT),
        ("L", _INT),
        ("P", _INT),
        ("R", _INT),
        ("rank", _INT),
        ("dtype", _STR),
        ("seed", _INT),
        ("verdict", _STR),
        ("elapsed_s", pa.float64()),
        ("worker", _STR),
        ("checks_failed", _STR_LIST),
    ]
)

MISMATCHES_SCHEMA = pa.schema(
    [
        ("case_id", _STR),
        ("impl", _STR),
        ("dialect", _STR),
        ("check", _STR),
        ("rank", _INT),
        ("slot", _INT),
        ("expert", _INT),
        ("position", _INT),
        ("expected", _INT),
        ("actual", _INT),
        ("verdict", _STR),
        ("message", _STR),
    ]
)

CASE_COLUMNS: tuple[str, ...] = tuple(CASES_SCHEMA.names)
MISMATCH_COLUMNS: tuple[str, ...] = tuple(MISMATCHES_SCHEMA.names)


def normalise_case(row: Mapping[str, Any]) -> dict[str, Any]:
    """Return *row* as a canonical case row (see the module docstring)."""
    return _normalise(row, _CASE_SPEC, "case row")


def normalise_mismatch(row: Mapping[str, Any]) -> dict[str, Any]:
    """Return *row* as a canonical mismatch row (see the module docstring)."""
    return _normalise(row, _MISMATCH_SPEC, "mismatch row")


def _spec(schema: pa.Schema) -> tuple[tuple[str, str], ...]:
    # (name, kind) read once: pyarrow builds a new list per Schema.names call, and
    # comparing Arrow types costs more than the rest of a row's normalisation.
    kinds = {_STR: "str", _INT: "int", pa.float64(): "float", _STR_LIST: "str-list"}
    return tuple((field.name, kinds[field.type]) for field in schema)


_CASE_SPEC = _spec(CASES_SCHEMA)
_MISMATCH_SPEC = _spec(MISMATCHES_SCHEMA)
_PLAIN = {"str": str, "int": int, "float": float}


def _normalise(row: Mapping[str, Any], spec: tuple[tuple[str, str], ...], what: str) -> dict:
    if not isinstance(row, Mapping):
        raise TypeError(f"a {what} must be a dict, got {type(row).__name__}")
    out = {}
    for name, kind in spec:
        value = row.get(name)
        # Plain str / int / float values (the common case) skip the general coercion.
        if value is not None and type(value) is not _PLAIN.get(kind):
            value = _coerce(value, name, kind, what)
        out[name] = value
    if len(row) > len(out) or any(key not in out for key in row):
        names = [name for name, _ in spec]
        key = next(key for key in row if key not in out)
        hint = difflib.get_close_matches(str(key), names, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(
            f"{what} has unknown column {key!r}{did_you_mean}; columns are: {', '.join(names)}"
        )
    if out.get("elapsed_s") is not None and math.isnan(out["elapsed_s"]):
        out["elapsed_s"] = None
    verdict = out["verdict"]
    if verdict is not None and verdict not in VERDICTS:
        raise ValueError(f"{what}: verdict={verdict!r} is not one of {', '.join(VERDICTS)}")
    return out


def _coerce(value: Any, name: str, kind: str, what: str) -> Any:
    def wrong(expected: str) -> TypeError:
        return TypeError(
            f"{what}: column {name!r} must be {expected}, got {type(value).__name__} {value!r}"
        )

    if kind == "str":
        if isinstance(value, str):
            return str(value)
        raise wrong("a str")
    if kind == "int":
        if isinstance(value, bool):
            raise wrong("an int")
        try:
            return operator.index(value)
        except TypeError:
            raise wrong("an int") from None
    if kind == "float":
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise wrong("a float")
    # kind == "str-list".  A bare string is iterable too; taking it would record its letters.
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise wrong("a list of str")
    items = list(value)
    for item in items:
        if not isinstance(item, str):
            raise wrong(f"a list of str (found {item!r} in it)")
    return [str(item) for item in items]
