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

A crash costs the lost case, not a start-up. Workers are forked from a
*zygote*, one spawned interpreter that has imported torch and difftest and
never runs a case, and the runner keeps a pool of warm *spares* next to the
worker in use, forked and set up in the background while the worker runs, so
that a crash swaps a ready spare in at once. One mechanism for every device;
the device only picks the settings (:class:`WorkerPlan`):

- on the CPU the zygote loads the implementation and calls it once on the
  smallest case of each dialect (after a forked *probe* showed that this
  returns), so a spare costs a ``fork``;
- on CUDA a context does not survive a fork, and a process forked from one
  that initialised the driver cannot create one. So the CUDA zygote imports
  torch, difftest and our backends' modules and calls nothing that touches
  the driver (no ``torch.cuda.is_available()``, no device count, no load of
  the implementation: our CUDA backend asks the device's architecture when
  it loads); each forked worker creates its own context right after the fork,
  loads the implementation and runs the smallest cases on the device before
  it says it is ready. Those contexts are created in the background (the
  driver creates one at a time: about 0.2 s each on an H200, 0.33 s for one
  alone), and the pool grows (up to :attr:`WorkerPlan.max_spares`) while
  crashes come faster than spares get ready.

When a forked worker cannot set up (the probe or a later fork fails to create
its context or to load), the runner says so once on stderr (:attr:`fallback`)
and from then on starts spawned interpreters (each loads on its own; one
spare): slower after a crash, never a kernel failure. ``restarts`` counts the
workers lost (crash, hang, sticky error) and replaced; ``cold_starts`` the
replacements that found no live spare and were started on the spot;
``spare_waits`` the takeovers that found no spare ready yet. Workers never
write core files, and a worker that is ended is not waited for: it is killed
and reaped in the background (by the zygote for a forked one).

Campaigns send cases in batches (:meth:`SandboxRunner.submit`, then
:meth:`~SandboxRunner.collect`), and the runner compares the previous batch
while the worker runs the next. Each case is pickled once per batch, however
often the rest of its batch is sent again after crashes. On CUDA a batch is
one message (one staged copy to the device); on the CPU its first case goes
alone and the rest in a second message, and each case is staged when its turn
comes, so a fresh worker starts on the first case at once. The worker streams
each case's runs back as soon as the case is done (a thread of the runner
reads them, so the worker never waits for the runner), so when it dies or
hangs the case it was running is known: :meth:`~SandboxRunner.collect`
returns the outcomes up to and including that one (a hang confirmed first),
and the caller submits the rest again, which a spare runs at once. Each case
has ``timeout_s`` from the end of the one before it. A *queued* batch (what a
CUDA campaign sends while nothing has failed: one synchronisation for the
batch, :func:`difftest.execute.run_batch`) answers all at once; when its
worker dies or hangs no case is to blame yet, and the runner runs the batch
again case by case on a spare.

:class:`InProcessRunner` has the same interface without the isolation, for
tests and for implementations known to be well behaved.
"""

from __future__ import annotations

import os
import pickle
import queue
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterator

from .budget import BudgetSpent
from .case import Case
from .errors import ImplementationError, LoadError
from .registry import Implementation

DEFAULT_TIMEOUT_S = 10.0
CONFIRM_FACTOR = 4.0  # a timeout is re-run once with this many times the budget
LOAD_TIMEOUT_S = 900.0  # the first load may JIT-build CUDA kernels
SET_UP_TIMEOUT_S = 300.0  # a forked worker creating its CUDA context and loading
REAP_TIMEOUT_S = 5.0  # a worker that closed its socket has this long to exit
STDERR_TAIL = 2000
SOCKET_BUFFER = 4 << 20  # bytes each side of a worker's socket may have in flight
SPAWNED_SPARES = 1  # after a fallback: each spawned spare is a whole interpreter


@dataclass(frozen=True)
class WorkerPlan:
    """How the workers of a device come to be: always forked from a zygote, and
    ``load_in_zygote``: the zygote loads the implementation and warms up on it, so a
    worker costs a fork (CPU); otherwise each worker loads it after the fork, with its
    own CUDA context (CUDA). ``spares``: warm spares kept from the start; the pool
    grows by one, up to ``max_spares``, each time a worker lost found no spare ready."""

    load_in_zygote: bool
    spares: int
    max_spares: int


CPU_PLAN = WorkerPlan(load_in_zygote=True, spares=2, max_spares=4)
CUDA_PLAN = WorkerPlan(load_in_zygote=False, spares=2, max_spares=8)  # a context each


def plan_for(device: str) -> WorkerPlan:
    return CUDA_PLAN if str(device).startswith("cuda") else CPU_PLAN


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
    """Runs cases in this process. No isolation: for tests and trusted code.
    ``queued_batches``: whether a campaign sends it queued batches (off unless asked:
    a sticky error of one, :class:`~difftest.execute.QueuedBatchLost`, has no spare
    to go to)."""

    def __init__(self, impl: Implementation, device: str, repeats: int | None = None,
                 callables: dict[str, Any] | None = None, queued_batches: bool = False
                 ) -> None:
        self.impl, self.device = impl, device
        self.repeats = repeats if repeats is not None else impl.repeats(device)
        self.queued_batches = queued_batches
        self._pending: list[Case] = []
        self._keys: list[Any] | None = None
        self._queued = False
        self._callables = callables if callables is not None else impl.load()

    def run(self, case: Case) -> Outcome:
        from .execute import run_case

        runs = run_case(case, self._callables, self.device, self.repeats)
        return Outcome.of(runs, f"pid{os.getpid()}")

    def restart(self) -> None:
        """Nothing to restart: in this process, state a call leaves stays for the next."""

    def submit(self, cases: list[Case], keys: list[Any] | None = None,
               queued: bool = False) -> None:
        self._pending, self._keys, self._queued = list(cases), keys, queued

    def collect(self) -> list[Outcome]:
        from .execute import run_batch

        cases, self._pending = self._pending, []
        if not cases:
            return []
        return [Outcome.of(runs, f"pid{os.getpid()}")
                for runs in run_batch(cases, self._callables, self.device, self.repeats,
                                      keys=self._keys, queued=self._queued)]

    def close(self) -> None:
        pass

    def __enter__(self) -> InProcessRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the worker side ------------------------------------------------------------
def _worker_main(fd: int, notice: int | None = None) -> None:
    """Entry of a spawned interpreter (a zygote, or a worker after a fallback;
    :meth:`SandboxRunner._spawn`).

    ``fd`` is its end of a socket pair with the runner, which carries the
    protocol; stdout and stderr go to a file, so that anything the
    implementation prints cannot corrupt it. ``notice``: a worker's death
    notice pipe (:func:`_notify_death_on`).
    """
    # Ctrl-C reaches the whole process group: the runner handles it (and ends this
    # worker); a worker dying of it would be recorded as a crash of its case.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a crash is the verdict, not a core file: dumping one per crash costs seconds
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    conn = Connection(fd)
    role, impl, device, cuda_device, plan = conn.recv()
    if cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(cuda_device)
    if role == "zygote":
        _zygote_main(conn, fd, impl, device, plan)
        return
    _notify_death_on(notice)
    try:
        callables = _set_up(impl, None, device)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent verbatim
        conn.send(("load_error", _load_error(exc)))
        return
    conn.send(("ready", os.getpid()))
    _serve(conn, callables, device)


# what faulthandler writes first for each fatal signal it catches (CPython's names)
_FATAL_SIGNALS = {"Segmentation fault": "SIGSEGV", "Bus error": "SIGBUS",
                  "Illegal instruction": "SIGILL", "Floating point exception": "SIGFPE",
                  "Aborted": "SIGABRT"}


def _notify_death_on(fd: int | None) -> None:
    """Have a fatal signal (segfault, abort, ...) write ``Fatal Python error: <what>``
    to ``fd`` at once, before the process dies (``faulthandler``). The runner reads it
    there, apart from the protocol and from stderr: it learns of the crash before the
    kernel has torn the process down (milliseconds for a process with torch loaded),
    and a spare starts on the next case meanwhile."""
    if fd is not None:
        import faulthandler

        faulthandler.enable(file=fd, all_threads=False)


def _load_error(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ImplementationError) else traceback.format_exc()


def _set_up(impl: Implementation, callables: dict[str, Any] | None,
            device: str) -> dict[str, Any]:
    """What a worker does before it runs a case: on CUDA create its own context; load
    the implementation unless its zygote did (``callables``). Returns the callables."""
    import torch  # every batch needs it

    from . import execute  # noqa: F401

    if str(device).startswith("cuda"):
        torch.cuda.init()
        torch.empty(1, device="cuda")  # the context itself, and the allocator's first block
        torch.cuda.synchronize()
    return callables if callables is not None else impl.load()


def _preload(impl: Implementation) -> None:
    """What a CUDA zygote loads: the modules of our backends, which build nothing and
    touch no driver when imported. Loading the implementation (ours asks the device's
    architecture; a user's module may do anything) is each forked worker's, after it
    has its own context."""
    from .registry import _backend

    if impl.kind in ("torch", "cuda"):
        _backend(impl.kind)


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
    """Run batches until told to stop, sending each case's runs as soon as it is done.

    A batch arrives as its cases pickled one by one (:meth:`SandboxRunner._encode`). A
    queued one (:func:`~difftest.execute.run_batch`) that hit a sticky error sends
    nothing: the runner runs it again case by case on a spare."""
    from .execute import QueuedBatchLost, run_batch

    for blobs, repeats, keys, queued in _messages(conn):
        cases = [pickle.loads(blob) for blob in blobs]
        try:
            runs = run_batch(cases, callables, device, repeats, queued=queued,
                             on_case=lambda one: conn.send(("case", one)), keys=keys)
        except QueuedBatchLost:
            os._exit(3)
        if runs and _fatal(runs[-1]):
            # the CUDA context is poisoned: nothing this process runs next means anything
            os._exit(3)


def _zygote_main(conn: Connection, fd: int, impl: Implementation, device: str,
                 plan: WorkerPlan) -> None:
    """Load what every worker needs, probe, say ``ready`` (or why no fork can work:
    ``cannot_fork``), then fork workers on request (:func:`_zygote_loop`)."""
    import gc

    try:
        import torch  # loaded once here, before any fork

        from . import execute  # noqa: F401

        if plan.load_in_zygote:
            callables: dict[str, Any] | None = impl.load()
        else:
            _preload(impl)
            callables = None
            if torch.cuda.is_initialized():  # torch's own flag: asking it initialises nothing
                conn.send(("cannot_fork", "CUDA was initialised in the zygote"))
                return
    except BaseException as exc:  # noqa: BLE001 - reported to the parent verbatim
        conn.send(("load_error", _load_error(exc)))
        return
    warm, why = _probe(impl, callables, device)
    if why is not None:
        conn.send(("cannot_fork", why))
        return
    if callables is not None and warm:
        # the lazy set-up of the first call (torch's and the implementation's) done once,
        # here: every forked worker starts with it
        from .execute import run_batch

        run_batch(warm, callables, device)
    gc.freeze()  # fewer pages each fork copies when the collector runs
    conn.send(("ready", os.getpid()))
    _zygote_loop(conn, fd, impl, callables, device, warm)


MADV_COLLAPSE = 25  # Linux 6.1+: make the range's pages huge pages, now
HUGE_PAGE = 2 << 20
# the zygote's memory becomes huge pages once it has forked this many workers: it costs
# ~0.4 s once and saves ~3 ms a fork, worth it only to a run that loses workers
HUGE_PAGES_AFTER_FORKS = 8


def _fewer_page_tables() -> None:
    """Turn the zygote's private memory into 2 MiB pages where it is mostly resident.

    A fork copies one page-table entry per 4 KiB page of private memory, and the
    exit of the child drops them again; torch leaves about 150 MB of it, so a
    fork cost ~4 ms and a crash as much again in the exit. As huge pages it is
    512 times fewer entries (a fork ~1 ms); a page a child writes is still
    copied 4 KiB at a time. Done once :data:`HUGE_PAGES_AFTER_FORKS` workers
    have been forked (the collapse copies the memory: ~0.4 s). Best effort:
    where the kernel cannot (older than 6.1, huge pages off, no ``/proc``)
    forks stay as they were.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/self/smaps") as f:
            smaps = f.read()
    except OSError:
        return
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    region = None
    for line in smaps.splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            anonymous = len(head) < 6 or head[5] == "[heap]"
            region = (lo, hi) if head[1].startswith("rw") and anonymous else None
        elif head[0] == "Rss:" and region is not None:
            lo, hi = region
            # a mostly untouched region stays as it is: a huge page would fill it
            if int(head[1]) * 1024 * 2 >= hi - lo:
                start = -(-lo // HUGE_PAGE) * HUGE_PAGE
                stop = hi // HUGE_PAGE * HUGE_PAGE
                if stop > start:
                    madvise(start, stop - start, MADV_COLLAPSE)  # fails harmlessly: EINVAL
            region = None


def _probe(impl: Implementation, callables: dict[str, Any] | None,
           device: str) -> tuple[list[Case], str | None]:
    """Fork a child that sets up as every worker will (:func:`_set_up`) and then calls
    the implementation on the smallest case of each dialect. Returns those cases, for
    every worker to warm up on before it says ready (none when the calls crashed or hung:
    the kernel stays cold, the zygote alive), and ``None``; or no case and why the child
    could not set up (then no forked worker can: the runner spawns its workers).
    """
    from .dialects import smallest_case
    from .execute import run_batch

    cases = [smallest_case(dialect) for dialect in impl.dialects]
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the probe
        code = 0
        try:
            os.close(read)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            try:
                ready = _set_up(impl, callables, device)
            except BaseException as exc:  # noqa: BLE001 - told to the zygote
                os.write(write, b"!" + _one_line(exc).encode())
                code = 1
            else:
                os.write(write, b".")
                run_batch(cases, ready, device)
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read(1) if select.select([pipe], [], [], SET_UP_TIMEOUT_S)[0] else None
        if said == b"!":
            why = pipe.read().decode(errors="replace")
    if said == b".":
        return (cases if _reap(pid) == 0 else []), None
    code = _reap(pid, timeout_s=0.0 if said is None else REAP_TIMEOUT_S)
    if said == b"!":
        return [], f"a forked worker could not set up: {why}"
    if said is None:
        return [], f"a forked worker did not set up within {SET_UP_TIMEOUT_S:.0f} s"
    return [], f"a forked worker died setting up ({_exit_text(code)})"


def _one_line(exc: BaseException) -> str:
    """``exc`` in one line: our own errors as their message, others with their type."""
    text = str(exc) if isinstance(exc, ImplementationError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:500]


def _zygote_loop(conn: Connection, fd: int, impl: Implementation,
                 callables: dict[str, Any] | None, device: str, warm: list[Case]) -> None:
    """Fork a worker per ``("fork", stderr_path)``; reap one per ``("reap", pid, answer)``.

    A forked worker gets a new socket pair: its end stays in the child, the
    other goes to the runner over ``fd`` (``SCM_RIGHTS``), so the runner talks
    to the worker directly. It sets up (:func:`_set_up`: on CUDA its context
    and the implementation) and runs the ``warm`` cases before it says
    ``ready`` (a spare does that while the worker in use runs: the pages its
    first call touches are its own by the time it takes over); a set-up that
    fails says ``init_error``. Reaping never holds up a fork: a child asked
    for is reaped once it has exited (killed after :data:`REAP_TIMEOUT_S`),
    between messages, with ``("reaped", (pid, code))`` when ``answer``. When
    told to stop, every child still here is killed and reaped. After
    :data:`HUGE_PAGES_AFTER_FORKS` forks its memory becomes huge pages
    (:func:`_fewer_page_tables`). The zygote itself never runs a case.
    """
    from multiprocessing.reduction import sendfds

    from .execute import run_batch

    control = socket.socket(fileno=os.dup(fd))
    children: set[int] = set()
    forks = 0
    dying: dict[int, list[Any]] = {}  # pid -> [when to kill it, whether to answer]
    while True:
        if dying and not conn.poll(0.002):
            _reap_exited(conn, dying, children)
            continue
        try:
            msg = conn.recv()
        except EOFError:
            break
        if msg is None:
            break
        if msg[0] == "reap":
            dying[msg[1]] = [time.monotonic() + REAP_TIMEOUT_S, msg[2]]
            _reap_exited(conn, dying, children)
            continue
        ours, theirs = _socket_pair()
        notice, noticed = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                conn.close()
                control.close()
                ours.close()
                os.close(notice)
                _notify_death_on(noticed)
                err = os.open(msg[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                os.dup2(err, 1)
                os.dup2(err, 2)
                os.close(err)
                child = Connection(theirs.detach())
                try:
                    ready = _set_up(impl, callables, device)
                except BaseException as exc:  # noqa: BLE001 - told to the runner
                    traceback.print_exc()
                    child.send(("init_error", _one_line(exc)))
                    code = 1
                else:
                    if warm:
                        run_batch(warm, ready, device)
                    child.send(("ready", os.getpid()))
                    _serve(child, ready, device)
            except BaseException:  # noqa: BLE001 - a forked child must not return
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children.add(pid)
        theirs.close()
        os.close(noticed)
        conn.send(("forked", pid))
        sendfds(control, [ours.fileno(), notice])
        ours.close()
        os.close(notice)
        forks += 1
        if forks == HUGE_PAGES_AFTER_FORKS:  # workers are being lost: forks will be many
            _fewer_page_tables()
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in children:
        _reap(pid)


def _reap_exited(conn: Connection, dying: dict[int, list[Any]], children: set[int]) -> None:
    """Reap the children of ``dying`` that have exited; kill those past their time."""
    for pid, (kill_at, answer) in list(dying.items()):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, None
        if done:
            del dying[pid]
            children.discard(pid)
            if answer:
                conn.send(("reaped", (pid, None if status is None
                                      else os.waitstatus_to_exitcode(status))))
        elif time.monotonic() > kill_at:
            os.kill(pid, signal.SIGKILL)
            dying[pid][0] = float("inf")


def _reap(pid: int, timeout_s: float = REAP_TIMEOUT_S) -> int | None:
    """The exit code of the zygote's child ``pid`` (negative: the signal), waiting for it
    at most ``timeout_s`` before killing it."""
    deadline = time.monotonic() + timeout_s
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


def _fatal_signal(fd: int) -> str | None:
    """The fatal signal a death notice names (read from ``fd``); ``None`` when it closed
    without one (the process exited) or names none we know."""
    text = b""
    while b"\n" not in text:
        chunk = os.read(fd, 256)
        if not chunk:
            break
        text += chunk
    what = text.split(b"\n", 1)[0].decode(errors="replace")
    return _FATAL_SIGNALS.get(what.removeprefix("Fatal Python error: "))


def _pidfd(pid: int) -> int | None:
    """A file descriptor that becomes readable when ``pid`` exits (Linux 5.3+), or None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (Linux): the state
    (field 3 of proc(5)) first; ``None`` when there is no such process or file."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _zombie_exit_code(pid: int, pidfd: int | None) -> int | None:
    """The exit code (negative: the signal) of a process that has died and not been
    reaped yet, from ``/proc/<pid>/stat`` (Linux); ``None`` when that cannot be told.

    A forked worker is the zygote's child, and asking the zygote costs a round
    trip on the path of every crash; its zombie already shows the status. The
    socket closes just before the zombie shows: ``pidfd`` says when it does.
    """
    if pidfd is not None:
        select.select([pidfd], [], [], 0.05)
    deadline = time.monotonic() + 0.05
    while True:
        fields = proc_stat(pid)
        if fields is None:
            return None
        if fields[0] == "Z" and len(fields) >= 50:
            return os.waitstatus_to_exitcode(int(fields[49]))  # field 52: exit_code
        if time.monotonic() > deadline:
            return None
        time.sleep(0.0005)


def _fatal(runs: list[list[Any]]) -> bool:
    """Whether one case's runs (``[repeat][rank]``) end in a sticky device error."""
    return any(r.fatal for repeat in runs for r in repeat)


# -- the runner side ----------------------------------------------------------------
class _SetUpFailed(Exception):
    """A forked worker (or the zygote's probe) could not set up: fall back to spawning."""


class _Worker:
    """One worker as the runner sees it: its socket, a thread reading it, its stderr file.

    The thread keeps the worker's first message (``ready``, or why not) apart
    and puts every later one on ``inbox`` as ``(arrival time, message)``, and
    ``None`` once the worker is dead: its socket closed, or its death notice
    (``notice``, :func:`_notify_death_on`) named a fatal signal, after every
    message sent before it.
    """

    def __init__(self, pid: int, conn: Connection, stderr_path: str, *,
                 proc: subprocess.Popen | None = None, zygote: _Zygote | None = None,
                 notice: int | None = None) -> None:
        self.pid, self.conn, self.stderr_path = pid, conn, stderr_path
        self.proc, self.zygote = proc, zygote
        self._notice = notice
        self._signal: str | None = None  # the fatal signal its death notice named
        self.ready = False
        self._reaped = False  # a forked worker's reaping was asked of its zygote
        self._ended = False
        self._pidfd = _pidfd(pid) if zygote is not None else None
        self._first: Any = None
        self._answered = threading.Event()
        self.inbox: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"difftest-worker-{pid}")
        self._reader.start()

    def _read(self) -> None:
        dead = False
        while True:
            if self._notice is not None and self._notice in wait([self.conn, self._notice]) \
                    and not self.conn.poll(0):
                self._signal = _fatal_signal(self._notice)
                os.close(self._notice)
                self._notice = None
                if self._signal is not None and not dead:  # dying: the socket closes later
                    dead = True
                    self._gone()
                continue
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                if not dead:
                    self._gone()
                return
            if dead:
                continue
            if not self._answered.is_set():
                self._first = msg
                self._answered.set()
            else:
                self.inbox.put((time.perf_counter(), msg))

    def _gone(self) -> None:
        if not self._answered.is_set():
            self._first = _GONE
            self._answered.set()
        self.inbox.put(None)

    def alive(self) -> bool:
        return (not self._ended and self._reader.is_alive()
                and (self.proc is None or self.proc.poll() is None))

    def said_ready(self) -> bool:
        """Whether its first message, arrived, is ``ready`` (it may have died since)."""
        return (self._answered.is_set() and self._first is not _GONE
                and self._first[0] == "ready")

    def is_ready(self) -> bool:
        """Whether it is alive and has said ``ready`` (without waiting)."""
        return self.alive() and self.said_ready()

    def wait_ready(self, impl: str, timeout_s: float) -> None:
        """Wait for the worker's ``ready``: :class:`ImplementationError` when it cannot
        load; :class:`_SetUpFailed` when a forked one could not set up or died first."""
        if self.ready:
            return
        first = self._first if self._answered.wait(timeout_s) else _NO_ANSWER
        if self.zygote is not None and (first is _GONE or first[0] == "init_error"):
            raise _SetUpFailed(f"a forked worker could not set up: {first[1]}"
                               if first is not _GONE else
                               f"a forked worker died setting up ({self.exit_text()})")
        _check_loaded(impl, first, timeout_s,
                      lambda: f"{self.exit_text()}); stderr: {self.tail()}")
        self.ready = True

    def send(self, obj: Any) -> bool:
        """Send ``obj``; ``False`` when the worker is gone."""
        try:
            self.conn.send(obj)
            return True
        except OSError:
            return False

    def exit_text(self) -> str:
        """How the worker ended (it is dead, or dying of the signal its notice named;
        otherwise waits for it to exit)."""
        if self._signal is not None:
            return f"killed by signal {self._signal}"
        if self.proc is not None:
            try:
                code = self.proc.wait(REAP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = None
        else:
            code = _zombie_exit_code(self.pid, self._pidfd)
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

    def end(self) -> None:
        """Kill the process, without waiting for it: :meth:`finished` says when it is gone."""
        if self._ended:
            return
        self._ended = True
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
        elif not self._reaped:
            try:
                os.kill(self.pid, signal.SIGKILL)  # still our zygote's unreaped child
            except ProcessLookupError:
                pass
            self.zygote.reap(self.pid, wait=False)
            self._reaped = True

    def finished(self, timeout_s: float = 0.0) -> bool:
        """After :meth:`end`: whether the process is gone (waiting up to ``timeout_s``);
        then its socket, thread and file are released."""
        self._reader.join(timeout_s)
        if self._reader.is_alive():
            return False
        if self.proc is not None:
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return False
        self.conn.close()
        if self._notice is not None:
            os.close(self._notice)
            self._notice = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        try:
            os.unlink(self.stderr_path)
        except OSError:
            pass
        return True


class _Zygote:
    """A spawned interpreter with what every worker needs loaded, forking workers on request."""

    def __init__(self, proc: subprocess.Popen, conn: Connection, stderr_path: str) -> None:
        self.proc, self.conn, self.stderr_path = proc, conn, stderr_path
        self._asked: list[str] = []  # stderr paths of the forks requested, not answered
        self._forked: list[_Worker] = []  # answered, not taken

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, impl: str) -> None:
        """Wait for ``ready``: :class:`ImplementationError` when the implementation cannot
        be loaded, :class:`_SetUpFailed` when the zygote says no fork of it can set up."""
        got = _NO_ANSWER
        if self.conn.poll(LOAD_TIMEOUT_S + SET_UP_TIMEOUT_S):
            try:
                got = self.conn.recv()
            except EOFError:
                got = _GONE
        if got is not _NO_ANSWER and got is not _GONE and got[0] == "cannot_fork":
            raise _SetUpFailed(got[1])

        def ended() -> str:
            try:
                code = self.proc.wait(REAP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = None
            return f"{_exit_text(code)}); stderr: {_tail(self.stderr_path)}"

        _check_loaded(impl, got, LOAD_TIMEOUT_S, ended)

    def request(self, stderr_path: str) -> None:
        """Ask for a worker; :meth:`take` gets it (the fork happens meanwhile)."""
        self._asked.append(stderr_path)
        self.conn.send(("fork", stderr_path))

    def take(self, wait: bool = True) -> _Worker | None:
        """The worker of the oldest :meth:`request` not taken yet; without ``wait``,
        ``None`` when the zygote has not answered it yet."""
        while not self._forked and (wait or self.conn.poll(0)):
            self._read_answer()
        return self._forked.pop(0) if self._forked else None

    def reap(self, pid: int, wait: bool = True) -> int | None:
        """Have the zygote collect its child ``pid`` once it has exited: its exit code, or
        ``None`` when ``wait`` is false (the zygote answers nothing) or it is gone."""
        try:
            self.conn.send(("reap", pid, wait))
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
                fd, notice = recvfds(control, 2)
            self._forked.append(_Worker(value, Connection(fd), self._asked.pop(0), zygote=self,
                                        notice=notice))
        return kind, value

    def _answer(self) -> Any:
        if not self.conn.poll(2 * REAP_TIMEOUT_S + 30):
            raise ImplementationError("the sandbox's zygote process does not answer")
        return self.conn.recv()

    def close(self) -> None:
        """Stop it; it kills and reaps the workers it still has."""
        try:
            self.conn.send(None)
            self.proc.wait(2 * REAP_TIMEOUT_S)
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


_IDLE: tuple[list[Case], None, float, None, bool] = ([], None, 0.0, None, False)


class SandboxRunner:
    """Runs cases in a warm worker process, with warm spares to take over after a crash.

    ``restarts``: workers lost to a crash, a hang or a sticky device error
    (each one replaced). ``cold_starts``: replacements started because no live
    spare was there (the first worker is not one). ``spare_waits``: takeovers
    that found no spare ready yet and waited for one (each grows the pool, up to
    the plan's ``max_spares``). ``fallback``: why workers are spawned
    interpreters instead of forks, ``None`` while they are forks. ``plan``
    (default :func:`plan_for` the device) says how workers come to be.
    ``queued_batches``: whether a campaign sends it queued batches (on CUDA, where
    they save a synchronisation and a copy per case; see :meth:`collect`).
    """

    def __init__(self, impl: Implementation, device: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 repeats: int | None = None, cuda_device: int | None = None,
                 confirm_timeouts: bool = True, plan: WorkerPlan | None = None) -> None:
        self.impl, self.device, self.timeout_s = impl, device, timeout_s
        self.confirm_timeouts = confirm_timeouts
        self.repeats = repeats if repeats is not None else impl.repeats(device)
        self.cuda_device = cuda_device
        self.plan = plan or plan_for(device)
        self.queued_batches = str(device).startswith("cuda")
        self._forks = hasattr(os, "fork")
        self.fallback: str | None = None
        self._zygote: _Zygote | None = None
        self._worker: _Worker | None = None
        self._spares: list[_Worker] = []  # warm spares, oldest first
        self._spare_count = self.plan.spares if self._forks else SPAWNED_SPARES
        self._forks_asked = 0  # forks requested from the zygote, not yet among the spares
        self._retired: list[_Worker] = []  # ended, not yet gone
        self._started = False  # the first worker is up: any later new one is a cold start
        # the batch in flight: its cases, worker, when sent, keys, whether queued
        self._pending: tuple[list[Case], _Worker | None, float, Any, bool] = _IDLE
        self._wire: dict[int, tuple[Case, bytes]] = {}  # id -> the case and its pickle
        # time.monotonic() at which every wait is cut (BudgetSpent): the campaign's budget
        self.deadline: float | None = None
        self.restarts = 0
        self.cold_starts = 0
        self.spare_waits = 0

    # -- worker lifecycle ---------------------------------------------------
    @property
    def worker_pid(self) -> int | None:
        """The pid of the worker that runs the next case, ``None`` when there is none yet."""
        worker = self._worker
        return worker.pid if worker is not None and worker.alive() else None

    @property
    def pool_size(self) -> int:
        """The warm spares kept now (the pool grows while crashes outrun it)."""
        return self._spare_count

    def warm_up(self, spares: bool = True) -> None:
        """Start the worker and its spares where needed; wait until the worker is ready,
        and the spares too unless ``spares`` is false: a campaign's first cases then run
        while the spares set up (on CUDA the driver creates one context at a time, so
        waiting for them would put each spare's context into the start-up)."""
        while True:
            self._current()
            self._arm()
            if not spares:
                return
            while self._forks_asked:
                self._receive_fork()
            try:
                for spare in self._spares:
                    spare.wait_ready(self.impl.name, LOAD_TIMEOUT_S)
                return
            except _SetUpFailed as exc:
                self._fall_back(str(exc))

    def _spawn(self, role: str, stderr_path: str, notice: int | None = None
               ) -> tuple[subprocess.Popen, Connection]:
        # A fresh interpreter, not multiprocessing's spawn: that would re-run the
        # user's __main__ module, and a pytest or script caller has no main guard.
        ours, theirs = _socket_pair()
        fds = [theirs.fileno()] + ([notice] if notice is not None else [])
        boot = (f"import sys; sys.path[:0] = {sys.path!r}; "
                f"from difftest.sandbox import _worker_main; _worker_main({fds[0]}, {notice})")
        with open(stderr_path, "ab") as err:
            proc = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.DEVNULL,
                                    stdout=err, stderr=err, pass_fds=fds)
        theirs.close()
        conn = Connection(ours.detach())
        conn.send((role, self.impl, self.device, self.cuda_device, self.plan))
        return proc, conn

    def _start_zygote(self) -> _Zygote | None:
        """A zygote that has loaded and probed; ``None`` after a fallback (it said no
        fork can set up)."""
        path = _stderr_file()
        zygote = _Zygote(*self._spawn("zygote", path), path)
        try:
            zygote.wait_ready(self.impl.name)
        except _SetUpFailed as exc:
            zygote.close()
            self._fall_back(str(exc))
            return None
        except ImplementationError:
            zygote.close()
            raise
        return zygote

    def _fall_back(self, why: str) -> None:
        """Forked workers cannot set up: say so once, and spawn every worker from now on.
        The forked worker in use, if any, goes on (it did set up)."""
        if self.fallback is None:
            self.fallback = why
            print(f"difftest: {self.impl.name} on {self.device}: {why}; its workers are "
                  "spawned interpreters from now on (each crash then costs a start-up)",
                  file=sys.stderr, flush=True)
        while self._forks_asked:
            self._receive_fork()
        for spare in [s for s in self._spares if s.zygote is not None]:
            self._spares.remove(spare)
            self._retire(spare)
        self._forks, self._spare_count = False, SPAWNED_SPARES

    def _spawn_worker(self) -> _Worker:
        path = _stderr_file()
        notice, noticed = os.pipe()
        try:
            proc, conn = self._spawn("worker", path, noticed)
        finally:
            os.close(noticed)
        return _Worker(proc.pid, conn, path, proc=proc, notice=notice)

    def _request_fork(self) -> None:
        """Ask the zygote (started if need be) for a fork; after a fallback, nothing."""
        if self._zygote is not None and not self._zygote.alive():
            self._zygote.close()
            self._zygote, self._forks_asked = None, 0
        if self._zygote is None:
            self._zygote = self._start_zygote()
            if self._zygote is None:
                return
        self._zygote.request(_stderr_file())
        self._forks_asked += 1

    def _receive_fork(self, wait: bool = True) -> bool:
        """Add the oldest fork requested to the spares (without ``wait``: if the zygote
        has answered it); whether one was added."""
        try:
            worker = self._zygote.take(wait)
        except (OSError, EOFError, ImplementationError):
            self._forks_asked = 0  # the zygote is gone: the next fork starts a new one
            return False
        if worker is None:
            return False
        self._forks_asked -= 1
        self._spares.append(worker)
        return True

    def _take_spare(self) -> _Worker | None:
        """The oldest spare that is ready, else the oldest one (waiting for a fork
        requested when there is none yet); ``None`` when there is none."""
        while self._forks_asked and self._receive_fork(wait=not self._spares):
            pass
        if not self._spares:
            return None
        ready = [spare for spare in self._spares if spare.is_ready()]
        spare = ready[0] if ready else self._spares[0]
        if not ready and self._started:  # crashes outrun the pool: grow it
            self.spare_waits += 1
            limit = self.plan.max_spares if self._forks else SPAWNED_SPARES
            self._spare_count = min(self._spare_count + 1, limit)
        self._spares.remove(spare)
        return spare

    def _current(self) -> _Worker:
        """The worker for the next case: the one in use, else a spare, else a new one."""
        worker = self._worker
        if worker is not None and not worker.alive():
            self._retire(worker)
            worker = self._worker = None
        cold = False  # no spare was there: a worker is started on the spot
        while worker is None:
            spare = self._take_spare()
            if spare is None:
                cold = True
                if self._forks:
                    self._request_fork()
                    continue  # a fork was requested (or the fallback happened)
                spare = self._spawn_worker()
            if not spare.alive() and spare.said_ready():  # died since: not a set-up failure
                self._retire(spare)
                continue
            try:
                spare.wait_ready(self.impl.name, LOAD_TIMEOUT_S)
            except _SetUpFailed as exc:
                self._retire(spare)
                self._fall_back(str(exc))
                continue
            except ImplementationError:
                self._retire(spare)
                raise
            worker = spare
        self.cold_starts += cold and self._started
        self._worker, self._started = worker, True
        return worker

    def _arm(self) -> None:
        """Top the spares up (a fork is only requested); replace those that died, and
        release the workers ended before that are gone."""
        self._retired = [w for w in self._retired if not w.finished()]
        while self._forks_asked and self._receive_fork(wait=False):
            pass
        for spare in [spare for spare in self._spares
                      if spare.said_ready() and not spare.alive()]:
            self._spares.remove(spare)
            self._retire(spare)
        while len(self._spares) + self._forks_asked < self._spare_count:
            if self._forks:
                self._request_fork()
            if not self._forks:  # spawned ones (also right after a fallback)
                self._spares.append(self._spawn_worker())

    def _retire(self, worker: _Worker) -> None:
        """End ``worker`` (killed now, gone in the background)."""
        worker.end()
        self._retired.append(worker)

    def _lose(self, worker: _Worker) -> None:
        """``worker`` crashed, hung or hit a sticky error: end it; a spare takes over."""
        self._retire(worker)
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
            self._retire(self._worker)
            self._worker = None

    def _encode(self, cases: list[Case]) -> list[bytes]:
        """Each case pickled, once: the rest of a batch sent again after a crash reuses
        the pickles of its first sending (only the batch's are kept)."""
        wire = {}
        for case in cases:
            known = self._wire.get(id(case))
            wire[id(case)] = known if known is not None and known[0] is case else (
                case, pickle.dumps(case, pickle.HIGHEST_PROTOCOL))
        self._wire = wire
        return [wire[id(case)][1] for case in cases]

    def _send(self, cases: list[Case], keys: list[Any] | None = None, queued: bool = False
              ) -> tuple[_Worker, float]:
        """Send ``cases`` to the current worker; a worker found dead on sending is replaced.

        On CUDA the batch is one message (one staged block, one copy to the
        device); elsewhere its first case goes alone, so that the worker starts
        on it while the rest is on its way (a worker that dies meanwhile is found
        by :meth:`collect`, at its case).
        """
        blobs = self._encode(cases)
        one = str(self.device).startswith("cuda") or len(blobs) == 1 or queued
        messages = [(blobs, keys)] if one else [
            (blobs[:1], keys and keys[:1]), (blobs[1:], keys and keys[1:])]
        while True:
            worker = self._current()
            worker.clear_stderr()
            since = time.perf_counter()
            if worker.send((messages[0][0], self.repeats, messages[0][1], queued)):
                break
            self._lose(worker)
        self._arm()  # while the worker runs the cases
        for message, message_keys in messages[1:]:
            if not worker.send((message, self.repeats, message_keys, False)):
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
                self._retire(worker)
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
            self._lose(worker)  # it reported a sticky error and is exiting: not waited for
        return Outcome.of(runs, name), arrived

    def submit(self, cases: list[Case], keys: list[Any] | None = None,
               queued: bool = False) -> None:
        """Start running ``cases`` as one batch; :meth:`collect` gives their outcomes.
        ``keys``: per case ``None`` or its :class:`~difftest.compare.RepeatKey` by rank,
        for the worker to leave out the outputs of repeats equal to the first run;
        ``queued``: run them as a queued batch (:func:`difftest.execute.run_batch`)."""
        cases = list(cases)
        if not cases:
            self._pending = _IDLE
            return
        worker, since = self._send(cases, keys, queued)
        self._pending = (cases, worker, since, keys, queued)

    def busy(self) -> bool:
        """Whether the batch :meth:`submit` started is still running (:meth:`collect`
        would wait): its worker is alive and some of its cases have not answered yet."""
        cases, worker = self._pending[:2]
        return bool(cases) and worker.inbox.qsize() < len(cases) and worker.alive()

    def collect(self) -> list[Outcome]:
        """The outcomes of the batch :meth:`submit` started, in its order.

        Each case has ``timeout_s`` from the end of the one before it (the
        first from the submit). After a crash, a (confirmed) timeout or a
        sticky device error only the cases up to and including the one that
        caused it: the cases after it did not run, and are the caller's to
        submit again (a spare takes them at once). :attr:`deadline` cuts the
        wait: the outcomes up to the cut (:class:`BudgetSpent` when there are none).

        A queued batch answers all at once, after its one synchronisation, within
        ``timeout_s`` of the submit. When its worker dies or hangs (a sticky error
        ends it without an answer) no case of it is to blame yet: the batch runs again
        case by case on a spare, and that run's outcomes (crash, hang) are returned.
        """
        (cases, worker, since, keys, queued), self._pending = self._pending, _IDLE
        outcomes: list[Outcome] = []
        for index, case in enumerate(cases):
            try:
                outcome, since = self._next_outcome(worker, since, self.timeout_s)
            except BudgetSpent:
                if not outcomes:
                    raise
                break
            if queued and not outcome.runs:  # its worker lost with the batch unanswered
                self.submit(cases[index:], keys and keys[index:])
                try:
                    return outcomes + self.collect()
                except BudgetSpent:
                    if not outcomes:
                        raise
                    return outcomes
            outcome = self._confirmed(case, outcome)
            outcomes.append(outcome)
            if worker is not self._worker:  # lost: the rest did not run
                break
        return outcomes

    def close(self) -> None:
        """End every process: the worker, the spares and the zygote (the workers are
        asked to stop first, and killed when they have not within a grace period)."""
        while self._forks_asked and self._receive_fork():
            pass
        workers = [w for w in [self._worker, *self._spares] if w is not None]
        self._worker, self._spares, self._wire = None, [], {}
        for worker in workers:
            worker.send(None)
        grace = time.monotonic() + 2.0
        for worker in workers:
            worker.finished(max(0.0, grace - time.monotonic()))
            self._retire(worker)
        for worker in self._retired:
            worker.finished(REAP_TIMEOUT_S)
        self._retired = []
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
