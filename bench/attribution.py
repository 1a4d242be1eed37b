"""What pinning damage on its writer costs: ``run_batch`` with and without attribution.

On CUDA the buffers of a batch share one allocation, so ``run_batch`` checks
after each case that no other case's bytes changed (``attribute``, on by
default there: one device copy of the case's block and one ``torch.equal`` of
the whole batch per case, see ``difftest.execute._Attribution``). On the CPU
it is off by default (each buffer is its own tensor); it is measured there
switched on, for comparison. For production ``vllm-lora`` cases of the decode
(T=32) and mid (T=1024) size classes, in batches as campaigns form them,
``repeats`` runs per case as campaigns use, each configuration runs the same
cases ``--rounds`` times, alternating, and the median per-case time of
``run_batch`` (set-up, transfer, calls, copy back, inspection) is shown.
On CUDA one more row times the pending-error peek done after every call
(``cudaPeekAtLastError``, a host-side read) per call.

    python3 bench/attribution.py --device cuda
    python3 bench/attribution.py --device cpu --quick

Prints one table and writes ``bench/results/attribution.csv``.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from _common import (
    SIZE_CLASSES,
    base_parser,
    campaign_batch,
    check_device,
    default_impl,
    make_case,
    print_table,
    write_csv,
)

COUNTS = {"decode": 512, "mid": 64}
QUICK_COUNTS = {"decode": 64, "mid": 8}


def per_case_s(fns, device: str, cases, batch: int, repeats: int, attribute: bool) -> float:
    from difftest.execute import run_batch

    start = time.perf_counter()
    for k in range(0, len(cases), batch):
        part = cases[k:k + batch]
        runs = run_batch(part, fns, device, repeats, attribute=attribute)
        assert len(runs) == len(part), "a sticky device error stopped the batch"
    return (time.perf_counter() - start) / len(cases)


def peek_s(calls: int) -> float:
    from difftest.execute import _pending_cuda_errors

    take = _pending_cuda_errors().take
    start = time.perf_counter()
    for _ in range(calls):
        take()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--sizes", default="decode,mid",
                        help="size classes, comma-separated (default decode,mid)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating rounds per configuration (default 5, quick 2)")
    ns = parser.parse_args()
    check_device(ns.device)
    from difftest import registry

    impl = registry.resolve(default_impl(ns.device))
    fns = impl.load()
    repeats = impl.repeats(ns.device)
    rounds = ns.rounds or (2 if ns.quick else 5)
    rows, table = [], []
    for size in ns.sizes.split(","):
        num_tokens = SIZE_CLASSES[size]
        count = (QUICK_COUNTS if ns.quick else COUNTS)[size]
        batch = campaign_batch(num_tokens)
        rng = np.random.default_rng(0)
        cases = [make_case(rng, num_tokens) for _ in range(count)]
        per_case_s(fns, ns.device, cases[:batch], batch, repeats, True)  # warm-up
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(rounds):
            for attribute in (False, True):
                times[attribute].append(
                    per_case_s(fns, ns.device, cases, batch, repeats, attribute))
        off, on = (statistics.median(times[a]) for a in (False, True))
        table.append([size, ns.device, batch, repeats, f"{off * 1e3:.3f}", f"{on * 1e3:.3f}",
                      f"{(on - off) * 1e6:+.1f}", f"{(on / off - 1) * 100:+.1f} %"])
        rows.append({"size": size, "device": ns.device, "batch": batch, "repeats": repeats,
                     "ms_per_case_without": off * 1e3, "ms_per_case_with": on * 1e3,
                     "verdicts": ""})
    notes = []
    if ns.device == "cuda":
        peek = peek_s(2000 if ns.quick else 20000)
        notes.append(f"pending-error peek after each call: {peek * 1e6:.2f} us per call "
                     f"({repeats} calls per case)")
        rows.append({"size": "peek", "device": ns.device, "us_per_call": peek * 1e6,
                     "verdicts": ""})
    else:
        notes.append("CPU: attribution is off by default (each buffer is its own tensor); "
                     "'with' switches it on")
    print_table(f"attribution: run_batch per case, {impl.name}, median of {rounds} rounds",
                ["size", "device", "batch", "repeats", "ms without", "ms with", "us/case",
                 "overhead"], table, notes)
    print(f"csv: {write_csv('attribution', rows)}")


if __name__ == "__main__":
    main()
