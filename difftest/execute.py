"""Run cases through an implementation, in this process (SPEC §9 set-up).

Every output buffer is filled with :data:`SENTINEL` and sits between two
guard bands of :data:`GUARD`, so a write past the end of a row, or of the
whole buffer, is visible even when no CUDA error is raised. Inputs are
copies, compared with the case after the call.

One call's buffers (inputs, outputs, scratch, each with its bands) are laid
out in one block of bytes (:class:`Staged`); every byte of the block that is
not a buffer's data belongs to a guard band. A batch of cases is one host
array of such blocks (every repeat of every rank of every case), so on a GPU
it costs one copy to the device, whatever the number of calls, and one copy
back per case. On the CPU each buffer is its own tensor over its part of the
host array, so a write past a buffer's storage raises as torch does.

Every case is synchronised before the next one starts (its copy back is the
synchronisation; a *queued* batch, below, is the exception), so a sticky
device error (an illegal address poisons the context) is pinned on the case
that caused it (``fatal``) and the batch stops there: :func:`run_batch`
returns the cases up to and including that one. The cases after it did not
run; the caller runs them in a fresh process. The calls of one case run back
to back when they are the same call repeated (one rank); the calls of an
expert-parallel case, one per rank, are each synchronised, so the fatal
error is also pinned on its rank.

A queued batch (``run_batch(..., queued=True)``: what a campaign on CUDA sends
while its implementation has failed nowhere) runs the calls of all its cases
back to back and reads the batch back once: one synchronisation and one copy
for the batch instead of two or three per case. It is what the case-by-case
run would return only while nothing went wrong, so anything that could need
attribution — a call that left a launch error pending, a changed input or
guard band of any case, a changed zone — makes the batch run again
case by case on a fresh staging (:meth:`_Batch.run_queued`); a sticky error
raises :class:`QueuedBatchLost` (the context is gone: the whole batch is to
run again case by case in a fresh process). What it does not see is a write
into another case's output or scratch data: that case's outputs are wrong, so
the caller runs a queued batch again case by case when any case of it failed
(:meth:`difftest.campaign.Campaign.dispatch`), and its runs say ``queued``.

The result is a :class:`RankRun` of plain NumPy arrays per call: it crosses
the pipe from a sandbox worker to the runner, which compares it with the
oracle. This module is the only one of difftest that imports torch, and only
the sandbox worker (or an in-process run) imports it.
"""

from __future__ import annotations

import functools
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .case import Case
from .compare import RepeatKey
from .dialects import DIALECT_INFO, SENTINEL, CallPlan, TensorArg  # SENTINEL: outputs' fill

GUARD = -1163005939  # 0xBAADF00D as int32: guard band around every buffer
GUARD_LEN = 64  # elements of guard band at least, before and after every buffer
ALIGN = 256  # bytes: every buffer's band, and its data, starts on this boundary
# intra-op threads of torch while an implementation runs on the CPU: the campaign's own
# process works beside its worker (draws, oracle, comparison) and `--workers N` runs N of
# each, so more threads only contend (bench/campaign.py on the 2-core machine, loaded:
# a huge case's calls 238 ms with torch's default 2 threads, 12 ms with 1)
CPU_THREADS = 1
# bytes of guard value before and after a batch's blocks (where attribution is on): a write
# far past a case's buffers lands there when no other case's block is in the way
ZONE_BYTES = 4 << 20


@dataclass
class RankRun:
    """What one call on one rank did, as plain NumPy values."""

    rank: int | None
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    guard_damage: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    mutated_inputs: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    error: str | None = None
    # where the error was raised: the last frames of the implementation's traceback
    frames: str | None = None
    fatal: bool = False  # the device is unusable after this error (sticky CUDA error)
    # the error is a CUDA error the call left pending (it returned normally): ``launch_error``
    launch_error: bool = False
    # the call's writes into other calls' blocks of the batch (:class:`_Attribution`)
    wild_writes: list[WildWrite] = field(default_factory=list)
    elapsed_s: float = 0.0  # the call; the last call of a case also waits for its copy back
    # a case's first run: seconds laying the case out (and its share of the copy to the
    # device), and inspecting what it wrote (bench/campaign.py's worker stages)
    setup_s: float = 0.0
    inspect_s: float = 0.0
    # a repeat the worker found equal to the first run of its rank after
    # canonicalisation (:class:`CanonicalForm`): its outputs are not sent (left empty)
    same_as_first: bool = False
    # read back with its whole queued batch, without the check after each case
    # (:meth:`_Batch.run_queued`): a failure of it may be another case's wild write
    queued: bool = False


class QueuedBatchLost(Exception):
    """A sticky device error while a queued batch ran: no case of it can be read back or
    blamed; the batch is to run again case by case in a fresh process."""


@dataclass(frozen=True)
class WildWrite:
    """Bytes of another case's block that changed while one case ran (its ``wild_write``).

    ``position`` is an element index relative to the buffer's data (negative: in its
    leading guard band; ``>= numel``: in its trailing band; ``band`` says which);
    ``case_id`` is ``None`` for a write that landed outside every case's block (in the
    zones around them, or in difftest's device copy of the batch); ``count`` then is
    the number of bytes that changed there.
    """

    case_id: str | None
    rank: int | None
    buffer: str
    role: str  # "input" | "output" | "scratch"
    position: int
    value: int
    count: int  # elements of that buffer and its bands that changed
    band: bool = False

    def changed(self) -> str:
        unit = "byte(s)" if self.case_id is None else "element(s)"
        return f"{self.count} {unit} there changed"

    def where(self) -> str:
        """``case 1a2b's input topk_ids[3]``, ``... guard band of output expert_ids[-5]``."""
        if self.case_id is None:
            return "memory outside the staged batch"
        rank = f" (rank {self.rank})" if self.rank is not None else ""
        what = f"guard band of {self.role}" if self.band else self.role
        return f"case {self.case_id}{rank}'s {what} {self.buffer}[{self.position}]"


@dataclass(frozen=True)
class _Buffer:
    name: str
    role: str  # "input" | "output" | "scratch"
    shape: tuple[int, ...]
    dtype: np.dtype
    start: int  # byte offset of the leading band in the call's block
    lead: int  # elements of leading band (>= GUARD_LEN)
    end: int  # byte offset one past the trailing band
    numel: int
    data: int  # byte offset of the data in the call's block
    strides: tuple[int, ...]  # contiguous, in elements

    @classmethod
    def lay_out(cls, name: str, role: str, shape: Sequence[int], dtype: np.dtype,
                start: int) -> _Buffer:
        """The buffer whose leading band starts at byte ``start`` of the block."""
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        lead = _round_up(GUARD_LEN * dtype.itemsize, ALIGN) // dtype.itemsize
        data = start + lead * dtype.itemsize
        end = _round_up(data + (numel + GUARD_LEN) * dtype.itemsize, ALIGN)
        strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        return cls(name, role, shape, dtype, start, lead, end, numel, data, strides)


def _round_up(value: int, to: int) -> int:
    return -(-value // to) * to


class Staged:
    """One call's buffers in one block of bytes, guard bands and fills included."""

    def __init__(self, plan: CallPlan) -> None:
        self.plan = plan
        buffers: list[_Buffer] = []
        offset = 0
        roles = [(n, "input", a.shape, a.dtype) for n, a in plan.inputs.items()]
        roles += [(n, "output", s, d) for n, (s, d) in plan.outputs.items()]
        roles += [(n, "scratch", s, d) for n, (s, d) in plan.scratch.items()]
        for name, role, shape, dtype in roles:
            dtype = np.dtype(dtype)
            if ALIGN % dtype.itemsize:
                raise TypeError(f"{name}: dtype {dtype} cannot be staged (item size "
                                f"{dtype.itemsize} does not divide {ALIGN})")
            buf = _Buffer.lay_out(name, role, shape, dtype, offset)
            buffers.append(buf)
            offset = buf.end
        self.buffers = buffers
        self.nbytes = offset
        # byte ranges of the block a correct call may change: output and scratch data
        self.writable = [(buf.data, buf.data + buf.numel * buf.dtype.itemsize)
                         for buf in buffers if buf.role != "input"]
        # and the ranges it must leave as staged: inputs and guard bands
        edges = [0] + [x for lo_hi in self.writable for x in lo_hi] + [offset]
        self.fixed = [(lo, hi) for lo, hi in zip(edges[::2], edges[1::2]) if hi > lo]
        block = np.empty(offset, np.uint8)
        for buf in buffers:
            region = block[buf.start:buf.end].view(buf.dtype)
            region[:] = np.array(GUARD).astype(buf.dtype)
            data = region[buf.lead:buf.lead + buf.numel]
            if buf.role == "input":
                data[:] = np.ascontiguousarray(plan.inputs[buf.name]).reshape(-1)
            else:
                data[:] = SENTINEL if buf.role == "output" else 0
        self.block = block

    def tensors(self, storage: Any, base: int, device: str) -> dict[str, Any]:
        """The call's tensors, for the block at byte ``base`` of the batch.

        On a GPU ``storage`` is :class:`_DeviceViews` (the batch's device bytes) and
        each tensor is one ``as_strided`` view of it. On the CPU ``storage`` is the
        host array and each buffer gets a tensor whose storage is the buffer and its
        two ``GUARD_LEN`` bands, so a write further out raises as torch does.
        """
        import torch

        out = {}
        for buf in self.buffers:
            if device == "cpu":
                size = buf.dtype.itemsize
                whole = storage[base + buf.data - GUARD_LEN * size:
                                base + buf.data + (buf.numel + GUARD_LEN) * size]
                tensor = torch.from_numpy(whole.view(buf.dtype))[GUARD_LEN:GUARD_LEN + buf.numel]
                out[buf.name] = tensor.view(buf.shape)
            else:
                view = storage[buf.dtype]  # its offset: the batch within its allocation
                out[buf.name] = view.as_strided(
                    buf.shape, buf.strides,
                    view.storage_offset() + (base + buf.data) // buf.dtype.itemsize)
        return out

    def outputs(self, host: np.ndarray, base: int, run: RankRun) -> None:
        """Only the outputs of the call whose block is ``host[base:]`` (for a block known
        to differ from the staged one in output and scratch data alone): views of
        ``host``, which holds nothing else that changes after the call."""
        for buf in self.buffers:
            if buf.role == "output":
                lo = base + buf.data
                data = host[lo:lo + buf.numel * buf.dtype.itemsize].view(buf.dtype)
                run.outputs[buf.name] = data.reshape(buf.shape)

    def inspect(self, host: np.ndarray, base: int, run: RankRun) -> None:
        """Inputs, guard bands and outputs of the call whose block is ``host[base:]``."""
        for buf in self.buffers:
            region = host[base + buf.start:base + buf.end].view(buf.dtype)
            data = region[buf.lead:buf.lead + buf.numel]
            if buf.role == "input":
                before = self.plan.inputs[buf.name].reshape(-1)
                if not np.array_equal(data, before):
                    i = int(np.flatnonzero(data != before)[0])
                    run.mutated_inputs[buf.name] = (i, int(before[i]), int(data[i]))
                continue
            band = np.concatenate([region[:buf.lead], region[buf.lead + buf.numel:]])
            bad = np.flatnonzero(band != np.array(GUARD).astype(buf.dtype))
            if bad.size:
                # positions relative to the buffer's start: negative before, >= numel after
                pos = np.where(bad < buf.lead, bad - buf.lead, bad - buf.lead + buf.numel)
                run.guard_damage[buf.name] = [(int(p), int(band[b]))
                                              for p, b in zip(pos[:8], bad[:8])]
        self.outputs(host, base, run)


@functools.cache
def _torch_dtype(dtype: np.dtype) -> Any:
    import torch

    try:
        return getattr(torch, np.dtype(dtype).name)  # int32, int64, uint8, float32, ...
    except AttributeError:
        raise TypeError(f"dtype {dtype} has no torch equivalent here") from None


class _DeviceViews(dict):
    """A batch's device bytes (``uint8``), and the same bytes as each dtype asked for."""

    def __init__(self, storage: Any) -> None:
        super().__init__()
        self.storage = storage

    def __missing__(self, dtype: np.dtype) -> Any:
        self[dtype] = self.storage.view(_torch_dtype(dtype))
        return self[dtype]


def _is_sticky_cuda_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    markers = ("illegal memory access", "illegal address", "unspecified launch failure",
               "misaligned address", "device-side assert", "AcceleratorError")
    return any(m in text for m in markers)


_GUARD_BYTES = np.array([GUARD], dtype=np.int32).view(np.uint8)  # little-endian, as staged

# cudaError_t codes after which the context is unusable: never cleared (they surface as
# ``fatal`` at the case's copy back). The rest are a launch's own, cleared once pinned.
_STICKY_CUDA_ERRORS = frozenset({
    214,  # ECC uncorrectable
    700,  # illegal address
    702,  # launch timeout
    710,  # device-side assert
    714,  # hardware stack error
    715,  # illegal instruction
    716,  # misaligned address
    717,  # invalid address space
    718,  # invalid program counter
    719,  # launch failure
    999,  # unknown
})


class _PendingCudaErrors:
    """The CUDA runtime's "last error" of this thread, read after each call.

    A launch with a bad configuration (a zero-block grid, too many threads)
    fails at once and leaves its error pending in the runtime; unchecked, it
    is raised by the next launch that checks (another case's, or our copy
    back). :meth:`take` reads it with ``cudaPeekAtLastError`` — a host-side
    read of a thread-local, no synchronisation — and clears it with
    ``cudaGetLastError`` unless it is sticky. It reads every CUDA runtime
    mapped into this process (``/proc/self/maps``): torch's shared
    ``libcudart``, which extensions built against torch share, and any
    other copy an extension brought; looked for at the first read and again
    every :attr:`RESCAN_S` seconds (a scan costs milliseconds). A runtime
    linked statically into an extension is not seen (its errors stay its
    own), nor one whose error stands even right after it was cleared (one the
    driver cannot run).
    """

    RESCAN_S = 10.0  # the mapped runtimes are looked for again at most this often

    def __init__(self) -> None:
        self._libs: list[tuple[Any, Any, Any]] = []
        self._seen: set[str] = set()
        self._next_scan = 0.0

    def _scan(self) -> str | None:
        """Bind the runtimes mapped since the last scan (a library an implementation
        loads on its first call brings its own); returns an error one of them holds
        pending, cleared."""
        import ctypes

        self._next_scan = time.monotonic() + self.RESCAN_S
        found = None
        for path in _mapped_cuda_runtimes():
            if path in self._seen:
                continue
            self._seen.add(path)
            try:
                lib = ctypes.CDLL(path)  # already loaded: the same instance as its users'
                peek, take = lib.cudaPeekAtLastError, lib.cudaGetLastError
                text = lib.cudaGetErrorString
            except (OSError, AttributeError):
                continue
            peek.restype = take.restype = ctypes.c_int
            text.restype, text.argtypes = ctypes.c_char_p, [ctypes.c_int]
            code = peek()
            if code in _STICKY_CUDA_ERRORS:
                self._libs.append((peek, take, text))  # left for the copy back to raise
                continue
            take()
            if peek() != 0:  # a standing error: a runtime this driver cannot run
                continue
            self._libs.append((peek, take, text))
            if code:
                found = found or (text(code) or b"cudaError %d" % code).decode(errors="replace")
        return found

    def take(self) -> str | None:
        """The text of a pending non-sticky error, which is then cleared; else ``None``."""
        found = self._scan() if time.monotonic() >= self._next_scan else None
        for peek, take, text in self._libs:
            code = peek()
            if code and code not in _STICKY_CUDA_ERRORS:
                take()
                found = found or (text(code) or b"cudaError %d" % code).decode(errors="replace")
        return found


def _mapped_cuda_runtimes() -> list[str]:
    """Paths of the CUDA runtime libraries mapped into this process, in load order."""
    paths: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)  # address perms offset device inode path
                path = fields[5].strip() if len(fields) == 6 else ""
                if "libcudart" in path.rsplit("/", 1)[-1] and path not in paths:
                    paths.append(path)
    except OSError:  # not Linux: nothing to read
        pass
    return paths


@functools.cache
def _pending_cuda_errors() -> _PendingCudaErrors:
    return _PendingCudaErrors()


def _describe(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    text = "".join(lines).strip()
    return text if len(text) < 2000 else text[:2000] + " …"


MAX_FRAMES = 5  # frames of a raising implementation's traceback kept for its bug report
MAX_FRAME_CHARS = 300


def _frames(exc: BaseException) -> str:
    """The last :data:`MAX_FRAMES` frames below our call of the implementation, as
    ``File "mykern.py", line 12, in fn`` and the line's source, each cut to
    :data:`MAX_FRAME_CHARS` characters."""
    frames = traceback.extract_tb(exc.__traceback__)[1:]  # [0] is run_batch's own call
    out = []
    for frame in frames[-MAX_FRAMES:]:
        line = f'File "{frame.filename}", line {frame.lineno}, in {frame.name}'
        if frame.line:
            line += f"\n    {frame.line.strip()}"
        out.append(line if len(line) <= MAX_FRAME_CHARS else line[:MAX_FRAME_CHARS] + " …")
    skipped = len(frames) - len(out)
    return (f"({skipped} earlier frames)\n" if skipped > 0 else "") + "\n".join(out)


@dataclass
class _Call:
    repeat: int
    rank: int | None
    staged: Staged
    base: int
    run: RankRun


def run_batch(cases: Sequence[Case], callables: dict[str, Callable[..., Any]], device: str,
              repeats: int = 1, *, profile: dict[str, float] | None = None,
              attribute: bool | None = None,
              on_case: Callable[[list[list[RankRun]]], None] | None = None,
              keys: Sequence[dict[int | None, RepeatKey | None] | None] | None = None,
              queued: bool = False) -> list[list[list[RankRun]]]:
    """Every rank of every case, ``repeats`` times: ``runs[case][repeat][rank]``.

    The calls run in order; each case is synchronised, and each rank of a
    multi-rank case. After a fatal (sticky) device error nothing more runs:
    the result ends with the case of the fatal call, whose runs are just its
    calls that raised (none of its outputs can be read), so it may hold fewer
    cases than given. On CUDA a launch error a call leaves pending is pinned
    on that call (``launch_error``) and cleared, so the next call starts clean.
    ``attribute`` (default: on CUDA, where the batch's buffers share one
    allocation) pins a write into another case's bytes, or into the zones
    around the batch, on the case that made it (:class:`_Attribution`, checked
    after each case). ``profile``, when given, gets the seconds of each step
    added to it (``set-up``, ``transfer``, ``kernel``, ``inspection``; the
    attribution check is part of the inspection). ``on_case``, when given, gets
    each case's runs as soon as they are read back, before the next case starts
    (a sandbox worker streams them to its runner). ``keys``, when given, has for
    each case ``None`` or its :class:`~difftest.compare.RepeatKey` by rank: a
    repeat of such a case that ran cleanly and equals the first run of its rank
    after canonicalisation (:class:`CanonicalForm`) is returned without its
    outputs, marked ``same_as_first`` (what a worker does not send, its runner
    does not unpickle nor canonicalise). ``queued``: run the batch queued (see the
    module's docstring; attribution on, on any device) when it has more than one case,
    falling back to the case-by-case run; raises
    :class:`QueuedBatchLost` after a sticky device error.
    """
    cuda = str(device).startswith("cuda")
    if not cuda:
        import torch

        threads = torch.get_num_threads()
        if threads != CPU_THREADS:  # restored after: an in-process caller keeps its own
            torch.set_num_threads(CPU_THREADS)
            try:
                return run_batch(cases, callables, device, repeats, profile=profile,
                                 attribute=attribute, on_case=on_case, keys=keys,
                                 queued=queued)
            finally:
                torch.set_num_threads(threads)
    if queued and len(cases) > 1:
        runs = _Batch(cases, repeats, device, ZONE_BYTES, profile).run_queued(
            callables, on_case, keys)
        if runs is not None:
            return runs
        attribute = True  # what the queued run could not tell apart, attributed
    if not cuda and len(cases) > 1 and not attribute:
        # One block for the batch saves copies to a device; the CPU has none to save, so
        # each case is staged when its turn comes: a worker that dies at one case has
        # staged no other (the cases after it are run again elsewhere). Attribution,
        # asked for on the CPU, needs the batch in one block, as on CUDA.
        return [runs for i, case in enumerate(cases)
                for runs in run_batch([case], callables, device, repeats, profile=profile,
                                      on_case=on_case, keys=keys and keys[i:i + 1])]
    attribute = cuda if attribute is None else attribute
    batch = _Batch(cases, repeats, device, ZONE_BYTES if attribute else 0, profile)
    return batch.run(callables, on_case, keys)


class _Batch:
    """A batch's calls staged in one host array (and, on CUDA, one device allocation)
    between two zones of guard value of ``zone`` bytes each (attribution is on where
    there are zones); :meth:`run` runs them."""

    def __init__(self, cases: Sequence[Case], repeats: int, device: str, zone: int,
                 profile: dict[str, float] | None) -> None:
        import torch

        self.cases, self.device, self.zone, self.profile = cases, device, zone, profile
        self.cuda = cuda = str(device).startswith("cuda")
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.clock = time.perf_counter()
        self.per_case: list[list[_Call]] = []
        base = 0
        for case in cases:
            start = time.perf_counter()
            staged = [Staged(DIALECT_INFO[case.dialect].plan(case, rank))
                      for rank in case.ranks()]
            calls = []
            for repeat in range(repeats):
                for rank, one in zip(case.ranks(), staged):
                    calls.append(_Call(repeat, rank, one, base, RankRun(rank)))
                    base += one.nbytes
            calls[0].run.setup_s = time.perf_counter() - start
            self.per_case.append(calls)
        start = time.perf_counter()
        # the blocks, between two zones of guard value where attribution is on (on the CPU
        # the zones are host memory, on CUDA device memory: the host holds the blocks alone)
        self.base = base
        whole = np.empty(base + (0 if cuda else 2 * zone), np.uint8)
        host = whole if cuda else whole[zone:zone + base]
        for calls in self.per_case:
            for call in calls:
                host[call.base:call.base + call.staged.nbytes] = call.staged.block
        # on the CPU the calls write into ``host`` itself: the staged bytes are kept apart
        # where attribution needs them as one array (elsewhere each call's block has them)
        self.host, self.pristine = host, host if cuda or not zone else host.copy()
        self.tick("set-up")
        if cuda:
            full = torch.empty(base + 2 * zone, dtype=torch.uint8, device=device)
            full[zone:zone + base].copy_(torch.from_numpy(host))
            if zone:
                full[:zone].view(torch.int32).fill_(GUARD)
                full[zone + base:].view(torch.int32).fill_(GUARD)
            self.storage: Any = _DeviceViews(full[zone:zone + base])
        else:  # NumPy for the CPU's bulk copies and fills (torch's contend for threads there)
            whole[:zone].view(np.int32)[:] = GUARD
            whole[zone + base:].view(np.int32)[:] = GUARD
            full, self.storage = torch.from_numpy(whole), host
        self.full = full
        self.sync()
        share = (time.perf_counter() - start) / max(1, len(cases))
        for calls in self.per_case:
            calls[0].run.setup_s += share
        self.tick("transfer")

    def tick(self, step: str) -> None:
        if self.profile is not None:
            now = time.perf_counter()
            self.profile[step] = self.profile.get(step, 0.0) + now - self.clock
            self.clock = now

    def blocks(self, index: int) -> tuple[int, int]:
        """Byte range of case ``index``'s blocks."""
        calls = self.per_case[index]
        return calls[0].base, calls[-1].base + calls[-1].staged.nbytes

    def run_queued(self, callables: dict[str, Callable[..., Any]],
                   on_case: Callable[[list[list[RankRun]]], None] | None,
                   keys: Sequence[dict[int | None, RepeatKey | None] | None] | None = None
                   ) -> list[list[list[RankRun]]] | None:
        """Every call of every case back to back, then one synchronisation and one copy
        back of the blocks with the answer whether both zones still hold the guard
        value; ``None`` (nothing sent to ``on_case``) when anything needs the case-by-case
        run: a call left a launch error pending, a zone changed, or a call's block
        changed outside its output and scratch data. A call that raises is the error of
        its case, as in the case-by-case run (an out-of-domain probe rejected, most
        often). The ranks of an expert-parallel case are queued too (a sticky error,
        which their synchronisation would pin on a rank, raises
        :class:`QueuedBatchLost`)."""
        import torch

        cuda, storage, zone, base = self.cuda, self.storage, self.zone, self.base
        pending = _pending_cuda_errors() if cuda else None
        for index, calls in enumerate(self.per_case):
            fn = callables[self.cases[index].dialect]
            for call in calls:
                _make_call(fn, call, storage, cuda, pending, None)
                if call.run.fatal:
                    raise QueuedBatchLost(call.run.error)
                if call.run.launch_error:  # the case-by-case run pins it on its call
                    return None
        start = time.perf_counter()
        self.tick("kernel")
        if cuda:
            full = self.full
            zones = torch.stack([full[:zone].view(torch.int32).eq(GUARD).all(),
                                 full[zone + base:].view(torch.int32).eq(GUARD).all()]).all()
            try:  # the one synchronisation: the blocks and the zones' answer in one copy
                back = torch.cat([full[zone:zone + base], zones.view(1).to(torch.uint8)]
                                 ).cpu().numpy()
            except Exception as exc:  # noqa: BLE001 - an error surfacing at the copy
                if _is_sticky_cuda_error(exc):
                    raise QueuedBatchLost(_describe(exc)) from exc
                return None
            intact, back = bool(back[base]), back[:base]
        else:
            whole = self.full.numpy()
            intact = bool((whole[:zone].view(np.int32) == GUARD).all()
                          and (whole[zone + base:].view(np.int32) == GUARD).all())
            back = self.host
        share = (time.perf_counter() - start) / len(self.per_case)
        self.tick("transfer")
        start = time.perf_counter()
        if not intact or any(_calls_with_stray_changes(calls, back, 0)
                             for calls in self.per_case):
            return None
        asked: list[tuple[_Call, Any]] = []
        for index, calls in enumerate(self.per_case):
            for call in calls:
                call.run.queued = True
                call.staged.outputs(back, call.base, call.run)
            calls[-1].run.elapsed_s += share
            if keys is not None and keys[index] is not None:
                asked += _repeats_asked(calls, keys[index], storage, "cuda" if cuda else "cpu")
        _mark_same(asked)  # one read of every answer of the batch
        runs: list[list[list[RankRun]]] = []
        for calls in self.per_case:
            calls[0].run.inspect_s = (time.perf_counter() - start) / len(self.per_case)
            runs.append(_by_repeat(calls))
            if on_case is not None:
                on_case(runs[-1])
        self.tick("inspection")
        return runs

    def run(self, callables: dict[str, Callable[..., Any]],
            on_case: Callable[[list[list[RankRun]]], None] | None,
            keys: Sequence[dict[int | None, RepeatKey | None] | None] | None = None
            ) -> list[list[list[RankRun]]]:
        """Run the cases in order (see :func:`run_batch`), with an :class:`_Attribution`
        check after each case where there are zones."""
        cuda, storage, profile, sync = self.cuda, self.storage, self.profile, self.sync
        pending = _pending_cuda_errors() if cuda else None
        watch = (_Attribution(self.cases, self.per_case, self.pristine, self.full,
                              self.zone, views=not cuda) if self.zone else None)
        runs: list[list[list[RankRun]]] = []
        for index, calls in enumerate(self.per_case):
            fn = callables[self.cases[index].dialect]
            # one rank: the calls are one call repeated, run back to back, and the copy
            # back synchronises them; several ranks: each call synchronised (fatal → rank)
            each = cuda and len(self.cases[index].ranks()) > 1
            lo, hi = self.blocks(index)
            done: list[_Call] = []
            for call in calls:
                done.append(call)
                _make_call(fn, call, storage, cuda, pending, sync if each else None)
                if call.run.fatal:
                    break
            back = None
            if not done[-1].run.fatal:
                start = time.perf_counter()
                try:
                    if profile is not None:
                        sync()  # the kernels' time apart from the copy's
                    self.tick("kernel")
                    back = storage.storage[lo:hi].cpu().numpy() if cuda else self.host[lo:hi]
                except Exception as exc:  # noqa: BLE001 - an error surfacing at the copy
                    if _is_sticky_cuda_error(exc):
                        _fatal_at_copy(done, exc)
                    else:  # one the peek could not see, raised (and so cleared) by torch
                        _pinned_call(done).run.error = _launch_error_text(exc)
                        _pinned_call(done).run.launch_error = True
                        try:
                            back = storage.storage[lo:hi].cpu().numpy()
                        except Exception as again:  # noqa: BLE001 - the context is gone after all
                            _fatal_at_copy(done, again)
                done[-1].run.elapsed_s += time.perf_counter() - start
            else:
                self.tick("kernel")
            if back is None:  # the context is gone: only the calls' errors can be reported
                done = [call for call in done if call.run.error is not None]
            self.tick("transfer")
            start = time.perf_counter()
            if back is not None:
                if watch is not None:
                    back = watch.after(index, back)
                suspects = _calls_with_stray_changes(done, back, lo)
                for k, call in enumerate(done):  # a call that raised too: did it write?
                    if k in suspects:
                        call.staged.inspect(back, call.base - lo, call.run)
                    else:
                        call.staged.outputs(back, call.base - lo, call.run)
                if keys is not None and keys[index] is not None:
                    _mark_same(_repeats_asked(done, keys[index], storage,
                                              "cuda" if cuda else "cpu"))
            if done:
                done[0].run.inspect_s = time.perf_counter() - start
            self.tick("inspection")
            runs.append(_by_repeat(done))
            if on_case is not None:
                on_case(runs[-1])
            if any(call.run.fatal for call in done):
                break  # the context is unusable: nothing run after this means anything
        return runs


def _by_repeat(calls: list[_Call]) -> list[list[RankRun]]:
    """The runs of one case's ``calls``, ``runs[repeat][rank]``."""
    by_repeat: dict[int, list[RankRun]] = {}
    for call in calls:
        by_repeat.setdefault(call.repeat, []).append(call.run)
    return list(by_repeat.values())


def _make_call(fn: Callable[..., Any], call: _Call, storage: Any, cuda: bool,
               pending: _PendingCudaErrors | None, sync: Callable[[], None] | None) -> None:
    """Make one call on its staged tensors and put what it did on ``call.run``: an
    exception it raised (``fatal`` when sticky), a launch error it left pending (read
    before ``sync``, given for a call synchronised on its own, could raise it as its
    own), the seconds it took."""
    tensors = call.staged.tensors(storage, call.base, "cuda" if cuda else "cpu")
    args = [tensors[a.name] if isinstance(a, TensorArg) else a
            for a in call.staged.plan.arguments]
    start = time.perf_counter()
    try:
        fn(*args)
        left = pending.take() if pending is not None else None
        if left is not None:
            call.run.error = f"launch error left pending by the call: {left}"
            call.run.launch_error = True
        if sync is not None:
            sync()
    except Exception as exc:  # noqa: BLE001 - any exception is the verdict "error"
        call.run.error, call.run.launch_error = _describe(exc), False
        call.run.frames = _frames(exc)
        call.run.fatal = cuda and _is_sticky_cuda_error(exc)
        left = pending.take() if pending is not None and not call.run.fatal else None
        if left is not None:
            call.run.error += f" (and it left a launch error pending: {left})"
    call.run.elapsed_s = time.perf_counter() - start


def _repeats_asked(calls: list[_Call], keys: dict[int | None, RepeatKey | None],
                   storage: Any, device: str) -> list[tuple[_Call, Any]]:
    """For each repeat among ``calls`` (one case's, read back and inspected) that ran
    cleanly, the question, asked on the device, whether it equals the first run of its
    rank after canonicalisation (for :func:`_mark_same`); a repeat that raised, or
    changed a guard band or an input, is not asked about (it is left whole)."""
    first: dict[int | None, tuple[CanonicalForm, list[Any]]] = {}
    asked: list[tuple[_Call, Any]] = []
    for call in calls:
        run = call.run
        if call.repeat == 0:
            if run.error is None and call.rank in keys:
                form = CanonicalForm(keys[call.rank])
                first[call.rank] = (form, form(_output_tensors(call, storage, device)))
            continue
        if (call.rank in first and run.error is None and not run.guard_damage
                and not run.mutated_inputs and not run.wild_writes):
            form, canon = first[call.rank]
            asked.append((call, form.equal(canon, _output_tensors(call, storage, device))))
    return asked


def _mark_same(asked: list[tuple[_Call, Any]]) -> None:
    """Mark ``same_as_first`` (and drop the outputs of) each repeat :func:`_repeats_asked`
    found equal to its first run, in one read of the answers."""
    import torch

    if asked:
        for (call, _), same in zip(asked, torch.stack([a for _, a in asked]).tolist()):
            if same:
                call.run.same_as_first, call.run.outputs = True, {}


def _output_tensors(call: _Call, storage: Any, device: str) -> dict[str, Any]:
    tensors = call.staged.tensors(storage, call.base, device)
    return {name: tensors[name] for name in call.staged.plan.outputs}


class CanonicalForm:
    """:func:`difftest.compare.canonical` of a call's output tensors, where they are (on
    the device), for the calls of one rank of one case (``key``: its
    :class:`~difftest.compare.RepeatKey`, ``None`` where the canonical form is the
    outputs themselves). For a rows call: the ``(block's segment, value)`` pairs of
    ``sorted_token_ids`` sorted (a position outside every segment is keyed by
    itself, so it keeps its place), with the positions and ``expert_ids`` blocks the
    dialect leaves unspecified zeroed, then ``expert_ids`` and
    ``num_tokens_post_pad``. Two runs have the same canonical form exactly when
    these tensors are equal (:meth:`equal`)."""

    def __init__(self, key: RepeatKey | None) -> None:
        self.key = key
        self._segment: Any = None  # int64 [L * P], shifted into the high 32 bits
        self._masks: tuple[Any, Any] | None = None

    def _layout(self, dev: Any) -> None:
        import torch

        key = self.key
        rows, positions, blocks = key.rows, key.positions, key.blocks
        segment = torch.full((rows, positions), -1, dtype=torch.int64, device=dev)
        width = min(positions, blocks * key.block_size)
        by_block = torch.from_numpy(key.block_keys()).to(dev)
        segment[:, :width] = by_block.repeat_interleave(key.block_size, dim=1)[:, :width]
        segment = segment.reshape(-1)
        alone = int(key.lengths.size) + torch.arange(segment.numel(), device=dev)
        self._segment = torch.where(segment < 0, alone, segment) << 32
        masks = []
        for limit, width in ((key.checked_positions, positions), (key.checked_blocks, blocks)):
            masks.append(None if limit is None else (
                torch.arange(width, device=dev)
                < torch.from_numpy(limit).to(dev).reshape(rows, 1)))
        self._masks = (masks[0], masks[1])

    def __call__(self, outputs: dict[str, Any]) -> list[Any]:
        import torch

        key = self.key
        if key is None:
            return [outputs[name].reshape(-1) for name in sorted(outputs)]
        values = outputs["sorted_token_ids"].reshape(key.rows, key.positions).to(torch.int64)
        if self._segment is None:
            self._layout(values.device)
        positions, blocks = self._masks
        if positions is not None:
            values = torch.where(positions, values, 0)
        experts = outputs["expert_ids"].reshape(key.rows, key.blocks)
        if blocks is not None:
            experts = torch.where(blocks, experts, 0)
        packed = self._segment | (values.reshape(-1) & 0xFFFFFFFF)
        return [torch.sort(packed).values, experts.reshape(-1),
                outputs["num_tokens_post_pad"].reshape(-1)]

    def equal(self, first: list[Any], outputs: dict[str, Any]) -> Any:
        """A 0-d bool tensor, on the device: whether ``outputs`` have the canonical form
        ``first`` (this form of the first run); read it when every question is asked."""
        import torch

        return torch.stack([(a == b).all() for a, b in zip(first, self(outputs))]).all()


class _Attribution:
    """Pins a write into another case's bytes of the batch on the case that made it.

    On CUDA every buffer of a batch lies in one allocation, so a call's wild
    write can land in another case's inputs, outputs or guard bands: before
    that case runs (it would be blamed for the damage, or fail on corrupted
    inputs) or after it was read back (unseen). The blocks lie between two
    zones of :data:`ZONE_BYTES` of guard value, so a write far past them is
    seen too, and a case alone (a batch of one, as a failure is confirmed)
    shows the write it made into a neighbour in its batch. After each case
    — its copy back has synchronised it — the whole allocation is compared
    with what it must hold: the zones, the staged bytes for the cases still
    to run, the bytes read back for those done, the case itself excepted.
    That is one comparison on the device against a device copy kept up to
    date (a copy of the case's block and one ``torch.equal`` per case); only
    when it differs are the differing bytes fetched, checked against the
    host's record, named (:class:`WildWrite` on the first call of the case
    that ran) and put back, so the cases after it run on intact inputs. A
    difference the host's record does not show is a write that landed in the
    device copy itself, past the allocation; it is named too. Not seen: a
    write beyond both, and one between the ranks or repeats of one case (its
    own failure either way). On the CPU (off by default there: each buffer
    is its own tensor, torch refuses a write past it) the same check runs on
    the host array.
    """

    def __init__(self, cases: Sequence[Case], per_case: list[list[_Call]],
                 pristine: np.ndarray, current: Any, zone: int, views: bool) -> None:
        self.cases, self.per_case, self.current, self.zone = cases, per_case, current, zone
        self.views = views  # the outputs are views of ``current`` (the CPU's host array)
        # what each byte of the blocks must hold: staged until its case ran, then what it
        # read back (the zones hold the guard value)
        self.expect = pristine.copy()
        if views:  # NumPy's copy is the faster on the CPU
            import torch

            self.reference = torch.from_numpy(current.numpy().copy())
        else:
            self.reference = current.clone()
        self.calls = [(call.base, i, call) for i, calls in enumerate(per_case) for call in calls]
        self.bases = [b for b, _, _ in self.calls]

    def after(self, index: int, back: np.ndarray) -> np.ndarray:
        """Check the batch after case ``index`` (whose bytes read back are ``back``);
        returns ``back``, copied when it is a view of the bytes a later call may change."""
        import torch

        calls = self.per_case[index]
        lo, hi = calls[0].base, calls[-1].base + calls[-1].staged.nbytes
        if self.views:
            back = back.copy()
        self.expect[lo:hi] = back
        z = self.zone
        if self.views:  # on the CPU NumPy's copy and comparison are the faster ones
            current, reference = self.current.numpy(), self.reference.numpy()
            reference[z + lo:z + hi] = current[z + lo:z + hi]
            if np.array_equal(current, reference):
                return back
        else:
            self.reference[z + lo:z + hi].copy_(self.current[z + lo:z + hi])
            if self.current.equal(self.reference):
                return back
        at = (self.current != self.reference).nonzero().flatten()
        where, now = at.cpu().numpy(), self.current[at].cpu().numpy()
        inner = where - z
        in_blocks = (inner >= 0) & (inner < self.expect.size)
        want = _GUARD_BYTES[where % 4]  # the zones' bytes (both start on a 4-byte boundary)
        want[in_blocks] = self.expect[inner[in_blocks]]
        hit = now != want  # bytes that changed; the rest: the device copy itself did
        writes: list[WildWrite] = []
        for case_index, call, mask in self._by_call(inner, hit & in_blocks):
            if len(writes) < 8:
                writes.append(self._named(case_index, call, inner[mask], now[mask]))
        outside = int((~(hit & in_blocks)).sum())
        if outside:  # in a zone, or past the allocation into the device copy
            writes.append(WildWrite(None, None, "", "", 0, 0, outside))
        value = torch.from_numpy(want).to(self.current.device)
        self.current[at] = value  # put back: the cases after it run on what was staged
        self.reference[at] = value
        calls[0].run.wild_writes += writes
        return back

    def _by_call(self, where: np.ndarray,
                 hit: np.ndarray) -> list[tuple[int, _Call, np.ndarray]]:
        """(case index, call, mask of ``where``) for every call whose block was hit."""
        owner = np.searchsorted(self.bases, where, side="right") - 1
        return [(self.calls[k][1], self.calls[k][2], hit & (owner == k))
                for k in np.unique(owner[hit])]

    def _named(self, case_index: int, call: _Call, positions: np.ndarray,
               values: np.ndarray) -> WildWrite:
        """The first changed element of ``call``'s block (bytes ``positions`` of the
        batch now hold ``values``): its buffer, index and value, and how many elements
        of that buffer and its bands changed."""
        first = int(positions[0]) - call.base
        buf = next(b for b in call.staged.buffers if b.start <= first < b.end)
        size = buf.dtype.itemsize
        element = (first - buf.data) // size
        at = call.base + buf.data + element * size
        word = self.expect[at:at + size].copy()
        mine = (positions >= at) & (positions < at + size)
        word[positions[mine] - at] = values[mine]
        offsets = positions - call.base
        inside = (offsets >= buf.start) & (offsets < buf.end)
        count = np.unique((offsets[inside] - buf.data) // size).size
        return WildWrite(self.cases[case_index].case_id, call.rank, buf.name, buf.role,
                         int(element), int(word.view(buf.dtype)[0]), int(count),
                         band=not 0 <= element < buf.numel)


def _pinned_call(done: list[_Call]) -> _Call:
    """The call an error raised after a case's calls belongs to: unsynchronised calls
    are one call repeated, its first run; after synchronised calls (ranks) the last."""
    return done[0] if len({c.rank for c in done}) == 1 else done[-1]


def _launch_error_text(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return "launch error left pending by the call: " + first.removeprefix("CUDA error: ")


def _fatal_at_copy(done: list[_Call], exc: BaseException) -> None:
    """Put a sticky device error raised by a case's copy back on its call
    (:func:`_pinned_call`)."""
    call = _pinned_call(done)
    call.run.error, call.run.fatal = _describe(exc), True
    if len(done) > 1 and call is done[0]:
        call.run.error += f" (raised by the copy back after the {len(done)} runs of the call)"


def _calls_with_stray_changes(calls: Sequence[_Call], back: np.ndarray,
                              offset: int) -> set[int]:
    """Indices of the calls whose block changed outside its output and scratch data.

    ``back`` holds the returned bytes of the calls' blocks, from byte ``offset``
    of the batch. A byte that differs from the call's staged block outside what
    the call may write (its inputs and guard bands: a small part of a large
    case) is guard-band damage or a mutated input, and only those calls get the
    buffer-by-buffer :meth:`Staged.inspect`.
    """
    found = set()
    for k, call in enumerate(calls):
        block, start = call.staged.block, call.base - offset
        mine = back[start:start + block.size]
        if not all(np.array_equal(mine[lo:hi], block[lo:hi]) for lo, hi in call.staged.fixed):
            found.add(k)
    return found


def run_case(case: Case, callables: dict[str, Callable[..., Any]], device: str,
             repeats: int = 1) -> list[list[RankRun]]:
    """Run every rank of ``case`` ``repeats`` times: ``runs[repeat][rank_index]``.

    The runs stop after a fatal (sticky) device error: nothing after it means
    anything in this process.
    """
    return run_batch([case], callables, device, repeats)[0]
