"""The floor: one launch + synchronise + copy-back, against end-to-end throughput.

For the size classes of ``bench/throughput.py`` (production ``vllm-lora``,
K=8 of E=64, B=16, L=8 with base tokens; decode T=32, mid T=1024, prefill
T=16384) this measures, in one run:

* the floor: the same kernel (``cuda_impl.cuda.implementation()["vllm-lora"]``
  on ``--device cuda``; the torch implementation on ``--device cpu``, labelled
  so) called on preallocated device buffers, then synchronised, then its
  three outputs copied back into preallocated host buffers (pinned on CUDA).
  Median wall time per iteration (``time.perf_counter``); on CUDA also the
  kernel alone between CUDA events;
* end-to-end throughput of cases of that size: generation → run → oracle →
  compare → record with a warm ``SandboxRunner`` (``--impl``, default cuda /
  torch), batched and pipelined as campaigns run them (``Campaign.dispatch``),
  and case by case (``Campaign.run_one``, one message per case);

and reports throughput as a fraction of the floor (floor time / time per
case).  A case runs its kernel ``repeats`` times (4 on CUDA, to expose races),
so the table also gives the fraction per launch (× repeats).

    python3 bench/floor.py --device cuda
    python3 bench/floor.py --device cpu --quick

Prints one table and writes ``bench/results/floor.csv``.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from _common import (
    SIZE_CLASSES,
    base_parser,
    check_device,
    default_impl,
    end_to_end,
    ensure_worker,
    fmt_ms,
    fmt_rate,
    make_case,
    print_table,
    write_csv,
)

ITERS = {"decode": 500, "mid": 300, "prefill": 100}
QUICK_ITERS = {"decode": 50, "mid": 30, "prefill": 5}
COUNTS = {"decode": 1024, "mid": 256, "prefill": 20}
QUICK_COUNTS = {"decode": 20, "mid": 10, "prefill": 3}


def floor_kernel(device: str):
    """(label, vllm-lora callable) of the floor measurement."""
    if device == "cuda":
        from cuda_impl import cuda

        return "cuda kernel", cuda.implementation()["vllm-lora"]
    from cuda_impl import torch_impl

    return "torch impl (CPU)", torch_impl.implementation()["vllm-lora"]


def measure_floor(fn, case, device: str, iters: int) -> dict:
    """Median seconds of launch + sync + copy-back on preallocated buffers."""
    import torch

    from difftest.dialects import DIALECT_INFO, TensorArg

    plan = DIALECT_INFO[case.dialect].plan(case, None)
    tensors = {name: torch.from_numpy(np.array(a, copy=True)).to(device)
               for name, a in plan.inputs.items()}
    hosts = {}
    for name, (shape, dtype) in {**plan.outputs, **plan.scratch}.items():
        tdtype = torch.int64 if dtype == np.int64 else torch.int32
        tensors[name] = torch.zeros(shape, dtype=tdtype, device=device)
        if name in plan.outputs:
            hosts[name] = torch.empty(shape, dtype=tdtype, pin_memory=device == "cuda")
    args = [tensors[a.name] if isinstance(a, TensorArg) else a for a in plan.arguments]
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def once() -> None:
        fn(*args)
        sync()
        for name, host in hosts.items():
            host.copy_(tensors[name], non_blocking=cuda)
        sync()

    for _ in range(max(3, iters // 20)):
        once()
    walls = []
    for _ in range(iters):
        start = time.perf_counter()
        once()
        walls.append(time.perf_counter() - start)
    out = {"floor_s": statistics.median(walls), "floor_min_s": min(walls), "kernel_s": None}
    if cuda:
        start_ev = torch.cuda.Event(enable_timing=True)
        stop_ev = torch.cuda.Event(enable_timing=True)
        kernel = []
        for _ in range(iters):
            start_ev.record()
            fn(*args)
            stop_ev.record()
            stop_ev.synchronize()
            kernel.append(start_ev.elapsed_time(stop_ev) / 1e3)
        out["kernel_s"] = statistics.median(kernel)
    return out


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--impl", help="end-to-end implementation (default: torch on cpu, "
                                       "cuda on cuda)")
    parser.add_argument("--sizes", default=",".join(SIZE_CLASSES))
    parser.add_argument("--count", type=int, help="end-to-end cases per size (200/100/20)")
    parser.add_argument("--iters", type=int, help="floor iterations per size (500/300/100)")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args()
    check_device(ns.device)

    from difftest import registry
    from difftest.sandbox import SandboxRunner

    impl = registry.resolve(ns.impl or default_impl(ns.device))
    repeats = impl.repeats(ns.device)
    label, fn = floor_kernel(ns.device)
    sizes = [s.strip() for s in ns.sizes.split(",") if s.strip()]
    counts, iters = (QUICK_COUNTS, QUICK_ITERS) if ns.quick else (COUNTS, ITERS)
    started = time.perf_counter()

    sandbox = SandboxRunner(impl, ns.device, timeout_s=120.0)
    startup = ensure_worker(sandbox, "vllm-lora")
    rows, csv_rows = [], []
    try:
        for k, size in enumerate(sizes):
            T = SIZE_CLASSES[size]
            case = make_case(np.random.default_rng(ns.seed + k), T)
            fl = measure_floor(fn, case, ns.device, ns.iters or iters[size])
            n = ns.count or counts[size]
            e2e = end_to_end(impl, ns.device, T, n, ns.seed + 100 + k, runner=sandbox)
            one = end_to_end(impl, ns.device, T, min(n, 200), ns.seed + 200 + k,
                             runner=sandbox, batch=1)
            frac = fl["floor_s"] / e2e["mean_s"]
            rows.append([f"{size} T={T}", fmt_ms(fl["kernel_s"]), fmt_ms(fl["floor_s"]),
                         fmt_rate(1 / fl["floor_s"]), fmt_rate(one["cases_per_s"]),
                         fmt_rate(e2e["cases_per_s"]), f"{100 * frac:.2f}%",
                         f"{100 * frac * repeats:.2f}%"])
            csv_rows.append({
                "size": size, "T": T, "floor_impl": label, "impl": impl.name,
                "device": ns.device, "repeats": repeats, "kernel_ms": (
                    fl["kernel_s"] * 1e3 if fl["kernel_s"] is not None else None),
                "floor_ms": fl["floor_s"] * 1e3, "floor_min_ms": fl["floor_min_s"] * 1e3,
                "floor_per_s": 1 / fl["floor_s"], "unbatched_cases_per_s": one["cases_per_s"],
                "e2e_cases_per_s": e2e["cases_per_s"], "e2e_ms": e2e["mean_s"] * 1e3,
                "fraction_of_floor": frac, "fraction_per_launch": frac * repeats,
                "iters": ns.iters or iters[size], "count": n,
                "verdicts": {**e2e["verdicts"]}, "unbatched_verdicts": one["verdicts"],
                "batch": e2e["batch"]})
    finally:
        sandbox.close()
    path = write_csv("floor", csv_rows)
    print_table(
        f"floor vs end-to-end: floor={label} on {ns.device}, end-to-end impl={impl.name} "
        f"({repeats} launch(es)/case), vllm-lora K=8 E=64 B=16 L=8",
        ["size", "kernel ms", "floor ms", "floor /s", "unbatched /s", "e2e cases/s",
         "e2e/floor", "x repeats"],
        rows,
        ["floor = launch + synchronise + copy-back of the 3 outputs into preallocated "
         "host buffers (median); kernel = CUDA events around the launch (GPU only)",
         f"e2e = generation + run via a warm SandboxRunner (start-up {startup:.1f} s "
         "excluded) + compare + record, batched and pipelined (Campaign.dispatch); "
         "unbatched = the same case by case (Campaign.run_one, at most 200 cases); "
         "e2e/floor = floor time / e2e time per case; x repeats = that times the launches per "
         "case",
         f"total {time.perf_counter() - started:.1f} s; csv: {path}"])


if __name__ == "__main__":
    main()
