"""Distinct cases per second of a real campaign, per stage, size class and worker count.

What users run, not synthetic cases: the real strategies through
``Campaign.generate`` (``--contract all``: every dialect of the implementation,
production and defensive), a warm sandboxed worker per campaign, batched and
pipelined as ``difftest run`` does, no failure database, no shrinking.
``--workers 1,2,...`` runs that many campaigns side by side, each in its own
process with its own seed (``difftest run --workers N`` derives them the same
way, ``cli.shard_seed``). A campaign of ``--seconds S`` generates for 70 % of S
(the budget's split), as ``difftest run --seconds S`` does.

Each campaign is given a ``difftest.campaign.Stages`` (no stage is timed
without one) and reports, per size class (``difftest.classify.size_class``:
decode N <= 1023 routes, mid, huge N >= 65536): in the campaign's process
``draw`` (Hypothesis and our builder), ``oracle``, ``compare`` and ``record``;
in its sandbox worker ``stage`` (laying out and copying to the device),
``run`` (the calls and the copy back) and ``inspect``. A stage's cell is the
distinct cases per second that stage alone would allow (cases / its seconds,
in one process); the ``all`` row adds ``wait`` (the campaign blocked on its
worker, the transfers between them included) and ``engine`` (the rest of
generation: Hypothesis' own work outside our draws). The last column is what
the run achieved: distinct cases recorded / seconds of generation, summed over
the side-by-side campaigns. ``busy`` is the CPU time each side used while
generating, as a share of generation's wall time (averaged over the campaigns):
the campaign's process (all its threads) and its worker (from ``/proc``; ``-``
where a worker was replaced or ``/proc`` cannot tell). A side near 100 % is what
bounds the run; neither near it means they wait on each other.

    python3 bench/campaign.py --device cpu --seconds 30 --workers 1,2
    python3 bench/campaign.py --device cuda --seconds 30 --workers 1,4,16

Prints one table and writes ``bench/results/campaign.csv``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import base_parser, check_device, default_impl, fmt_rate, print_table, write_csv

WORKER_STAGES = ("stage", "run", "inspect")
MAIN_STAGES = ("draw", "oracle", "compare", "record")
STAGES = ("draw", "stage", "run", "inspect", "oracle", "compare", "record")


def cpu_seconds(pid: int | None) -> float | None:
    """User and system CPU seconds process ``pid`` used, all its threads (``None``: no
    pid, or ``/proc`` cannot tell)."""
    from difftest.sandbox import proc_stat

    fields = None if pid is None else proc_stat(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def one_campaign(impl_name: str, device: str, seconds: float, seed: int, out: Path,
                 gpu: int | None = None) -> dict:
    """One campaign in this process, its sandboxed worker warm before the clock starts
    (on GPU ``gpu``, as ``difftest run --workers`` shares the GPUs round-robin)."""
    from difftest.budget import Budget
    from difftest.campaign import Campaign, Stages
    from difftest.registry import resolve
    from difftest.sandbox import SandboxRunner

    impl = resolve(impl_name)
    with SandboxRunner(impl, device, timeout_s=60.0, cuda_device=gpu) as runner:
        runner.warm_up()
        budget = Budget(seconds=seconds, seed=seed)
        campaign = Campaign(impl, runner, out, seed=seed, budget=budget)
        campaign.stages = stages = Stages()
        clock = campaign.clock
        worker, worker_cpu = runner.worker_pid, cpu_seconds(runner.worker_pid)
        own_cpu, start = time.process_time(), time.perf_counter()
        campaign.generate(dialects=impl.dialects, contracts=("production", "defensive"),
                          max_examples=None, deadline=clock.generate_end,
                          drain_deadline=clock.drain_end)
        wall = time.perf_counter() - start
        own_cpu = time.process_time() - own_cpu
        end_cpu = cpu_seconds(worker) if runner.worker_pid == worker else None
        result = campaign.close()
    return {"wall_s": wall, "cases": result.cases, "duplicates": result.duplicates,
            "campaign_cpu_s": own_cpu,
            "worker_cpu_s": None if end_cpu is None or worker_cpu is None
            else end_cpu - worker_cpu,
            "verdicts": result.verdicts, "dispatch_s": stages.dispatch_s,
            "class_cases": stages.cases,
            "seconds": [[stage, size, s] for (stage, size), s in stages.seconds.items()]}


def side_by_side(impl: str, device: str, seconds: float, seed: int, workers: int) -> list[dict]:
    """``workers`` campaigns at once, each in a process of its own (``--child``)."""
    from difftest.cli import shard_seed

    gpus = 0
    if device == "cuda":
        import torch

        gpus = max(1, torch.cuda.device_count())  # counts devices; creates no context
    with tempfile.TemporaryDirectory(prefix="bench-campaign-") as tmp:
        procs = []
        for i in range(workers):
            out = Path(tmp) / f"worker-{i}"
            cmd = [sys.executable, __file__, "--child", "--impl", impl, "--device", device,
                   "--seconds", str(seconds), "--seed", str(shard_seed(seed, (i, workers))),
                   "--out", str(out)] + (["--gpu", str(i % gpus)] if gpus else [])
            procs.append((subprocess.Popen(cmd), out))
        results = []
        for proc, out in procs:
            if proc.wait() != 0:
                sys.exit(f"a campaign process exited with {proc.returncode}")
            results.append(json.loads((out / "bench-stages.json").read_text()))
    return results


def rows_of(workers: int, results: list[dict]) -> list[dict]:
    """Per size class (and ``all``): cases, seconds per stage (summed over the campaigns)
    and the distinct cases/s achieved."""
    wall = max(r["wall_s"] for r in results)
    sizes = ("decode", "mid", "huge")
    rows = []
    for size in (*sizes, "all"):
        wanted = sizes if size == "all" else (size,)
        cases = sum(r["class_cases"].get(s, 0) for r in results for s in wanted)
        row = {"workers": workers, "size": size, "cases": cases, "wall_s": round(wall, 3),
               "cases_per_s": cases / wall if wall else 0.0}
        for stage in STAGES:
            row[f"{stage}_s"] = sum(s for r in results for st, sz, s in r["seconds"]
                                    if st == stage and sz in wanted)
        if size == "all":
            main = sum(row[f"{s}_s"] for s in ("oracle", "compare", "record"))
            row["wait_s"] = sum(r["dispatch_s"] for r in results) - main
            row["engine_s"] = sum(r["wall_s"] - r["dispatch_s"] for r in results) - row["draw_s"]
            row["duplicates"] = sum(r["duplicates"] for r in results)
            walls = sum(r["wall_s"] for r in results)
            row["campaign_busy"] = sum(r["campaign_cpu_s"] for r in results) / walls
            row["worker_busy"] = (None if any(r["worker_cpu_s"] is None for r in results)
                                  else sum(r["worker_cpu_s"] for r in results) / walls)
            row["verdicts"] = " ".join(f"{v}={sum(r['verdicts'].get(v, 0) for r in results)}"
                                       for v in sorted({v for r in results for v in r["verdicts"]}))
        rows.append(row)
    return rows


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--impl", default=None, help="implementation (default: torch on the "
                        "CPU, cuda on CUDA)")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="budget of each campaign, as difftest run --seconds (default 30)")
    parser.add_argument("--workers", default="1", help="campaigns side by side, e.g. 1,2,4")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse_hidden())
    parser.add_argument("--out", default=None, help=argparse_hidden())
    parser.add_argument("--gpu", type=int, default=None, help=argparse_hidden())
    args = parser.parse_args()
    impl = args.impl or default_impl(args.device)
    if args.child:
        out = Path(args.out)
        result = one_campaign(impl, args.device, args.seconds, args.seed, out, args.gpu)
        (out / "bench-stages.json").write_text(json.dumps(result))
        return
    check_device(args.device)
    seconds = 6.0 if args.quick else args.seconds
    counts = [1] if args.quick else [int(w) for w in args.workers.split(",")]
    rows = []
    for workers in counts:
        rows += rows_of(workers, side_by_side(impl, args.device, seconds, args.seed, workers))

    def rate(row: dict, stage: str) -> str:
        s = row.get(f"{stage}_s", 0.0)
        return fmt_rate(row["cases"] / s) if s > 0 and row["cases"] else "-"

    def busy(row: dict) -> str:
        if row["size"] != "all":
            return ""
        worker = row["worker_busy"]
        return (f"{row['campaign_busy']:.0%} / "
                + ("-" if worker is None else f"{worker:.0%}"))

    headers = ["workers / size", "cases", *STAGES, "wait", "engine",
               "busy: campaign / worker", "distinct cases/s"]
    table = [[f"{r['workers']} / {r['size']}", r["cases"], *(rate(r, s) for s in STAGES),
              rate(r, "wait") if r["size"] == "all" else "",
              rate(r, "engine") if r["size"] == "all" else "", busy(r),
              fmt_rate(r["cases_per_s"])]
             for r in rows]
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print_table(
        f"Real campaign, {impl} on {args.device}, --contract all, {seconds:g} s budget per "
        f"campaign (generation 70 % of it), seed {args.seed}; a stage's cell: distinct "
        "cases/s that stage alone allows in one process",
        headers, table,
        notes=["duplicates skipped (all sizes): "
               + ", ".join(f"{r['workers']} worker(s) {r['duplicates']}"
                           for r in rows if r["size"] == "all"),
               "verdicts: " + "; ".join(f"{r['workers']}: {r['verdicts']}"
                                        for r in rows if r["size"] == "all"),
               f"load average at the end: {' '.join(load)}"])
    path = write_csv("campaign", [{k: (round(v, 4) if isinstance(v, float) else v)
                                   for k, v in r.items()} for r in rows])
    print(f"csv: {path}")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
