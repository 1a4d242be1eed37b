"""Records of a difftest run: case and mismatch logs, summary, bug reports, JUnit.

Works on plain dicts (see :data:`CASE_COLUMNS`, :data:`MISMATCH_COLUMNS`) and
depends on pandas, pyarrow and matplotlib only — nothing of difftest, the
oracle or torch.  The run directory layout is DESIGN.md's "Run directory".
"""

from reports.bugreport import write_bug_report
from reports.contracts import contract_split
from reports.environment import environment
from reports.junit import write_junit
from reports.log import RunLog, merge_runs, read_rows, rebuild_parquet
from reports.schema import (
    CASE_COLUMNS,
    CASES_SCHEMA,
    MISMATCH_COLUMNS,
    MISMATCHES_SCHEMA,
    NO_EDGE_CLASS,
    VERDICTS,
)
from reports.summary import write_summary

__all__ = [
    "CASE_COLUMNS",
    "CASES_SCHEMA",
    "MISMATCH_COLUMNS",
    "MISMATCHES_SCHEMA",
    "NO_EDGE_CLASS",
    "VERDICTS",
    "RunLog",
    "contract_split",
    "environment",
    "merge_runs",
    "read_rows",
    "rebuild_parquet",
    "write_bug_report",
    "write_junit",
    "write_summary",
]
