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


def _pytest(tmp_path, *args, source=EXTERNAL):
    (tmp_path / "test_external_kernels.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
         "test_external_kernels.py", "--difftest-out", str(tmp_path / "out"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _report_path(out):
    """The bug report's directory named in a failed check's output."""
    return Path(next(line.split("bug report: ", 1)[1].strip() for line in out.splitlines()
                     if "bug report: " in line))


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
    assert (_report_path(out) / "repro.py").exists()
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


CRASHING = '''
from user_impls import correct_vllm, segfaults_on_odd_tokens


def test_a_segfaulting_kernel(difftest_check):
    difftest_check(segfaults_on_odd_tokens, "vllm-lora", seconds=15, timeout=5)


def test_a_correct_kernel_after_it(difftest_check):
    result = difftest_check(correct_vllm, "vllm-lora", seconds=3)
    assert result.passed and result.result.cases > 0
'''


def test_a_segfault_fails_its_test_and_the_session_goes_on(tmp_path):
    done = _pytest(tmp_path, source=CRASHING)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "1 failed, 1 passed" in out
    assert "FAILED vllm-lora--crash--sigsegv" in out, out
    assert "first failure: worker died: killed by signal SIGSEGV" in out
    # T odd crashes: the minimal case has one token
    assert "minimal case (vllm-lora, " in out and "topk_ids = [[0]]" in out
    assert (_report_path(out) / "repro.py").exists()


def test_a_local_function_needs_in_process_to_be_checked(tmp_path):
    from difftest.api import check_callable
    from difftest.errors import UsageError

    def local_kernel(*args):
        raise AssertionError("never called")

    with pytest.raises(UsageError, match="cannot be imported by name in a sandbox worker.*"
                       "pass in_process=True"):
        check_callable(local_kernel, "align", in_process=False, out_dir=tmp_path, database=None)


RECORDS = '''
def test_one(request):
    request.node.user_properties.append(("difftest", {
        "impl": "py:m:f", "dialect": "align", "cases": 3, "failures": [], "reports": []}))
'''


def test_the_summary_section_holds_this_runs_rows_only(tmp_path):
    # two sessions in one process: per-run state in config.stash, not a module global
    (tmp_path / "test_rows.py").write_text(RECORDS)
    script = ("import pytest, sys\n"
              "for _ in range(2):\n"
              "    pytest.main(['-q', '-p', 'no:cacheprovider', 'test_rows.py'])\n")
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    rows = [line for line in done.stdout.splitlines() if line.startswith("PASSED  py:m:f")]
    assert rows == ["PASSED  py:m:f [align] 3 cases  (test_rows.py::test_one)"] * 2, done.stdout


def test_a_check_in_which_no_case_ran_does_not_pass(tmp_path):
    from difftest.api import check_result
    from difftest.campaign import CampaignResult

    check = check_result("py:m:f", "align", CampaignResult(tmp_path, elapsed_s=2.0))
    assert not check.passed
    assert "no case ran within the budget (2.0 s)" in str(check)
