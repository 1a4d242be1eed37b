"""Time to catch each shipped fault, and the cost and result of minimising it.

For every fault the device ships (the torch faults, run on CPU as
``difftest selfcheck`` does; on ``--device cuda`` also the CUDA faults, on the
GPU), over ``--seeds`` seeds (default 10; ``--quick`` 2): a campaign
(``Campaign.generate(stop_on_failure=True, seconds=budget)``, both contracts,
the fault's dialects) runs until the first failing case, then that failure
is shrunk as a run shrinks it (``Campaign._shrink``: the same-signature
predicate, and a crash's or a hang's costly passes; no bug report written).
The table gives median and worst over seeds of: cases and seconds until the
first failure, minimisation seconds, and routes (T x K) of the minimal case.

One ``SandboxRunner`` per implementation is reused across its seeds; the
worker is started (and the implementation loaded, JIT build included) before
the clock of each seed starts, so worker start-up is NOT in the numbers.  A
worker restart inside a campaign or a shrink (after a crash) is.

    python3 bench/time_to_catch.py --device cuda
    python3 bench/time_to_catch.py --device cpu --quick

Prints one table and writes ``bench/results/time_to_catch.csv`` (one row per
implementation and seed).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from _common import base_parser, check_device, ensure_worker, print_table, write_csv


def implementations(device: str, only: list[str] | None,
                    backends: list[str] | None = None) -> list[tuple[str, str]]:
    """(impl name, device it runs on) for every fault of ``device`` (of ``backends``)."""
    from cuda_impl import FAULTS

    where = [("torch", "cpu")] + ([("cuda", "cuda")] if device == "cuda" else [])
    return [(f"{backend}:{fault}", dev) for backend, dev in where
            if not backends or backend in backends
            for fault, info in FAULTS.items()
            if backend in info.backends and (not only or fault in only)]


def one_seed(impl, runner, seed: int, budget_s: float, shrink_s: float, tmp: Path) -> dict:
    from difftest.campaign import Campaign

    ensure_worker(runner, impl.dialects[0])  # start-up stays out of the numbers
    campaign = Campaign(impl, runner, tmp / f"seed{seed}", seed=seed)
    start = time.monotonic()
    campaign.generate(dialects=impl.dialects, contracts=("production", "defensive"),
                      max_examples=None, seconds=budget_s, stop_on_failure=True)
    generate_s = time.monotonic() - start
    result = campaign.result
    row = {"seed": seed, "caught": bool(result.failures), "cases": result.cases,
           "seconds": generate_s}
    if result.failures:
        failure = min(result.failures.values(), key=lambda f: f.cases_until_failure)
        row.update(cases=failure.cases_until_failure, seconds=failure.seconds_until_failure,
                   signature=failure.signature, first_routes=failure.case.num_routes)
        _, _, shrunk = campaign._shrink(failure, shrink_s)  # as a run shrinks it
        s = shrunk.case.sizes()
        row.update(shrink_s=shrunk.elapsed_s, shrink_calls=shrunk.calls,
                   minimal=shrunk.minimal, min_routes=shrunk.case.num_routes,
                   min_case=" ".join(f"{k}={s[k]}" for k in "TKEBLR" if s[k]))
    campaign.log.close()
    return row


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--seeds", type=int, help="seeds per fault (default 10, quick 2)")
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="generation budget per seed (default 15; a fault not caught "
                             "by then counts as escaped for that seed)")
    parser.add_argument("--shrink-seconds", type=float, default=5.0,
                        help="shrink budget per seed (default 5; '1-min' says how many "
                             "shrinks finished inside it)")
    parser.add_argument("--faults", help="only these faults, comma-separated")
    parser.add_argument("--backends", help="only these backends, comma-separated (torch, cuda)")
    ns = parser.parse_args()
    check_device(ns.device)

    from difftest import registry
    from difftest.sandbox import SandboxRunner

    seeds = list(range(ns.seeds or (2 if ns.quick else 10)))
    only = [f.strip() for f in ns.faults.split(",")] if ns.faults else None
    backends = [b.strip() for b in ns.backends.split(",")] if ns.backends else None
    names = implementations(ns.device, only, backends)
    started = time.perf_counter()
    rows, csv_rows = [], []
    with tempfile.TemporaryDirectory(prefix="bench-ttc-") as tmp:
        for name, dev in names:
            impl = registry.resolve(name)
            per_seed = []
            with SandboxRunner(impl, dev, timeout_s=30.0) as runner:
                startup = ensure_worker(runner, impl.dialects[0])
                for seed in seeds:
                    r = one_seed(impl, runner, seed, ns.seconds, ns.shrink_seconds,
                                 Path(tmp) / name.replace(":", "_"))
                    per_seed.append(r)
                    csv_rows.append({"impl": name, "device": dev, "worker_startup_s": startup,
                                     "budget_s": ns.seconds,
                                     "shrink_budget_s": ns.shrink_seconds, **r})
            caught = [r for r in per_seed if r["caught"]]

            def med_max(key: str, fmt: str, rs=caught) -> tuple[str, str]:
                vals = [r[key] for r in rs]
                if not vals:
                    return "-", "-"
                return format(statistics.median(vals), fmt), format(max(vals), fmt)

            c_med, c_max = med_max("cases", ".0f")
            s_med, s_max = med_max("seconds", ".2f")
            k_med, k_max = med_max("shrink_s", ".2f")
            m_med, m_max = med_max("min_routes", ".0f")
            sigs = sorted({r["signature"].split("--", 1)[1] for r in caught})
            rows.append([name, f"{len(caught)}/{len(per_seed)}", c_med, c_max, s_med, s_max,
                         k_med, k_max, m_med, m_max,
                         sum(bool(r.get("minimal")) for r in caught), ",".join(sigs) or "-"])
            # the row as it is done, so that a run cut short still shows it
            print("  " + "  ".join(str(v) for v in rows[-1]), flush=True)
    path = write_csv("time_to_catch", csv_rows)
    print_table(
        f"time to catch: device={ns.device}, {len(seeds)} seeds, budget {ns.seconds:g} s/seed, "
        f"shrink budget {ns.shrink_seconds:g} s/seed (median / worst over caught seeds)",
        ["implementation", "caught", "cases", "worst", "s", "worst", "shrink s", "worst",
         "min routes", "worst", "1-min", "signature (verdict--check)"],
        rows,
        ["s = seconds until the first failure; shrink s = the failure shrunk as a run "
         "shrinks it (Campaign._shrink); min routes = T*K of the minimal case; 1-min = seeds "
         "whose shrink reached a 1-minimal case",
         "worker start-up (and JIT build) excluded: one warm SandboxRunner per "
         "implementation, re-warmed before each seed",
         f"total {time.perf_counter() - started:.1f} s; csv: {path}"])


if __name__ == "__main__":
    main()
