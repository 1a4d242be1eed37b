"""The case and mismatch logs of a run directory (DESIGN.md "Run directory").

Two layers, so that a run killed at any moment keeps every row it recorded:

* the **journals** ``cases.jsonl`` and ``mismatches.jsonl`` — one JSON object
  per line, appended and flushed as each row arrives.  They are the truth.
* the **tables** ``cases.parquet`` and ``mismatches.parquet`` — rewritten
  atomically (temporary file in the same directory, then ``os.replace``) from
  the rows held in memory, at most every ``parquet_interval_s`` seconds and on
  :meth:`RunLog.flush` / :meth:`RunLog.close`.  A reader never sees a torn
  file, only one that may lag the journal by a couple of seconds;
  :func:`rebuild_parquet` brings them level after a killed run.

Example::

    with RunLog(out_dir) as log:
        log.add_case({"case_id": "c1", "impl": "torch", "verdict": "pass", ...})
        log.add_mismatches([{"case_id": "c2", "check": "expert_ids", ...}])
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from reports._files import replace_atomically
from reports.schema import (
    CASES_SCHEMA,
    MISMATCHES_SCHEMA,
    VERDICTS,
    normalise_case,
    normalise_mismatch,
)

__all__ = ["RunLog", "merge_runs", "read_rows", "read_tables", "rebuild_parquet"]


@dataclass(frozen=True)
class _Kind:
    """One record type of a run directory: its files, schema and row check."""

    journal: str
    parquet: str
    schema: pa.Schema
    normalise: Callable[[Mapping[str, Any]], dict[str, Any]]


_CASES = _Kind("cases.jsonl", "cases.parquet", CASES_SCHEMA, normalise_case)
_MISMATCHES = _Kind("mismatches.jsonl", "mismatches.parquet", MISMATCHES_SCHEMA, normalise_mismatch)


class _Log:
    """One record type of an open RunLog: its journal file and its rows in memory.

    Rows in memory are Arrow record batches plus the rows added since the last
    parquet rewrite, so a rewrite converts only the new rows before encoding.
    """

    def __init__(self, out_dir: Path, kind: _Kind) -> None:
        self.kind = kind
        self.parquet_path = out_dir / kind.parquet
        journal = out_dir / kind.journal
        if journal.exists():
            existing = _load_journal(journal, kind, repair=True)
        else:
            # A directory with a parquet file and no journal: its rows seed the
            # journal, so that the journal stays the whole truth.
            existing = _read_kind(out_dir, kind)
        self.batches: list[pa.RecordBatch] = existing.to_batches()
        self.pending: list[dict[str, Any]] = []
        self.count = existing.num_rows
        self.file = open(journal, "a", encoding="utf-8")
        if not journal.stat().st_size and existing.num_rows:
            self.file.write("".join(_dumps(row) + "\n" for row in existing.to_pylist()))
            self.file.flush()

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        # Validate everything first: a bad row must not leave half a call journalled.
        clean = [self.kind.normalise(row) for row in rows]
        if not clean:
            return
        self.file.write("".join(_dumps(row) + "\n" for row in clean))
        self.file.flush()
        self.pending.extend(clean)
        self.count += len(clean)

    def write_parquet(self) -> None:
        schema = self.kind.schema
        if self.pending:
            self.batches.append(pa.RecordBatch.from_pylist(self.pending, schema=schema))
            self.pending = []
        if len(self.batches) > 64:
            self.batches = pa.Table.from_batches(self.batches, schema).combine_chunks().to_batches()
        _write_parquet_atomically(pa.Table.from_batches(self.batches, schema), self.parquet_path)

    def close(self) -> None:
        self.file.close()


class RunLog:
    """Records the cases and mismatches of one run into ``out_dir``.

    ``out_dir`` is created if needed.  If it already holds journals (a
    resumed or merged run) their rows are loaded and new rows are appended
    after them.  Both parquet files exist, with their full schema, as soon as
    the log is opened, even before any row arrives.

    Rows are dicts keyed by :data:`reports.CASE_COLUMNS` /
    :data:`reports.MISMATCH_COLUMNS`; a missing key is recorded as null, an
    unknown key raises ``ValueError``, a wrongly typed value ``TypeError``.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, parquet_interval_s: float = 2.0):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.parquet_interval_s = float(parquet_interval_s)
        self._cases = _Log(self.out_dir, _CASES)
        try:
            self._mismatches = _Log(self.out_dir, _MISMATCHES)
        except BaseException:
            self._cases.close()
            raise
        self._closed = False
        try:
            self.flush()
        except BaseException:
            self._cases.close()
            self._mismatches.close()
            raise

    @property
    def num_cases(self) -> int:
        """Case rows recorded in this directory, including those loaded at open."""
        return self._cases.count

    @property
    def num_mismatches(self) -> int:
        """Mismatch rows recorded in this directory, including those loaded at open."""
        return self._mismatches.count

    def add_case(self, row: Mapping[str, Any]) -> None:
        """Journal one case row now; the parquet table follows within the interval."""
        self._add(self._cases, [row])

    def add_mismatches(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Journal mismatch rows now (all or none of them: each is validated first)."""
        self._add(self._mismatches, rows)

    def flush(self) -> None:
        """Rewrite both parquet files from every row recorded so far."""
        self._check_open()
        self._cases.write_parquet()
        self._mismatches.write_parquet()
        self._last_write = time.monotonic()

    def close(self) -> None:
        """Flush and close the journals.  Closing twice is harmless."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._cases.close()
            self._mismatches.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _add(self, log: _Log, rows: Iterable[Mapping[str, Any]]) -> None:
        self._check_open()
        log.append(rows)
        if time.monotonic() - self._last_write >= self.parquet_interval_s:
            self.flush()

    def _check_open(self) -> None:
        if getattr(self, "_closed", False):
            raise ValueError(f"RunLog({str(self.out_dir)!r}) is closed")


def read_rows(run_dir: str | os.PathLike[str]) -> tuple[list[dict], list[dict]]:
    """Return ``(case_rows, mismatch_rows)`` of a run directory as lists of dicts.

    Each kind is read from its journal when there is one (it is never behind
    the parquet file), else from its parquet file, else it is empty.  A torn
    last journal line, left by a process killed mid-write, is skipped.
    """
    cases, mismatches = read_tables(run_dir)
    return cases.to_pylist(), mismatches.to_pylist()


def read_tables(run_dir: str | os.PathLike[str]) -> tuple[pa.Table, pa.Table]:
    """Like :func:`read_rows`, as Arrow tables with the fixed schemas."""
    run_dir = Path(run_dir)
    return _read_kind(run_dir, _CASES), _read_kind(run_dir, _MISMATCHES)


def rebuild_parquet(out_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """Rewrite ``cases.parquet`` and ``mismatches.parquet`` from the journals.

    For a run that was killed before its last parquet rewrite.  A kind with no
    journal keeps its parquet file if it has one, and gets an empty one with
    the full schema if not.  Returns ``(number_of_cases, number_of_mismatches)``.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"out_dir={str(out_dir)!r} is not a directory")
    counts = []
    for kind in (_CASES, _MISMATCHES):
        table = _read_kind(out_dir, kind)
        if (out_dir / kind.journal).exists() or not (out_dir / kind.parquet).exists():
            _write_parquet_atomically(table, out_dir / kind.parquet)
        counts.append(table.num_rows)
    return counts[0], counts[1]


def merge_runs(
    out_dir: str | os.PathLike[str], part_dirs: Sequence[str | os.PathLike[str]]
) -> tuple[int, int]:
    """Merge the run directories ``part_dirs`` (e.g. one per GPU) into ``out_dir``.

    Case and mismatch rows of every part are appended, in the order of
    ``part_dirs``, to ``out_dir``'s journals (after any rows it already has)
    and both parquet files are rewritten.  ``cases/*.json`` files and
    ``bugs/<signature>/`` directories are copied; where ``out_dir`` already has
    one of the same name it is kept (the same case id or bug signature names
    the same case or bug).  Returns ``(number_of_cases, number_of_mismatches)``
    in ``out_dir`` afterwards.
    """
    out_dir = Path(out_dir)
    parts = [Path(part) for part in part_dirs]
    for index, part in enumerate(parts):
        if not part.is_dir():
            raise ValueError(f"part_dirs[{index}]={str(part)!r} is not a directory")
        if out_dir.exists() and part.resolve() == out_dir.resolve():
            raise ValueError(
                f"part_dirs[{index}]={str(part)!r} is out_dir itself; merge into a new directory"
            )
    with RunLog(out_dir) as log:
        for part in parts:
            for table, log_of_kind in zip(read_tables(part), (log._cases, log._mismatches)):
                log_of_kind.append(table.to_pylist())
        for part in parts:
            _copy_new(part / "cases", out_dir / "cases", dirs=False)
            _copy_new(part / "bugs", out_dir / "bugs", dirs=True)
        return log.num_cases, log.num_mismatches


def _copy_new(source: Path, dest: Path, *, dirs: bool) -> None:
    if not source.is_dir():
        return
    dest.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        target = dest / entry.name
        if target.exists():
            continue
        if dirs and entry.is_dir():
            shutil.copytree(entry, target)
        elif not dirs and entry.is_file() and entry.suffix == ".json":
            shutil.copy2(entry, target)


def _read_kind(run_dir: Path, kind: _Kind) -> pa.Table:
    if (run_dir / kind.journal).exists():
        return _load_journal(run_dir / kind.journal, kind, repair=False)
    if (run_dir / kind.parquet).exists():
        table = pq.read_table(run_dir / kind.parquet)
        if table.schema.equals(kind.schema):
            return table
        return _table(kind, table.to_pylist())  # written by someone else: check every row
    return kind.schema.empty_table()


def _load_journal(path: Path, kind: _Kind, *, repair: bool) -> pa.Table:
    """The rows of a journal.  A torn last line (no newline, not valid JSON) is
    dropped; with ``repair`` it is also cut from the file so appends start on
    a clean line.  Any other unreadable line is a ``ValueError`` naming file
    and line.
    """
    if not path.exists():
        return kind.schema.empty_table()
    data = path.read_bytes()
    tail = data[data.rfind(b"\n") + 1 :]  # b"" when the file ends with a newline
    if tail.strip():
        try:
            json.loads(tail)
            torn = False
        except ValueError:
            torn = True
        if repair:
            with open(path, "r+b") as file:
                if torn:
                    file.truncate(len(data) - len(tail))
                else:
                    file.seek(0, os.SEEK_END)
                    file.write(b"\n")
        data = data[: len(data) - len(tail)] if torn else data + b"\n"
    if not data.strip():
        return kind.schema.empty_table()
    try:
        # Arrow's reader checks fields and types as strictly as normalise(), fast;
        # only verdicts are left to check.
        options = pa_json.ParseOptions(
            explicit_schema=kind.schema, unexpected_field_behavior="error"
        )
        table = pa_json.read_json(io.BytesIO(data), parse_options=options)
        verdicts = set(table.column("verdict").unique().to_pylist())
        if table.schema.equals(kind.schema) and verdicts <= {None, *VERDICTS}:
            return table
    except pa.ArrowException:
        pass
    # Something is wrong: read line by line to say where.
    rows = [
        _parse_line(path, number, line, kind.normalise)
        for number, line in enumerate(data.split(b"\n"), start=1)
        if line.strip()
    ]
    return _table(kind, rows)


def _table(kind: _Kind, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([kind.normalise(row) for row in rows], schema=kind.schema)


def _parse_line(
    path: Path, number: int, line: bytes, normalise: Callable[[Mapping[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    try:
        return normalise(json.loads(line))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}:{number}: unreadable journal line: {error}") from None


def _dumps(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"))


def _write_parquet_atomically(table: pa.Table, path: Path) -> None:
    replace_atomically(path, lambda temp: pq.write_table(table, temp))
