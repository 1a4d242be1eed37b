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

import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from reports._files import replace_atomically
from reports.schema import CASES_SCHEMA, MISMATCHES_SCHEMA, normalise_case, normalise_mismatch

__all__ = ["RunLog", "merge_runs", "read_rows", "rebuild_parquet"]

CASES_JOURNAL = "cases.jsonl"
MISMATCHES_JOURNAL = "mismatches.jsonl"
CASES_PARQUET = "cases.parquet"
MISMATCHES_PARQUET = "mismatches.parquet"


class _Table:
    """One record type: its journal, its parquet file, its rows in memory.

    Rows in memory are kept as Arrow record batches, converted once when a
    parquet rewrite is due, so a rewrite costs one parquet encode and not a
    re-conversion of every row recorded so far.
    """

    def __init__(
        self,
        out_dir: Path,
        journal: str,
        parquet: str,
        schema: pa.Schema,
        normalise: Callable[[Mapping[str, Any]], dict[str, Any]],
    ) -> None:
        self.journal_path = out_dir / journal
        self.parquet_path = out_dir / parquet
        self.schema = schema
        self.normalise = normalise
        existing = _load_journal(self.journal_path, normalise, repair=True)
        self.batches: list[pa.RecordBatch] = []
        self.pending: list[dict[str, Any]] = existing
        self.count = len(existing)
        self.file = open(self.journal_path, "a", encoding="utf-8")

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        # Validate everything first: a bad row must not leave half a call journalled.
        clean = [self.normalise(row) for row in rows]
        if not clean:
            return
        self.file.write("".join(_dumps(row) + "\n" for row in clean))
        self.file.flush()
        self.pending.extend(clean)
        self.count += len(clean)

    def write_parquet(self) -> None:
        if self.pending:
            self.batches.append(pa.RecordBatch.from_pylist(self.pending, schema=self.schema))
            self.pending = []
        if len(self.batches) > 64:
            combined = pa.Table.from_batches(self.batches, schema=self.schema).combine_chunks()
            self.batches = combined.to_batches()
        _write_parquet_atomically(
            pa.Table.from_batches(self.batches, schema=self.schema), self.parquet_path
        )

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
        self._cases = _Table(
            self.out_dir, CASES_JOURNAL, CASES_PARQUET, CASES_SCHEMA, normalise_case
        )
        try:
            self._mismatches = _Table(
                self.out_dir,
                MISMATCHES_JOURNAL,
                MISMATCHES_PARQUET,
                MISMATCHES_SCHEMA,
                normalise_mismatch,
            )
        except BaseException:
            self._cases.close()
            raise
        self._closed = False
        self.flush()

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

    def _add(self, table: _Table, rows: Iterable[Mapping[str, Any]]) -> None:
        self._check_open()
        table.append(rows)
        if time.monotonic() - self._last_write >= self.parquet_interval_s:
            self.flush()

    def _check_open(self) -> None:
        if getattr(self, "_closed", False):
            raise ValueError(f"RunLog({str(self.out_dir)!r}) is closed")


def read_rows(run_dir: str | os.PathLike[str]) -> tuple[list[dict], list[dict]]:
    """Return ``(case_rows, mismatch_rows)`` of a run directory.

    Each kind is read from its journal when there is one (it is never behind
    the parquet file), else from its parquet file, else it is empty.  A torn
    last journal line, left by a process killed mid-write, is skipped.
    """
    run_dir = Path(run_dir)
    return (
        _read_kind(run_dir, CASES_JOURNAL, CASES_PARQUET, normalise_case),
        _read_kind(run_dir, MISMATCHES_JOURNAL, MISMATCHES_PARQUET, normalise_mismatch),
    )


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
    for journal, parquet, schema, normalise in (
        (CASES_JOURNAL, CASES_PARQUET, CASES_SCHEMA, normalise_case),
        (MISMATCHES_JOURNAL, MISMATCHES_PARQUET, MISMATCHES_SCHEMA, normalise_mismatch),
    ):
        rows = _read_kind(out_dir, journal, parquet, normalise)
        if (out_dir / journal).exists() or not (out_dir / parquet).exists():
            table = pa.Table.from_pylist(rows, schema=schema)
            _write_parquet_atomically(table, out_dir / parquet)
        counts.append(len(rows))
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
            case_rows, mismatch_rows = read_rows(part)
            log._cases.append(case_rows)
            log._mismatches.append(mismatch_rows)
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


def _read_kind(
    run_dir: Path,
    journal: str,
    parquet: str,
    normalise: Callable[[Mapping[str, Any]], dict[str, Any]],
) -> list[dict[str, Any]]:
    if (run_dir / journal).exists():
        return _load_journal(run_dir / journal, normalise, repair=False)
    if (run_dir / parquet).exists():
        return [normalise(row) for row in pq.read_table(run_dir / parquet).to_pylist()]
    return []


def _load_journal(
    path: Path, normalise: Callable[[Mapping[str, Any]], dict[str, Any]], *, repair: bool
) -> list[dict[str, Any]]:
    """Rows of a journal.  A torn last line (no newline, not valid JSON) is
    dropped; with ``repair`` it is also cut from the file so appends start on
    a clean line.  Any other unreadable line is an error naming file and line.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            rows.append(_parse_line(path, number, line, normalise))
    if tail.strip():
        try:
            json.loads(tail)
            torn = False
        except ValueError:
            torn = True
        if not torn:
            rows.append(_parse_line(path, len(lines) + 1, tail, normalise))
        if repair:
            with open(path, "r+b") as file:
                if torn:
                    file.truncate(len(data) - len(tail))
                else:
                    file.seek(0, os.SEEK_END)
                    file.write(b"\n")
    return rows


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
