"""Crash-isolated execution: implementations run in warm worker processes.

The bugs this project hunts do not fail politely: an illegal memory access
poisons the CUDA context, a bad index segfaults, an off-by-one hangs. So the
runner (the parent) never runs an implementation and never initialises CUDA;
a worker process loads the implementation once and then runs case after
case. A worker that dies gives the case it was running the verdict ``crash``
(signal or exit code, and the tail of its stderr); one that does not answer
within ``timeout_s`` is killed and gives ``timeout``, confirmed once on a
fresh worker with :data:`CONFIRM_FACTOR` times the budget. A sticky CUDA
error (illegal address) also ends the worker, after it has reported the case
as a ``crash``.

A crash costs the lost case, not a start-up: next to the worker in use the
runner keeps warm *spares*, started as soon as the worker is up, loaded in
the background and topped up each time one takes over (a spare that died is
replaced). On CUDA a worker is a fresh interpreter (its own CUDA context,
created while it is the spare; one spare). Elsewhere workers are forked from
a *zygote*, one spawned interpreter that has loaded the implementation and
called it once on the smallest case of each dialect (after a forked probe
showed that call returns), and never runs a case; a spare then costs a
``fork`` and two are kept. ``restarts`` counts the workers lost (crash, hang,
sticky error) and replaced; ``cold_starts`` the replacements that found no
live spare and were started on the spot. Workers never write core files.

Campaigns send cases in batches (:meth:`SandboxRunner.submit`, then
:meth:`~SandboxRunner.collect`), and the runner compares the previous batch
while the worker runs the next. On CUDA a batch is one message and one staged
copy to the device; on the CPU it goes in messages of 1, 2, 4, ... cases,
and each case is staged when its turn comes, so a fresh worker starts on the
first case at once. The worker streams each case's runs back as soon as the
case is done (a thread of the runner reads them, so the worker never waits
for the runner), so when it dies or hangs the case it was running is known:
:meth:`~SandboxRunner.collect` returns the outcomes up to and including that
one (a hang confirmed first), and the caller submits the rest again, which a
spare runs at once. Each case has ``timeout_s`` from the end of the one
before it.

:class:`InProcessRunner` has the same interface without the isolation, for
tests and for implementations known to be well behaved.
"""

from __future__ import annotations

import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterator

from .budget import BudgetSpent
from .case import Case
from .errors import ImplementationError, LoadError
from .registry import Implementation

DEFAULT_TIMEOUT_S = 10.0
CONFIRM_FACTOR = 4.0  # a timeout is re-run once with this many times the budget
LOAD_TIMEOUT_S = 900.0  # the first load may JIT-build CUDA kernels
REAP_TIMEOUT_S = 5.0  # a worker that closed its socket has this long to exit
STDERR_TAIL = 2000
SOCKET_BUFFER = 4 << 20  # bytes each side of a worker's socket may have in flight
FORKED_SPARES = 2  # a fork costs milliseconds: two, for crashes that come close together
SPAWNED_SPARES = 1  # each one holds its own CUDA context


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


# -- the worker side ------------------------------------------------------------
def _worker_main(fd: int) -> None:
    """Entry of a spawned interpreter (a worker or a zygote, :meth:`SandboxRunner._spawn`).

    ``fd`` is its end of a socket pair with the runner, which carries the
    protocol; stdout and stderr go to a file, so that anything the
    implementation prints cannot corrupt it.
    """
    # Ctrl-C reaches the whole process group: the runner handles it (and ends this
    # worker); a worker dying of it would be recorded as a crash of its case.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a crash is the verdict, not a core file: dumping one per crash costs seconds
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    conn = Connection(fd)
    role, impl, device, cuda_device = conn.recv()
    if cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(cuda_device)
    try:
        callables = impl.load()
        import torch  # every batch needs it: loaded once here, before any fork

        from . import execute  # noqa: F401

        if device.startswith("cuda"):
            torch.cuda.init()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent verbatim
        detail = str(exc) if isinstance(exc, ImplementationError) else traceback.format_exc()
        conn.send(("load_error", detail))
        return
    conn.send(("ready", os.getpid()))
    if role == "zygote":
        warm = _warm_up(impl, callables, device)
        _zygote_loop(conn, fd, callables, device, warm)
    else:
        _serve(conn, callables, device)


def _messages(conn: Connection) -> Iterator[Any]:
    """The messages on ``conn`` until it closes or says stop (``None``)."""
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        yield msg


def _serve(conn: Connection, callables: dict[str, Any], device: str) -> None:
    """Run batches until told to stop, sending each case's runs as soon as it is done."""
    from .execute import run_batch

    for cases, repeats in _messages(conn):
        runs = run_batch(cases, callables, device, repeats,
                         on_case=lambda one: conn.send(("case", one)))
        if runs and _fatal(runs[-1]):
            # the CUDA context is poisoned: nothing this process runs next means anything
            os._exit(3)


def _warm_up(impl: Implementation, callables: dict[str, Any], device: str) -> list[Case]:
    """Call the implementation once on the smallest case of each of its dialects, here in
    the zygote, so that every forked worker starts with the lazy set-up of the first
    call (torch's and the implementation's) done, and freeze what there is for the
    garbage collector (fewer copied pages per fork). A forked probe makes the calls
    first: a kernel that crashes or hangs even there stays cold, and the zygote alive.
    Returns the cases it ran (none when the probe did not come back).
    """
    import gc

    from .dialects import smallest_case
    from .execute import run_batch

    cases = [smallest_case(dialect) for dialect in impl.dialects]
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the probe
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        try:
            run_batch(cases, callables, device)
        finally:
            os._exit(0)
    if _reap(pid) != 0:
        return []
    run_batch(cases, callables, device)
    gc.freeze()
    return cases


def _zygote_loop(conn: Connection, fd: int, callables: dict[str, Any], device: str,
                 warm: list[Case]) -> None:
    """Fork a worker per ``("fork", stderr_path)``; reap one per ``("reap", pid)``.

    A forked worker gets a new socket pair: its end stays in the child, the
    other goes to the runner over ``fd`` (``SCM_RIGHTS``), so the runner talks
    to the worker directly. Before it says ``ready`` it runs the ``warm`` cases
    once more (a spare does that while the worker in use runs: the pages its
    first call touches are its own by the time it takes over). The zygote
    itself never runs a case.
    """
    from multiprocessing.reduction import sendfds

    from .execute import run_batch

    control = socket.socket(fileno=os.dup(fd))
    for msg in _messages(conn):
        if msg[0] == "reap":
            conn.send(("reaped", (msg[1], _reap(msg[1]))))
            continue
        ours, theirs = _socket_pair()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                conn.close()
                control.close()
                ours.close()
                err = os.open(msg[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                os.dup2(err, 1)
                os.dup2(err, 2)
                os.close(err)
                child = Connection(theirs.detach())
                if warm:
                    run_batch(warm, callables, device)
                child.send(("ready", os.getpid()))
                _serve(child, callables, device)
            except BaseException:  # noqa: BLE001 - a forked child must not return
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        theirs.close()
        conn.send(("forked", pid))
        sendfds(control, [ours.fileno()])
        ours.close()


def _reap(pid: int) -> int | None:
    """The exit code of the zygote's child ``pid`` (negative: the signal), waiting for it
    at most :data:`REAP_TIMEOUT_S` before killing it."""
    deadline = time.monotonic() + REAP_TIMEOUT_S
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.002)


def _zombie_exit_code(pid: int) -> int | None:
    """The exit code (negative: the signal) of a process that has died and not been
    reaped yet, from ``/proc/<pid>/stat`` (Linux); ``None`` when that cannot be told.

    A forked worker is the zygote's child, and asking the zygote costs a round
    trip on the path of every crash; its zombie already shows the status.
    """
    deadline = time.monotonic() + 0.05  # the socket closes just before the zombie shows
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        if fields[0] == "Z" and len(fields) >= 50:
            return os.waitstatus_to_exitcode(int(fields[49]))  # field 52: exit_code
        if time.monotonic() > deadline:
            return None
        time.sleep(0.001)


def _fatal(runs: list[list[Any]]) -> bool:
    """Whether one case's runs (``[repeat][rank]``) end in a sticky device error."""
    return any(r.fatal for repeat in runs for r in repeat)


# -- the runner side ----------------------------------------------------------------
class _Worker:
    """One worker as the runner sees it: its socket, a thread reading it, its stderr file.

    The thread puts every message on ``inbox`` as ``(arrival time, message)``,
    and ``None`` once the socket is closed (the worker died or exited).
    """

    def __init__(self, pid: int, conn: Connection, stderr_path: str, *,
                 proc: subprocess.Popen | None = None, zygote: _Zygote | None = None) -> None:
        self.pid, self.conn, self.stderr_path = pid, conn, stderr_path
        self.proc, self.zygote = proc, zygote
        self.ready = False
        self._reaped = False  # a forked worker's exit status was collected by its zygote
        self.inbox: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"difftest-worker-{pid}")
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                self.inbox.put(None)
                return
            self.inbox.put((time.perf_counter(), msg))

    def alive(self) -> bool:
        return self._reader.is_alive() and (self.proc is None or self.proc.poll() is None)

    def wait_ready(self, impl: str, timeout_s: float) -> None:
        """Wait for the worker's ``ready``; :class:`ImplementationError` when it cannot load."""
        if self.ready:
            return
        try:
            got = self.inbox.get(timeout=timeout_s)
        except queue.Empty:
            got = _NO_ANSWER
        _check_loaded(impl, _GONE if got is None else got if got is _NO_ANSWER else got[1],
                      timeout_s, lambda: f"{self.exit_text()}); stderr: {self.tail()}")
        self.ready = True

    def send(self, obj: Any) -> bool:
        """Send ``obj``; ``False`` when the worker is gone."""
        try:
            self.conn.send(obj)
            return True
        except OSError:
            return False

    def exit_text(self) -> str:
        """How the worker ended (it has closed its socket; waits for it to exit)."""
        if self.proc is not None:
            try:
                code = self.proc.wait(REAP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = None
        else:
            code = _zombie_exit_code(self.pid)
            if code is None:
                code = self.zygote.reap(self.pid)
            else:  # known already: the zygote reaps it while the runner goes on
                self.zygote.reap(self.pid, wait=False)
            self._reaped = True
        return _exit_text(code)

    def tail(self) -> str:
        return _tail(self.stderr_path)

    def clear_stderr(self) -> None:
        open(self.stderr_path, "wb").close()

    def kill(self, grace_s: float = 0.0) -> None:
        """End the process (after ``grace_s`` to exit by itself), reap it, drop its file."""
        if self.proc is not None:
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            if grace_s:
                self._reader.join(grace_s)
            if not self._reaped:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.zygote.reap(self.pid)
                self._reaped = True
        self._reader.join(REAP_TIMEOUT_S)
        self.conn.close()
        try:
            os.unlink(self.stderr_path)
        except OSError:
            pass

    def close(self) -> None:
        self.send(None)
        self.kill(grace_s=2.0)


class _Zygote:
    """A spawned interpreter with the implementation loaded that forks workers on request."""

    def __init__(self, proc: subprocess.Popen, conn: Connection, stderr_path: str) -> None:
        self.proc, self.conn, self.stderr_path = proc, conn, stderr_path
        self._asked: list[str] = []  # stderr paths of the forks requested, not answered
        self._forked: list[_Worker] = []  # answered, not taken

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, impl: str) -> None:
        got = _NO_ANSWER
        if self.conn.poll(LOAD_TIMEOUT_S):
            try:
                got = self.conn.recv()
            except EOFError:
                got = _GONE

        def ended() -> str:
            try:
                code = self.proc.wait(REAP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = None
            return f"{_exit_text(code)}); stderr: {_tail(self.stderr_path)}"

        _check_loaded(impl, got, LOAD_TIMEOUT_S, ended)

    def request(self, stderr_path: str) -> None:
        """Ask for a worker; :meth:`take` gets it (the fork happens meanwhile)."""
        self.conn.send(("fork", stderr_path))
        self._asked.append(stderr_path)

    def take(self) -> _Worker:
        """The worker of the oldest :meth:`request` not taken yet."""
        while not self._forked:
            self._read_answer()
        return self._forked.pop(0)

    def reap(self, pid: int, wait: bool = True) -> int | None:
        """Have the zygote collect its child ``pid``: its exit code, or ``None`` when
        ``wait`` is false (the answer is skipped when it comes) or the zygote is gone."""
        try:
            self.conn.send(("reap", pid))
            while wait:
                kind, value = self._read_answer()
                if kind == "reaped" and value[0] == pid:
                    return value[1]
        except (OSError, EOFError, ImplementationError):
            pass
        return None

    def _read_answer(self) -> tuple[str, Any]:
        """The next answer; a forked worker's goes to ``_forked`` with its socket."""
        from multiprocessing.reduction import recvfds

        kind, value = self._answer()
        if kind == "forked":
            with socket.socket(fileno=os.dup(self.conn.fileno())) as control:
                fd = recvfds(control, 1)[0]
            self._forked.append(_Worker(value, Connection(fd), self._asked.pop(0), zygote=self))
        return kind, value

    def _answer(self) -> Any:
        if not self.conn.poll(2 * REAP_TIMEOUT_S + 30):
            raise ImplementationError("the sandbox's zygote process does not answer")
        return self.conn.recv()

    def close(self) -> None:
        try:
            self.conn.send(None)
            self.proc.wait(2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.conn.close()
        try:
            os.unlink(self.stderr_path)
        except OSError:
            pass


class SandboxRunner:
    """Runs cases in a warm worker process, with a warm spare to take over after a crash.

    ``restarts``: workers lost to a crash, a hang or a sticky device error
    (each one replaced). ``cold_starts``: replacements started because no live
    spare was ready (the first worker is not one).
    """

    def __init__(self, impl: Implementation, device: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 repeats: int | None = None, cuda_device: int | None = None,
                 confirm_timeouts: bool = True) -> None:
        self.impl, self.device, self.timeout_s = impl, device, timeout_s
        self.confirm_timeouts = confirm_timeouts
        self.repeats = repeats if repeats is not None else impl.repeats(device)
        self.cuda_device = cuda_device
        # a CUDA context does not survive a fork: CUDA workers are fresh interpreters
        self._forks = not str(device).startswith("cuda") and hasattr(os, "fork")
        self._zygote: _Zygote | None = None
        self._worker: _Worker | None = None
        # warm spares, oldest first; forked ones are cheap, a CUDA one holds a context
        self._spares: list[_Worker] = []
        self._spare_count = FORKED_SPARES if self._forks else SPAWNED_SPARES
        self._forks_asked = 0  # forks requested from the zygote, not yet among the spares
        self._started = False  # the first worker is up: any later new one is a cold start
        self._pending: tuple[list[Case], _Worker | None, float] = ([], None, 0.0)
        # time.monotonic() at which every wait is cut (BudgetSpent): the campaign's budget
        self.deadline: float | None = None
        self.restarts = 0
        self.cold_starts = 0

    # -- worker lifecycle ---------------------------------------------------
    @property
    def worker_pid(self) -> int | None:
        """The pid of the worker that runs the next case, ``None`` when there is none yet."""
        worker = self._worker
        return worker.pid if worker is not None and worker.alive() else None

    def warm_up(self) -> None:
        """Start the worker and its spares where needed and wait until all are loaded."""
        self._current()
        self._arm()
        while self._forks_asked:
            self._receive_fork()
        for spare in self._spares:
            spare.wait_ready(self.impl.name, LOAD_TIMEOUT_S)

    def _spawn(self, role: str, stderr_path: str) -> tuple[subprocess.Popen, Connection]:
        # A fresh interpreter, not multiprocessing's spawn: that would re-run the
        # user's __main__ module, and a pytest or script caller has no main guard.
        ours, theirs = _socket_pair()
        boot = (f"import sys; sys.path[:0] = {sys.path!r}; "
                f"from difftest.sandbox import _worker_main; _worker_main({theirs.fileno()})")
        with open(stderr_path, "ab") as err:
            proc = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.DEVNULL,
                                    stdout=err, stderr=err, pass_fds=[theirs.fileno()])
        theirs.close()
        conn = Connection(ours.detach())
        conn.send((role, self.impl, self.device, self.cuda_device))
        return proc, conn

    def _start_zygote(self) -> _Zygote:
        path = _stderr_file()
        zygote = _Zygote(*self._spawn("zygote", path), path)
        try:
            zygote.wait_ready(self.impl.name)
        except ImplementationError:
            zygote.close()
            raise
        return zygote

    def _new_worker(self) -> _Worker | None:
        """A started worker (loading, or forked and ready); ``None``: the zygote was lost."""
        if not self._forks:
            path = _stderr_file()
            proc, conn = self._spawn("worker", path)
            return _Worker(proc.pid, conn, path, proc=proc)
        self._request_fork()
        return self._take_spare()

    def _request_fork(self) -> None:
        if self._zygote is not None and not self._zygote.alive():
            self._zygote.close()
            self._zygote, self._forks_asked = None, 0
        if self._zygote is None:
            self._zygote = self._start_zygote()
        self._zygote.request(_stderr_file())
        self._forks_asked += 1

    def _receive_fork(self) -> None:
        """Wait for the oldest fork requested and add it to the spares."""
        self._forks_asked -= 1
        try:
            self._spares.append(self._zygote.take())
        except (OSError, EOFError, ImplementationError):
            pass  # the zygote is gone: the next fork starts a new one

    def _take_spare(self) -> _Worker | None:
        """The oldest spare (waiting for a fork requested when there is none yet)."""
        while not self._spares and self._forks_asked:
            self._receive_fork()
        return self._spares.pop(0) if self._spares else None

    def _current(self) -> _Worker:
        """The worker for the next case: the one in use, else a live spare, else a new one."""
        worker = self._worker
        if worker is not None and not worker.alive():
            worker.kill()
            worker = self._worker = None
        while worker is None:
            spare = self._take_spare()
            if spare is not None and spare.alive():
                worker = spare
                break
            if spare is not None:
                spare.kill()
                continue
            self.cold_starts += self._started
            worker = self._new_worker()
        try:
            worker.wait_ready(self.impl.name, LOAD_TIMEOUT_S)
        except ImplementationError:
            worker.kill()
            raise
        self._worker, self._started = worker, True
        return worker

    def _arm(self) -> None:
        """Top the spares up (a fork is only requested); replace those that died."""
        for spare in [spare for spare in self._spares if not spare.alive()]:
            spare.kill()
            self._spares.remove(spare)
        while len(self._spares) + self._forks_asked < self._spare_count:
            if self._forks:
                self._request_fork()
            else:
                self._spares.append(self._new_worker())

    def _lose(self, worker: _Worker) -> None:
        """``worker`` crashed, hung or hit a sticky error: end it; the spare takes over."""
        worker.kill()
        if self._worker is worker:
            self._worker = None
        self.restarts += 1

    # -- running --------------------------------------------------------------
    def run(self, case: Case) -> Outcome:
        return self._confirmed(case, self._run_once(case, self.timeout_s))

    def _confirmed(self, case: Case, outcome: Outcome) -> Outcome:
        """A timeout counts only when a fresh worker with CONFIRM_FACTOR times the budget
        hangs too (a loaded machine can make a slow case look hung)."""
        if outcome.verdict != "timeout" or not self.confirm_timeouts:
            return outcome
        try:
            retry = self._run_once(case, self.timeout_s * CONFIRM_FACTOR)
        except BudgetSpent:
            outcome.detail += (f"; not confirmed: the run's budget ended during the "
                               f"{CONFIRM_FACTOR:g}x re-run")
            return outcome
        if retry.verdict == "timeout":
            retry.detail = (f"no answer within {self.timeout_s:g} s, nor within "
                            f"{self.timeout_s * CONFIRM_FACTOR:g} s on a fresh worker; "
                            "worker killed")
        return retry

    def _run_once(self, case: Case, timeout_s: float) -> Outcome:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise BudgetSpent(f"the run's budget ended before {self.impl.name} ran a case")
        worker, since = self._send([case])
        return self._next_outcome(worker, since, timeout_s)[0]

    def restart(self) -> None:
        """End the worker in use: the next case runs in a fresh one (a spare), which
        nothing an earlier case left in memory or in the implementation's state can
        reach (a failure is confirmed alone so; ``restarts`` counts only the workers
        lost to a crash, a hang or a sticky error)."""
        if self._worker is not None:
            self._worker.kill()
            self._worker = None

    def _send(self, cases: list[Case]) -> tuple[_Worker, float]:
        """Send ``cases`` to the current worker; a worker found dead on sending is replaced.

        On CUDA the batch is one message (one staged block, one copy to the
        device); elsewhere it goes in messages of 1, 2, 4, ... cases, so that
        the worker starts on the first case while the rest are on their way,
        and the runner seldom waits for room in the socket (a worker that
        dies meanwhile is found by :meth:`collect`, at its case).
        """
        messages, start, size = [], 0, 1
        while start < len(cases):
            stop = start + size if self._forks else len(cases)
            messages.append(cases[start:stop])
            start, size = stop, 2 * size
        while True:
            worker = self._current()
            worker.clear_stderr()
            since = time.perf_counter()
            if worker.send((messages[0], self.repeats)):
                break
            self._lose(worker)
        self._arm()  # while the worker runs the cases
        for message in messages[1:]:
            if not worker.send((message, self.repeats)):
                break
        return worker, since

    def _next_outcome(self, worker: _Worker, since: float, timeout_s: float
                      ) -> tuple[Outcome, float]:
        """The outcome of the next case ``worker`` runs, due ``timeout_s`` after ``since``;
        and when it arrived. A crash, hang or sticky error ends the worker."""
        name = f"pid{worker.pid}"
        due = since + timeout_s - time.perf_counter()
        left = float("inf") if self.deadline is None else self.deadline - time.monotonic()
        try:
            got = worker.inbox.get(timeout=max(0.0, min(due, left)))
        except queue.Empty:
            if left < due:  # cut by the budget, not a timeout: the case did not run
                worker.kill()
                if self._worker is worker:
                    self._worker = None
                raise BudgetSpent(f"the run's budget ended while waiting for {self.impl.name}")
            self._lose(worker)
            now = time.perf_counter()
            return Outcome(verdict="timeout", worker=name, elapsed_s=now - since,
                           detail=f"no answer within {timeout_s:g} s; worker killed"), now
        if got is None:
            now = time.perf_counter()
            how, tail = worker.exit_text(), worker.tail()
            self._lose(worker)
            return Outcome(verdict="crash", worker=name, elapsed_s=now - since,
                           detail=f"worker died: {how}" + (
                               f"; stderr tail:\\n{tail}" if tail else "")), now
        arrived, (kind, runs) = got
        if _fatal(runs):
            worker.kill(grace_s=REAP_TIMEOUT_S)  # it reported a sticky error and is exiting
            self._worker = None
            self.restarts += 1
        return Outcome.of(runs, name), arrived

    def submit(self, cases: list[Case]) -> None:
        """Start running ``cases`` as one batch; :meth:`collect` gives their outcomes."""
        cases = list(cases)
        if not cases:
            self._pending = ([], None, 0.0)
            return
        worker, since = self._send(cases)
        self._pending = (cases, worker, since)

    def collect(self) -> list[Outcome]:
        """The outcomes of the batch :meth:`submit` started, in its order.

        Each case has ``timeout_s`` from the end of the one before it (the
        first from the submit). After a crash, a (confirmed) timeout or a
        sticky device error only the cases up to and including the one that
        caused it: the cases after it did not run, and are the caller's to
        submit again (the spare takes them at once). :attr:`deadline` cuts the
        wait: the outcomes up to the cut (:class:`BudgetSpent` when there are none).
        """
        (cases, worker, since), self._pending = self._pending, ([], None, 0.0)
        outcomes: list[Outcome] = []
        for case in cases:
            try:
                outcome, since = self._next_outcome(worker, since, self.timeout_s)
            except BudgetSpent:
                if not outcomes:
                    raise
                break
            outcome = self._confirmed(case, outcome)
            outcomes.append(outcome)
            if worker is not self._worker:  # lost: the rest did not run
                break
        return outcomes

    def close(self) -> None:
        """End every process: the worker, the spares and the zygote."""
        while self._forks_asked:
            self._receive_fork()
        for worker in [self._worker, *self._spares]:
            if worker is not None:
                worker.close()
        self._worker, self._spares = None, []
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None

    def __enter__(self) -> SandboxRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _socket_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair with room for a batch in flight, so that neither side waits
    for the other to read (the kernel caps the size at its ``wmem_max``)."""
    pair = socket.socketpair()
    for end in pair:
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    return pair


_NO_ANSWER, _GONE = "no answer", "gone"  # instead of a worker's first message


def _check_loaded(impl: str, first: Any, timeout_s: float, ended: Callable[[], str]) -> None:
    """Raise :class:`LoadError` unless a worker's ``first`` message is ``ready``.

    ``ended()`` says how a worker that died while loading ended, and its stderr.
    """
    if first is _NO_ANSWER:
        raise LoadError(f"--impl {impl}: worker did not load it within {timeout_s:.0f} s")
    if first is _GONE:
        raise LoadError(f"--impl {impl}: worker died while loading it ({ended()}")
    kind, payload = first
    if kind == "load_error":
        # our own load errors arrive as their one line; anything else as a traceback
        raise LoadError(payload if payload.startswith(("--impl ", "--load ")) else
                        f"--impl {impl}: cannot load it: {payload}")


def _tail(path: str) -> str:
    """The last :data:`STDERR_TAIL` bytes of a worker's stderr file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - STDERR_TAIL))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def _stderr_file() -> str:
    fd, path = tempfile.mkstemp(prefix="difftest-worker-", suffix=".err")
    os.close(fd)
    return path


def _exit_text(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
