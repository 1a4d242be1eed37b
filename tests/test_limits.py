"""Declared limits, the ``rejected`` verdict, distinct signatures and internal errors (exit 3).

Issue 13 §2, §3 and §5: a kernel's declared input domain is respected (and its
clean rejections outside it are not failures), distinct bugs get distinct
reports, and a bug of difftest itself is exit 3, never a kernel failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import limit_impls
import numpy as np
import pytest

from difftest import limits as domain
from difftest import registry
from difftest.api import check_callable
from difftest.campaign import PROBES_PER_RUN
from difftest.case import Case, EPGroup
from difftest.cli import shard_seed
from difftest.errors import UsageError
from difftest.evaluate import crash_kind, error_class, evaluate
from difftest.sandbox import InProcessRunner

TESTS = Path(__file__).resolve().parent
LIMITS = {"num_experts": (1, limit_impls.LIMIT_E)}


def _cli(*args, env_extra=None, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "difftest", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def _align_case(num_experts, ids=((0,),), **kw):
    return Case(dialect="align", contract="production",
                topk_ids=np.asarray(ids, dtype=np.int32), num_experts=num_experts,
                block_size=1, **kw)


def _evaluate(fn, case, limits):
    runner = InProcessRunner(registry.resolve("torch", "align"), "cpu",
                             callables={"align": fn})
    return evaluate(case, runner.run(case), stable=False, limits=limits)


# -- the limits module ------------------------------------------------------------------
def test_limit_syntax_names_and_bounds():
    assert domain.parse("num_experts=1:992") == ("num_experts", (1, 992))
    assert domain.parse("num_experts=:992") == ("num_experts", (0, 992))
    assert domain.parse("topk=2:") == ("topk", (2, domain.UNBOUNDED))
    assert domain.parse_all(["topk=1:4", "topk=2:3"]) == {"topk": (2, 3)}  # the last wins
    for bad, why in [("num_experts", "expected NAME=MIN:MAX"),
                     ("num_experts=5", "expected NAME=MIN:MAX"),
                     ("num_experts=a:b", "must be integers"),
                     ("num_experts=9:3", "need 0 <= min <= max"),
                     ("experts=1:9", "unknown limit name 'experts'; known names: num_tokens, "
                                     "topk, num_experts, block_size, max_loras, "
                                     "max_num_tokens_padded, num_routes, ep_size")]:
        with pytest.raises(UsageError, match=why):
            domain.parse(bad)
    with pytest.raises(UsageError, match="must be \\(min, max\\)"):
        domain.validate({"topk": 4})


def test_a_case_is_measured_as_each_call_sees_it():
    case = Case(dialect="align", contract="production",
                topk_ids=np.zeros((3, 2), np.int32), num_experts=8, block_size=4,
                ep=EPGroup(8, 2, dispatch="local_ids"))
    sizes = domain.sizes(case)
    assert sizes["num_experts"] == (4,)  # each rank's call sees its local count
    assert (sizes["num_tokens"], sizes["topk"], sizes["num_routes"], sizes["ep_size"]) == (
        (3,), (2,), (6,), (2,))
    assert "max_loras" not in sizes  # align has no slots: the limit does not apply
    assert domain.violations(case, {"num_experts": (1, 3), "num_routes": (7, 9),
                                    "max_loras": (1, 1)}) == [
        "num_experts=4 > 3", "num_routes=6 < 7"]
    assert domain.in_domain(case, {"num_experts": (1, 4)})


def test_the_registry_reads_declared_limits_and_the_cuda_backend_declares_max_experts():
    from cuda_impl import cuda

    assert registry.resolve("py:limit_impls:rejects_many_experts").limits == LIMITS
    assert registry.resolve("py:limit_impls:rejects_many_experts_undeclared").limits == {}
    assert registry.resolve("cuda").limits == {"num_experts": (1, cuda.MAX_EXPERTS)}
    assert registry.resolve("torch").limits == {}
    impl = registry.resolve("py:limit_impls:rejects_many_experts").with_limits(
        {"topk": (1, 4)})
    assert impl.limits == {**LIMITS, "topk": (1, 4)}
    with pytest.raises(UsageError, match="unknown limit name 'experts'; known names"):
        registry.resolve("py:limit_impls:unknown_limit_name")


# -- verdicts outside the domain -----------------------------------------------------------
def test_a_clean_rejection_outside_the_domain_is_rejected_not_a_failure():
    case = _align_case(201)
    ev = _evaluate(limit_impls.rejects_many_experts, case, LIMITS)
    assert (ev.verdict, ev.failed, ev.signature(case)) == ("rejected", False, None)
    assert "num_experts=201 > 200" in ev.detail and "RuntimeError" in ev.detail
    # the same exception inside the domain (here: none declared) stays a failure
    ev = _evaluate(limit_impls.rejects_many_experts, case, {})
    assert ev.verdict == "error" and ev.failed
    assert ev.signature(case) == "align--error--RuntimeError--num_experts-must-be-at-most-N-got-N"


def test_a_rejection_that_writes_first_is_an_unclean_rejection():
    case = _align_case(201)
    ev = _evaluate(limit_impls.writes_then_rejects, case, LIMITS)
    assert ev.verdict == "mismatch"
    assert ev.checks_failed == ["unclean_rejection"]
    assert "wrote num_tokens_post_pad[0] = 0" in ev.mismatches[0].message
    assert ev.signature(case) == "align--mismatch--unclean_rejection"


def test_an_out_of_domain_case_that_runs_right_passes_and_one_that_runs_wrong_fails():
    case = _align_case(17)
    ev = _evaluate(limit_impls.accepts_everything_declares_little, case, {"num_experts": (1, 16)})
    assert ev.verdict == "pass"

    def wrong(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
              num_tokens_post_pad, expert_map=None):
        limit_impls._align(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                           num_tokens_post_pad, expert_map)
        num_tokens_post_pad.fill_(0)

    ev = _evaluate(wrong, case, {"num_experts": (1, 16)})
    assert ev.verdict == "mismatch" and ev.checks_failed == ["num_tokens_post_pad"]


# -- signatures --------------------------------------------------------------------------
@pytest.mark.parametrize("raised, expected", [
    ("RuntimeError: padded_num_experts must be less than 1024",
     "RuntimeError--padded_num_experts-must-be-less-than-N"),
    ("torch.AcceleratorError: CUDA error: invalid argument\nSearch for `cudaErrorInvalid...",
     "AcceleratorError--CUDA-error-invalid-argument"),
    ("ValueError: bad pointer 0x7f3a00ff in /tmp/x/kernel.py line 12 (shape [4, 8])",
     "ValueError--bad-pointer-ADDR-in-PATH-line-N-shape-N-N"),
    ("NotImplementedError", "NotImplementedError"),
    ("launch error left pending by the call: invalid argument",
     "launch-error-left-pending-by-the-call-invalid-argument"),
])
def test_error_classes_mask_numbers_addresses_and_paths(raised, expected):
    assert error_class(raised) == expected


def test_a_long_message_is_cut_at_a_word():
    cls = error_class("RuntimeError: " + "word " * 40)
    assert len(cls) <= len("RuntimeError--") + 60 and not cls.endswith("-")


# What torch appends to every CUDA error it raises (the hint names device-side assertions
# whatever the error was).
_TORCH_HINTS = ("\nSearch for `cudaError{name}' in https://docs.nvidia.com/cuda/cuda-runtime-api/"
                "group__CUDART__TYPES.html for more information.\nCUDA kernel errors might be "
                "asynchronously reported at some other API call, so the stacktrace below might "
                "be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\nCompile "
                "with `TORCH_USE_CUDA_DSA` to enable device-side assertions.")


@pytest.mark.parametrize("detail, kind", [
    ("sticky: torch.AcceleratorError: CUDA error: an illegal memory access was encountered",
     "cuda-illegal-address"),
    ("sticky device error (the context is unusable): torch.AcceleratorError: CUDA error: an "
     "illegal memory access was encountered" + _TORCH_HINTS.format(name="IllegalAddress"),
     "cuda-illegal-address"),
    # The same wild write at another address: the other error (both seen for one case on
    # the H200, run after run): one bug, one kind.
    ("sticky device error (the context is unusable): torch.AcceleratorError: CUDA error: "
     "operation not supported on global/shared address space"
     + _TORCH_HINTS.format(name="InvalidAddressSpace"), "cuda-illegal-address"),
    ("an error of another caller: cudaErrorInvalidAddressSpace", "cuda-illegal-address"),
    ("torch.AcceleratorError: CUDA error: device-side assert triggered"
     + _TORCH_HINTS.format(name="Assert"), "cuda-device-side-assert"),
    ("torch.AcceleratorError: CUDA error: an illegal instruction was encountered"
     + _TORCH_HINTS.format(name="IllegalInstruction"), "cuda-illegal-instruction"),
    ("RuntimeError: CUDA error: an illegal instruction was encountered",
     "cuda-illegal-instruction"),
    ("CUDA error: misaligned address", "cuda-misaligned-address"),
    ("CUDA error: unspecified launch failure", "cuda-launch-failure"),
    ("CUDA error: too many resources requested for launch",
     "cuda-too-many-resources-requested-for-launch"),
    ("worker died: killed by signal SIGSEGV; stderr tail:\nSegmentation fault", "sigsegv"),
    ("worker died: killed by signal SIGBUS", "sigbus"),
    ("worker died: killed by signal SIGABRT", "sigabrt"),
    ("worker died: killed by signal SIGKILL", "killed"),
    ("worker died: exit code 7", "exit-7"),
    ("x", "crash"),
])
def test_crash_kinds(detail, kind):
    assert crash_kind(detail) == kind


def test_two_unrelated_errors_get_two_reports(tmp_path):
    check = check_callable(limit_impls.two_errors, "align", seconds=60, max_examples=400,
                           seed=0, out_dir=tmp_path, shrink_seconds=10, database=None)
    signatures = sorted(check.result.failures)
    assert signatures == [
        "align--error--RuntimeError--padded_num_experts-must-be-less-than-N-got-N",
        "align--error--ValueError--launch-at-ADDR-invalid-argument",
    ]
    assert sorted(p.name for p in (tmp_path / "bugs").iterdir()) == signatures
    too_many, empty = (check.result.minimal[s][0] for s in signatures)
    assert too_many.num_experts == 101 and empty.num_tokens == 0


# -- campaigns with limits ----------------------------------------------------------------
def test_a_limit_declaring_kernel_is_clean_and_its_probes_are_rejected(tmp_path):
    check = check_callable(limit_impls.rejects_many_experts, "align", seconds=60,
                           max_examples=300, seed=0, out_dir=tmp_path, shrink_seconds=5,
                           database=None)
    assert check.passed, str(check)
    verdicts = check.result.verdicts
    assert verdicts.get("rejected", 0) >= PROBES_PER_RUN
    assert set(verdicts) == {"pass", "rejected"}
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "cases.parquet").to_pandas()
    assert (table[table.verdict == "rejected"].E > limit_impls.LIMIT_E).all()
    assert (table[table.verdict == "pass"].E <= limit_impls.LIMIT_E).all()
    assert (table.E == limit_impls.LIMIT_E).any()  # cases aim at the declared bound
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["limits"] == {"num_experts": [1, limit_impls.LIMIT_E]}
    summary = (tmp_path / "summary.html").read_text()
    assert (f"Declared domain: num_experts 1..{limit_impls.LIMIT_E}; out-of-domain probes "
            f"rejected cleanly: {verdicts['rejected']}") in summary
    assert check.result.cases == len(table)


def test_the_undeclared_twin_fails_with_an_error_signature_naming_the_message(tmp_path):
    check = check_callable(limit_impls.rejects_many_experts_undeclared, "align", seconds=60,
                           max_examples=300, seed=0, out_dir=tmp_path, shrink_seconds=5,
                           database=None)
    assert list(check.result.failures) == [
        "align--error--RuntimeError--num_experts-must-be-at-most-N-got-N"]
    # and with limits= the twin is clean again
    check = check_callable(limit_impls.rejects_many_experts_undeclared, "align", seconds=60,
                           max_examples=100, seed=0, out_dir=tmp_path / "b", shrink_seconds=5,
                           database=None, limits={"num_experts": (None, limit_impls.LIMIT_E)})
    assert check.passed and check.result.verdicts.get("rejected", 0) >= PROBES_PER_RUN


def test_an_unclean_rejection_is_reported_with_its_domain(tmp_path):
    check = check_callable(limit_impls.writes_then_rejects, "align", seconds=60,
                           max_examples=100, seed=0, out_dir=tmp_path, shrink_seconds=5,
                           database=None)
    sig = "align--mismatch--unclean_rejection"
    assert list(check.result.failures) == [sig]
    report = (tmp_path / "bugs" / sig / "report.md").read_text()
    assert "- Declared domain: `num_experts=1:200`" in report
    assert "--impl py:limit_impls:writes_then_rejects --limit num_experts=1:200" in report


def test_limit_on_the_command_line(tmp_path):
    out = tmp_path / "run"
    done = _cli("run", "--impl", "py:limit_impls:rejects_many_experts_undeclared",
                "--limit", f"num_experts=1:{limit_impls.LIMIT_E}", "--max-examples", "60",
                "--seed", "1", "--out", out, "--no-db", "--in-process", "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"declared domain: num_experts 1..{limit_impls.LIMIT_E} (" in done.stdout
    assert "out-of-domain probe(s) rejected cleanly" in done.stdout
    assert not list(out.glob("cases/*.json"))  # a rejected probe is no failing case


@pytest.mark.parametrize("args, message", [
    (["--limit", "experts=1:8"], "difftest: --limit 'experts=1:8': unknown limit name "
                                 "'experts'; known names: num_tokens, topk, num_experts"),
    (["--limit", "num_experts"], "difftest: --limit 'num_experts': expected NAME=MIN:MAX"),
    (["--limit", "num_experts=x:1"], "difftest: --limit 'num_experts=x:1': MIN and MAX must "
                                     "be integers"),
])
def test_a_bad_limit_is_a_usage_error_of_one_line(args, message, tmp_path):
    done = _cli("run", "--impl", "torch", "--dialect", "align", *args, "--max-examples", "5",
                "--out", tmp_path / "run", "--no-db")
    assert done.returncode == 2
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr


def test_an_unknown_name_in_difftest_limits_is_a_usage_error(tmp_path):
    done = _cli("run", "--impl", "py:limit_impls:unknown_limit_name", "--max-examples", "5",
                "--out", tmp_path / "run", "--no-db")
    assert done.returncode == 2
    assert "unknown limit name 'experts'; known names: num_tokens" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


# -- internal errors ----------------------------------------------------------------------
# Put into the child interpreters by sitecustomize: the generator's EP step raises on its
# BREAK_AT-th call, in the process whose command line has --seed BREAK_SEED (every
# process when BREAK_SEED is empty).
_SITECUSTOMIZE = textwrap.dedent('''
    import os, sys
    seed = os.environ.get("BREAK_SEED", "")
    if os.environ.get("BREAK_AT") and (not seed or seed in sys.argv):
        import difftest.strategies._case as strategies
        calls = [0]
        original = strategies._draw_ep
        def broken(draw, plan):
            calls[0] += 1
            if calls[0] == int(os.environ["BREAK_AT"]):
                raise KeyError("injected bug of the generator")
            return original(draw, plan)
        strategies._draw_ep = broken
''')


def _break_env(tmp_path, at, seed=""):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.pathsep.join([str(site), str(TESTS), str(TESTS.parent)])
    return {"PYTHONPATH": path, "BREAK_AT": str(at), "BREAK_SEED": seed}


def test_an_internal_error_is_exit_3_with_one_line_and_the_cases_before_it_kept(tmp_path):
    out = tmp_path / "run"
    done = _cli("run", "--impl", "torch", "--dialect", "align", "--max-examples", "200",
                "--seed", "4", "--out", out, "--no-db", "--in-process", "--quiet",
                env_extra=_break_env(tmp_path, 40))
    assert done.returncode == 3, done.stdout + done.stderr
    line = done.stderr.strip()
    assert "\n" not in line
    saved = out / "internal-error.txt"
    head, draw, tail = line.partition(", draw ")
    assert head == (
        "difftest: internal error of difftest (not a failure of the implementation): the case "
        "generator raised KeyError: 'injected bug of the generator'; reproduce with seed 4")
    draw, _, tail = tail.partition(";")
    assert tail == f" traceback in {saved}"
    assert "Traceback" in saved.read_text() and "injected bug" in saved.read_text()
    run = json.loads((out / "run.json").read_text())
    # every case drawn before the broken draw was run and recorded, once (a case drawn
    # again is skipped: a case id runs once per run)
    assert int(draw) - 1 >= 30
    drawn = int(draw) - 1 - run["duplicates_skipped"]
    assert run["cases"] == drawn and run["verdicts"] == {"pass": drawn}
    assert len((out / "cases.jsonl").read_text().splitlines()) == drawn


def test_an_internal_error_of_one_worker_keeps_the_others_results(tmp_path):
    out = tmp_path / "run"
    broken_seed = str(shard_seed(4, (1, 2)))
    done = _cli("run", "--impl", "torch", "--dialect", "align", "--max-examples", "30",
                "--seed", "4", "--workers", "2", "--out", out, "--no-db", "--in-process",
                env_extra=_break_env(tmp_path, 10, broken_seed))
    assert done.returncode == 3, done.stdout + done.stderr
    saved = out / "parts" / "worker-1" / "internal-error.txt"
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("difftest: internal error of difftest (not a failure of the "
                           "implementation): worker 1 of 2 stopped: the case generator raised "
                           "KeyError")
    assert last.endswith(f"reproduce with seed {broken_seed}; traceback in {saved}")
    run = json.loads((out / "run.json").read_text())
    assert run["exit_codes"] == [0, 3]
    parts = [json.loads((out / "parts" / f"worker-{i}" / "run.json").read_text())["cases"]
             for i in (0, 1)]
    assert parts[0] == 30 and 5 <= parts[1] < 10  # worker 1's cases before the bug, kept
    assert run["cases"] == sum(parts)
    assert len((out / "cases.jsonl").read_text().splitlines()) == sum(parts)


def test_a_bug_of_ours_raising_value_error_is_not_a_usage_error(tmp_path, monkeypatch):
    from difftest import cli

    def broken(ns):
        raise ValueError("an internal ValueError")

    monkeypatch.setitem(cli._COMMANDS, "list", broken)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["list"]) == 3
    saved = list((tmp_path / ".difftest" / "internal-errors").glob("*/internal-error.txt"))
    assert len(saved) == 1 and "an internal ValueError" in saved[0].read_text()


def test_an_oracle_argument_error_in_a_replayed_case_is_a_usage_error(tmp_path):
    case = _align_case(4, max_num_tokens_padded=0)  # P smaller than the production size
    path = tmp_path / "case.json"
    path.write_text(case.to_json())
    done = _cli("replay", path, "--impl", "torch")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("difftest: ") and "max_num_tokens_padded=0" in done.stderr
    assert done.stderr.count("\n") == 1


def test_signatures_per_dialect_are_capped_and_the_rest_counted(tmp_path, monkeypatch):
    from difftest import campaign

    monkeypatch.setattr(campaign, "MAX_SIGNATURES_PER_DIALECT", 3)
    check = check_callable(limit_impls.many_errors, "align", seconds=60, max_examples=150,
                           seed=0, out_dir=tmp_path, shrink_seconds=1, database=None)
    result = check.result
    assert len(result.failures) == 3 and len(list((tmp_path / "bugs").iterdir())) == 3
    assert len(result.capped) >= 5 and not set(result.capped) & set(result.failures)
    assert all(s.startswith("align--error--RuntimeError--code-") for s in result.capped)
    assert sum(f.count for f in result.failures.values()) + sum(result.capped.values()) == (
        result.cases)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["signatures_over_cap"] == result.capped
    summary = (tmp_path / "summary.html").read_text()
    assert (f"{len(result.capped)} failure signature(s) past the per-dialect cap "
            f"({sum(result.capped.values())} case(s), not reported)") in summary


def test_the_console_counts_the_signatures_past_the_cap(tmp_path):
    done = _cli("run", "--impl", "py:limit_impls:many_errors", "--max-examples", "400",
                "--seed", "0", "--out", tmp_path / "run", "--no-db", "--no-shrink",
                "--in-process", "--quiet")
    assert done.returncode == 1, done.stderr
    fails = [line for line in done.stdout.splitlines() if line.startswith("FAIL ")]
    assert len(fails) == 21, done.stdout
    assert all(line.startswith("FAIL align--error--RuntimeError--code-") for line in fails[:20])
    assert fails[20].startswith("FAIL ") and " more signature(s) past the cap of 20 per " \
        "dialect (" in fails[20]


def test_num_experts_is_what_the_kernel_receives_e_plus_one_buckets_for_sglang_align():
    # the cuda backend's num_experts 1..1024: SGLang's plain align passes E + 1 buckets
    ids = np.zeros((1, 1), dtype=np.int32)
    bound = {"num_experts": (1, 1024)}
    assert domain.violations(Case("align", "production", ids, 1024, 4), bound) == []
    assert domain.violations(Case("sglang-align", "production", ids, 1024, 4), bound) == [
        "num_experts=1025 > 1024"]
    assert domain.in_domain(Case("sglang-align", "production", ids, 1023, 4), bound)


@pytest.mark.parametrize("detail, noted", [
    ("sticky device error (the context is unusable): torch.AcceleratorError: CUDA error: an "
     "illegal memory access was encountered" + _TORCH_HINTS.format(name="IllegalAddress"), True),
    ("worker died: killed by signal SIGSEGV", False),
])
def test_an_illegal_address_report_says_why_repro_py_may_pass(tmp_path, detail, noted):
    # the same stray write can land in mapped memory in repro.py's own process: the report
    # says so, and where the access is named wherever it lands
    from difftest import registry
    from difftest.bugreport import write_failure_report
    from difftest.evaluate import Evaluation

    impl = registry.resolve("torch", "align")
    case = Case("align", "production", np.zeros((1, 1), dtype=np.int32), 1, 1)
    evaluation = Evaluation("crash", [], detail)
    folder = write_failure_report(tmp_path, evaluation.signature(case), impl, case, evaluation)
    report = (folder / "report.md").read_text()
    reproduce = report.split("## Reproduce", 1)[1].split("\n## ", 1)[0]
    assert ("the same access can land in mapped memory and pass unseen" in reproduce) is noted
    assert ("`python repro.py` may print `ok` here" in reproduce) is noted
    assert ("compute-sanitizer --tool memcheck python repro.py --device cuda --repeats 1 "
            "--exact-buffers" in reproduce) is noted
