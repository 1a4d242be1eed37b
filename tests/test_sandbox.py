"""The sandbox survives implementations that crash, hang, print or fail to load."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from difftest import registry
from difftest.case import Case
from difftest.errors import ImplementationError
from difftest.evaluate import evaluate
from difftest.sandbox import SandboxRunner


def _vllm_case(T: int, enabled=(1, 1, 1)) -> Case:
    topk = np.zeros((T, 1), dtype=np.int32)
    mapping = np.zeros(T, dtype=np.int32)
    contract = "production" if T and all(enabled) else "defensive"
    return Case("vllm-lora", contract, topk, 2, 2, max_loras=2, token_lora_mapping=mapping,
                lora_ids=np.array([0, -1, -1], dtype=np.int32),
                adapter_enabled=np.array(enabled, dtype=np.int32))


def _verdict(runner, impl, case):
    return evaluate(case, runner.run(case), stable=impl.stable)


@pytest.mark.parametrize("forks", [True, False], ids=["forked", "spawned"])
def test_segfault_is_a_crash_and_the_warm_spare_takes_the_next_case(forks):
    impl = registry.resolve("py:user_impls:segfaults_on_empty_batch", "vllm-lora")
    with SandboxRunner(impl, "cpu", timeout_s=30) as runner:
        runner._forks = forks  # spawned workers are what CUDA gets
        assert _verdict(runner, impl, _vllm_case(3)).verdict == "pass"
        first_pid = runner.worker_pid
        runner.warm_up()
        spare_pid = runner._spares[0].pid
        crashed = _verdict(runner, impl, _vllm_case(0))
        assert crashed.verdict == "crash"
        assert "SIGSEGV" in crashed.detail
        after = _verdict(runner, impl, _vllm_case(3))
        assert after.verdict == "pass"
        assert runner.worker_pid == spare_pid != first_pid
        assert (runner.restarts, runner.cold_starts) == (1, 0)
        runner.warm_up()
        assert len(runner._spares) == runner._spare_count  # re-armed


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_close_ends_the_worker_the_spare_and_the_zygote():
    impl = registry.resolve("py:user_impls:segfaults_on_empty_batch", "vllm-lora")
    with SandboxRunner(impl, "cpu", timeout_s=30) as runner:
        runner.warm_up()
        pids = [runner.worker_pid, *(spare.pid for spare in runner._spares),
                runner._zygote.proc.pid]
        assert len(pids) == 4  # the worker, two forked spares, the zygote
        assert not any(_gone(pid) for pid in pids)
    assert all(_gone(pid) for pid in pids)


def test_a_spare_that_died_is_replaced_before_it_is_needed():
    impl = registry.resolve("py:user_impls:segfaults_on_empty_batch", "vllm-lora")
    with SandboxRunner(impl, "cpu", timeout_s=30) as runner:
        runner.warm_up()
        dead = [spare.pid for spare in runner._spares]
        for pid in dead:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(s.alive() for s in runner._spares) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _verdict(runner, impl, _vllm_case(3)).verdict == "pass"
        runner.warm_up()
        assert len(runner._spares) == 2
        assert all(s.pid not in dead and s.alive() for s in runner._spares)
        assert _verdict(runner, impl, _vllm_case(0)).verdict == "crash"
        assert _verdict(runner, impl, _vllm_case(2)).verdict == "pass"
        assert (runner.restarts, runner.cold_starts) == (1, 0)


def test_hang_is_a_timeout_and_the_campaign_goes_on():
    impl = registry.resolve("py:user_impls:hangs_on_disabled_adapter", "vllm-lora")
    with SandboxRunner(impl, "cpu", timeout_s=1.0) as runner:
        # the first run includes no load time: the worker is started and loaded first
        hung = _verdict(runner, impl, _vllm_case(2, enabled=(0, 1, 1)))
        assert hung.verdict == "timeout"
        assert "nor within 4 s on a fresh worker" in hung.detail
        assert hung.signature(_vllm_case(2, enabled=(0, 1, 1))) == (
            "vllm-lora--timeout--timeout")
        assert _verdict(runner, impl, _vllm_case(2)).verdict == "pass"
        # the hung worker and the one that confirmed it were lost; spares replaced both
        assert (runner.restarts, runner.cold_starts) == (2, 0)


def test_printing_implementation_does_not_corrupt_the_protocol(tmp_path, monkeypatch):
    module = tmp_path / "chatty_impl.py"
    module.write_text(
        "import sys\n"
        "from cuda_impl import torch_impl\n"
        "_ok = torch_impl.implementation()['align']\n"
        "def chatty(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,\n"
        "           num_tokens_post_pad, expert_map=None):\n"
        "    print('hello from the kernel' * 1000)\n"
        "    sys.stdout.flush()\n"
        "    _ok(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,\n"
        "        num_tokens_post_pad, expert_map)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    impl = registry.resolve("py:chatty_impl:chatty")
    assert impl.dialects == ("align",)
    case = Case("align", "production", np.array([[1, 0]], dtype=np.int32), 2, 2)
    with SandboxRunner(impl, "cpu", timeout_s=30) as runner:
        assert _verdict(runner, impl, case).verdict == "pass"


def test_a_module_that_fails_in_the_worker_is_an_implementation_error(tmp_path, monkeypatch):
    module = tmp_path / "half_broken.py"
    module.write_text(
        "import os\n"
        "def align(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,\n"
        "          num_tokens_post_pad, expert_map=None):\n"
        "    pass\n"
        "if os.environ.get('DIFFTEST_TEST_BREAK') == '1':\n"
        "    raise RuntimeError('cannot initialise')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    impl = registry.resolve("py:half_broken:align")
    monkeypatch.setenv("DIFFTEST_TEST_BREAK", "1")
    case = Case("align", "production", np.array([[0]], dtype=np.int32), 1, 1)
    with SandboxRunner(impl, "cpu", timeout_s=30) as runner:
        with pytest.raises(ImplementationError, match="cannot initialise"):
            runner.run(case)


def test_a_batch_with_a_segfault_pins_it_on_its_case_and_the_spare_runs_the_rest():
    impl = registry.resolve("py:user_impls:segfaults_on_empty_batch", "vllm-lora")
    cases = [_vllm_case(3), _vllm_case(1), _vllm_case(0), _vllm_case(2)]
    with SandboxRunner(impl, "cpu", timeout_s=30) as runner:
        runner.submit(cases[:2])
        assert [o.verdict for o in runner.collect()] == [None, None]  # one message, no crash
        runner.submit(cases)
        outcomes = runner.collect()
        # the worker streams each case as it is done: it died running the third
        verdicts = [evaluate(c, o, stable=impl.stable).verdict for c, o in zip(cases, outcomes)]
        assert verdicts == ["pass", "pass", "crash"]
        assert "SIGSEGV" in outcomes[2].detail
        assert runner.restarts == 1
        runner.submit(cases[3:])
        assert evaluate(cases[3], runner.collect()[0], stable=impl.stable).verdict == "pass"
        assert (runner.restarts, runner.cold_starts) == (1, 0)


def test_a_batch_that_hangs_pins_the_timeout_on_its_case():
    impl = registry.resolve("py:user_impls:hangs_on_disabled_adapter", "vllm-lora")
    cases = [_vllm_case(2), _vllm_case(2, enabled=(0, 1, 1)), _vllm_case(1)]
    with SandboxRunner(impl, "cpu", timeout_s=1.0, confirm_timeouts=False) as runner:
        runner.run(cases[0])  # started and loaded: the batch's second has no load time
        runner.submit(cases)
        verdicts = [evaluate(c, o, stable=impl.stable).verdict
                    for c, o in zip(cases, runner.collect())]
        assert verdicts == ["pass", "timeout"]
        assert runner.restarts == 1


def test_the_smallest_case_of_every_dialect_is_production_and_the_oracle_takes_it():
    # the zygote warms up on these: they must be well formed and exercise nothing
    from difftest.case import DIALECTS
    from difftest.classify import contract_of
    from difftest.dialects import DIALECT_INFO, smallest_case

    for dialect in DIALECTS:
        case = smallest_case(dialect)
        assert case.dialect == dialect and contract_of(case) == "production"
        assert (case.num_tokens, case.topk) == (1, 1)
        for rank in case.ranks():
            DIALECT_INFO[dialect].reference(case, rank)


def test_a_deadline_cuts_a_hang_and_no_case_of_it_is_run():
    import time

    from difftest.budget import BudgetSpent

    impl = registry.resolve("py:user_impls:hangs_on_disabled_adapter", "vllm-lora")
    with SandboxRunner(impl, "cpu", timeout_s=6) as runner:
        runner.warm_up()
        runner.deadline = time.monotonic() + 1.0
        start = time.monotonic()
        with pytest.raises(BudgetSpent):
            runner.run(_vllm_case(1, enabled=(0, 1, 1)))
        assert time.monotonic() - start < 5.0  # cut at the deadline, not the 6 s timeout
        assert runner.worker_pid is None  # the hung worker was killed
