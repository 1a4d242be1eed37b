"""The pytest plugin, used from a test file outside the project."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

EXTERNAL = '''
from user_impls import correct_vllm, skips_slot_at_index_l


def test_correct_kernel(difftest_check):
    result = difftest_check(correct_vllm, "vllm-lora", seconds=3)
    assert result.passed and result.result.cases > 0


def test_faulty_kernel(difftest_check):
    difftest_check(skips_slot_at_index_l, "vllm-lora", seconds=20)
'''


def _pytest(tmp_path, *args):
    (tmp_path / "test_external_kernels.py").write_text(EXTERNAL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
         "test_external_kernels.py", "--difftest-out", str(tmp_path / "out"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _check_output(done, tmp_path):
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "1 failed, 1 passed" in out
    # the failure shows the minimal case and where the report is
    assert "FAILED vllm-lora--mismatch--num_tokens_post_pad" in out
    # whichever case failed first, its minimum has one slot, listed at lora_ids[L]
    assert "minimal case (vllm-lora, " in out
    assert "lora_ids = [-1, 0]" in out and "max_loras = 1" in out
    assert "first failure: num_tokens_post_pad[0:1]: values differ" in out
    report = next(line.split("bug report: ", 1)[1].strip() for line in out.splitlines()
                  if "bug report: " in line)
    assert (Path(report) / "repro.py").exists()
    # its own section in the terminal summary
    assert any(line.startswith("=") and " difftest " in line for line in out.splitlines())
    assert "PASSED  py:user_impls:correct_vllm [vllm-lora]" in out


def test_fixture_fails_with_the_minimal_case_and_passes_a_correct_kernel(tmp_path):
    _check_output(_pytest(tmp_path), tmp_path)


def test_plugin_works_under_xdist(tmp_path):
    pytest.importorskip("xdist")
    done = _pytest(tmp_path, "-n", "2")
    _check_output(done, tmp_path)
    workers = {p.name for p in (tmp_path / "out").iterdir()}
    assert workers <= {"gw0", "gw1"} and workers


def test_options_have_their_own_group():
    done = subprocess.run([sys.executable, "-m", "pytest", "--help"], capture_output=True,
                          text=True, timeout=120)
    text = done.stdout
    assert "differential testing of MoE align kernels:" in text
    for option in ("--difftest-impl", "--difftest-seconds", "--difftest-profile"):
        assert option in text


def test_difftest_impl_option_adds_a_campaign_item(tmp_path):
    (tmp_path / "test_nothing.py").write_text("def test_ok():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_nothing.py",
         "--difftest-impl", "torch:uneven-ep-truncates", "--difftest-seconds", "10",
         "--difftest-out", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed, 1 passed" in done.stdout
    assert "difftest[torch:uneven-ep-truncates:ep-remap]" in done.stdout
    assert "FAILED ep-remap--mismatch--local_topk_ids" in done.stdout
