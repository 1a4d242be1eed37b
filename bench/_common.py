"""Shared pieces of the benchmarks: size classes, case building, timing, table and CSV.

Not a benchmark itself.  Every script imports it as ``from _common import ...``
(``bench/`` is the script's directory, so it is on ``sys.path``), and this
module puts the checkout root on ``sys.path`` so ``difftest``, ``oracle``,
``cuda_impl`` and ``reports`` import when run from a checkout.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout

# CSVs go to bench/results/ (git-ignored), or where DIFFTEST_BENCH_RESULTS says
RESULTS = Path(os.environ.get("DIFFTEST_BENCH_RESULTS")
               or Path(__file__).resolve().parent / "results")

# The size classes of the issue: decode (T <= 64), mid (T ~ 1k), prefill (T ~ 16k).
# Routing as in a real MoE layer: K distinct experts per token out of E, B = 16,
# L = 8 adapter slots, every token on a random slot or on the base model (-1).
SIZE_CLASSES: dict[str, int] = {"decode": 32, "mid": 1024, "prefill": 16384}
TOPK, NUM_EXPERTS, BLOCK_SIZE, MAX_LORAS = 8, 64, 16, 8


# -- command line ---------------------------------------------------------------------
def base_parser(doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device the implementation runs on (default cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes / few repetitions (a smoke run, < 1 min on CPU)")
    return parser


def check_device(device: str) -> None:
    """Exit with a message when ``--device cuda`` has no GPU (never imports torch on CPU
    paths more than needed)."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here")


def default_impl(device: str) -> str:
    return "cuda" if device == "cuda" else "torch"


def sync_fn(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


# -- cases ----------------------------------------------------------------------------
def make_case(rng: np.random.Generator, num_tokens: int, *, topk: int = TOPK,
              num_experts: int = NUM_EXPERTS, block_size: int = BLOCK_SIZE,
              max_loras: int = MAX_LORAS, seed: int | None = None):
    """A production ``vllm-lora`` case of ``num_tokens`` tokens from the NumPy ``rng``.

    ``topk`` distinct experts per token; ``token_lora_mapping`` uniform over
    ``[-1, L)`` (base tokens and, for T >> L, every slot); ``lora_ids`` and
    ``adapter_enabled`` left to the production layout.  Tagged like the
    strategies tag theirs (``contract_of``, ``edge_classes_of``), so the cost of
    tagging is part of generation.
    """
    from difftest.case import Case
    from difftest.classify import contract_of, edge_classes_of

    keys = rng.random((num_tokens, num_experts))
    topk_ids = np.argpartition(keys, topk - 1, axis=1)[:, :topk].astype(np.int32)
    mapping = rng.integers(-1, max_loras, num_tokens, dtype=np.int32)
    case = Case("vllm-lora", "production", topk_ids, num_experts, block_size,
                max_loras=max_loras, token_lora_mapping=mapping, seed=seed,
                note="bench")
    return case.replace(contract=contract_of(case), edge_classes=edge_classes_of(case))


def ensure_worker(runner: Any, dialect: str) -> float:
    """Make sure ``runner``'s sandbox worker is up (start-up kept out of timings).

    Returns the seconds spent (0.0 when a worker was already running).
    """
    if getattr(runner, "worker_pid", None) is not None:
        return 0.0
    from difftest.dialects import smallest_case

    start = time.perf_counter()
    runner.run(smallest_case(dialect))
    return time.perf_counter() - start


# -- end-to-end -----------------------------------------------------------------------
def campaign_batch(num_tokens: int, topk: int = TOPK) -> int:
    """Cases per batch as ``Campaign.generate`` forms them for cases of this size: a
    batch closes at ``BATCH_CASES`` cases or once it holds ``BATCH_ROUTES`` routes."""
    from difftest.campaign import BATCH_CASES, BATCH_ROUTES

    return min(BATCH_CASES, -(-BATCH_ROUTES // max(1, num_tokens * topk)))


def end_to_end(impl: Any, device: str, num_tokens: int, count: int, seed: int,
               runner: Any = None, batch: int | None = None) -> dict[str, Any]:
    """``count`` cases of ``num_tokens`` tokens through the campaign's own path.

    Generation (NumPy) + run in ``runner`` (a warm ``SandboxRunner`` when none is
    given: the worker start-up is measured once, apart) + oracle + compare +
    record.  ``batch`` = 1 runs case by case (``Campaign.run_one``: one message
    per case); otherwise cases go in batches of ``batch``
    through ``Campaign.dispatch``, pipelined as ``Campaign.generate`` does (the
    runner compares one batch while the worker runs the next); default
    :func:`campaign_batch`.  Returns seconds per case, cases/s,
    verdicts and the worker start-up time.
    """
    from difftest.campaign import Campaign
    from difftest.sandbox import SandboxRunner

    batch = batch or campaign_batch(num_tokens)
    own = runner is None
    if own:
        runner = SandboxRunner(impl, device, timeout_s=120.0)
    startup = ensure_worker(runner, "vllm-lora")
    rng = np.random.default_rng(seed)
    verdicts: dict[str, int] = {}

    def tally(evaluations: Sequence[Any]) -> None:
        for e in evaluations:
            verdicts[e.verdict] = verdicts.get(e.verdict, 0) + 1

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        campaign = Campaign(impl, runner, Path(tmp), seed=seed)
        # one untimed batch of this size first: allocator and page warm-up
        campaign.dispatch([make_case(rng, num_tokens) for _ in range(batch)])
        campaign.drain()
        start = time.perf_counter()
        if batch == 1:
            tally([campaign.run_one(make_case(rng, num_tokens), seed) for _ in range(count)])
        else:
            for first in range(0, count, batch):
                tally(campaign.dispatch([make_case(rng, num_tokens)
                                         for _ in range(min(batch, count - first))]))
            tally(campaign.drain())
        wall = time.perf_counter() - start
        campaign.log.close()
    if own:
        runner.close()
    return {"mean_s": wall / count, "cases_per_s": count / wall, "verdicts": verdicts,
            "worker_startup_s": startup, "count": count, "batch": batch,
            "restarts": getattr(runner, "restarts", 0)}


# -- timing ---------------------------------------------------------------------------
class Stopwatch:
    """Accumulates seconds per named stage: ``with sw("kernel"): ...``."""

    def __init__(self, sync: Callable[[], None] = lambda: None) -> None:
        self.totals: dict[str, float] = {}
        self.sync = sync
        self._name: str | None = None
        self._start = 0.0

    def __call__(self, name: str) -> Stopwatch:
        self._name = name
        return self

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sync()
        self.totals[self._name] = self.totals.get(self._name, 0.0) + (
            time.perf_counter() - self._start)


def median_s(call: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- output ---------------------------------------------------------------------------
def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
                notes: Sequence[str] = ()) -> None:
    """One fixed-width table: first column left-aligned, the rest right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths)))

    print(title)
    print(line(headers))
    print("-" * len(line(headers)))
    for row in cells:
        print(line(row))
    for note in notes:
        print(note)


def write_csv(name: str, rows: Sequence[dict[str, Any]]) -> Path:
    path = RESULTS / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def fmt_rate(per_s: float | None) -> str:
    if per_s is None:
        return "-"
    return f"{per_s:,.1f}" if per_s < 100 else f"{per_s:,.0f}"
