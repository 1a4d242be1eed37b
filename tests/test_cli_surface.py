"""The CLI as a CI user meets it (issue 17): usage errors found early, one line each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from difftest.case import Case
from difftest.cli import main

TESTS = Path(__file__).parent


def _difftest(*args, cwd=None, timeout=300, pythonpath=None):
    path = pythonpath if pythonpath is not None else [str(TESTS), str(TESTS.parent)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run([sys.executable, "-m", "difftest", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _one_line_usage_error(code: int, err: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


# -- option errors -------------------------------------------------------------
@pytest.mark.parametrize("option", ["--seconds", "--shrink-seconds", "--timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "1e400"])
def test_a_budget_must_be_a_finite_positive_number(option, value, capsys):
    code = main(["run", "--impl", "torch", option, value])
    err = capsys.readouterr().err
    _one_line_usage_error(code, err)
    assert err == (f"difftest run: argument {option}: '{value}': must be a finite number > 0 "
                   "(see difftest run --help)\n")


def test_an_option_error_names_the_command_once(capsys):
    code = main(["run", "--impl", "torch", "--max-examples", "many"])
    err = capsys.readouterr().err
    _one_line_usage_error(code, err)
    assert err.startswith("difftest run: argument --max-examples: 'many' is not an integer")
    assert code == main(["replay"]) == 2
    assert capsys.readouterr().err.startswith("difftest replay: the following arguments")


# -- output paths, checked before the campaign ---------------------------------
@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("option, where, needle", [
    ("--out", "{file}", "--out={file}: is a file, not a directory"),
    ("--out", "{file}/run", "--out={file}/run: {file} is a file, not a directory"),
    ("--out", "/proc/difftest-run", "--out=/proc/difftest-run: cannot write in /proc"),
    ("--junit", "/proc/x.xml", "--junit=/proc/x.xml: cannot write in /proc"),
    ("--junit", "{dir}", "--junit={dir}: is a directory, not a file"),
    ("--db", "{file}", "--db={file}: is a file, not a directory"),
    ("--db", "{file}/db", "--db={file}/db: {file} is a file, not a directory"),
])
def test_a_bad_output_path_is_refused_before_the_campaign(option, where, needle, a_file,
                                                          tmp_path, capsys):
    fill = {"file": a_file, "dir": tmp_path}
    out = ["--out", str(tmp_path / "run")] if option != "--out" else []
    code = main(["run", "--impl", "torch", "--dialect", "align", "--max-examples", "1",
                 *out, option, where.format(**fill)])
    err = capsys.readouterr().err
    _one_line_usage_error(code, err)
    assert err.startswith(f"difftest: {needle.format(**fill)}")
    assert not (tmp_path / "run").exists()  # nothing ran


def test_minimize_checks_its_out_before_running(a_file, tmp_path, capsys):
    case = tmp_path / "case.json"
    case.write_text(Case("align", "production", np.array([[0, 1]], dtype=np.int32), 2,
                         4).to_json())
    code = main(["minimize", str(case), "--impl", "torch", "--out", str(a_file)])
    err = capsys.readouterr().err
    _one_line_usage_error(code, err)
    assert f"--out={a_file}: is a file, not a directory" in err


# -- case files validated on load ----------------------------------------------
@pytest.mark.parametrize("field, value, needle", [
    ("block_size", 0, "block_size=0: must be a positive integer"),
    ("num_experts", "four", "num_experts='four': must be an integer, not str"),
    ("num_experts", 1, "contract='production' but the case is outside it (expert id outside "
                       "[0, E)): tag it 'defensive'"),
    ("max_num_tokens_padded", 1, "max_num_tokens_padded=1"),
    ("edge_classes", ["no-such-class"], "edge_classes has unknown class(es) ['no-such-class']"),
])
@pytest.mark.parametrize("command", ["replay", "minimize"])
def test_an_invalid_case_file_is_a_usage_error_not_a_verdict(command, field, value, needle,
                                                             tmp_path, capsys):
    data = Case("align", "production", np.array([[0, 1], [1, 1]], dtype=np.int32), 2,
                4).to_dict()
    data[field] = value
    path = tmp_path / "case.json"
    path.write_text(json.dumps(data))
    code = main([command, str(path), "--impl", "torch", *(
        ["--out", str(tmp_path / "min")] if command == "minimize" else [])])
    captured = capsys.readouterr()
    _one_line_usage_error(code, captured.err)
    assert captured.err.startswith(f"difftest: CASE={path}: ") and needle in captured.err
    assert captured.out == ""


# -- the current directory is importable ----------------------------------------
_MYKERN = '''
from cuda_impl import torch_impl

_align = torch_impl.implementation(None)["align"]


def fn(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids, num_tokens_post_pad,
       expert_map=None):
    """Counts one padded slot too many."""
    _align(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids, num_tokens_post_pad,
           expert_map)
    num_tokens_post_pad += 1
'''


def test_a_module_in_the_current_directory_is_importable_everywhere(tmp_path):
    kern = tmp_path / "kern"
    kern.mkdir()
    (kern / "mykern.py").write_text(_MYKERN)
    repo = [str(TESTS.parent)]  # -P: like the console script, the cwd is not on sys.path

    def difftest(*args):
        return subprocess.run([sys.executable, "-P", "-m", "difftest", *map(str, args)],
                              cwd=kern, env={**os.environ, "PYTHONPATH": repo[0]},
                              capture_output=True, text=True, timeout=300)

    out = tmp_path / "run"
    done = difftest("run", "--impl", "py:mykern:fn", "--max-examples", "3", "--seed", "0",
                    "--out", out, "--no-db", "--shrink-seconds", "5")
    assert done.returncode == 1, done.stderr
    assert "FAIL align--mismatch--num_tokens_post_pad" in done.stdout
    bug = out / "bugs" / "align--mismatch--num_tokens_post_pad"
    replayed = difftest("replay", bug / "case.json", "--impl", "py:mykern:fn")
    assert replayed.returncode == 1, replayed.stderr
    assert ": mismatch" in replayed.stdout
    minimized = difftest("minimize", bug / "case.json", "--impl", "py:mykern:fn",
                         "--out", tmp_path / "min", "--shrink-seconds", "5")
    assert minimized.returncode == 1, minimized.stderr
    # repro.py finds the module from any folder: it records where it was imported from
    repro = subprocess.run([sys.executable, bug / "repro.py"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": repo[0]}, capture_output=True,
                           text=True, timeout=120)
    assert repro.returncode == 1 and "BUG PRESENT in py:mykern:fn" in repro.stdout, repro.stderr


# -- seeds, focus and the summary for scripts ---------------------------------------
def _case_ids(out: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(out / "cases.parquet").column("case_id").to_pylist()


def test_a_run_without_seed_draws_one_prints_it_and_the_seed_repeats_the_cases(tmp_path):
    first = _difftest("run", "--impl", "torch", "--dialect", "align", "--max-examples", "15",
                      "--out", tmp_path / "a", "--no-db", "--in-process")
    assert first.returncode == 0, first.stderr
    seed = json.loads((tmp_path / "a" / "run.json").read_text())["seed"]
    assert isinstance(seed, int)
    assert f"difftest run: seed {seed} (drawn; --seed {seed} repeats these cases)" in first.stderr
    assert f"seed {seed}" in first.stdout.splitlines()[-1]
    again = _difftest("run", "--impl", "torch", "--dialect", "align", "--max-examples", "15",
                      "--seed", seed, "--out", tmp_path / "b", "--no-db", "--in-process")
    assert again.returncode == 0, again.stderr
    assert "drawn" not in again.stderr
    assert _case_ids(tmp_path / "a") == _case_ids(tmp_path / "b") and len(_case_ids(
        tmp_path / "a")) == 15


def test_classes_focus_every_case_on_them(tmp_path):
    done = _difftest("run", "--impl", "torch", "--dialect", "vllm-lora", "--max-examples", "12",
                     "--seed", "1", "--classes", "base-only,disabled-adapter", "--out",
                     tmp_path / "run", "--no-db", "--in-process")
    assert done.returncode == 0, done.stderr
    import pyarrow.parquet as pq

    tags = pq.read_table(tmp_path / "run" / "cases.parquet").column("edge_classes").to_pylist()
    assert len(tags) == 12
    assert all({"base-only", "disabled-adapter"} & set(t) for t in tags), tags


@pytest.mark.parametrize("classes, needle", [
    ("nosuch", "difftest run: argument --classes: 'nosuch': not an edge class; known: "
               "full-slots-with-base, base-only,"),
    ("base-only", "difftest: --classes=base-only: no case of align (production, defensive) "
                  "can be built around base-only; these can: block-edges,"),
])
def test_an_edge_class_no_case_can_have_is_a_usage_error(classes, needle, tmp_path, capsys):
    code = main(["run", "--impl", "torch", "--dialect", "align", "--classes", classes,
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    _one_line_usage_error(code, err)
    assert err.startswith(needle)
    assert not (tmp_path / "run").exists()


def test_json_summary_workers_merged_and_junit_one_testcase_per_bug(tmp_path):
    out = tmp_path / "run"
    done = _difftest("run", "--impl", "torch:inactive-blocks-zero", "--dialect", "align",
                     "--max-examples", "12", "--seed", "4", "--workers", "2", "--json",
                     "--out", out, "--no-db", "--shrink-seconds", "5", "--junit",
                     tmp_path / "j.xml")  # --json, a flag, before an option with a value
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)  # one JSON object and nothing else
    sig = "align--mismatch--expert_ids"
    bug = out / "bugs" / sig
    assert summary["exit_code"] == 1 and summary["run_dir"] == str(out)
    assert summary["cases"] == 24 and sum(summary["verdicts"].values()) == 24
    assert summary["seed"] == 4 and summary["junit"] == str(tmp_path / "j.xml")
    [failure] = summary["failures"]
    assert failure["signature"] == sig and failure["report"] == str(bug)
    assert failure["count"] == summary["verdicts"]["mismatch"]
    assert (bug / "report.md").is_file()  # the merged copy, not parts/worker-i
    assert "parts" not in done.stdout
    import xml.etree.ElementTree as ET

    suite = ET.parse(tmp_path / "j.xml").getroot()
    bugs = [tc for tc in suite.iter("testcase") if tc.find("failure") is not None]
    assert [tc.get("name") for tc in bugs] == [sig]
    message = bugs[0].find("failure").get("message")
    assert f"report: {bug}" in message and "minimal case: T=" in message
    assert len(message) < 1000
    assert int(suite.get("failures")) == 1 and int(suite.get("tests")) > 1


def test_workers_print_one_merged_summary(tmp_path):
    out = tmp_path / "run"
    done = _difftest("run", "--impl", "torch:inactive-blocks-zero", "--dialect", "align",
                     "--max-examples", "8", "--seed", "4", "--workers", "2", "--out", out,
                     "--no-db", "--shrink-seconds", "5")
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("16 cases in ")
    parts = [json.loads((out / "parts" / f"worker-{i}" / "run.json").read_text())["failures"]
             for i in range(2)]
    count = sum(p[0]["count"] for p in parts)
    first = min(p[0]["first_after"] for p in parts)
    assert [line for line in lines if line.startswith("FAIL")] == [
        f"FAIL align--mismatch--expert_ids: {count} case(s), first after {first}; report "
        f"{out / 'bugs' / 'align--mismatch--expert_ids'}"]
    assert "worker-" not in done.stdout


# -- bug reports -------------------------------------------------------------------
_HOSTILE = '''
def fn(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids, num_tokens_post_pad,
       expert_map=None):
    """Raises a message no report may render as HTML."""
    _deeper(topk_ids)


def _deeper(topk_ids):
    raise RuntimeError("<script>alert(1)</script><img src=x onerror=alert(2)> a | b")
'''


def _outside_code(markdown: str) -> str:
    """``markdown`` without fenced blocks and code spans (what renders as markup)."""
    import re

    markdown = re.sub(r"(?ms)^(`{3,}).*?^\1", "", markdown)
    return re.sub(r"(`+).*?\1", "", markdown)


def test_a_raising_kernels_report_is_escaped_has_its_frames_and_the_padding_used(tmp_path):
    (tmp_path / "hostile.py").write_text(_HOSTILE)
    out = tmp_path / "run"
    done = _difftest("run", "--impl", "py:hostile:fn", "--max-examples", "2", "--seed", "0",
                     "--out", out, "--no-db", "--shrink-seconds", "5", "--in-process",
                     cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    [bug] = (out / "bugs").iterdir()
    report = (bug / "report.md").read_text()
    assert "<script>alert(1)</script>" in report  # the message is there, in code
    rendered = _outside_code(report)
    assert "<script" not in rendered and "<img" not in rendered, rendered
    header = next(line for line in report.splitlines() if line.startswith("| check |"))
    row = next(line for line in report.splitlines()
               if line.startswith("| exception |"))
    assert row.replace("\\|", "").count("|") == header.count("|")
    assert "&lt;script>" in row and "a \\| b" in row
    # the traceback's last frames, with file:line
    hostile = tmp_path / "hostile.py"
    assert f'File "{hostile}", line 9, in _deeper' in report
    assert f'File "{hostile}", line 5, in fn' in report
    assert "No output to compare: the call raised an exception." in report
    assert "expected `None`" not in report
    # the P the call used, and that it is the production size
    assert "| `max_num_tokens_padded` | " in report
    padded = next(line for line in report.splitlines() if "`max_num_tokens_padded`" in line)
    assert padded.endswith(" (the production size) |") and "None" not in padded
    summary = (out / "summary.html").read_text()
    assert "<script>alert" not in summary and "<img src=x" not in summary


_SEGFAULT = '''
import ctypes


def fn(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids, num_tokens_post_pad,
       expert_map=None):
    ctypes.string_at(0)
'''


def test_a_crash_report_says_what_happened(tmp_path):
    (tmp_path / "crashes.py").write_text(_SEGFAULT)
    out = tmp_path / "run"
    done = _difftest("run", "--impl", "py:crashes:fn", "--max-examples", "1", "--seed", "0",
                     "--out", out, "--no-db", "--shrink-seconds", "2", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    [bug] = (out / "bugs").iterdir()
    report = (bug / "report.md").read_text()
    assert "- Verdict: `crash` — the call crashed" in report
    assert "No output to compare: the call crashed" in report
    assert "What happened:" in report and "SIGSEGV" in report
    assert "expected `None`" not in report and "actual `None`" not in report


def test_a_kernel_passing_production_and_failing_defensive_is_told_in_words(tmp_path):
    done = _difftest("run", "--impl", "torch:no-slot-upper-guard", "--dialect", "vllm-lora",
                     "--max-examples", "40", "--seed", "0", "--out", tmp_path / "run", "--no-db",
                     "--no-shrink", "--in-process")
    assert done.returncode == 1, done.stderr
    [said] = [line for line in done.stdout.splitlines() if " passes the " in line]
    assert said.startswith("torch:no-slot-upper-guard passes the production contract (")
    assert ") and fails the defensive contract (" in said
    assert f"{said}.</p>" in (tmp_path / "run" / "summary.html").read_text()


def test_minimize_lists_shrink_steps_compressed_per_pass_run(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(Case("align", "production", np.zeros((64, 1), dtype=np.int32), 2,
                         4).to_json())
    done = _difftest("minimize", path, "--impl", "torch:inactive-blocks-zero", "--out",
                     tmp_path / "min", "--shrink-seconds", "20")
    assert done.returncode == 1, done.stderr
    report = (tmp_path / "min" / "bugs" / "align--mismatch--expert_ids" / "report.md").read_text()
    steps = report[report.index("Shrink passes applied:"):report.index("## Expected")]
    assert "- drop_tokens: T 64 → 2 in 2 steps\n" in steps
    assert steps.count("drop_tokens") == 1
