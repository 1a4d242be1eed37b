"""How the oracle's time grows with the number of routes N and of slots L.

Random routing (topk 8 over E = 64 experts, B = 16), random token→slot map
with base tokens, production ``lora_ids`` and ``P``.  Prints one table of the
median wall time of ``oracle.align`` and ``oracle.lora_align`` and writes it,
one row per measurement, to ``bench/results/oracle_scaling.csv``.

    .venv/bin/python bench/oracle_scaling.py
"""

from __future__ import annotations

import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import oracle

NUM_ROUTES = [1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20]  # 1k … 1M
MAX_LORAS = [1, 8, 32, 64]
NUM_EXPERTS, BLOCK_SIZE, TOPK = 64, 16, 8
REPEATS = 5
CSV_PATH = Path(__file__).resolve().parent / "results" / "oracle_scaling.csv"


def median_ms(call) -> float:
    call()  # warm-up: first touch of the output pages
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(num_routes: int, rng: np.random.Generator) -> list[dict]:
    num_tokens = num_routes // TOPK
    topk_ids = rng.integers(0, NUM_EXPERTS, (num_tokens, TOPK), dtype=np.int32)
    rows = [
        {
            "op": "align",
            "num_routes": num_routes,
            "max_loras": 0,
            "median_ms": median_ms(lambda: oracle.align(topk_ids, NUM_EXPERTS, BLOCK_SIZE)),
        }
    ]
    for max_loras in MAX_LORAS:
        mapping = rng.integers(-1, max_loras, num_tokens, dtype=np.int32)
        rows.append(
            {
                "op": "lora_align",
                "num_routes": num_routes,
                "max_loras": max_loras,
                "median_ms": median_ms(
                    lambda m=mapping, L=max_loras: oracle.lora_align(
                        topk_ids, m, NUM_EXPERTS, BLOCK_SIZE, L
                    )
                ),
            }
        )
    return rows


def main() -> None:
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    rows = [row for n in NUM_ROUTES for row in measure(n, rng)]
    for row in rows:
        row.update(num_experts=NUM_EXPERTS, block_size=BLOCK_SIZE, topk=TOPK, repeats=REPEATS)

    CSV_PATH.parent.mkdir(parents=True, exist_ok=True)
    with CSV_PATH.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    headers = ["N routes", "align"] + [f"lora L={L}" for L in MAX_LORAS]
    print(f"oracle median ms (E={NUM_EXPERTS}, B={BLOCK_SIZE}, topk={TOPK}, {REPEATS} repeats)")
    print("  ".join(f"{h:>12}" for h in headers))
    for n in NUM_ROUTES:
        cells = [f"{n:>12,}"] + [f"{r['median_ms']:>12.2f}" for r in rows if r["num_routes"] == n]
        print("  ".join(cells))
    print(f"total {time.perf_counter() - started:.1f} s; csv: {CSV_PATH}")


if __name__ == "__main__":
    main()
