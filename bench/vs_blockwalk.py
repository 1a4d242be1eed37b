"""Against the usual way: a Python block walk versus ``difftest.evaluate``.

The check a typical upstream test does after the LoRA align kernel
(``tests/lora/test_moe_lora_align_sum.py`` style): for every slot, for every
block ``b < num_tokens_post_pad[slot] / B``, read ``expert_ids[b]`` as a Python
int; for each of the ``B`` positions of the block read ``sorted_token_ids`` as a
Python int, skip pads (``== N``), and check that ``topk_ids.flatten()[tok]`` is
that expert and that the token maps to that slot.  Faithfully, that is all it
checks: not the rows of unprocessed slots (their sentinels), not guard bands,
not the inputs, not pad values, not the inactive ``expert_ids`` blocks, not
that every route is present, and ``num_tokens_post_pad`` only as the loop
bound.  An exception from the call (or an ``IndexError`` inside the walk)
fails that test too, so it counts as flagged.

Two measurements, in one run:

1. time of each check on the same outputs of one prefill-sized case (T=16384,
   K=8 of E=64, B=16, L=8 with base tokens), run once by ``--impl`` (torch on
   CPU, cuda on GPU) through ``difftest.execute.run_case``: the block walk, and
   ``difftest.evaluate.evaluate`` with the oracle (``DIALECT_INFO.reference``)
   included and, separately, with the expected value given; as a ratio;
2. which shipped faults each check catches: every torch fault runs (in
   process, on CPU whatever ``--device``, as ``difftest selfcheck`` runs torch
   faults) on ~50 cases from ``difftest.strategies.cases``
   (fixed Hypothesis seed, both contracts, no EP/expert_map since the walk
   knows nothing of them, ``allow_large=False``); a fault counts as caught by a
   check when the check flags at least one case.  The correct torch
   implementation runs on the same cases for the false-alarm row.
   ``uneven-ep-truncates`` lives in ``ep-remap`` only, which has no align
   output to walk: the walk cannot catch it (ours runs on ep-remap cases).

    python3 bench/vs_blockwalk.py --device cuda
    python3 bench/vs_blockwalk.py --device cpu --quick

Prints one table and writes ``bench/results/vs_blockwalk.csv``.
"""

from __future__ import annotations

import time

import numpy as np
from _common import (
    base_parser,
    check_device,
    default_impl,
    fmt_ms,
    make_case,
    median_s,
    print_table,
    write_csv,
)


def blockwalk(topk_ids: np.ndarray, token_lora_mapping: np.ndarray, max_loras: int,
              block_size: int, max_num_tokens_padded: int, max_num_m_blocks: int,
              sorted_token_ids: np.ndarray, expert_ids: np.ndarray,
              num_tokens_post_pad: np.ndarray) -> str | None:
    """The usual check, in Python ints; the first complaint, or ``None``.

    Raises whatever a walk over garbage raises (``IndexError``): the caller
    counts that as flagged, like a test that errors.
    """
    flat_topk = topk_ids.reshape(-1).tolist()
    mapping = token_lora_mapping.tolist()
    sorted_ids = sorted_token_ids.tolist()
    experts = expert_ids.tolist()
    post_pad = num_tokens_post_pad.tolist()
    topk, pad = topk_ids.shape[1], len(flat_topk)
    P, M, B = max_num_tokens_padded, max_num_m_blocks, block_size
    for lora_idx in range(max_loras):
        for b in range(post_pad[lora_idx] // B):
            expert = experts[lora_idx * M + b]
            for j in range(B):
                tok = sorted_ids[lora_idx * P + b * B + j]
                if tok == pad:
                    continue
                if flat_topk[tok] != expert:
                    return (f"slot {lora_idx} block {b}: route {tok} has expert "
                            f"{flat_topk[tok]}, block says {expert}")
                if mapping[tok // topk] != lora_idx:
                    return (f"slot {lora_idx} block {b}: route {tok} belongs to slot "
                            f"{mapping[tok // topk]}")
    return None


def blockwalk_tensors(topk_ids, token_lora_mapping, max_loras: int, block_size: int,
                      max_num_m_blocks: int, sorted_token_ids, expert_ids) -> str | None:
    """The usual check as upstream tests write it: index the torch tensors element by
    element, every block of every slot (2-D views [L, P] and [L, M])."""
    flat_topk = topk_ids.view(-1)
    pad = flat_topk.numel()
    topk = topk_ids.shape[1]
    for lora_idx in range(max_loras):
        for b in range(max_num_m_blocks):
            expert = expert_ids[lora_idx][b]
            for j in range(block_size):
                tok = sorted_token_ids[lora_idx][b * block_size + j]
                if tok >= pad:
                    continue
                if flat_topk[tok] != expert:
                    return f"slot {lora_idx} block {b}: route {int(tok)} in the wrong block"
                if token_lora_mapping[tok // topk] != lora_idx:
                    return f"slot {lora_idx} block {b}: route {int(tok)} in the wrong slot"
    return None


def walk_tensors_run(case, run) -> str | None:
    import torch

    from difftest.dialects import DIALECT_INFO

    plan = DIALECT_INFO[case.dialect].plan(case, None)
    P, M = plan.arguments[5], plan.arguments[6]
    L = case.max_loras
    return blockwalk_tensors(
        torch.from_numpy(case.topk_ids), torch.from_numpy(case.token_lora_mapping), L,
        case.block_size, M, torch.from_numpy(run.outputs["sorted_token_ids"]).view(L, P),
        torch.from_numpy(run.outputs["expert_ids"]).view(L, M))


def walk_run(case, run) -> str | None:
    """The block walk over one ``RankRun`` of a vllm-lora case (flagged: a string)."""
    from difftest.dialects import DIALECT_INFO

    if run.error is not None:
        return f"call raised: {run.error.splitlines()[0]}"
    plan = DIALECT_INFO[case.dialect].plan(case, None)
    P, M = plan.arguments[5], plan.arguments[6]
    try:
        return blockwalk(case.topk_ids, case.token_lora_mapping, case.max_loras,
                         case.block_size, P, M, run.outputs["sorted_token_ids"],
                         run.outputs["expert_ids"], run.outputs["num_tokens_post_pad"])
    except IndexError as exc:
        return f"walk raised IndexError: {exc}"


def time_checks(impl, device: str, repeats: int, seed: int) -> dict:
    from difftest.evaluate import evaluate, expected_by_rank
    from difftest.execute import run_case
    from difftest.sandbox import Outcome

    case = make_case(np.random.default_rng(seed), 16384)
    runs = run_case(case, impl.load(), device)
    run = runs[0][0]
    outcome = Outcome(runs)
    expected = expected_by_rank(case)
    result: dict = {"case": case, "walk_verdict": walk_run(case, run) or "pass",
                    "ours_verdict": evaluate(case, outcome, stable=impl.stable).verdict}

    def med(call) -> float:
        return median_s(call, repeats)

    result["walk_s"] = med(lambda: walk_run(case, run))
    start = time.perf_counter()  # one run: it takes seconds
    walk_tensors_run(case, run)
    result["walk_tensors_s"] = time.perf_counter() - start
    result["ours_s"] = med(lambda: evaluate(case, outcome, stable=impl.stable))
    result["ours_compare_s"] = med(
        lambda: evaluate(case, outcome, stable=impl.stable, expected=expected))
    result["oracle_s"] = med(lambda: expected_by_rank(case))
    return result


def draw_cases(dialect: str, count: int, seed: int, max_examples: int) -> list:
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hseed

    from difftest.strategies import cases

    out: list = []

    class Enough(BaseException):
        pass

    @hseed(seed)
    @settings(max_examples=max_examples, phases=[Phase.generate], database=None,
              deadline=None, suppress_health_check=list(HealthCheck),
              verbosity=Verbosity.quiet)
    @given(cases(dialects=(dialect,), contracts=("production", "defensive"),
                 allow_large=False))
    def collect(case) -> None:
        if dialect == "vllm-lora" and (case.ep is not None or case.expert_map is not None):
            return
        out.append(case)
        if len(out) >= count:
            raise Enough

    try:
        collect()
    except Enough:
        pass
    return out


def fault_counts(device: str, count: int, seed: int) -> list[dict]:
    """Per torch fault (and the correct impl): cases flagged by each check."""
    from cuda_impl import FAULTS, torch_impl
    from difftest.evaluate import evaluate
    from difftest.execute import run_case
    from difftest.sandbox import Outcome

    names = [None] + [f for f, info in FAULTS.items() if "torch" in info.backends]
    case_sets: dict[str, list] = {}
    rows = []
    for fault in names:
        dialects = FAULTS[fault].dialects if fault else ("vllm-lora", "ep-remap")
        fns = torch_impl.implementation(fault)
        for dialect in [d for d in ("vllm-lora", "ep-remap") if d in dialects]:
            if dialect not in case_sets:
                case_sets[dialect] = draw_cases(dialect, count, seed, 20 * count)
            walk_flags = ours_flags = 0
            start = time.perf_counter()
            for case in case_sets[dialect]:
                runs = run_case(case, fns, device, 1)
                ours = evaluate(case, Outcome(runs), stable=torch_impl.STABLE)
                ours_flags += ours.verdict != "pass"
                if dialect == "vllm-lora":
                    walk_flags += walk_run(case, runs[0][0]) is not None
            rows.append({"fault": fault or "(correct torch)", "dialect": dialect,
                         "cases": len(case_sets[dialect]),
                         "walk_flagged": walk_flags if dialect == "vllm-lora" else None,
                         "ours_flagged": ours_flags,
                         "seconds": time.perf_counter() - start})
            if fault:
                break  # one dialect per fault: vllm-lora where it has it, else ep-remap
    return rows


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--impl", help="implementation timed on the prefill case "
                                       "(default: torch on cpu, cuda on cuda)")
    parser.add_argument("--cases", type=int,
                        help="generated cases per fault (default 200, --quick too)")
    parser.add_argument("--repeats", type=int, help="timing repeats (default 5, quick 2)")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args()
    check_device(ns.device)

    from difftest import registry

    impl = registry.resolve(ns.impl or default_impl(ns.device))
    started = time.perf_counter()
    t = time_checks(impl, ns.device, ns.repeats or (2 if ns.quick else 5), ns.seed)
    counts = fault_counts("cpu", ns.cases or 200, ns.seed)

    s = t["case"].sizes()
    size = f"T={s['T']} K={s['K']} E={s['E']} B={s['B']} L={s['L']} P={s['P']}"
    rows = [
        [f"prefill check ms ({size})", fmt_ms(t["walk_s"]), fmt_ms(t["ours_s"]),
         f"ours/walk {t['ours_s'] / t['walk_s']:.2f}x (incl. oracle)"],
        ["  walk as upstream tests write it (tensor indexing)", fmt_ms(t["walk_tensors_s"]),
         fmt_ms(t["ours_s"]), f"walk/ours {t['walk_tensors_s'] / t['ours_s']:.0f}x"],
        ["  ours, expected given", "", fmt_ms(t["ours_compare_s"]),
         f"ours/walk {t['ours_compare_s'] / t['walk_s']:.2f}x; oracle "
         f"{fmt_ms(t['oracle_s'])} ms"],
        [f"  verdict on {impl.name} output", t["walk_verdict"], t["ours_verdict"], ""],
    ]
    faults = [r for r in counts if r["fault"] != "(correct torch)"]
    for r in counts:
        walk = "n/a" if r["walk_flagged"] is None else f"{r['walk_flagged']}/{r['cases']}"
        label = ("false alarms: correct torch" if r["fault"] == "(correct torch)"
                 else f"fault {r['fault']}")
        note = f"{r['dialect']} cases flagged"
        if r["walk_flagged"] is None:
            note += " (no align output to walk)"
        rows.append([label, walk, f"{r['ours_flagged']}/{r['cases']}", note])
    walk_caught = sum(bool(r["walk_flagged"]) for r in faults)
    ours_caught = sum(bool(r["ours_flagged"]) for r in faults)
    rows.append(["faults caught", f"{walk_caught}/{len(faults)}",
                 f"{ours_caught}/{len(faults)}", "at least one case flagged"])

    csv_rows = [{"row": "timing", "impl": impl.name, "device": ns.device, **s,
                 "walk_ms": t["walk_s"] * 1e3, "ours_ms": t["ours_s"] * 1e3,
                 "walk_tensors_ms": t["walk_tensors_s"] * 1e3,
                 "ours_expected_given_ms": t["ours_compare_s"] * 1e3,
                 "oracle_ms": t["oracle_s"] * 1e3, "ratio_ours_over_walk":
                 t["ours_s"] / t["walk_s"], "walk_verdict": t["walk_verdict"],
                 "ours_verdict": t["ours_verdict"]}]
    csv_rows += [{"row": "fault", "impl": "torch", "device": "cpu", **r} for r in counts]
    path = write_csv("vs_blockwalk", csv_rows)
    print_table(f"block walk vs difftest.evaluate on {ns.device}", ["", "block walk", "ours",
                                                                     "note"], rows,
                [f"fault cases: strategies.cases, Hypothesis seed {ns.seed}, both contracts, "
                 "no EP/expert_map, allow_large=False; torch faults run in process on CPU",
                 f"total {time.perf_counter() - started:.1f} s; csv: {path}"])


if __name__ == "__main__":
    main()
