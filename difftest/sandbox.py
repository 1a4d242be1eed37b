"""Crash-isolated execution: implementations run in warm worker processes.

The bugs this project hunts do not fail politely: an illegal memory access
poisons the CUDA context, a bad index segfaults, an off-by-one hangs. So the
runner (the parent) never runs an implementation and never initialises CUDA;
a worker process (``spawn``ed, so it owns its CUDA context) loads the
implementation once and then runs case after case. A worker that dies gives
its case the verdict ``crash`` (signal or exit code, and the tail of its
stderr); one that does not answer within ``timeout_s`` is killed and gives
``timeout``. Either way the next case gets a fresh worker, and nothing
already recorded is lost. A sticky CUDA error (illegal address) also ends the
worker, after it has reported the case as a ``crash``.

Campaigns send cases in batches (:meth:`SandboxRunner.submit`, then
:meth:`~SandboxRunner.collect`): one message and one staged copy to the
device for the batch, and the runner compares the previous batch while the
worker runs the next. A sticky device error stops a batch at the case that
caused it (every case is synchronised): the worker reports the cases up to
that one and exits, and :meth:`~SandboxRunner.collect` returns just those, so
the crash is recorded before any restart; the caller submits the rest again.
A batch whose worker dies or hangs without reporting gives no verdicts: its
cases are run again one by one, each in the isolation described above, so
the crash or hang is pinned on the case that caused it.

:class:`InProcessRunner` has the same interface without the isolation, for
tests and for implementations known to be well behaved.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from .case import Case
from .errors import ImplementationError
from .registry import Implementation

DEFAULT_TIMEOUT_S = 10.0
CONFIRM_FACTOR = 4.0  # a timeout is re-run once with this many times the budget
LOAD_TIMEOUT_S = 900.0  # the first load may JIT-build CUDA kernels
STDERR_TAIL = 2000


@dataclass
class Outcome:
    """What running one case produced: runs, or why there are none."""

    runs: list[list[Any]] = field(default_factory=list)  # [repeat][rank] RankRun
    verdict: str | None = None  # "crash" | "timeout" when the worker did not report
    detail: str = ""
    worker: str = ""
    elapsed_s: float = 0.0  # in the implementation's calls, all repeats and ranks; or waited

    @classmethod
    def of(cls, runs: list[list[Any]], worker: str) -> Outcome:
        return cls(runs, worker=worker,
                   elapsed_s=sum(r.elapsed_s for repeat in runs for r in repeat))


class InProcessRunner:
    """Runs cases in this process. No isolation: for tests and trusted code."""

    def __init__(self, impl: Implementation, device: str, repeats: int | None = None,
                 callables: dict[str, Any] | None = None) -> None:
        self.impl, self.device = impl, device
        self.repeats = repeats if repeats is not None else impl.repeats(device)
        self._pending: list[Case] = []
        self._callables = callables if callables is not None else impl.load()

    def run(self, case: Case) -> Outcome:
        from .execute import run_case

        runs = run_case(case, self._callables, self.device, self.repeats)
        return Outcome.of(runs, f"pid{os.getpid()}")

    def restart(self) -> None:
        """Nothing to restart: in this process, state a call leaves stays for the next."""

    def submit(self, cases: list[Case]) -> None:
        self._pending = list(cases)

    def collect(self) -> list[Outcome]:
        from .execute import run_batch

        cases, self._pending = self._pending, []
        if not cases:
            return []
        return [Outcome.of(runs, f"pid{os.getpid()}")
                for runs in run_batch(cases, self._callables, self.device, self.repeats)]

    def close(self) -> None:
        pass

    def __enter__(self) -> InProcessRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _worker_main() -> None:
    """Entry of a worker process (started by :meth:`SandboxRunner._start`).

    The protocol runs over the stdin/stdout pipes the parent made; file
    descriptor 1 is then pointed at the stderr file so that anything the
    implementation prints cannot corrupt it.
    """
    from multiprocessing.connection import Connection

    # Ctrl-C reaches the whole process group: the runner handles it (and ends this
    # worker); a worker dying of it would be recorded as a crash of its case.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    proto_out = os.dup(1)
    os.dup2(2, 1)
    inbox, outbox = Connection(os.dup(0), writable=False), Connection(proto_out, readable=False)
    impl, device, cuda_device = inbox.recv()
    if cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(cuda_device)
    try:
        callables = impl.load()
        if device.startswith("cuda"):
            import torch

            torch.cuda.init()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent verbatim
        detail = str(exc) if isinstance(exc, ImplementationError) else traceback.format_exc()
        outbox.send(("load_error", detail))
        return
    outbox.send(("ready", os.getpid()))
    from .execute import run_batch

    while True:
        try:
            msg = inbox.recv()
        except EOFError:
            return
        if msg is None:
            return
        cases, repeats = msg
        runs = run_batch(cases, callables, device, repeats)
        outbox.send(("ok", runs))
        if _fatal(runs[-1] if runs else []):
            # the CUDA context is poisoned: nothing this process runs next means anything
            os._exit(3)


def _fatal(runs: list[list[Any]]) -> bool:
    """Whether one case's runs (``[repeat][rank]``) end in a sticky device error."""
    return any(r.fatal for repeat in runs for r in repeat)


class SandboxRunner:
    """Runs cases in a warm worker process, restarting it after a crash or hang."""

    def __init__(self, impl: Implementation, device: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 repeats: int | None = None, cuda_device: int | None = None,
                 confirm_timeouts: bool = True) -> None:
        self.impl, self.device, self.timeout_s = impl, device, timeout_s
        self.confirm_timeouts = confirm_timeouts
        self.repeats = repeats if repeats is not None else impl.repeats(device)
        self.cuda_device = cuda_device
        self._proc: Any = None
        self._conn: Any = None
        self._pending: tuple[list[Case], bool] = ([], False)
        self._stderr = tempfile.NamedTemporaryFile(prefix="difftest-worker-", suffix=".err",
                                                   delete=False)
        self._stderr.close()
        self.restarts = 0
        self.fallbacks = 0  # batches re-run case by case after an unreported crash or a hang

    # -- worker lifecycle ---------------------------------------------------
    def _start(self) -> None:
        # A fresh interpreter, not multiprocessing's spawn: that would re-run the
        # user's __main__ module, and a pytest or script caller has no main guard.
        boot = (f"import sys; sys.path[:0] = {sys.path!r}; "
                "from difftest.sandbox import _worker_main; _worker_main()")
        err = open(self._stderr.name, "ab")
        proc = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err)
        err.close()
        parent = _Duplex(proc)
        parent.send((self.impl, self.device, self.cuda_device))
        if not parent.poll(LOAD_TIMEOUT_S):
            proc.kill()
            raise ImplementationError(f"--impl {self.impl.name}: worker did not load it within "
                                      f"{LOAD_TIMEOUT_S:.0f} s")
        try:
            kind, payload = parent.recv()
        except EOFError:
            proc.wait(5)
            raise ImplementationError(
                f"--impl {self.impl.name}: worker died while loading it "
                f"({_exit_text(proc.returncode)}); stderr: {self._tail()}") from None
        if kind == "load_error":
            proc.wait(5)
            raise ImplementationError(f"--impl {self.impl.name}: cannot load it: {payload}")
        self._proc, self._conn = proc, parent

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def _tail(self) -> str:
        try:
            with open(self._stderr.name, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - STDERR_TAIL))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def _clear_stderr(self) -> None:
        open(self._stderr.name, "wb").close()

    # -- running --------------------------------------------------------------
    def run(self, case: Case) -> Outcome:
        outcome = self._run_once(case, self.timeout_s)
        if outcome.verdict == "timeout" and self.confirm_timeouts:
            # A loaded machine can make a slow case look hung: a timeout counts only
            # when a fresh worker with CONFIRM_FACTOR times the budget hangs too.
            retry = self._run_once(case, self.timeout_s * CONFIRM_FACTOR)
            if retry.verdict != "timeout":
                return retry
            retry.detail = (f"no answer within {self.timeout_s:g} s, nor within "
                            f"{self.timeout_s * CONFIRM_FACTOR:g} s on a fresh worker; "
                            "worker killed")
            return retry
        return outcome

    def _run_once(self, case: Case, timeout_s: float) -> Outcome:
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._start()
        self._clear_stderr()
        worker = f"pid{self._proc.pid}"
        start = time.perf_counter()
        try:
            self._conn.send(([case], self.repeats))
            answered = self._conn.poll(timeout_s)
            if not answered:
                self._kill()
                self.restarts += 1
                return Outcome(verdict="timeout", worker=worker,
                               detail=f"no answer within {timeout_s:g} s; worker killed",
                               elapsed_s=time.perf_counter() - start)
            kind, runs = self._conn.recv()
            runs = runs[0]
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            try:
                code = self._proc.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            tail = self._tail()
            self._kill()
            self.restarts += 1
            return Outcome(verdict="crash", worker=worker,
                           detail=f"worker died: {_exit_text(code)}" + (
                               f"; stderr tail:\n{tail}" if tail else ""),
                           elapsed_s=time.perf_counter() - start)
        if _fatal(runs):
            self._retire()
        return Outcome.of(runs, worker)

    def restart(self) -> None:
        """End the worker: the next case runs in a fresh one, which nothing an earlier
        case left in memory or in the implementation's state can reach (a failure is
        confirmed alone so; ``restarts`` counts only restarts after a crash or hang)."""
        self._kill()

    def _retire(self) -> None:
        """The worker reported a sticky device error and is exiting: let it go."""
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._kill()
        self.restarts += 1

    def submit(self, cases: list[Case]) -> None:
        """Start running ``cases`` as one batch; :meth:`collect` gives their outcomes."""
        cases = list(cases)
        sent = False
        if cases:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._kill()
                    self._start()
                self._clear_stderr()
                self._conn.send((cases, self.repeats))
                sent = True
            except (BrokenPipeError, ConnectionResetError, OSError):
                sent = False
        self._pending = (cases, sent)

    def collect(self) -> list[Outcome]:
        """The outcomes of the batch :meth:`submit` started, in its order.

        After a sticky device error only the cases up to the one that caused
        it (its outcome a ``crash``): the cases after it did not run, and are
        the caller's to submit again. The batch has ``timeout_s`` in all. When
        its worker dies or hangs without reporting, every case of it is run
        again on its own (:meth:`run`), which pins the crash or hang on the
        case that caused it.
        """
        (cases, sent), self._pending = self._pending, ([], False)
        if not cases:
            return []
        if sent:
            worker = f"pid{self._proc.pid}"
            try:
                if self._conn.poll(self.timeout_s):
                    kind, payload = self._conn.recv()
                    if kind == "ok":
                        if payload and _fatal(payload[-1]):
                            self._retire()
                        return [Outcome.of(runs, worker) for runs in payload]
            except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
                pass
        self._kill()
        self.restarts += 1
        self.fallbacks += 1
        return [self.run(case) for case in cases]

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
        if self._proc is not None:
            try:
                self._proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        try:
            os.unlink(self._stderr.name)
        except OSError:
            pass

    def __enter__(self) -> SandboxRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Duplex:
    """send/recv/poll over a child's stdin/stdout pipes."""

    def __init__(self, proc: subprocess.Popen) -> None:
        from multiprocessing.connection import Connection

        self._out = Connection(os.dup(proc.stdin.fileno()), readable=False)
        self._in = Connection(os.dup(proc.stdout.fileno()), writable=False)
        proc.stdin.close()
        proc.stdout.close()

    def send(self, obj: Any) -> None:
        self._out.send(obj)

    def recv(self) -> Any:
        return self._in.recv()

    def poll(self, timeout: float) -> bool:
        return self._in.poll(timeout)

    def close(self) -> None:
        self._out.close()
        self._in.close()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
