"""Run one case through an implementation, in this process (SPEC §9 set-up).

Every output buffer is filled with :data:`SENTINEL` and sits inside one
allocation between two guard bands of :data:`GUARD`, so a write past the end
of a row, or of the whole buffer, is visible even when no CUDA error is
raised. Inputs are kept as NumPy copies and compared after the call.

The result is a :class:`RankRun` of plain NumPy arrays: it crosses the pipe
from a sandbox worker to the runner, which compares it with the oracle.
This module is the only one of difftest that imports torch, and only the
sandbox worker (or an in-process run) imports it.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .case import Case
from .dialects import DIALECT_INFO, CallPlan, TensorArg

SENTINEL = -559038737  # 0xDEADBEEF as int32: "never written"
GUARD = -1163005939  # 0xBAADF00D as int32: guard band around every buffer
GUARD_LEN = 64


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


def _is_sticky_cuda_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    markers = ("illegal memory access", "illegal address", "unspecified launch failure",
               "misaligned address", "device-side assert", "AcceleratorError")
    return any(m in text for m in markers)


def run_call(case: Case, rank: int | None, fn: Callable[..., Any], device: str) -> RankRun:
    """One call of ``fn`` for ``rank`` of ``case`` on ``device``, fully checked set-up."""
    import torch

    plan: CallPlan = DIALECT_INFO[case.dialect].plan(case, rank)
    tensors: dict[str, Any] = {}
    for name, array in plan.inputs.items():
        # a copy: an implementation that writes into an input must not reach the case
        tensors[name] = torch.from_numpy(np.array(array, copy=True)).to(device)
    guarded: dict[str, Any] = {}
    for name, (shape, dtype) in {**plan.outputs, **plan.scratch}.items():
        numel = int(np.prod(shape))
        tdtype = torch.int64 if dtype == np.int64 else torch.int32
        buf = torch.full((GUARD_LEN + numel + GUARD_LEN,), GUARD, dtype=tdtype, device=device)
        fill = SENTINEL if name in plan.outputs else 0
        buf[GUARD_LEN:GUARD_LEN + numel].fill_(fill)
        guarded[name] = buf
        tensors[name] = buf[GUARD_LEN:GUARD_LEN + numel].view(shape)
    args = [tensors[a.name] if isinstance(a, TensorArg) else a for a in plan.arguments]
    result = RankRun(rank)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    try:
        fn(*args)
        sync()
    except Exception as exc:  # noqa: BLE001 - any exception is the verdict "error"
        result.elapsed_s = time.perf_counter() - start
        result.error = _describe(exc)
        result.fatal = _is_sticky_cuda_error(exc)
        return result
    result.elapsed_s = time.perf_counter() - start
    for name, buf in guarded.items():
        host = buf.cpu().numpy()
        numel = host.size - 2 * GUARD_LEN
        band = np.concatenate([host[:GUARD_LEN], host[GUARD_LEN + numel:]])
        bad = np.flatnonzero(band != GUARD)
        if bad.size:
            # positions relative to the buffer's start: negative before, >= numel after
            pos = np.where(bad < GUARD_LEN, bad - GUARD_LEN, bad - GUARD_LEN + numel)
            result.guard_damage[name] = [(int(p), int(band[b])) for p, b in zip(pos[:8], bad[:8])]
        if name in plan.outputs:
            result.outputs[name] = host[GUARD_LEN:GUARD_LEN + numel].copy()
    for name, array in plan.inputs.items():
        after = tensors[name].cpu().numpy()
        if after.shape != array.shape or not np.array_equal(after, array):
            flat_a, flat_b = array.reshape(-1), after.reshape(-1)
            diff = np.flatnonzero(flat_a != flat_b) if flat_a.shape == flat_b.shape else [0]
            i = int(diff[0])
            result.mutated_inputs[name] = (i, int(flat_a[i]), int(flat_b[i]))
    return result


def _describe(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    text = "".join(lines).strip()
    return text if len(text) < 2000 else text[:2000] + " …"


def run_case(case: Case, callables: dict[str, Callable[..., Any]], device: str,
             repeats: int = 1) -> list[list[RankRun]]:
    """Run every rank of ``case`` ``repeats`` times: ``runs[repeat][rank_index]``.

    Stops early after a fatal (sticky) device error: nothing after it means
    anything in this process.
    """
    fn = callables[case.dialect]
    runs: list[list[RankRun]] = []
    for _ in range(repeats):
        one: list[RankRun] = []
        for rank in case.ranks():
            run = run_call(case, rank, fn, device)
            one.append(run)
            if run.fatal:
                runs.append(one)
                return runs
        runs.append(one)
    return runs
