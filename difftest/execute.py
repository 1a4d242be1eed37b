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

Every case is synchronised before the next one starts (its copy back is
the synchronisation), so a sticky device error (an illegal address poisons
the context) is pinned on the case that caused it (``fatal``) and the batch
stops there: :func:`run_batch` returns the cases up to and including that
one. The cases after it did not run; the caller runs them in a fresh
process. The calls of one case run back to back when they are the same call
repeated (one rank); the calls of an expert-parallel case, one per rank, are
each synchronised, so the fatal error is also pinned on its rank.

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
from .dialects import DIALECT_INFO, SENTINEL, CallPlan, TensorArg  # SENTINEL: outputs' fill

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
    elapsed_s: float = 0.0  # the call; the last call of a case also waits for its copy back


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
                out[buf.name] = storage[buf.dtype].as_strided(
                    buf.shape, buf.strides, (base + buf.data) // buf.dtype.itemsize)
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


def _describe(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    text = "".join(lines).strip()
    return text if len(text) < 2000 else text[:2000] + " …"


@dataclass
class _Call:
    repeat: int
    rank: int | None
    staged: Staged
    base: int
    run: RankRun


def run_batch(cases: Sequence[Case], callables: dict[str, Callable[..., Any]], device: str,
              repeats: int = 1, *, profile: dict[str, float] | None = None,
              on_case: Callable[[list[list[RankRun]]], None] | None = None
              ) -> list[list[list[RankRun]]]:
    """Every rank of every case, ``repeats`` times: ``runs[case][repeat][rank]``.

    The calls run in order; each case is synchronised, and each rank of a
    multi-rank case. After a fatal (sticky) device error nothing more runs:
    the result ends with the case of the fatal call, whose runs are just its
    calls that raised (none of its outputs can be read), so it may hold fewer
    cases than given.
    ``profile``, when given, gets the seconds of each step added to it
    (``set-up``, ``transfer``, ``kernel``, ``inspection``). ``on_case``, when
    given, gets each case's runs as soon as they are read back, before the
    next case starts (a sandbox worker streams them to its runner).
    """
    import torch

    cuda = str(device).startswith("cuda")
    if not cuda and len(cases) > 1:
        # One block for the batch saves copies to a device; the CPU has none to save, so
        # each case is staged when its turn comes: a worker that dies at one case has
        # staged no other (the cases after it are run again elsewhere).
        return [runs for case in cases
                for runs in run_batch([case], callables, device, repeats, profile=profile,
                                      on_case=on_case)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = [time.perf_counter()]

    def tick(step: str) -> None:
        if profile is not None:
            now = time.perf_counter()
            profile[step] = profile.get(step, 0.0) + now - clock[0]
            clock[0] = now

    per_case: list[list[_Call]] = []
    base = 0
    for case in cases:
        staged = [Staged(DIALECT_INFO[case.dialect].plan(case, rank)) for rank in case.ranks()]
        per_case.append([])
        for repeat in range(repeats):
            for rank, one in zip(case.ranks(), staged):
                per_case[-1].append(_Call(repeat, rank, one, base, RankRun(rank)))
                base += one.nbytes
    host = np.empty(base, np.uint8)
    for calls in per_case:
        for call in calls:
            host[call.base:call.base + call.staged.nbytes] = call.staged.block
    # on the CPU the calls write into ``host`` itself: keep the staged bytes apart
    pristine = host if cuda else host.copy()
    tick("set-up")
    storage = _DeviceViews(torch.from_numpy(host).to(device)) if cuda else host
    sync()
    tick("transfer")
    runs: list[list[list[RankRun]]] = []
    for index, calls in enumerate(per_case):
        fn = callables[cases[index].dialect]
        # one rank: the calls are one call repeated, run back to back, and the copy
        # back synchronises them; several ranks: each call synchronised (fatal → rank)
        each = cuda and len(cases[index].ranks()) > 1
        done: list[_Call] = []
        for call in calls:
            tensors = call.staged.tensors(storage, call.base, "cuda" if cuda else "cpu")
            args = [tensors[a.name] if isinstance(a, TensorArg) else a
                    for a in call.staged.plan.arguments]
            done.append(call)
            start = time.perf_counter()
            try:
                fn(*args)
                if each:
                    sync()
            except Exception as exc:  # noqa: BLE001 - any exception is the verdict "error"
                call.run.error = _describe(exc)
                call.run.fatal = cuda and _is_sticky_cuda_error(exc)
            call.run.elapsed_s = time.perf_counter() - start
            if call.run.fatal:
                break
        lo, hi = calls[0].base, calls[-1].base + calls[-1].staged.nbytes
        back = None
        if not done[-1].run.fatal:
            start = time.perf_counter()
            try:
                if profile is not None:
                    sync()  # the kernels' time apart from the copy's
                tick("kernel")
                back = storage.storage[lo:hi].cpu().numpy() if cuda else host[lo:hi]
            except Exception as exc:  # noqa: BLE001 - a sticky error surfacing at the copy
                _fatal_at_copy(done, exc)
            done[-1].run.elapsed_s += time.perf_counter() - start
        else:
            tick("kernel")
        if back is None:  # the context is gone: only the calls' errors can be reported
            done = [call for call in done if call.run.error is not None]
        tick("transfer")
        if back is not None:
            suspects = _calls_with_stray_changes(done, pristine[lo:hi], back, lo)
            for k, call in enumerate(done):
                if call.run.error is not None:
                    continue
                if k in suspects:
                    call.staged.inspect(back, call.base - lo, call.run)
                else:
                    call.staged.outputs(back, call.base - lo, call.run)
        tick("inspection")
        by_repeat: dict[int, list[RankRun]] = {}
        for call in done:
            by_repeat.setdefault(call.repeat, []).append(call.run)
        runs.append(list(by_repeat.values()))
        if on_case is not None:
            on_case(runs[-1])
        if any(call.run.fatal for call in done):
            break  # the context is unusable: nothing run after this means anything
    return runs


def _fatal_at_copy(done: list[_Call], exc: BaseException) -> None:
    """Put a sticky device error raised by a case's copy back on its call.

    Unsynchronised calls are one call repeated: the error is that call's, put
    on its first run. After synchronised calls (ranks) it is the last call's.
    """
    call = done[0] if len({c.rank for c in done}) == 1 else done[-1]
    call.run.error, call.run.fatal = _describe(exc), True
    if len(done) > 1 and call is done[0]:
        call.run.error += f" (raised by the copy back after the {len(done)} runs of the call)"


def _calls_with_stray_changes(calls: Sequence[_Call], pristine: np.ndarray,
                              back: np.ndarray, offset: int) -> set[int]:
    """Indices of the calls whose block changed outside its output and scratch data.

    ``pristine`` and ``back`` are the staged and the returned bytes of the
    calls' blocks, from byte ``offset`` of the batch. A byte that differs
    outside what a call may write is guard-band damage or a mutated input, and
    only those calls get the buffer-by-buffer :meth:`Staged.inspect`. First one
    comparison of just the bytes no call may change (inputs and bands: a small
    part of a large case); only when they differ, all the bytes, to find whose.
    """
    ranges = [(call.base - offset + lo, call.base - offset + hi)
              for call in calls for lo, hi in call.staged.fixed]
    if np.array_equal(np.concatenate([back[lo:hi] for lo, hi in ranges]),
                      np.concatenate([pristine[lo:hi] for lo, hi in ranges])):
        return set()
    changed = back != pristine
    for call in calls:
        for lo, hi in call.staged.writable:
            changed[call.base - offset + lo:call.base - offset + hi] = False
    stray = np.flatnonzero(changed)
    if not stray.size:
        return set()
    starts = np.array([call.base - offset for call in calls])
    return set(np.unique(np.searchsorted(starts, stray, side="right") - 1).tolist())


def run_case(case: Case, callables: dict[str, Callable[..., Any]], device: str,
             repeats: int = 1) -> list[list[RankRun]]:
    """Run every rank of ``case`` ``repeats`` times: ``runs[repeat][rank_index]``.

    The runs stop after a fatal (sticky) device error: nothing after it means
    anything in this process.
    """
    return run_batch([case], callables, device, repeats)[0]
