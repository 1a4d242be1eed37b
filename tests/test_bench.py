"""Every benchmark's smoke run (--quick, CPU) prints its table and writes its CSV.

Benchmarks measure; these tests only keep them runnable as the package changes
under them (no timing is asserted).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[1] / "bench"

SMOKE = {
    "attribution": ["--sizes", "decode", "--rounds", "1"],
    "throughput": ["--sizes", "decode,mid", "--count", "8", "--draws", "5"],
    "floor": ["--sizes", "decode", "--count", "8", "--iters", "5"],
    "throughput_parallel": ["--sizes", "decode", "--procs", "1", "--seconds", "1"],
    "time_to_catch": ["--seeds", "1", "--faults", "inactive-blocks-zero,uneven-ep-truncates",
                      "--shrink-seconds", "2"],
    "vs_blockwalk": ["--repeats", "1"],
    "oracle_scaling": ["--repeats", "1"],
    "crash_throughput": ["--count", "60"],
    "campaign": [],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_smoke_run_prints_its_table_and_writes_its_csv(name, tmp_path):
    env = {**os.environ, "DIFFTEST_BENCH_RESULTS": str(tmp_path)}
    done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--device", "cpu",
                           "--quick", *SMOKE[name]], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert f"csv: {tmp_path / (name + '.csv')}" in done.stdout
    with (tmp_path / f"{name}.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows, "empty CSV"
    verdicts = " ".join(str(r.get("verdicts", "")) for r in rows)
    assert "mismatch" not in verdicts and "crash" not in verdicts, verdicts
    if name == "campaign":  # how busy each side was: the campaign's process and its worker
        everything = next(r for r in rows if r["size"] == "all")
        assert float(everything["campaign_busy"]) > 0 and float(everything["worker_busy"]) > 0
