"""End-to-end cases per second, and where the time of one case goes.

For three size classes of production ``vllm-lora`` cases (decode T=32, mid
T=1024, prefill T=16384; K=8 distinct experts of E=64, B=16, L=8 slots with
base tokens), built deterministically from a NumPy RNG (not Hypothesis: a
size class needs fixed sizes), cases go generate → run → oracle → compare →
record in batches (``--batch``; by default as ``Campaign.generate`` forms
them: ``_common.campaign_batch``, 64 decode, 8 mid or 1 prefill case), in
this process, with one timer per stage (per case = stage total / cases):

* generation  -- build and tag the cases (``bench/_common.make_case``);
* set-up      -- the call plans, one staged host array with guard bands and fills;
* transfer    -- that array host→device (one copy per batch), and each case's
  blocks back (one copy per case);
* kernel      -- every call of the batch (``repeats`` per case), one synchronisation
  per case (for this profile, apart from the copy back);
* inspection  -- guard bands, outputs and inputs read back from the host copy;
* oracle      -- ``DIALECT_INFO[d].reference`` for every rank;
* comparison  -- ``difftest.evaluate.evaluate`` with that expected value;
* logging     -- ``Campaign._record``: ``RunLog.add_case`` (+ ``add_mismatches``).

set-up, transfer, kernel and inspection are ``difftest.execute.run_batch``'s
own steps (its ``profile`` argument). Then, for the full cost including the
IPC to the sandbox worker, the same kind of cases go through a warm
``SandboxRunner`` and ``Campaign.dispatch``, pipelined as
``Campaign.generate`` runs them (end-to-end, batched), and one by one through
``Campaign.run_one`` (end-to-end, unbatched: one message, one upload and no
overlap per case, as before batching). One more row is the cost of
drawing one case from ``difftest.strategies.cases`` (Hypothesis, mixed
sizes), which is how campaigns get their cases.

    python3 bench/throughput.py --device cuda          # --impl cuda by default there
    python3 bench/throughput.py --device cpu --quick   # torch on CPU, small counts

Prints one table and writes ``bench/results/throughput.csv``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (
    SIZE_CLASSES,
    Stopwatch,
    base_parser,
    campaign_batch,
    check_device,
    default_impl,
    end_to_end,
    fmt_ms,
    fmt_rate,
    make_case,
    print_table,
    write_csv,
)

STAGES = ("generation", "set-up", "transfer", "kernel", "inspection", "oracle", "comparison",
          "logging")
COUNTS = {"decode": 1024, "mid": 256, "prefill": 20}
QUICK_COUNTS = {"decode": 64, "mid": 16, "prefill": 3}


def in_process(impl, fns, device: str, num_tokens: int, count: int, seed: int,
               repeats: int, batch: int) -> dict:
    """Stage seconds per case (means over ``count`` cases) and the verdicts."""
    from difftest.campaign import Campaign
    from difftest.dialects import DIALECT_INFO
    from difftest.evaluate import evaluate
    from difftest.execute import run_batch
    from difftest.sandbox import Outcome

    rng = np.random.default_rng(seed)
    verdicts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        campaign = Campaign(impl, None, Path(tmp), seed=seed)  # used for _record only
        done = -1  # the first batch warms up and is not counted
        while done < count:
            size = batch if done < 0 else min(batch, count - done)
            sw = Stopwatch()
            with sw("generation"):
                cases = [make_case(rng, num_tokens) for _ in range(size)]
            steps: dict[str, float] = {}
            result = run_batch(cases, fns, device, repeats, profile=steps)
            assert len(result) == len(cases), "a sticky device error stopped the batch"
            for case, runs in zip(cases, result):
                with sw("oracle"):
                    info = DIALECT_INFO[case.dialect]
                    expected = {rank: info.reference(case, rank) for rank in case.ranks()}
                outcome = Outcome.of(runs, "in-process")
                with sw("comparison"):
                    evaluation = evaluate(case, outcome, stable=impl.stable, expected=expected)
                with sw("logging"):
                    campaign._record(case, evaluation, outcome, seed)
                if done >= 0:
                    verdicts[evaluation.verdict] = verdicts.get(evaluation.verdict, 0) + 1
            if done < 0:
                totals = {s: 0.0 for s in STAGES}
                done = 0
                continue
            for stage, seconds in {**sw.totals, **steps}.items():
                totals[stage] += seconds
            done += size
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
    parser.add_argument("--count", type=int,
                        help="cases per size class (default 1024/256/20)")
    parser.add_argument("--batch", type=int,
                        help="cases per batch (default: as campaigns form them per size)")
    parser.add_argument("--repeats", type=int, help="runs per case (default: the impl's)")
    parser.add_argument("--draws", type=int, help="Hypothesis draws (default 200, quick 30)")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args()
    check_device(ns.device)

    from difftest import registry

    impl = registry.resolve(ns.impl or default_impl(ns.device))
    fns = impl.load()
    repeats = ns.repeats or impl.repeats(ns.device)
    sizes = [s.strip() for s in ns.sizes.split(",") if s.strip()]
    counts = QUICK_COUNTS if ns.quick else COUNTS
    started = time.perf_counter()

    results, batches = {}, {}
    for k, size in enumerate(sizes):
        T = SIZE_CLASSES[size]
        n = ns.count or counts[size]
        b = min(ns.batch or campaign_batch(T), n)
        batches[size] = b
        results[size] = in_process(impl, fns, ns.device, T, n, ns.seed + k, repeats, b)
        results[size]["e2e"] = end_to_end(impl, ns.device, T, n, ns.seed + 100 + k, batch=b)
        results[size]["e2e1"] = end_to_end(impl, ns.device, T, min(n, 200), ns.seed + 300 + k,
                                           batch=1)
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
    extra = {"in-process total": [], "in-process cases/s": [], "end-to-end batched": [],
             "end-to-end batched cases/s": [], "end-to-end unbatched": [],
             "end-to-end unbatched cases/s": []}
    for size in sizes:
        r = results[size]
        total = sum(r["per_case"].values())
        e2e, e2e1 = r["e2e"], r["e2e1"]
        extra["in-process total"] += [fmt_ms(total), "100%"]
        extra["in-process cases/s"] += [fmt_rate(1 / total), ""]
        extra["end-to-end batched"] += [fmt_ms(e2e["mean_s"]),
                                        f"{100 * e2e['mean_s'] / total:.0f}%"]
        extra["end-to-end batched cases/s"] += [fmt_rate(e2e["cases_per_s"]), ""]
        extra["end-to-end unbatched"] += [fmt_ms(e2e1["mean_s"]),
                                          f"{100 * e2e1['mean_s'] / total:.0f}%"]
        extra["end-to-end unbatched cases/s"] += [fmt_rate(e2e1["cases_per_s"]), ""]
        base = {"size": size, "T": SIZE_CLASSES[size]}
        csv_rows += [
            {**base, "row": "in-process total", "ms_per_case": total * 1e3, "share": 1.0,
             "cases_per_s": 1 / total, "verdicts": r["verdicts"]},
            {**base, "row": "end-to-end batched", "ms_per_case": e2e["mean_s"] * 1e3,
             "cases_per_s": e2e["cases_per_s"], "verdicts": e2e["verdicts"],
             "worker_startup_s": e2e["worker_startup_s"], "batch": e2e["batch"],
             "restarts": e2e["restarts"]},
            {**base, "row": "end-to-end unbatched", "ms_per_case": e2e1["mean_s"] * 1e3,
             "cases_per_s": e2e1["cases_per_s"], "verdicts": e2e1["verdicts"],
             "count": e2e1["count"], "batch": 1},
        ]
    rows += [[name] + values for name, values in extra.items()]
    rows.append(["hypothesis generation", fmt_ms(hyp_s), "(mixed)"] + ["", ""] * (len(sizes) - 1))
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
        f"{repeats} run(s)/case, batches of " + "/".join(str(batches[s]) for s in sizes)
        + ", cases/class "
        + "/".join(str(results[s]["count"]) for s in sizes),
        headers, rows,
        [f"hypothesis generation: {draws} draws of strategies.cases(vllm-lora), mean "
         f"{hyp_routes:,.0f} routes/case; end-to-end = generation + a warm SandboxRunner "
         f"(worker start-up {startup:.1f} s, excluded) + compare + record, batched "
         "(Campaign.dispatch, pipelined) or unbatched (Campaign.run_one, at most 200 cases); "
         "its % is of the in-process total",
         "verdicts: " + "; ".join(f"{s} {results[s]['verdicts']} / e2e "
                                  f"{results[s]['e2e']['verdicts']} / unbatched "
                                  f"{results[s]['e2e1']['verdicts']}" for s in sizes),
         f"total {time.perf_counter() - started:.1f} s; csv: {path}"])


if __name__ == "__main__":
    main()
