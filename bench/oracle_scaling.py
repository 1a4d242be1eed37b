"""How the oracle's time grows with the number of routes N and of slots L.

Random routing (topk 8 over E = 64 experts, B = 16), random token→slot map
with base tokens, production ``lora_ids`` and ``P``.  Prints one table of the
median wall time of ``oracle.align`` and ``oracle.lora_align`` per N (1k to
1M routes) and L (1 to 64), and the growth exponent of each column: the
slope of log(time) against log(N) over N >= 16k (1.0 is linear; below 16k a
fixed cost per call and per slot dominates).  Writes one CSV row per
measurement.

    python3 bench/oracle_scaling.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _common import print_table, write_csv

import oracle

NUM_ROUTES = [1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20]  # 1k … 1M
MAX_LORAS = [1, 8, 32, 64]
NUM_EXPERTS, BLOCK_SIZE, TOPK = 64, 16, 8
SLOPE_FROM = 1 << 14  # the exponent is fitted from here up


def median_ms(call, repeats: int) -> float:
    call()  # warm-up: first touch of the output pages
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(num_routes: int, rng: np.random.Generator, repeats: int) -> dict[str, float]:
    """Median ms per column ("align", "lora L=1", ...) at ``num_routes`` routes."""
    num_tokens = num_routes // TOPK
    topk_ids = rng.integers(0, NUM_EXPERTS, (num_tokens, TOPK), dtype=np.int32)
    times = {"align": median_ms(lambda: oracle.align(topk_ids, NUM_EXPERTS, BLOCK_SIZE),
                                repeats)}
    for max_loras in MAX_LORAS:
        mapping = rng.integers(-1, max_loras, num_tokens, dtype=np.int32)
        times[f"lora L={max_loras}"] = median_ms(
            lambda m=mapping, L=max_loras: oracle.lora_align(topk_ids, m, NUM_EXPERTS,
                                                             BLOCK_SIZE, L), repeats)
    return times


def exponent(sizes: list[int], times: list[float]) -> float | None:
    """Least-squares slope of log(time) on log(N) over the sizes >= SLOPE_FROM."""
    pts = [(np.log(n), np.log(t)) for n, t in zip(sizes, times) if n >= SLOPE_FROM and t > 0]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu",), default="cpu",
                        help="the oracle is NumPy: it runs on the CPU")
    parser.add_argument("--quick", action="store_true", help="up to 64k routes, 2 repeats")
    parser.add_argument("--repeats", type=int, help="timed calls per cell (default 5)")
    ns = parser.parse_args()
    sizes = [n for n in NUM_ROUTES if not ns.quick or n <= 1 << 16]
    repeats = ns.repeats or (2 if ns.quick else 5)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    per_size = {n: measure(n, rng, repeats) for n in sizes}
    columns = list(per_size[sizes[0]])
    csv_rows = [{"op": "align" if col == "align" else "lora_align", "num_routes": n,
                 "max_loras": 0 if col == "align" else int(col.split("=")[1]),
                 "median_ms": per_size[n][col], "num_experts": NUM_EXPERTS,
                 "block_size": BLOCK_SIZE, "topk": TOPK, "repeats": repeats}
                for n in sizes for col in columns]
    path = write_csv("oracle_scaling", csv_rows)
    rows = [[f"{n:,}"] + [f"{per_size[n][col]:.2f}" for col in columns] for n in sizes]
    slopes = [exponent(sizes, [per_size[n][col] for n in sizes]) for col in columns]
    rows.append([f"exponent (N >= {SLOPE_FROM:,})"] + ["-" if s is None else f"{s:.2f}"
                                                       for s in slopes])
    print_table(f"oracle median ms (E={NUM_EXPERTS}, B={BLOCK_SIZE}, topk={TOPK}, "
                f"{repeats} repeats)", ["N routes"] + columns, rows,
                ["exponent = slope of log(ms) on log(N); 1.00 is linear growth",
                 f"in L at N={sizes[-1]:,}: L={MAX_LORAS[-1]} costs "
                 f"{per_size[sizes[-1]][columns[-1]] / per_size[sizes[-1]][columns[1]]:.1f}x "
                 f"L={MAX_LORAS[0]} ({MAX_LORAS[-1] // MAX_LORAS[0]}x the slots)",
                 f"total {time.perf_counter() - started:.1f} s; csv: {path}"])


if __name__ == "__main__":
    main()
