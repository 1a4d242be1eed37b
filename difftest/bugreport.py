"""Turn a minimised failure into ``DIR/bugs/<signature>/`` (report, case, repro)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .case import Case, rank_inputs
from .checks import describe
from .evaluate import Evaluation, faults_where_it_lands
from .limits import as_json as limits_json
from .repro import repro_files
from .shrink import compressed_log


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
    for name in ("num_experts", "block_size", "max_loras"):
        out[name] = getattr(case, name)
    if case.dialect != "ep-remap":
        out["max_num_tokens_padded"] = padding_text(case)
    if case.dialect == "sglang-align":  # SGLang's call flags
        out["pad_sorted_token_ids"] = case.pad_sorted_token_ids
        out["ignore_invalid_expert"] = case.ignore_invalid_expert
    if case.ep is not None:
        out["ep"] = (f"G={case.ep.global_num_experts}, R={case.ep.ep_size}, "
                     f"strategy={case.ep.strategy}, dispatch={case.ep.dispatch}, "
                     f"ranks={list(case.ep.ranks)}")
    return out


def confirmation_lines(failure: Any, case: Case, culprit: Case | None) -> list[str]:
    """What re-running the failure alone found, for the report (``case``/``culprit``: the
    reported, possibly shrunk, victim and culprit)."""
    from .campaign import CONFIRM_ATTEMPTS, CULPRIT_CANDIDATES

    c = getattr(failure, "confirmation", None)
    if c is None:
        if failure is not None and failure.evaluation.verdict == "flaky":
            return ["Counted as flaky without a re-run of its own: the first cases of its "
                    "signature did not fail alone."]
        if failure is not None:
            return ["Not confirmed alone: the run's budget left no time to re-run it."]
        return []
    if c.reproduced:
        if c.attempts == 0:
            return ["A timeout: confirmed by the sandbox on a fresh worker with a longer "
                    "budget."]
        return [f"Confirmed alone (a batch of its own, its own allocation, a fresh worker): "
                f"it failed the same way on re-run {c.attempts} of at most {CONFIRM_ATTEMPTS}."]
    lines = [f"Flaky: case `{failure.case.case_id}` failed as `{c.original}` in the campaign, "
             f"but not in {c.attempts} re-run(s) alone (a batch of its own, its own "
             "allocation, a fresh worker)."]
    if c.neighbours:
        lines.append("Ran before it in the same worker, nearest first: " + ", ".join(
            f"`{n.case.case_id}`" + (" (same batch)" if n.same_batch else "")
            for n in c.neighbours) + ".")
    if culprit is not None:
        lines.append(
            f"Culprit: case `{culprit.case_id}` leaves the kernel in a state, or writes "
            f"memory, that breaks case `{case.case_id}`: run right before it, as a batch of "
            f"the two, it makes it fail as `{c.original}`. `culprit.json` holds the culprit, "
            "`case.json` the victim; `python repro.py` runs the pair in that order.")
    else:
        tried = min(len(c.neighbours), CULPRIT_CANDIDATES)
        lines.append(f"No culprit: none of the {tried} nearest of them, run right before it, "
                     "made it fail the same way.")
    return lines


def padding_text(case: Case) -> str:
    """The ``P`` each call received and whether it is the production size (SPEC §2):
    ``"2 (the production size)"``, ``"9 (production: 4)"``; per rank for EP groups."""
    ranks = case.ranks()
    used = [rank_inputs(case, rank)["max_num_tokens_padded"] for rank in ranks]
    production = [rank_inputs(case.replace(max_num_tokens_padded=None), rank)[
        "max_num_tokens_padded"] for rank in ranks]
    def shown(values: list[int]) -> str:
        if len(set(values)) == 1:
            return str(values[0])
        return ", ".join(f"rank {r}: {v}" for r, v in zip(ranks, values))

    if used == production:
        return f"{shown(used)} (the production size)"
    return f"{shown(used)} (production: {shown(production)})"


def compact_case(case: Case, width: int = 240) -> str:
    """The case on one line for JUnit and the console: its sizes, then its inputs,
    cut at ``width`` characters: ``T=1 K=2 E=2 B=2 L=0 P=3 (production size);
    topk_ids=[[0, 0]]``."""
    sizes = case.sizes()
    shape = " ".join(f"{k}={v}" for k, v in sizes.items() if v is not None)
    inputs = case_inputs(case)
    if "max_num_tokens_padded" in inputs:
        shape += f" ({inputs['max_num_tokens_padded'].partition(' (')[2].rstrip(')')})"
    arrays = "; ".join(f"{k}={v}" for k, v in inputs.items() if isinstance(v, list))
    text = f"{shape}; {arrays}" if arrays else shape
    return text if len(text) <= width else text[:width - 1] + "…"


def write_failure_report(out_dir: Path, signature: str, impl: Any, case: Case,
                         evaluation: Evaluation, *, failure: Any = None, shrink: Any = None,
                         extra: dict | None = None, culprit: Case | None = None) -> Path:
    """``DIR/bugs/<signature>/`` for ``case``; with a ``culprit``, the pair (flaky)."""
    import reports

    title = title_of(impl.name, case, evaluation)
    repro_py, case_json = repro_files(case, impl.name, impl.stable, title, signature,
                                      culprit=culprit, libraries=impl.libraries)
    first = evaluation.mismatches[0] if evaluation.mismatches else None
    info = {
        "title": title,
        "impl": impl.name,
        "dialect": case.dialect,
        "contract": case.contract,
        "edge_classes": list(case.edge_classes),
        "case": case_json,
        "inputs": case_inputs(case),
        "verdict": evaluation.verdict,
        "first_difference": first.as_row() if first else {},
        "mismatches": [m.as_row() for m in evaluation.mismatches],
        "environment": reports.environment(),
        "repro_py": repro_py,
        "limits": limits_json(getattr(impl, "limits", None)),
    }
    confirmation = confirmation_lines(failure, case, culprit)
    if confirmation:
        info["confirmation"] = confirmation
    if culprit is not None:
        info["culprit_case"] = culprit.to_dict()
    if shrink is not None:
        info["shrink_log"] = compressed_log(shrink.passes_applied) + [
            f"{shrink.calls} candidate runs in {shrink.elapsed_s:.1f} s; "
            f"{'1-minimal' if shrink.minimal else 'budget ran out before 1-minimality'}"]
    if faults_where_it_lands(signature):
        from .sanitizer import unseen_elsewhere_note

        info["reproduce_note"] = (f"{unseen_elsewhere_note()} So `python repro.py` may print "
                                  "`ok` here (with this note); the re-run's output from this "
                                  "run, when it had time, is below.")
    if evaluation.frames:
        info["traceback"] = evaluation.frames
    if failure is not None:
        info["cases_until_failure"] = failure.cases_until_failure
    if extra:
        info.update(extra)
    return Path(reports.write_bug_report(out_dir, signature, info))
