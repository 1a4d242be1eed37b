"""The CLI's binding exit codes and its run directory (DESIGN.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from difftest.case import Case
from difftest.cli import main

TESTS = Path(__file__).parent


def _difftest(*args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    return subprocess.run([sys.executable, "-m", "difftest", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv, needle", [
    (["run"], "the following arguments are required: --impl"),
    (["run", "--impl", "nosuch"], "--impl 'nosuch': unknown implementation"),
    (["run", "--impl", "torch:nosuch"], "torch has no fault 'nosuch'"),
    (["run", "--impl", "torch:odd-block-resets-count"], "torch has no fault"),
    (["run", "--impl", "torch", "--dialect", "nope"], "--dialect='nope'"),
    (["run", "--impl", "torch", "--seconds", "-1"], "must be > 0"),
    (["run", "--impl", "torch", "--contract", "sloppy"], "invalid choice: 'sloppy'"),
    (["run", "--impl", "py:no_such_module_xyz:fn", "--dialect", "align"],
     "cannot import module 'no_such_module_xyz'"),
    (["run", "--impl", "py:json:nothing_here"], "has no callable 'nothing_here'"),
    (["run", "--impl", "torch:sort-ignores-disabled", "--dialect", "align"],
     "supports vllm-lora, sglang-lora"),
    (["replay", "/nonexistent/case.json", "--impl", "torch"], "cannot read it"),
    (["report", "/nonexistent-dir"], "not a directory"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_usage_errors_exit_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_case_file_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "case.json"
    bad.write_text('{"dialect": "align", "bogus": 1}')
    assert main(["replay", str(bad), "--impl", "torch"]) == 2
    assert "unknown field(s) ['bogus']" in capsys.readouterr().err
    bad.write_text("not json")
    assert main(["replay", str(bad), "--impl", "torch"]) == 2
    assert "case file is not JSON" in capsys.readouterr().err


def test_cuda_impl_without_a_gpu_is_a_usage_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["run", "--impl", "cuda", "--max-examples", "1"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpus_are_counted_from_the_driver_files_and_cuda_visible_devices(monkeypatch):
    from difftest import cli

    files = ["null", "nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm", "nvidia10x"]
    monkeypatch.setattr(cli.os, "listdir", lambda path: files if path == "/dev" else [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("DIFFTEST_DEVICE", raising=False)
    assert cli.cuda_device_count() == 3
    assert cli.default_device() == "cuda"
    for visible, count in (("1", 1), ("0,2", 2), ("GPU-1a2b,GPU-3c4d", 2), ("", 0),
                           ("-1", 0), ("0,-1,1", 1), ("0,1,2,3,4", 3)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert cli.cuda_device_count() == count, visible
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cli.default_device() == "cpu"
    files[:] = ["null", "nvidiactl"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert cli.cuda_device_count() == 0


def test_the_campaign_process_never_imports_torch(tmp_path):
    # its workers load the implementation; the process itself reads only declarations
    import subprocess
    import sys

    code = ("import sys; from difftest.cli import main; "
            f"code = main(['run', '--impl', 'torch:no-slot-upper-guard', '--device', 'cpu', "
            f"'--max-examples', '40', '--seed', '3', '--no-db', '--quiet', "
            f"'--out', {str(tmp_path / 'run')!r}]); "
            "print(code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    assert out[-2:] == ["1", "False"]


def test_list_names_implementations_faults_and_classes(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for needle in ("torch:grid-skips-last-slot", "cuda:odd-block-resets-count", "vllm-lora",
                   "full-slots-with-base", "huge-batch", "py:package.module:function"):
        assert needle in out


def test_clean_run_exits_0_and_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    done = _difftest("run", "--impl", "torch", "--dialect", "align", "--max-examples", "40",
                     "--seed", "3", "--out", out, "--no-db", "--junit", tmp_path / "j.xml")
    assert done.returncode == 0, done.stderr
    assert "40 cases" in done.stdout and "pass 40" in done.stdout
    cases = pq.read_table(out / "cases.parquet")
    assert cases.num_rows == 40
    assert set(cases.column("verdict").to_pylist()) == {"pass"}
    assert cases.column_names[:6] == ["case_id", "impl", "dialect", "contract", "edge_classes",
                                      "T"]
    assert pq.read_table(out / "mismatches.parquet").num_rows == 0
    assert (out / "summary.html").read_text().count("<img") >= 1
    import xml.etree.ElementTree as ET

    suite = ET.parse(tmp_path / "j.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("failures")) == 0 and int(suite.get("tests")) > 0


def test_same_seed_same_cases(tmp_path):
    ids = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        done = _difftest("run", "--impl", "torch", "--dialect", "sglang-lora",
                         "--max-examples", "25", "--seed", "11", "--out", out, "--no-db",
                         "--in-process")
        assert done.returncode == 0, done.stderr
        ids.append(pq.read_table(out / "cases.parquet").column("case_id").to_pylist())
    assert ids[0] == ids[1] and len(ids[0]) == 25


def test_fault_exits_1_and_the_summary_names_the_check(tmp_path):
    out = tmp_path / "run"
    done = _difftest("run", "--impl", "torch:inactive-blocks-zero", "--dialect", "align",
                     "--seconds", "30", "--seed", "0", "--out", out, "--no-db",
                     "--shrink-seconds", "10")
    assert done.returncode == 1, done.stderr
    assert "FAIL align--mismatch--expert_ids" in done.stdout
    assert "expert_ids" in (out / "summary.html").read_text()
    mism = pq.read_table(out / "mismatches.parquet").to_pylist()
    assert mism and {m["check"] for m in mism} == {"expert_ids"}
    first = mism[0]
    assert first["expected"] == -1 and first["actual"] == 0
    bug = out / "bugs" / "align--mismatch--expert_ids"
    assert {p.name for p in bug.iterdir()} == {"report.md", "case.json", "repro.py"}
    # the saved failing case replays as a failure; the minimal one too
    saved = next((out / "cases").glob("*.json"))
    assert _difftest("replay", saved, "--impl", "torch:inactive-blocks-zero").returncode == 1
    assert _difftest("replay", saved, "--impl", "torch").returncode == 0
    # repro.py: fails on the faulty implementation, passes on the correct one
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    bad = subprocess.run([sys.executable, bug / "repro.py"], env=env, capture_output=True,
                         text=True)
    good = subprocess.run([sys.executable, bug / "repro.py", "--impl", "torch"], env=env,
                          capture_output=True, text=True)
    assert bad.returncode == 1 and "BUG PRESENT" in bad.stdout
    assert good.returncode == 0, good.stdout + good.stderr
    minimal = Case.from_json((bug / "case.json").read_text())
    # an inactive block needs padding slack: the smallest cases showing the fault are
    # one dropped route (defensive: T=K=E=B=1) or two routes to one of two experts
    # with B = 2 (production)
    assert minimal.num_routes <= 2 and minimal.num_experts <= 2


def test_failure_database_replays_a_failure_first(tmp_path):
    db = tmp_path / "db"
    first = _difftest("run", "--impl", "torch:uneven-ep-truncates", "--seconds", "20",
                      "--seed", "0", "--out", tmp_path / "a", "--db", db, "--no-shrink")
    assert first.returncode == 1
    # per signature the first failing case (no shrinking: no minimal one)
    folder = db / "torch_uneven-ep-truncates"
    saved = [p.stem.partition("-")[2] for p in sorted(folder.glob("*/*.json"))]
    assert saved and all(p.name.startswith("first-") for p in folder.glob("*/*.json"))
    assert {p.name for p in folder.iterdir()} == set(
        json.loads((tmp_path / "a" / "run.json").read_text())["signatures"])
    second = _difftest("run", "--impl", "torch:uneven-ep-truncates", "--max-examples", "1",
                       "--seed", "5", "--out", tmp_path / "b", "--db", db, "--no-shrink")
    assert second.returncode == 1
    assert f"({len(saved)} replayed from the failure database)" in second.stdout
    order = pq.read_table(tmp_path / "b" / "cases.parquet").column("case_id").to_pylist()
    assert order[:len(saved)] == saved
    # a fixed implementation forgets them: the database entry passes and is removed
    third = _difftest("run", "--impl", "torch", "--dialect", "ep-remap", "--max-examples", "1",
                      "--out", tmp_path / "c", "--db", db)
    assert third.returncode == 0
    assert json.loads((tmp_path / "c" / "run.json").read_text())["replayed"] == 0


def test_report_rebuilds_a_killed_runs_parquet(tmp_path, capsys):
    out = tmp_path / "run"
    assert _difftest("run", "--impl", "torch", "--dialect", "ep-remap", "--max-examples", "5",
                     "--out", out, "--no-db").returncode == 0
    (out / "cases.parquet").unlink()
    (out / "summary.html").unlink()
    assert main(["report", str(out)]) == 0
    assert pq.read_table(out / "cases.parquet").num_rows == 5
    assert (out / "summary.html").exists()


def test_case_json_round_trip_is_lossless():
    from difftest.case import EPGroup

    case = Case("sglang-lora", "defensive", np.array([[3, -1]], dtype=np.int64), 4, 3,
                max_loras=2, seg_indptr=np.array([0, 1], dtype=np.int32),
                req_to_lora=np.array([-1], dtype=np.int32), max_num_tokens_padded=9,
                ep=EPGroup(4, 3, "round_robin", "local_ids"), edge_classes=("int64-ids",),
                seed=7)
    back = Case.from_json(case.to_json())
    assert back.case_id == case.case_id and back.to_dict() == case.to_dict()
    assert back.topk_ids.dtype == np.int64 and back.ep.ranks == (0, 1, 2)


def test_interrupted_run_keeps_what_it_recorded(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    proc = subprocess.Popen([sys.executable, "-m", "difftest", "run", "--impl", "torch",
                             "--dialect", "align", "--seconds", "120", "--out", str(out),
                             "--no-db", "--quiet"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        journal = out / "cases.jsonl"
        if journal.exists() and len(journal.read_text().splitlines()) >= 5:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted; what was recorded so far is kept" in err and "Traceback" not in err
    recorded = len((out / "cases.jsonl").read_text().splitlines())
    assert recorded >= 5
    assert pq.read_table(out / "cases.parquet").num_rows == recorded
    assert (out / "summary.html").exists()


def test_user_module_that_raises_on_import_is_a_usage_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "explodes_on_import.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["run", "--impl", "py:explodes_on_import:fn", "--dialect", "align"]) == 2
    err = capsys.readouterr().err
    assert "importing 'explodes_on_import' raised RuntimeError: no GPU here" in err
    assert "Traceback" not in err


def test_a_run_in_which_no_case_ran_exits_2_and_still_writes_its_directory(tmp_path):
    # every case hangs, and the budget ends before the first one's timeout: nothing checked
    (tmp_path / "hangs_impl.py").write_text(
        "import os, time\n"
        "calls = {}\n"
        "def align(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,\n"
        "          num_tokens_post_pad, expert_map=None):\n"
        "    calls[os.getpid()] = calls.get(os.getpid(), 0) + 1\n"
        "    if calls[os.getpid()] > 1:  # every process warms up on its first call\n"
        "        time.sleep(600)\n")
    out = tmp_path / "run"
    done = _difftest("run", "--impl", "py:hangs_impl:align", "--seconds", "1", "--timeout", "60",
                     "--no-db", "--seed", "1", "--out", out, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stdout.splitlines()[0] == "0 cases in " + done.stdout.split(" in ")[1].split()[0] \
        + " s: "
    said = [line for line in done.stderr.splitlines() if "checked nothing" in line]
    assert len(said) == 1
    assert said[0].startswith("difftest run: --seconds 1 checked nothing, so this run does not "
                              "pass (exit 2): no case ran within the budget (")
    assert said[0].endswith("s): give it more seconds (the worker's start-up is not counted); "
                            f"run directory {out}")
    assert json.loads((out / "run.json").read_text())["cases"] == 0
    assert (out / "summary.html").is_file()
