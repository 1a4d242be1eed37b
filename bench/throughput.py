"""End-to-end cases per second, and where the time of one case goes.

For three size classes of production ``vllm-lora`` cases (decode T=32, mid
T=1024, prefill T=16384; K=8 distinct experts of E=64, B=16, L=8 slots with
base tokens), built deterministically from a NumPy RNG (not Hypothesis: a
size class needs fixed sizes), each case goes generate → run → oracle →
compare → record, in this process, with one timer per stage:

* generation  -- build and tag the case (``bench/_common.make_case``);
* set-up      -- the call plan, the guarded sentinel-filled output buffers;
* transfer    -- inputs host→device, outputs and inputs device→host;
* kernel      -- the implementation's callable, synchronised;
* band+input  -- the guard-band and input-mutation scans of ``run_call``;
* oracle      -- ``DIALECT_INFO[d].reference`` for every rank;
* comparison  -- ``difftest.evaluate.evaluate`` with that expected value;
* logging     -- ``Campaign._record``: ``RunLog.add_case`` (+ ``add_mismatches``).

set-up, transfer, kernel and band+input are the steps of
``difftest.execute.run_call`` re-done here with timers (difftest is not
modified), ``repeats`` times per case like ``run_case`` (4 on CUDA, 1 on CPU).
Then, for the full cost including the IPC to the sandbox worker, the same
kind of cases go through ``SandboxRunner`` + ``Campaign.run_one`` (worker
start-up measured once, apart).  One more row is the cost of drawing one
case from ``difftest.strategies.cases`` (Hypothesis, mixed sizes), which is
how campaigns get their cases.

    python3 bench/throughput.py --device cuda          # --impl cuda by default there
    python3 bench/throughput.py --device cpu --quick   # torch on CPU, small counts

Prints one table and writes ``bench/results/throughput.csv``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (SIZE_CLASSES, Stopwatch, base_parser, check_device, default_impl,
                     end_to_end, fmt_ms, fmt_rate, make_case, print_table, sync_fn, write_csv)

STAGES = ("generation", "set-up", "transfer", "kernel", "band+input", "oracle", "comparison",
          "logging")
COUNTS = {"decode": 200, "mid": 100, "prefill": 20}
QUICK_COUNTS = {"decode": 20, "mid": 10, "prefill": 3}


def timed_run_call(case, rank, fn, device: str, sw: Stopwatch):
    """``difftest.execute.run_call`` step by step, each step under a timer."""
    import torch

    from difftest.dialects import DIALECT_INFO, TensorArg
    from difftest.execute import GUARD, GUARD_LEN, SENTINEL, RankRun, _describe

    with sw("set-up"):
        plan = DIALECT_INFO[case.dialect].plan(case, rank)
    tensors = {}
    with sw("transfer"):
        for name, array in plan.inputs.items():
            tensors[name] = torch.from_numpy(np.array(array, copy=True)).to(device)
    guarded = {}
    with sw("set-up"):
        for name, (shape, dtype) in {**plan.outputs, **plan.scratch}.items():
            numel = int(np.prod(shape))
            tdtype = torch.int64 if dtype == np.int64 else torch.int32
            buf = torch.full((GUARD_LEN + numel + GUARD_LEN,), GUARD, dtype=tdtype, device=device)
            buf[GUARD_LEN:GUARD_LEN + numel].fill_(SENTINEL if name in plan.outputs else 0)
            guarded[name] = buf
            tensors[name] = buf[GUARD_LEN:GUARD_LEN + numel].view(shape)
        args = [tensors[a.name] if isinstance(a, TensorArg) else a for a in plan.arguments]
    result = RankRun(rank)
    start = time.perf_counter()
    try:
        with sw("kernel"):
            fn(*args)
    except Exception as exc:  # noqa: BLE001 - as run_call: the verdict "error"
        result.elapsed_s = time.perf_counter() - start
        result.error = _describe(exc)
        return result
    result.elapsed_s = time.perf_counter() - start
    hosts = {}
    with sw("transfer"):
        for name, buf in guarded.items():
            hosts[name] = buf.cpu().numpy()
        after = {name: tensors[name].cpu().numpy() for name in plan.inputs}
    with sw("band+input"):
        for name, host in hosts.items():
            numel = host.size - 2 * GUARD_LEN
            band = np.concatenate([host[:GUARD_LEN], host[GUARD_LEN + numel:]])
            bad = np.flatnonzero(band != GUARD)
            if bad.size:
                pos = np.where(bad < GUARD_LEN, bad - GUARD_LEN, bad - GUARD_LEN + numel)
                result.guard_damage[name] = [(int(p), int(band[b]))
                                             for p, b in zip(pos[:8], bad[:8])]
            if name in plan.outputs:
                result.outputs[name] = host[GUARD_LEN:GUARD_LEN + numel].copy()
        for name, array in plan.inputs.items():
            if after[name].shape != array.shape or not np.array_equal(after[name], array):
                flat_a, flat_b = array.reshape(-1), after[name].reshape(-1)
                i = int(np.flatnonzero(flat_a != flat_b)[0]) if flat_a.shape == flat_b.shape else 0
                result.mutated_inputs[name] = (i, int(flat_a[i]), int(flat_b[i]))
    return result


def in_process(impl, fn, device: str, num_tokens: int, count: int, seed: int,
               repeats: int) -> dict:
    """Stage seconds per case (means over ``count`` cases) and the verdicts."""
    from difftest.campaign import Campaign
    from difftest.dialects import DIALECT_INFO
    from difftest.evaluate import evaluate
    from difftest.sandbox import Outcome

    rng = np.random.default_rng(seed)
    verdicts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        campaign = Campaign(impl, None, Path(tmp), seed=seed)  # used for _record only
        for i in range(count + 1):  # the first case warms up and is not counted
            sw = Stopwatch(sync_fn(device))
            with sw("generation"):
                case = make_case(rng, num_tokens)
            runs = [[timed_run_call(case, rank, fn, device, sw) for rank in case.ranks()]
                    for _ in range(repeats)]
            with sw("oracle"):
                info = DIALECT_INFO[case.dialect]
                expected = {rank: info.reference(case, rank) for rank in case.ranks()}
            outcome = Outcome(runs, worker="in-process")
            with sw("comparison"):
                evaluation = evaluate(case, outcome, stable=impl.stable, expected=expected)
            with sw("logging"):
                campaign._record(case, evaluation, outcome, seed)
            if i == 0:
                totals = {s: 0.0 for s in STAGES}
                continue
            for stage, seconds in sw.totals.items():
                totals[stage] += seconds
            verdicts[evaluation.verdict] = verdicts.get(evaluation.verdict, 0) + 1
        campaign.log.close()
    return {"per_case": {s: t / count for s, t in totals.items()}, "verdicts": verdicts}


def hypothesis_draws(count: int, seed: int) -> tuple[float, float]:
    """Seconds per case drawn from ``strategies.cases`` (vllm-lora, both contracts), and
    the mean routes per drawn case."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hseed

    from difftest.strategies import cases

    routes: list[int] = []

    @hseed(seed)
    @settings(max_examples=count, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
    @given(cases(dialects=("vllm-lora",), contracts=("production", "defensive")))
    def draw(case) -> None:
        routes.append(case.num_routes)

    start = time.perf_counter()
    draw()
    elapsed = time.perf_counter() - start
    return elapsed / max(len(routes), 1), float(np.mean(routes)) if routes else 0.0


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--impl", help="implementation (default: torch on cpu, cuda on cuda)")
    parser.add_argument("--sizes", default=",".join(SIZE_CLASSES),
                        help="size classes to run, comma-separated (default all)")
    parser.add_argument("--count", type=int, help="cases per size class (default 200/100/20)")
    parser.add_argument("--repeats", type=int, help="runs per case (default: the impl's)")
    parser.add_argument("--draws", type=int, help="Hypothesis draws (default 200, quick 30)")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args()
    check_device(ns.device)

    from difftest import registry

    impl = registry.resolve(ns.impl or default_impl(ns.device))
    fn = impl.load()["vllm-lora"]
    repeats = ns.repeats or impl.repeats(ns.device)
    sizes = [s.strip() for s in ns.sizes.split(",") if s.strip()]
    counts = QUICK_COUNTS if ns.quick else COUNTS
    started = time.perf_counter()

    results = {}
    for k, size in enumerate(sizes):
        T = SIZE_CLASSES[size]
        n = ns.count or counts[size]
        results[size] = in_process(impl, fn, ns.device, T, n, ns.seed + k, repeats)
        results[size]["e2e"] = end_to_end(impl, ns.device, T, n, ns.seed + 100 + k)
        results[size]["count"] = n
    draws = ns.draws or (30 if ns.quick else 200)
    hyp_s, hyp_routes = hypothesis_draws(draws, ns.seed)

    csv_rows = []
    rows = []
    for stage in STAGES:
        row = [stage]
        for size in sizes:
            per = results[size]["per_case"]
            total = sum(per.values())
            row += [fmt_ms(per[stage]), f"{100 * per[stage] / total:.0f}%"]
            csv_rows.append({"size": size, "T": SIZE_CLASSES[size], "row": stage,
                             "ms_per_case": per[stage] * 1e3, "share": per[stage] / total})
        rows.append(row)
    total_row, rate_row, e2e_row, e2e_rate_row, ipc_row = (
        ["in-process total"], ["in-process cases/s"], ["end-to-end (sandbox)"],
        ["end-to-end cases/s"], ["IPC+worker overhead"])
    for size in sizes:
        r = results[size]
        total = sum(r["per_case"].values())
        e2e = r["e2e"]
        total_row += [fmt_ms(total), "100%"]
        rate_row += [fmt_rate(1 / total), ""]
        e2e_row += [fmt_ms(e2e["mean_s"]), f"{100 * e2e['mean_s'] / total:.0f}%"]
        e2e_rate_row += [fmt_rate(e2e["cases_per_s"]), ""]
        ipc_row += [fmt_ms(e2e["mean_s"] - total), ""]
        base = {"size": size, "T": SIZE_CLASSES[size]}
        csv_rows += [
            {**base, "row": "in-process total", "ms_per_case": total * 1e3, "share": 1.0,
             "cases_per_s": 1 / total, "verdicts": r["verdicts"]},
            {**base, "row": "end-to-end (sandbox)", "ms_per_case": e2e["mean_s"] * 1e3,
             "median_ms": e2e["median_s"] * 1e3, "cases_per_s": e2e["cases_per_s"],
             "verdicts": e2e["verdicts"], "worker_startup_s": e2e["worker_startup_s"]},
        ]
    rows += [total_row, rate_row, e2e_row, e2e_rate_row, ipc_row,
             ["hypothesis generation", fmt_ms(hyp_s), "(mixed)"] + ["", ""] * (len(sizes) - 1)]
    csv_rows.append({"size": "hypothesis", "T": None, "row": "hypothesis generation",
                     "ms_per_case": hyp_s * 1e3, "cases_per_s": 1 / hyp_s,
                     "mean_routes": hyp_routes, "count": draws})
    for row in csv_rows:
        row.update(impl=impl.name, device=ns.device, repeats=repeats,
                   count=row.get("count", results.get(row["size"], {}).get("count")))
    path = write_csv("throughput", csv_rows)

    headers = ["stage (ms/case)"]
    for size in sizes:
        headers += [f"{size} T={SIZE_CLASSES[size]}", "%"]
    startup = max(results[s]["e2e"]["worker_startup_s"] for s in sizes)
    print_table(
        f"throughput: impl={impl.name} device={ns.device} vllm-lora K=8 E=64 B=16 L=8, "
        f"{repeats} run(s)/case, cases/class "
        + "/".join(str(results[s]["count"]) for s in sizes),
        headers, rows,
        [f"hypothesis generation: {draws} draws of strategies.cases(vllm-lora), mean "
         f"{hyp_routes:,.0f} routes/case; end-to-end = generation + Campaign.run_one through "
         f"a warm SandboxRunner (worker start-up {startup:.1f} s, excluded); its % is of the "
         "in-process total",
         f"verdicts: " + "; ".join(f"{s} {results[s]['verdicts']} / e2e "
                                   f"{results[s]['e2e']['verdicts']}" for s in sizes),
         f"total {time.perf_counter() - started:.1f} s; csv: {path}"])


if __name__ == "__main__":
    main()
