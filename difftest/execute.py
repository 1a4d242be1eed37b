"""Run cases through an implementation, in this process (SPEC §9 set-up).

Every output buffer is filled with :data:`SENTINEL` and sits between two
guard bands of :data:`GUARD`, so a write past the end of a row, or of the
whole buffer, is visible even when no CUDA error is raised. Inputs are
copies, compared with the case after the call.

One call's buffers (inputs, outputs, scratch, each with its bands) are laid
out in one block of bytes (:class:`Staged`); every byte of the block that is
not a buffer's data belongs to a guard band. A batch of cases is one host
array of such blocks (every repeat of every rank of every case), so on a GPU
it costs one copy to the device and one back, whatever the number of calls:
the calls are launched back to back and synchronised once. On the CPU each
buffer is its own tensor over its part of the host array, so a write past a
buffer's storage raises as torch does.

A batch gives up at the first sticky device error (an illegal address
poisons the context, and which call caused it is not known without a
synchronisation after every call): :func:`run_batch` then reports the batch
*poisoned*, and the caller re-runs its cases one by one in a fresh process
with ``sync_each`` (a synchronisation after every call), which names the
call and gives it the verdict ``crash``.

The result is a :class:`RankRun` of plain NumPy arrays per call: it crosses
the pipe from a sandbox worker to the runner, which compares it with the
oracle. This module is the only one of difftest that imports torch, and only
the sandbox worker (or an in-process run) imports it.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .case import Case
from .dialects import DIALECT_INFO, CallPlan, TensorArg

SENTINEL = -559038737  # 0xDEADBEEF as int32: "never written"
GUARD = -1163005939  # 0xBAADF00D as int32: guard band around every buffer
GUARD_LEN = 64  # elements of guard band at least, before and after every buffer
ALIGN = 256  # bytes: every buffer's band, and its data, starts on this boundary


@dataclass
class RankRun:
    """What one call on one rank did, as plain NumPy values."""

    rank: int | None
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    guard_damage: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    mutated_inputs: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    error: str | None = None
    fatal: bool = False  # the device is unusable after this error (sticky CUDA error)
    elapsed_s: float = 0.0


@dataclass
class BatchResult:
    """``runs[case][repeat][rank]``, or why there are none (``poisoned``)."""

    runs: list[list[list[RankRun]]] = field(default_factory=list)
    poisoned: str | None = None  # a sticky device error in a batch run without sync_each


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
                out[buf.name] = storage[buf.dtype].as_strided(
                    buf.shape, buf.strides, (base + buf.data) // buf.dtype.itemsize)
        return out

    def outputs(self, host: np.ndarray, base: int, run: RankRun) -> None:
        """Only the outputs of the call whose block is ``host[base:]`` (for a block known
        to differ from the staged one in output and scratch data alone)."""
        for buf in self.buffers:
            if buf.role == "output":
                lo = base + buf.data
                data = host[lo:lo + buf.numel * buf.dtype.itemsize].view(buf.dtype)
                run.outputs[buf.name] = data.reshape(buf.shape).copy()

    def inspect(self, host: np.ndarray, base: int, run: RankRun) -> None:
        """Guard bands, outputs and inputs of the call whose block is ``host[base:]``."""
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
            if buf.role == "output":
                run.outputs[buf.name] = data.reshape(buf.shape).copy()


def _torch_dtypes() -> dict[np.dtype, Any]:
    import torch

    return {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
            np.dtype(np.uint8): torch.uint8, np.dtype(np.int8): torch.int8,
            np.dtype(np.int16): torch.int16, np.dtype(np.bool_): torch.bool,
            np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


class _LazyDtypes(dict):
    def __missing__(self, key: np.dtype) -> Any:
        self.update(_torch_dtypes())
        if key not in self:
            raise TypeError(f"dtype {key} has no torch equivalent here")
        return self[key]


_TORCH_DTYPES: dict[np.dtype, Any] = _LazyDtypes()


class _DeviceViews(dict):
    """A batch's device bytes (``uint8``), and the same bytes as each dtype asked for."""

    def __init__(self, storage: Any) -> None:
        super().__init__()
        self.storage = storage

    def __missing__(self, dtype: np.dtype) -> Any:
        self[dtype] = self.storage.view(_TORCH_DTYPES[dtype])
        return self[dtype]


def _is_sticky_cuda_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    markers = ("illegal memory access", "illegal address", "unspecified launch failure",
               "misaligned address", "device-side assert", "AcceleratorError")
    return any(m in text for m in markers)


def _describe(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    text = "".join(lines).strip()
    return text if len(text) < 2000 else text[:2000] + " …"


@dataclass
class _Call:
    case: int
    repeat: int
    rank: int | None
    staged: Staged
    base: int
    run: RankRun
    events: tuple[Any, Any] | None = None


def run_batch(cases: Sequence[Case], callables: dict[str, Callable[..., Any]], device: str,
              repeats: int = 1, *, sync_each: bool = False,
              profile: dict[str, float] | None = None) -> BatchResult:
    """Every rank of every case, ``repeats`` times, from one staged host array.

    Without ``sync_each`` (a batch) the calls are not synchronised one by one:
    a sticky device error makes the whole batch *poisoned*. With it, the call
    whose synchronisation fails is marked ``fatal`` and nothing after it runs.
    ``profile``, when given, gets the seconds of each step added to it (``set-up``,
    ``transfer``, ``kernel``, ``inspection``), with a synchronisation between steps.
    """
    import torch

    cuda = str(device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = [time.perf_counter()]

    def tick(step: str) -> None:
        if profile is not None:
            sync()
            now = time.perf_counter()
            profile[step] = profile.get(step, 0.0) + now - clock[0]
            clock[0] = now

    calls: list[_Call] = []
    base = 0
    for index, case in enumerate(cases):
        staged = [Staged(DIALECT_INFO[case.dialect].plan(case, rank)) for rank in case.ranks()]
        for repeat in range(repeats):
            for rank, one in zip(case.ranks(), staged):
                calls.append(_Call(index, repeat, rank, one, base, RankRun(rank)))
                base += one.nbytes
    host = np.empty(base, np.uint8)
    for call in calls:
        host[call.base:call.base + call.staged.nbytes] = call.staged.block
    # on the CPU the calls write into ``host`` itself: keep the staged bytes apart
    pristine = host if cuda else host.copy()
    tick("set-up")
    storage = _DeviceViews(torch.from_numpy(host).to(device)) if cuda else host
    tick("transfer")
    done: list[_Call] = []
    # one timing event per call boundary: a call's GPU time runs from the event
    # before it to the event after it
    mark = None
    if cuda and not sync_each:
        mark = torch.cuda.Event(enable_timing=True)
        mark.record()
    for call in calls:
        tensors = call.staged.tensors(storage, call.base, "cuda" if cuda else "cpu")
        args = [tensors[a.name] if isinstance(a, TensorArg) else a
                for a in call.staged.plan.arguments]
        fn = callables[cases[call.case].dialect]
        done.append(call)
        start = time.perf_counter()
        try:
            fn(*args)
            if sync_each:
                sync()
        except Exception as exc:  # noqa: BLE001 - any exception is the verdict "error"
            call.run.elapsed_s = time.perf_counter() - start
            call.run.error = _describe(exc)
            if cuda and _is_sticky_cuda_error(exc):
                if not sync_each:
                    return BatchResult(poisoned=call.run.error)
                call.run.fatal = True
                break
        else:
            call.run.elapsed_s = time.perf_counter() - start
        if mark is not None:
            after = torch.cuda.Event(enable_timing=True)
            after.record()
            if call.run.error is None:
                call.events = (mark, after)
            mark = after
    tick("kernel")
    back = None
    if not any(call.run.fatal for call in done):
        try:
            back = storage.storage.cpu().numpy() if cuda else host
        except Exception as exc:  # noqa: BLE001 - an asynchronous sticky error surfaces here
            if not sync_each:
                return BatchResult(poisoned=_describe(exc))
            last = done[-1].run
            last.error, last.fatal = _describe(exc), True
    tick("transfer")
    if back is not None:
        suspects = _calls_with_stray_changes(done, pristine, back)
        for k, call in enumerate(done):
            if call.events is not None:
                call.run.elapsed_s = call.events[0].elapsed_time(call.events[1]) / 1e3
            if call.run.error is not None:
                continue
            if k in suspects:
                call.staged.inspect(back, call.base, call.run)
            else:
                call.staged.outputs(back, call.base, call.run)
    tick("inspection")
    result = BatchResult([[] for _ in cases])
    for call in done:
        per_case = result.runs[call.case]
        if len(per_case) <= call.repeat:
            per_case.append([])
        per_case[call.repeat].append(call.run)
    return result


def _calls_with_stray_changes(calls: Sequence[_Call], pristine: np.ndarray,
                              back: np.ndarray) -> set[int]:
    """Indices of the calls whose block changed outside its output and scratch data.

    One comparison over the whole batch: a byte that differs from the staged
    one, outside what a call may write, is guard-band damage or a mutated
    input, and only those calls get the buffer-by-buffer :meth:`Staged.inspect`.
    """
    changed = back != pristine
    for call in calls:
        for lo, hi in call.staged.writable:
            changed[call.base + lo:call.base + hi] = False
    stray = np.flatnonzero(changed)
    if not stray.size:
        return set()
    starts = np.array([call.base for call in calls])
    return set(np.unique(np.searchsorted(starts, stray, side="right") - 1).tolist())


def run_case(case: Case, callables: dict[str, Callable[..., Any]], device: str,
             repeats: int = 1) -> list[list[RankRun]]:
    """Run every rank of ``case`` ``repeats`` times: ``runs[repeat][rank_index]``.

    Each call is synchronised on its own; the runs stop after a fatal (sticky)
    device error: nothing after it means anything in this process.
    """
    return run_batch([case], callables, device, repeats, sync_each=True).runs[0]
