"""The standalone repro.py: guard bands by default, exact-size buffers for compute-sanitizer."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from difftest.case import Case  # noqa: E402
from difftest.repro import repro_script  # noqa: E402

TESTS = Path(__file__).resolve().parent


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_an_overrun_is_a_guard_band_by_default_and_outside_the_allocation_with_exact_buffers(
        tmp_path):
    # T = 4 > 3: user_impls.writes_past_last_row stores 7 one element past sorted_token_ids
    case = Case("vllm-lora", "production", np.zeros((4, 1), dtype=np.int32), 1, 1, max_loras=1,
                token_lora_mapping=np.zeros(4, dtype=np.int32))
    script = tmp_path / "repro.py"
    script.write_text(repro_script(case, "py:user_impls:writes_past_last_row", False, "t", "s"))
    banded = _run(script)
    assert banded.returncode == 1, banded.stdout + banded.stderr
    assert "run 1: sorted_token_ids: guard band overwritten" in banded.stdout
    # exact buffers: the store lands past the tensor's own storage, which torch refuses on
    # the CPU (on CUDA it is a write outside the allocation, which memcheck names)
    exact = _run(script, "--exact-buffers")
    assert exact.returncode == 1, exact.stdout + exact.stderr
    assert "run 1: raised RuntimeError" in exact.stdout and "guard band" not in exact.stdout
    fixed = _run(script, "--exact-buffers", "--impl", "torch")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr


def test_a_pair_repro_runs_the_culprit_first_and_fails_only_after_it(tmp_path):
    # user_impls.stale_total_after_more_experts: wrong totals right after a call with
    # more experts; B = 2 keeps its other bug (B = 1) out of the way
    def case(E):
        return Case("vllm-lora", "production", np.zeros((1, 1), dtype=np.int32), E, 2,
                    max_loras=1, token_lora_mapping=np.zeros(1, dtype=np.int32))

    impl = "py:user_impls:stale_total_after_more_experts"
    victim, culprit = case(1), case(2)
    pair, alone = tmp_path / "pair.py", tmp_path / "alone.py"
    pair.write_text(repro_script(victim, impl, False, "t", "s", culprit=culprit))
    alone.write_text(repro_script(victim, impl, False, "t", "s"))
    done = _run(pair)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "BUG PRESENT in py:user_impls:stale_total_after_more_experts (vllm-lora, after " \
           "the culprit):" in done.stdout
    assert "run 1: slot 0: num_tokens_post_pad expected 2, actual 4" in done.stdout
    assert f"({culprit.case_id}) first" in pair.read_text()
    done = _run(alone)
    assert done.returncode == 0, done.stdout + done.stderr
    fixed = _run(pair, "--impl", "torch")
    assert fixed.returncode == 0 and "each after the culprit" in fixed.stdout, fixed.stdout


def test_a_long_sanitizer_output_keeps_its_first_error_and_its_end():
    from difftest import sanitizer

    first = "========= Invalid __global__ write of size 4 bytes\n"
    middle = "========= Host Frame: c10 free\n" * 1000
    text = first + middle + "========= ERROR SUMMARY: 6 errors\n"
    kept = sanitizer._head_and_tail(text)
    assert kept.startswith(first) and kept.endswith("ERROR SUMMARY: 6 errors\n")
    left_out = len(text) - sanitizer.HEAD - sanitizer.TAIL
    assert f"[… {left_out} characters left out …]" in kept
    assert len(kept) < sanitizer.HEAD + sanitizer.TAIL + 100
    assert sanitizer._head_and_tail(first) == first
def test_a_large_case_repro_reads_its_case_json_and_still_fails_on_the_faulty_kernel(tmp_path):
    import json

    from difftest.repro import INLINE_ELEMENTS, repro_files

    T = 2048  # 8192 routes: far more array elements than INLINE_ELEMENTS
    case = Case("vllm-lora", "production", np.zeros((T, 4), dtype=np.int32), 1, 1,
                max_loras=1, token_lora_mapping=np.zeros(T, dtype=np.int32))
    assert case.topk_ids.size > INLINE_ELEMENTS
    text, case_json = repro_files(case, "py:user_impls:writes_past_last_row", False, "t", "s")
    assert "CALLS = None" in text and len(text) < 20_000  # no arrays inline
    # the call records travel deflated: smaller than the case's own arrays
    assert len(json.dumps(case_json["repro_calls"])) < len(case.to_json())
    script = tmp_path / "repro.py"
    script.write_text(text)
    (tmp_path / "case.json").write_text(json.dumps(case_json))
    # case.json is still a case (its call records aside)
    assert Case.from_json((tmp_path / "case.json").read_text()).case_id == case.case_id
    banded = _run(script)
    assert banded.returncode == 1, banded.stdout + banded.stderr
    assert "run 1: sorted_token_ids: guard band overwritten" in banded.stdout
    fixed = _run(script, "--impl", "torch")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    # without the case.json next to it, it cannot run: exit 2 and why
    (tmp_path / "case.json").unlink()
    alone = _run(script)
    assert alone.returncode == 2 and "case.json" in alone.stderr


def test_a_small_case_repro_carries_its_calls_inline(tmp_path):
    from difftest.repro import repro_files

    case = Case("vllm-lora", "production", np.zeros((4, 1), dtype=np.int32), 1, 1, max_loras=1,
                token_lora_mapping=np.zeros(4, dtype=np.int32))
    text, case_json = repro_files(case, "py:user_impls:writes_past_last_row", False, "t", "s")
    assert "CALLS = json.loads(" in text and case_json == case.to_dict()
    script = tmp_path / "repro.py"
    script.write_text(text)
    assert _run(script).returncode == 1  # no case.json needed


_FAKE_SANITIZER = """#!/bin/sh
# stands in for compute-sanitizer: prints its arguments; with FAKE_SLEEP, a child hangs
echo "FAKE MEMCHECK $@"
if [ -n "$FAKE_SLEEP" ]; then
    sleep "$FAKE_SLEEP" &
    echo "child $!"
    wait
fi
"""


@pytest.fixture
def fake_sanitizer(tmp_path, monkeypatch):
    from difftest import sanitizer

    tool = tmp_path / "compute-sanitizer"
    tool.write_text(_FAKE_SANITIZER)
    tool.chmod(0o755)
    monkeypatch.setattr(sanitizer, "find_sanitizer", lambda: str(tool))
    return tool


def _torch_align_case():
    from difftest import registry

    case = Case("align", "production", np.zeros((2, 1), dtype=np.int32), 1, 1)
    return case, registry.resolve("torch", "align")


def test_a_sanitizer_re_run_runs_in_the_background_and_reports_its_command(fake_sanitizer):
    from difftest.sanitizer import SanitizerRun

    case, impl = _torch_align_case()
    run = SanitizerRun.start(case, impl)
    text = run.result(60.0)
    assert text.startswith("$ PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck "
                           "python repro.py --device cuda --repeats 1 --exact-buffers\n")
    assert "FAKE MEMCHECK --tool memcheck " in text and "--exact-buffers" in text
    assert "cut after" not in text


def test_a_sanitizer_re_run_past_its_time_is_killed_with_its_children(fake_sanitizer,
                                                                      monkeypatch):
    from difftest.sanitizer import SanitizerRun

    monkeypatch.setenv("FAKE_SLEEP", "300")
    case, impl = _torch_align_case()
    run = SanitizerRun.start(case, impl)
    deadline = time.monotonic() + 30
    while "child" not in Path(run._tmp.name, "output.txt").read_text() and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    text = run.result(0.0)
    child = int(text.split("child ")[1].split()[0])
    assert "(compute-sanitizer cut after " in text and "the run's budget ended" in text
    assert run.proc.returncode is not None
    time.sleep(0.2)  # the group's SIGKILL is delivered; the child is then gone or a zombie
    state = Path(f"/proc/{child}/stat")
    assert not state.exists() or state.read_text().split(") ")[1][0] == "Z"


def test_the_campaign_runs_at_most_two_re_runs_at_once_and_skips_them_past_the_budget(
        fake_sanitizer, monkeypatch):
    from difftest.budget import Budget
    from difftest.campaign import SANITIZER_PARALLEL, SANITIZER_SKIPPED, _Sanitizing

    monkeypatch.setenv("FAKE_SLEEP", "1")
    case, impl = _torch_align_case()
    now = [0.0]
    clock = Budget(seconds=100.0).start(lambda: now[0])
    sanitizing = _Sanitizing(impl)
    for sig in ("a", "b", "c"):
        sanitizing.queue((sig, None, case, None, None))
        sanitizing.start_queued(clock)
    assert SANITIZER_PARALLEL == 2
    assert [r[0] for r, run in sanitizing._running] == ["a", "b"]
    done = list(sanitizing.results(clock))
    assert [r[0] for r, _ in done] == ["a", "b", "c"]
    assert all("FAKE MEMCHECK" in text for _, text in done)
    now[0] = 115.0  # the re-runs' end (115 % of S): no re-run starts
    sanitizing.queue(("d", None, case, None, None))
    assert list(sanitizing.results(clock)) == [(("d", None, case, None, None),
                                                SANITIZER_SKIPPED)]


def test_a_re_run_in_an_interpreter_started_before_its_case_prints_what_repro_py_prints(
        tmp_path, monkeypatch):
    # The interpreter imports torch under memcheck first, then runs the case's repro.py as
    # `python repro.py <arguments>` would: same exit code, same report.
    from difftest import registry, sanitizer
    from difftest.repro import repro_files

    tool = tmp_path / "compute-sanitizer"
    tool.write_text('#!/bin/sh\nshift 2\nexec "$@"\n')  # drops "--tool memcheck", runs the rest
    tool.chmod(0o755)
    monkeypatch.setattr(sanitizer, "find_sanitizer", lambda: str(tool))
    monkeypatch.setattr(sanitizer, "REPRO_ARGS", ("--device", "cpu", "--repeats", "1"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    case = Case("vllm-lora", "production", np.zeros((4, 1), dtype=np.int32), 1, 1, max_loras=1,
                token_lora_mapping=np.zeros(4, dtype=np.int32))
    impl = registry.resolve("py:user_impls:writes_past_last_row", "vllm-lora")
    host = sanitizer.SanitizerHost.start()
    run = sanitizer.SanitizerRun.start(case, impl, host)
    assert run.proc is host.proc
    text = run.result(120.0)
    direct = tmp_path / "direct"
    direct.mkdir()
    script, case_json = repro_files(case, impl.name, impl.stable, "sanitizer re-run", "-",
                                    libraries=impl.libraries)
    (direct / "repro.py").write_text(script)
    (direct / "case.json").write_text(__import__("json").dumps(case_json))
    alone = _run(direct / "repro.py", "--device", "cpu", "--repeats", "1")
    assert run.proc.returncode == alone.returncode == 1, text
    assert "run 1: sorted_token_ids: guard band overwritten" in alone.stdout
    assert text.endswith(alone.stdout), text


def test_interpreters_start_when_their_signatures_are_found_at_most_two_at_once(
        fake_sanitizer):
    from difftest.budget import Budget
    from difftest.campaign import _Sanitizing

    case, impl = _torch_align_case()
    clock = Budget(seconds=100.0).start()
    sanitizing = _Sanitizing(impl)
    try:
        sanitizing.expect()
        assert len(sanitizing._hosts) == 1  # one signature: one interpreter, not two
        sanitizing.expect()
        sanitizing.expect()
        hosts = list(sanitizing._hosts)
        assert len(hosts) == 2  # three signatures, two at a time
        sanitizing.queue(("a", None, case, None, None))
        sanitizing.start_queued(clock)
        (report, run), = sanitizing._running
        assert report[0] == "a" and run.proc is hosts[0].proc  # it ran in the one waiting
        done = list(sanitizing.results(clock))
        assert [r[0] for r, _ in done] == ["a"] and "FAKE MEMCHECK" in done[0][1]
        # two signatures still to come: two interpreters wait for them, and kill ends them
        waiting = list(sanitizing._hosts)
        assert len(waiting) == 2 and hosts[1] in waiting
    finally:
        sanitizing.kill()
    assert all(host.proc.returncode is not None for host in waiting)
    assert sanitizing._hosts == []


def test_a_campaign_dropped_without_close_ends_the_interpreters_it_started(fake_sanitizer,
                                                                           tmp_path,
                                                                           monkeypatch):
    import gc

    from difftest.campaign import Campaign

    monkeypatch.setenv("FAKE_SLEEP", "300")  # the fake interpreter waits as a real one does
    _, impl = _torch_align_case()
    campaign = Campaign(impl, object(), tmp_path, seed=0)
    campaign.log.close()  # what the test uses of close(); the interpreter is left to the drop
    campaign._sanitizing.expect()
    [host] = campaign._sanitizing._hosts
    assert host.proc.poll() is None
    del campaign
    gc.collect()
    assert host.proc.returncode is not None and host.proc.stdin.closed


def test_an_illegal_address_repro_that_passes_says_why_and_how_to_see_it(tmp_path):
    # the case crashed where it was found; here its stray access may land in mapped memory
    case = Case("vllm-lora", "production", np.zeros((4, 1), dtype=np.int32), 1, 1, max_loras=1,
                token_lora_mapping=np.zeros(4, dtype=np.int32))
    script = tmp_path / "repro.py"
    script.write_text(repro_script(case, "py:user_impls:correct_vllm", False, "t",
                                   "vllm-lora--crash--cuda-illegal-address"))
    found_in = _run(script)
    assert found_in.returncode == 0, found_in.stdout + found_in.stderr
    ok, note = found_in.stdout.splitlines()[-2:]
    assert ok.startswith("ok: py:user_impls:correct_vllm passes every check")
    assert note.startswith("note: this case crashed with an illegal address where it was found")
    assert ("PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python repro.py "
            "--device cuda --repeats 1 --exact-buffers" in note)
    other = _run(script, "--impl", "torch")  # another implementation passing: no note
    assert other.returncode == 0 and "note:" not in other.stdout
    script.write_text(repro_script(case, "py:user_impls:correct_vllm", False, "t",
                                   "vllm-lora--crash--sigsegv"))
    assert "note:" not in _run(script).stdout  # a segfault is seen by any process
