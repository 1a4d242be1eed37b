"""Aggregate end-to-end throughput of N campaign processes sharing one device.

One campaign process (runner + its sandbox worker) is bound by the CPU work
around each case (generation, oracle, comparison, logging), not by the GPU:
a decode-sized launch is tens of microseconds. ``difftest run --workers N``
runs N such processes; this measures what that buys, per size class: each
process warms its worker, waits at a barrier, then sends freshly generated
cases through ``Campaign.dispatch`` in batches as ``Campaign.generate`` forms
them (``_common.campaign_batch``: 64 decode cases, 8 mid ones; pipelined)
for ``--seconds``; the table sums cases/s.

    python3 bench/throughput_parallel.py --device cuda --procs 1,4,8,14
"""

from __future__ import annotations

import multiprocessing as mp
import time

from _common import base_parser, check_device, default_impl, make_case, print_table, write_csv

SIZES = {"decode": 32, "mid": 1024}


def _one(impl_name: str, device: str, num_tokens: int, seconds: float, seed: int,
         barrier, results) -> None:
    import tempfile
    from pathlib import Path

    import numpy as np
    from _common import campaign_batch, ensure_worker

    from difftest import registry
    from difftest.campaign import Campaign
    from difftest.sandbox import SandboxRunner

    impl = registry.resolve(impl_name)
    batch = campaign_batch(num_tokens)
    rng = np.random.default_rng(seed)
    with SandboxRunner(impl, device, timeout_s=120.0) as runner, \
            tempfile.TemporaryDirectory() as tmp:
        ensure_worker(runner, "vllm-lora")
        campaign = Campaign(impl, runner, Path(tmp), seed=seed)
        campaign.dispatch([make_case(rng, num_tokens) for _ in range(batch)])
        campaign.drain()
        barrier.wait()
        start, done, failed = time.perf_counter(), 0, 0
        evaluations: list = []
        while True:
            done += len(evaluations)
            failed += sum(e.verdict != "pass" for e in evaluations)
            if time.perf_counter() - start >= seconds:
                break
            evaluations = campaign.dispatch([make_case(rng, num_tokens)
                                             for _ in range(batch)])
        evaluations = campaign.drain()
        done += len(evaluations)
        failed += sum(e.verdict != "pass" for e in evaluations)
        results.put((done, time.perf_counter() - start, failed))
        campaign.log.close()


def measure(impl_name: str, device: str, num_tokens: int, procs: int, seconds: float):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_one, args=(impl_name, device, num_tokens, seconds, 100 + i,
                                              barrier, results)) for i in range(procs)]
    for w in workers:
        w.start()
    got = [results.get(timeout=seconds + 600) for _ in workers]
    for w in workers:
        w.join()
    cases = sum(g[0] for g in got)
    return cases, sum(g[0] / g[1] for g in got), sum(g[2] for g in got)


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--procs", default="1,4,8", help="comma-separated process counts")
    parser.add_argument("--seconds", type=float, default=None, help="per measurement (20)")
    parser.add_argument("--sizes", default=",".join(SIZES),
                        help=f"size classes, comma-separated (default {','.join(SIZES)})")
    ns = parser.parse_args()
    check_device(ns.device)
    impl = default_impl(ns.device)
    seconds = ns.seconds or (5.0 if ns.quick else 20.0)
    rows, csv_rows = [], []
    for label in [s.strip() for s in ns.sizes.split(",") if s.strip()]:
        if label not in SIZES:
            parser.error(f"--sizes: {label!r} is not one of {', '.join(SIZES)}")
        tokens = SIZES[label]
        for procs in [int(p) for p in ns.procs.split(",")]:
            cases, rate, failed = measure(impl, ns.device, tokens, procs, seconds)
            rows.append([f"{label} T={tokens}", procs, cases, f"{rate:,.0f}",
                         f"{rate / procs:,.0f}", failed])
            csv_rows.append({"size": label, "procs": procs, "cases": cases,
                             "cases_per_s": rate, "failed": failed, "impl": impl,
                             "device": ns.device})
    path = write_csv("throughput_parallel", csv_rows)
    print_table(f"aggregate end-to-end throughput, impl={impl} on {ns.device}",
                ["size", "processes", "cases", "cases/s", "per process", "failures"], rows,
                [f"{seconds:g} s per measurement after warm-up; generation + run + oracle + "
                 f"compare + record per case; csv: {path}"])


if __name__ == "__main__":
    main()
