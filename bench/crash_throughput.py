"""Cases per second of a kernel that crashes on a share of its cases.

A kernel under development crashes a lot, and every crash kills its sandbox
worker. This measures what a crash costs a campaign: decode-sized production
``vllm-lora`` cases (``_common.make_case``: T=32, K=8 of E=64, B=16, L=8) go
through a warm ``SandboxRunner`` and ``Campaign.dispatch``, batched and
pipelined as ``Campaign.generate`` runs them, and a share of them (``--rates``,
default 20 %, 5 % and 0 %) is planted crashes. On the CPU the implementation is
the torch one except that it segfaults (a NULL read through ``ctypes``) on a
case of 31 tokens, and a planted case has 31. On CUDA it is
``cuda:no-slot-upper-guard``, and a planted case lists slot ``2**28`` in
``lora_ids``: the kernel writes that row, an illegal address.

Every case's verdict is checked (a planted case must be a ``crash``, every
other one a ``pass``); a wrong one ends the bench with exit 1. The table
gives cases/s for each rate, its share of the 0 % rate, the worker restarts
(one per crash), the cold starts (a replacement started when no spare was
there), the takeovers that found no spare ready yet, and the pool of warm
spares (at the start → at the end: it grows while crashes outrun it). The
note says how the workers came to be (forked from a zygote, or spawned after
a fallback, and why). Worker start-up before the first case is not timed.

    python3 bench/crash_throughput.py                  # CPU
    python3 bench/crash_throughput.py --device cuda    # H200

Prints one table and writes ``bench/results/crash_throughput.csv``.
"""

from __future__ import annotations

import ctypes
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (
    base_parser,
    campaign_batch,
    check_device,
    ensure_worker,
    fmt_rate,
    make_case,
    print_table,
    write_csv,
)

TOKENS, CRASH_TOKENS = 32, 31  # on the CPU a planted crash is a case of CRASH_TOKENS tokens
WILD_SLOT = 1 << 28  # on CUDA, a lora_ids entry that far past L
IMPL = {"cpu": "py:crash_throughput:crashes_on_31_tokens", "cuda": "cuda:no-slot-upper-guard"}


def crashes_on_31_tokens(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                         max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                         num_tokens_post_pad, adapter_enabled, lora_ids, expert_map=None):
    """The correct torch implementation, except that T = 31 kills the process (SIGSEGV)."""
    from cuda_impl import torch_impl

    if topk_ids.shape[0] == CRASH_TOKENS:
        ctypes.string_at(0)
    torch_impl.implementation()["vllm-lora"](
        topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
        max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
        num_tokens_post_pad, adapter_enabled, lora_ids, expert_map)


def planted_crash(rng: np.random.Generator, device: str, seed: int):
    """A case the implementation of ``device`` crashes on."""
    import oracle

    if device == "cpu":
        return make_case(rng, CRASH_TOKENS, seed=seed)
    case = make_case(rng, TOKENS, seed=seed)  # the faulty kernel writes row WILD_SLOT
    lora_ids = oracle.active_lora_ids(case.token_lora_mapping, case.max_loras)
    lora_ids[-1] = WILD_SLOT
    return case.replace(contract="defensive", lora_ids=lora_ids)


def measure(impl, device: str, rate: float, count: int, seed: int) -> dict:
    """``count`` cases, a share ``rate`` of them planted crashes, through a warm runner."""
    from difftest.campaign import Campaign
    from difftest.sandbox import SandboxRunner

    rng = np.random.default_rng(seed)
    crash = rng.random(count) < rate
    cases = [planted_crash(rng, device, i) if c else make_case(rng, TOKENS, seed=i)
             for i, c in enumerate(crash)]
    warm = [make_case(rng, TOKENS) for _ in range(campaign_batch(TOKENS))]
    batch = campaign_batch(TOKENS)
    with SandboxRunner(impl, device, timeout_s=120.0) as runner, \
            tempfile.TemporaryDirectory(prefix="bench-crash-") as tmp:
        ensure_worker(runner, "vllm-lora")
        campaign = Campaign(impl, runner, Path(tmp), seed=seed)
        campaign.dispatch(warm)  # untimed: allocator and page warm-up
        campaign.drain()
        runner.warm_up()  # the spare is loaded too
        restarts, cold, waits = runner.restarts, runner.cold_starts, runner.spare_waits
        pool = runner.pool_size
        evaluations = []
        start = time.perf_counter()
        for first in range(0, count, batch):
            evaluations += campaign.dispatch(cases[first:first + batch])
        evaluations += campaign.drain()
        wall = time.perf_counter() - start
        restarts, cold = runner.restarts - restarts, runner.cold_starts - cold
        waits, pool = runner.spare_waits - waits, f"{pool}→{runner.pool_size}"
        fallback = runner.fallback
        campaign.log.close()
    verdicts = [e.verdict for e in evaluations]
    expected = ["crash" if c else "pass" for c in crash]
    if verdicts != expected:
        wrong = next(i for i, (v, e) in enumerate(zip(verdicts, expected)) if v != e)
        raise SystemExit(f"rate {rate:.0%}: case {wrong} got {verdicts[wrong]!r}, "
                         f"expected {expected[wrong]!r}")
    return {"rate": rate, "cases": count, "crashes": int(crash.sum()), "seconds": wall,
            "cases_per_s": count / wall, "restarts": restarts, "cold_starts": cold,
            "spare_waits": waits, "pool": pool, "fallback": fallback}


def main() -> None:
    from difftest import registry

    parser = base_parser(__doc__)
    parser.add_argument("--rates", default="20,5,0",
                        help="crash rates in percent, comma-separated (default 20,5,0)")
    parser.add_argument("--count", type=int, default=None,
                        help="cases per rate (default 600; 120 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args()
    check_device(ns.device)
    try:
        rates = sorted({float(r) / 100 for r in ns.rates.split(",") if r.strip()}, reverse=True)
    except ValueError:
        parser.error(f"--rates {ns.rates!r}: expected percentages like 20,5,0")
    if not rates or not all(0 <= r <= 1 for r in rates):
        parser.error(f"--rates {ns.rates!r}: each rate must be between 0 and 100")
    count = ns.count or (120 if ns.quick else 600)
    impl = registry.resolve(IMPL[ns.device], "vllm-lora")
    results = [measure(impl, ns.device, rate, count, ns.seed + i) for i, rate in enumerate(rates)]
    clean = next((r["cases_per_s"] for r in results if r["rate"] == 0), None)
    rows, csv_rows = [], []
    for r in results:
        share = f"{r['cases_per_s'] / clean:.0%}" if clean else "-"
        rows.append([f"{r['rate']:.0%}", r["cases"], r["crashes"], f"{r['seconds']:.2f}",
                     fmt_rate(r["cases_per_s"]), share, r["restarts"], r["cold_starts"],
                     r["spare_waits"], r["pool"]])
        csv_rows.append({**r, "share_of_clean": r["cases_per_s"] / clean if clean else None,
                         "device": ns.device})
    path = write_csv("crash_throughput", csv_rows)
    print_table(f"cases/s of a kernel that crashes on a share of its cases, on {ns.device}",
                ["crash rate", "cases", "crashes", "seconds", "cases/s", "of 0 %",
                 "restarts", "cold starts", "spare waits", "pool"], rows,
                [f"T={TOKENS} production vllm-lora cases, impl={IMPL[ns.device]} (planted "
                 + (f"crashes T={CRASH_TOKENS}" if ns.device == "cpu" else
                    f"crashes lora_ids[L] = {WILD_SLOT}") + "), "
                 f"batches of {campaign_batch(TOKENS)} through Campaign.dispatch; csv: {path}",
                 workers_note(ns.device, [r["fallback"] for r in results])])


def workers_note(device: str, fallbacks: list) -> str:
    """How the workers came to be: forks of a zygote (the plan of ``device``), or
    spawned interpreters after a fallback, and why."""
    from difftest.sandbox import plan_for

    plan = plan_for(device)
    why = next((f for f in fallbacks if f), None)
    if why:
        return f"workers: spawned interpreters (fallback: {why})"
    return (f"workers: forked from a zygote ({'it' if plan.load_in_zygote else 'each worker'}"
            f" loads the implementation), {plan.spares} warm spares growing to at most "
            f"{plan.max_spares}")


if __name__ == "__main__":
    main()
