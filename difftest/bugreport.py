"""Turn a minimised failure into ``DIR/bugs/<signature>/`` (report, case, repro)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .case import Case
from .checks import describe
from .evaluate import Evaluation
from .repro import repro_script


def title_of(impl_name: str, case: Case, evaluation: Evaluation) -> str:
    check = evaluation.primary_check or evaluation.verdict
    sizes = case.sizes()
    shape = ", ".join(f"{k}={v}" for k, v in sizes.items() if v is not None)
    return (f"{impl_name} ({case.dialect}): {describe(check)} "
            f"[{evaluation.verdict}, check {check}] on a {case.contract} case with {shape}")


def case_inputs(case: Case) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("topk_ids", "token_lora_mapping", "seg_indptr", "req_to_lora", "lora_ids",
                 "adapter_enabled", "expert_map"):
        value = getattr(case, name)
        if value is not None:
            out[name] = value.tolist()
    for name in ("num_experts", "block_size", "max_loras", "max_num_tokens_padded"):
        out[name] = getattr(case, name)
    if case.dialect == "sglang-align":  # SGLang's call flags
        out["pad_sorted_token_ids"] = case.pad_sorted_token_ids
        out["ignore_invalid_expert"] = case.ignore_invalid_expert
    if case.ep is not None:
        out["ep"] = (f"G={case.ep.global_num_experts}, R={case.ep.ep_size}, "
                     f"strategy={case.ep.strategy}, dispatch={case.ep.dispatch}, "
                     f"ranks={list(case.ep.ranks)}")
    return out


def write_failure_report(out_dir: Path, signature: str, impl: Any, case: Case,
                         evaluation: Evaluation, *, failure: Any = None, shrink: Any = None,
                         extra: dict | None = None) -> Path:
    import reports

    title = title_of(impl.name, case, evaluation)
    first = evaluation.mismatches[0] if evaluation.mismatches else None
    info = {
        "title": title,
        "impl": impl.name,
        "dialect": case.dialect,
        "contract": case.contract,
        "edge_classes": list(case.edge_classes),
        "case": case.to_dict(),
        "inputs": case_inputs(case),
        "first_difference": first.as_row() if first else {},
        "mismatches": [m.as_row() for m in evaluation.mismatches],
        "environment": reports.environment(),
        "repro_py": repro_script(case, impl.name, impl.stable, title, signature),
    }
    if shrink is not None:
        info["shrink_log"] = list(shrink.passes_applied) + [
            f"{shrink.calls} candidate runs in {shrink.elapsed_s:.1f} s; "
            f"{'1-minimal' if shrink.minimal else 'budget ran out before 1-minimality'}"]
    if failure is not None:
        info["cases_until_failure"] = failure.cases_until_failure
    if extra:
        info.update(extra)
    return Path(reports.write_bug_report(out_dir, signature, info))
