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
from difftest.sandbox import SandboxRunner, WorkerPlan


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


def test_a_queued_batch_whose_worker_dies_runs_again_case_by_case_and_the_crash_is_its_case():
    impl = registry.resolve("py:user_impls:segfaults_on_empty_batch", "vllm-lora")
    cases = [_vllm_case(3), _vllm_case(1), _vllm_case(0), _vllm_case(2)]
    with SandboxRunner(impl, "cpu", timeout_s=30) as runner:
        runner.submit(cases[:2], queued=True)
        clean = runner.collect()
        assert all(run.queued for o in clean for repeat in o.runs for run in repeat)
        runner.submit(cases, queued=True)
        outcomes = runner.collect()
        # no answer from the queued run: the spare ran the batch case by case
        verdicts = [evaluate(c, o, stable=impl.stable).verdict for c, o in zip(cases, outcomes)]
        assert verdicts == ["pass", "pass", "crash"]
        assert "SIGSEGV" in outcomes[2].detail
        assert not any(run.queued for o in outcomes for repeat in o.runs for run in repeat)
        assert runner.restarts == 2  # the queued run's worker, and the case by case run's


def test_a_queued_batch_that_hangs_runs_again_case_by_case_and_the_timeout_is_its_case():
    impl = registry.resolve("py:user_impls:hangs_on_disabled_adapter", "vllm-lora")
    cases = [_vllm_case(2), _vllm_case(2, enabled=(0, 1, 1)), _vllm_case(1)]
    with SandboxRunner(impl, "cpu", timeout_s=1.0, confirm_timeouts=False) as runner:
        runner.run(cases[0])
        runner.submit(cases, queued=True)
        verdicts = [evaluate(c, o, stable=impl.stable).verdict
                    for c, o in zip(cases, runner.collect())]
        assert verdicts == ["pass", "timeout"]
        assert runner.restarts == 2


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


def _until_idle(runner, seconds: float = 20.0) -> bool:
    """Poll ``runner.busy()`` until it is False; whether it became so in ``seconds``."""
    end = time.monotonic() + seconds
    while runner.busy():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_busy_while_a_case_of_the_batch_has_not_answered_and_not_once_it_did_or_died():
    hangs = registry.resolve("py:user_impls:hangs_on_disabled_adapter", "vllm-lora")
    with SandboxRunner(hangs, "cpu", timeout_s=1.0, confirm_timeouts=False) as runner:
        assert not runner.busy()  # nothing submitted
        runner.run(_vllm_case(1))  # loaded
        runner.submit([_vllm_case(2), _vllm_case(2, enabled=(0, 1, 1))])
        time.sleep(0.5)  # the first answered long ago; the second spins
        assert runner.busy()
        assert [o.verdict for o in runner.collect()][1] == "timeout"
        assert not runner.busy()  # collected
        runner.submit([_vllm_case(3), _vllm_case(1)])
        assert _until_idle(runner)  # both answered: collect would not wait
        assert [evaluate(c, o, stable=hangs.stable).verdict for c, o in
                zip([_vllm_case(3), _vllm_case(1)], runner.collect())] == ["pass", "pass"]
    segfaults = registry.resolve("py:user_impls:segfaults_on_empty_batch", "vllm-lora")
    with SandboxRunner(segfaults, "cpu", timeout_s=30) as runner:
        runner.run(_vllm_case(1))
        runner.submit([_vllm_case(0), _vllm_case(2)])
        assert _until_idle(runner)  # the worker died at the first: the second never answers
        assert [o.verdict for o in runner.collect()] == ["crash"]


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


# -- one mechanism for every device: the CUDA plan, exercised on the CPU ------------
# On CUDA the zygote loads nothing of the implementation (a CUDA context does not survive
# a fork) and each forked worker loads it after the fork; WorkerPlan(load_in_zygote=False)
# is that plan, and on the CPU it runs the same code but for the context itself.
_CHILD_LOADS = WorkerPlan(load_in_zygote=False, spares=2, max_spares=3)
_CANNOT_SET_UP = ("a forked worker could not set up: --impl py:tells_impl:segfaults: importing "
                  "'tells_impl' raised RuntimeError: no context in a forked child")

_SEGFAULTS_AND_TELLS = """\
import os, sys
sys.path.insert(0, {tests!r})
import user_impls
with open({log!r}, "a") as log:
    log.write(f"{{os.getpid()}}\\n")
if os.environ.get("SANDBOX_TEST_BREAK_FORKS") and os.path.exists(os.environ[
        "SANDBOX_TEST_BREAK_FORKS"]) and os.getppid() != int(os.environ["SANDBOX_TEST_RUNNER"]):
    raise RuntimeError("no context in a forked child")  # as CUDA after a fork would
segfaults = user_impls.segfaults_on_empty_batch
"""


@pytest.fixture
def child_loaded(tmp_path, monkeypatch):
    """A py: implementation (segfaults at T = 0) whose module logs each process that
    imports it, and refuses to import in a forked worker once ``tmp_path/break``
    exists (SANDBOX_TEST_BREAK_FORKS; a spawned worker, the runner's child, may)."""
    log = tmp_path / "imported-by"
    (tmp_path / "tells_impl.py").write_text(_SEGFAULTS_AND_TELLS.format(
        tests=os.path.dirname(__file__), log=str(log)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SANDBOX_TEST_RUNNER", str(os.getpid()))
    monkeypatch.setenv("SANDBOX_TEST_BREAK_FORKS", str(tmp_path / "break"))
    impl = registry.resolve("py:tells_impl:segfaults", "vllm-lora")
    return impl, log, tmp_path / "break"


def _importers(log) -> set[int]:
    return {int(line) for line in log.read_text().split()} if log.exists() else set()


def test_a_zygote_that_loads_nothing_forks_workers_that_load_and_take_over(child_loaded):
    impl, log, _ = child_loaded
    with SandboxRunner(impl, "cpu", timeout_s=30, plan=_CHILD_LOADS) as runner:
        runner.warm_up()
        zygote, worker = runner._zygote.proc.pid, runner.worker_pid
        spares = [spare.pid for spare in runner._spares]
        assert len(spares) == 2
        assert zygote not in _importers(log)  # the CUDA zygote must not load it
        assert {worker, *spares} <= _importers(log)  # each worker did, after its fork
        crashed = _verdict(runner, impl, _vllm_case(0))
        assert (crashed.verdict, crashed.detail.split(";")[0]) == (
            "crash", "worker died: killed by signal SIGSEGV")
        assert _verdict(runner, impl, _vllm_case(3)).verdict == "pass"
        assert runner.worker_pid == spares[0]
        assert (runner.restarts, runner.cold_starts, runner.fallback) == (1, 0, None)


def test_the_zygote_loads_the_implementation_itself_on_the_cpu(child_loaded):
    impl, log, _ = child_loaded
    with SandboxRunner(impl, "cpu", timeout_s=30) as runner:
        runner.warm_up()
        # the zygote and its probe imported it; the forked workers inherited it
        assert runner._zygote.proc.pid in _importers(log)
        assert runner.worker_pid not in _importers(log)


def test_forks_that_cannot_set_up_fall_back_to_spawned_workers_said_once(child_loaded, capfd):
    impl, log, broken = child_loaded
    broken.touch()  # every forked child fails to load, the zygote's probe first
    with SandboxRunner(impl, "cpu", timeout_s=30, plan=_CHILD_LOADS) as runner:
        assert _verdict(runner, impl, _vllm_case(3)).verdict == "pass"
        crashed = _verdict(runner, impl, _vllm_case(0))
        assert crashed.verdict == "crash" and "SIGSEGV" in crashed.detail
        assert _verdict(runner, impl, _vllm_case(2)).verdict == "pass"
        assert runner.fallback == _CANNOT_SET_UP
        assert (runner.restarts, runner.cold_starts) == (1, 0)  # a spawned spare took over
        assert runner._zygote is None and runner._spare_count == 1
    said = [line for line in capfd.readouterr().err.splitlines() if "spawned" in line]
    assert said == [f"difftest: {impl.name} on cpu: {runner.fallback}; its workers are "
                    "spawned interpreters from now on (each crash then costs a start-up)"]


def test_a_fork_that_fails_after_the_probe_falls_back_and_the_worker_in_use_goes_on(
        child_loaded, capfd):
    impl, log, broken = child_loaded
    with SandboxRunner(impl, "cpu", timeout_s=30, plan=_CHILD_LOADS) as runner:
        runner.warm_up()
        first = runner.worker_pid
        broken.touch()
        for spare in runner._spares:  # both die: their replacements are forked now
            os.kill(spare.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(s.alive() for s in runner._spares) and time.monotonic() < deadline:
            time.sleep(0.01)
        runner.warm_up()  # ... and fail to set up: spawned spares instead
        assert runner.fallback == _CANNOT_SET_UP
        assert runner.worker_pid == first  # the forked worker in use set up: it stays
        assert [s.proc is not None for s in runner._spares] == [True]
        assert _verdict(runner, impl, _vllm_case(0)).verdict == "crash"
        assert _verdict(runner, impl, _vllm_case(1)).verdict == "pass"
        assert runner.worker_pid != first and (runner.restarts, runner.cold_starts) == (1, 0)
    assert sum("spawned" in line for line in capfd.readouterr().err.splitlines()) == 1


def test_the_pool_grows_when_a_crash_finds_no_spare_ready(tmp_path, monkeypatch):
    (tmp_path / "slow_impl.py").write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import user_impls\n"
        "if os.path.exists(os.environ['SANDBOX_TEST_SLOW']):\n"
        "    time.sleep(3)  # a slow set-up, as a CUDA context can be\n"
        "segfaults = user_impls.segfaults_on_empty_batch\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SANDBOX_TEST_SLOW", str(tmp_path / "slow"))
    impl = registry.resolve("py:slow_impl:segfaults", "vllm-lora")
    plan = WorkerPlan(load_in_zygote=False, spares=1, max_spares=2)
    with SandboxRunner(impl, "cpu", timeout_s=30, plan=plan) as runner:
        runner.warm_up()
        (tmp_path / "slow").touch()  # from now on a spare needs 3 s to get ready
        assert _verdict(runner, impl, _vllm_case(0)).verdict == "crash"
        assert _verdict(runner, impl, _vllm_case(0)).verdict == "crash"  # on a ready spare
        assert (runner.spare_waits, runner.pool_size) == (0, 1)
        assert _verdict(runner, impl, _vllm_case(1)).verdict == "pass"  # none ready: waits
        assert (runner.spare_waits, runner.pool_size, runner.restarts) == (1, 2, 2)


# -- the death notice --------------------------------------------------------------------
def test_a_death_notice_ends_the_worker_after_the_messages_sent_before_it():
    import socket
    from multiprocessing.connection import Connection

    from difftest.sandbox import _Worker

    ours, theirs = socket.socketpair()
    notice, noticed = os.pipe()
    path = __import__("tempfile").mkstemp()[1]
    worker = _Worker(os.getpid(), Connection(ours.detach()), path, notice=notice)
    child = Connection(theirs.detach())
    child.send(("ready", 0))
    child.send(("case", ["runs"]))
    os.write(noticed, b"Fatal Python error: Segmentation fault\n\nStack (most recent")
    worker.wait_ready("x", 10)
    assert worker.inbox.get(timeout=10)[1] == ("case", ["runs"])
    assert worker.inbox.get(timeout=10) is None  # dead, though its socket is still open
    assert worker.exit_text() == "killed by signal SIGSEGV"
    child.close()  # the kernel's teardown ends; the socket closes
    os.close(noticed)
    assert worker.finished(10)


def test_a_notice_closed_without_a_fatal_signal_waits_for_the_socket():
    import socket
    from multiprocessing.connection import Connection

    from difftest.sandbox import _fatal_signal, _Worker

    read, write = os.pipe()
    os.write(write, b"Fatal Python error: Segmentation fault\n")
    os.close(write)
    assert _fatal_signal(read) == "SIGSEGV"
    os.close(read)
    ours, theirs = socket.socketpair()
    notice, noticed = os.pipe()
    worker = _Worker(os.getpid(), Connection(ours.detach()), __import__("tempfile").mkstemp()[1],
                     notice=notice)
    os.close(noticed)  # a process exiting closes it with nothing written
    child = Connection(theirs.detach())
    child.send(("ready", 0))
    child.send(("case", []))
    worker.wait_ready("x", 10)
    assert worker.inbox.get(timeout=10)[1] == ("case", [])
    child.close()
    assert worker.inbox.get(timeout=10) is None
    assert worker._signal is None


_SLOW_TO_LOAD = """\
import os, sys, time
sys.path.insert(0, {tests!r})
import user_impls
if os.getppid() != int(os.environ["SANDBOX_TEST_RUNNER"]):
    time.sleep(1.0)  # each forked worker's set-up, as a CUDA context's would be
correct = user_impls.correct_vllm
"""


def test_a_campaign_warm_up_waits_for_its_worker_and_leaves_the_spares_setting_up(
        tmp_path, monkeypatch):
    (tmp_path / "slow_fork_set_up.py").write_text(
        _SLOW_TO_LOAD.format(tests=os.path.dirname(__file__)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SANDBOX_TEST_RUNNER", str(os.getpid()))
    impl = registry.resolve("py:slow_fork_set_up:correct", "vllm-lora")
    with SandboxRunner(impl, "cpu", timeout_s=30, plan=_CHILD_LOADS) as runner:
        runner.warm_up(spares=False)
        assert runner._worker.is_ready()
        assert len(runner._spares) + runner._forks_asked == 2  # both asked for
        assert not any(spare.is_ready() for spare in runner._spares)  # still loading
        assert _verdict(runner, impl, _vllm_case(3)).verdict == "pass"
        runner.warm_up()
        assert len(runner._spares) == 2 and all(s.is_ready() for s in runner._spares)
