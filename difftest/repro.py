"""The standalone ``repro.py`` of a bug report.

The script needs torch and the implementation, nothing of difftest or the
oracle: it carries every rank's inputs, the argument list and the oracle's
expected outputs as literals, rebuilds the tensors (outputs sentinel-filled
inside guard bands, as the campaign does), calls the implementation and
checks what the campaign checks per call. It exits 1 while the bug is
present, 0 once it is fixed, 2 when it cannot run. For a flaky failure with
a culprit it runs the pair: the culprit's calls, then the victim's, in each
run, and only the victim's checks decide (the culprit's own are shown).

A large case (more than ``INLINE_ELEMENTS`` array elements in its calls) would
make a script of megabytes: its ``repro.py`` reads the call records from the
``case.json`` next to it instead (key ``repro_calls``, arrays deflated; loading
the case ignores it), and needs nothing else either.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import zlib
from typing import Any

import numpy as np

from .case import REPRO_CALLS, Case
from .dialects import DIALECT_INFO, RemapExpected, TensorArg
from .execute import GUARD, GUARD_LEN, SENTINEL

INLINE_ELEMENTS = 4096


def _array(a: np.ndarray) -> dict[str, Any]:
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": a.reshape(-1).tolist()}


def call_records(case: Case) -> list[dict[str, Any]]:
    """Per rank: inputs, buffers, arguments and expected outputs, JSON-able."""
    info = DIALECT_INFO[case.dialect]
    records = []
    for rank in case.ranks():
        plan = info.plan(case, rank)
        exp = info.reference(case, rank)
        if isinstance(exp, RemapExpected):
            expected = {"local_topk_ids": _array(exp.local_topk_ids)}
        else:
            expected = {
                "sorted_token_ids": _array(exp.sorted_token_ids),
                "expert_ids": _array(exp.expert_ids),
                "num_tokens_post_pad": _array(exp.num_tokens_post_pad),
                "written": [bool(w) for w in exp.written],
                "block_size": exp.block_size,
                # leading expert_ids blocks that are specified, per row (the rest unchecked)
                "checked_blocks": [int(c) for c in exp.expert_ids_checked().sum(axis=1)],
                # and leading sorted_token_ids positions
                "checked_positions": [int(c) for c in exp.sorted_token_ids_checked().sum(axis=1)],
            }
        records.append({
            "rank": rank,
            "inputs": {k: _array(v) for k, v in plan.inputs.items()},
            "outputs": {k: [list(s), str(d)] for k, (s, d) in plan.outputs.items()},
            "scratch": {k: [list(s), str(d)] for k, (s, d) in plan.scratch.items()},
            "arguments": [{"tensor": a.name} if isinstance(a, TensorArg) else {"value": a}
                          for a in plan.arguments],
            "expected": expected,
        })
    return records


_TEMPLATE = r'''#!/usr/bin/env python3
"""Standalone reproducer: __TITLE__

Implementation: __IMPL__   dialect: __DIALECT__   signature: __SIGNATURE__

    python repro.py                 # the implementation the bug was found in
    python repro.py --impl torch    # any other: torch[:fault], cuda[:fault], py:module:function,
                                    # op:NAMESPACE::NAME
    python repro.py --load build/lib.so   # op libraries to load instead of the recorded ones
    python repro.py --device cpu

Exit 1 while the bug is present, 0 when every check passes, 2 if it cannot run.
Needs torch and the implementation; the expected outputs are carried below.__PAIR_NOTE__
"""
import argparse
import base64
import importlib
import json
import os
import sys
import zlib

import numpy as np
import torch

IMPL = __IMPL_JSON__
LIBRARIES = __LIBRARIES_JSON__  # op libraries loaded first (--load overrides them)
DIALECT = __DIALECT_JSON__
STABLE = __STABLE__
SENTINEL, GUARD, GUARD_LEN = __SENTINEL__, __GUARD__, __GUARD_LEN__
CALLS = __CALLS__  # None: the call records are in the case.json next to this file
CULPRIT = json.loads(__CULPRIT_JSON__)  # calls run before CALLS in each run (a pair)
# where a py: implementation's module was imported from when the bug was found
MODULE_PATH = __MODULE_PATH__
# printed after "ok" when the implementation the bug was found in passes here (a failure
# this process may not see: an illegal address that lands in mapped memory)
OK_NOTE = __OK_NOTE_JSON__


def load(name):
    kind, _, rest = name.partition(":")
    if kind == "torch":
        from cuda_impl import torch_impl
        return torch_impl.implementation(rest or None)[DIALECT]
    if kind == "cuda":
        from cuda_impl import cuda
        return cuda.implementation(rest or None)[DIALECT]
    if kind == "py":
        module, _, attr = rest.partition(":")
        sys.path[:0] = [p for p in [os.getcwd(), *MODULE_PATH] if p not in sys.path]
        return getattr(importlib.import_module(module), attr)
    if kind == "op":
        namespace, _, op = rest.partition("::")
        return getattr(getattr(torch.ops, namespace), op)
    if kind == "vllm":
        from vllm import _custom_ops as ops
        return ops.moe_lora_align_block_size if DIALECT == "vllm-lora" else ops.moe_align_block_size
    if kind == "sglang":
        import inspect
        import sgl_kernel
        if DIALECT != "sglang-align":
            return sgl_kernel.moe_lora_align_block_size
        fn = sgl_kernel.moe_align_block_size
        try:  # versions before 2026 have no ignore_invalid_expert (the last argument)
            count = len(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            count = 9
        return fn if count >= 9 else (lambda *args: fn(*args[:count]))
    raise SystemExit(f"unknown --impl {name!r}")


def calls():
    if CALLS is not None:
        return CALLS
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "case.json")
    with open(path) as f:
        return json.load(f)["__REPRO_CALLS__"]


def array(rec):
    if "zlib" in rec:  # little-endian bytes, deflated, base64 (case.json of a large case)
        raw = zlib.decompress(base64.b64decode(rec["zlib"]))
        dtype = np.dtype(rec["dtype"]).newbyteorder("<")
        return np.frombuffer(raw, dtype=dtype).astype(rec["dtype"]).reshape(rec["shape"])
    return np.asarray(rec["data"], dtype=rec["dtype"]).reshape(rec["shape"])


def run(fn, call, device, exact=False):
    # exact: every buffer its own allocation of exactly its size, no guard bands, so
    # that compute-sanitizer (with PYTORCH_NO_CUDA_MEMORY_CACHING=1) sees a write past it
    band = 0 if exact else GUARD_LEN
    tensors, guarded = {}, {}
    for name, rec in call["inputs"].items():
        tensors[name] = torch.from_numpy(array(rec)).to(device)
    for kind in ("outputs", "scratch"):
        for name, (shape, dtype) in call[kind].items():
            numel = int(np.prod(shape))
            buf = torch.full((numel + 2 * band,), GUARD, device=device,
                             dtype=torch.int64 if dtype == "int64" else torch.int32)
            buf[band:band + numel] = SENTINEL if kind == "outputs" else 0
            guarded[name] = (buf, kind)
            tensors[name] = buf[band:band + numel].view(shape)
    args = [tensors[a["tensor"]] if "tensor" in a else a["value"] for a in call["arguments"]]
    fn(*args)
    if device.startswith("cuda"):
        try:  # a launch error the call left pending is raised by torch's next launch check
            torch.empty(1, device=device).fill_(0)
        except RuntimeError as exc:
            return [f"CUDA error left pending by the call: {exc}".splitlines()[0]]
        torch.cuda.synchronize()
    problems = []
    got = {}
    for name, (buf, kind) in guarded.items():
        host = buf.cpu().numpy()
        if (host[:band] != GUARD).any() or (host[host.size - band:] != GUARD).any():
            problems.append(f"{name}: guard band overwritten (write outside the buffer)")
        got[name] = host[band:host.size - band]
    for name, rec in call["inputs"].items():
        if not np.array_equal(tensors[name].cpu().numpy(), array(rec)):
            problems.append(f"input {name} was modified")
    exp = call["expected"]
    if "local_topk_ids" in exp:
        want = array(exp["local_topk_ids"]).reshape(-1)
        diff = np.flatnonzero(want != got["local_topk_ids"])
        if diff.size:
            i = diff[0]
            problems.append(f"local_topk_ids[{i}]: expected {want[i]}, actual "
                            f"{got['local_topk_ids'][i]} ({diff.size} differ)")
        return problems
    srt, eid, tot = (array(exp[k]) for k in ("sorted_token_ids", "expert_ids",
                                             "num_tokens_post_pad"))
    L, P = srt.shape
    M, B = eid.shape[1], exp["block_size"]
    g_srt = got["sorted_token_ids"].reshape(L, P)
    g_eid = got["expert_ids"].reshape(L, M)
    g_tot = got["num_tokens_post_pad"].reshape(L)
    for l in range(L):
        if not exp["written"][l]:
            if (g_srt[l] != SENTINEL).any() or (g_eid[l] != SENTINEL).any() or g_tot[l] != SENTINEL:
                problems.append(f"slot {l}: row of an unprocessed slot was written")
            continue
        if g_tot[l] != tot[l]:
            problems.append(f"slot {l}: num_tokens_post_pad expected {tot[l]}, actual {g_tot[l]}")
        checked = exp["checked_blocks"][l]
        bad = np.flatnonzero(g_eid[l][:checked] != eid[l][:checked])
        if bad.size:
            b = bad[0]
            problems.append(f"slot {l}: expert_ids[{b}] expected {eid[l][b]}, actual "
                            f"{g_eid[l][b]} ({bad.size} blocks differ)")
        b, t = 0, int(tot[l])
        while b < t // B:
            e, end = eid[l][b], b
            while end < M and eid[l][end] == e:
                end += 1
            want, have = srt[l, b * B:end * B], g_srt[l, b * B:end * B]
            if not STABLE:
                want, have = np.sort(want), np.sort(have)
            if not np.array_equal(want, have):
                problems.append(f"slot {l} / expert {e}: sorted_token_ids[{b * B}:{end * B}] "
                                f"expected routes {want.tolist()}, actual {have.tolist()}")
            b = end
        end = exp["checked_positions"][l]
        if not np.array_equal(g_srt[l, t:end], srt[l, t:end]):
            problems.append(f"slot {l}: sorted_token_ids[{t}:] must all be the pad value"
                            + (" (left unwritten)" if (srt[l, t:] == SENTINEL).all() else ""))
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--impl", default=IMPL)
    ap.add_argument("--load", action="append", metavar="PATH",
                    help="op library to load first (repeatable; default: the recorded ones)")
    ap.add_argument("--device", default="cuda" if IMPL.startswith("cuda") else "cpu")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs of the case (default: 20 on CUDA, where races hide, else 1)")
    ap.add_argument("--exact-buffers", action="store_true",
                    help="outputs in allocations of their exact size, no guard bands (for "
                         "compute-sanitizer with PYTORCH_NO_CUDA_MEMORY_CACHING=1)")
    ns = ap.parse_args()
    repeats = ns.repeats or (20 if ns.device.startswith("cuda") else 1)
    try:
        for library in LIBRARIES if ns.load is None else ns.load:
            torch.ops.load_library(library)
        fn = load(ns.impl)
    except Exception as exc:
        print(f"cannot load {ns.impl}: {exc}", file=sys.stderr)
        return 2
    try:
        records = calls()
    except (OSError, ValueError, KeyError) as exc:
        print(f"cannot read the case next to repro.py (case.json): {exc!r}", file=sys.stderr)
        return 2
    problems, culprit = [], []
    for k in range(repeats):
        for call in CULPRIT:
            where = f"run {k + 1}, culprit" + (f", rank {call['rank']}"
                                                if call["rank"] is not None else "")
            try:
                culprit += [f"{where}: {p}" for p in run(fn, call, ns.device, ns.exact_buffers)]
            except Exception as exc:
                culprit.append(f"{where}: raised {type(exc).__name__}: {exc}")
        for call in records:
            where = f"run {k + 1}" + (f", rank {call['rank']}" if call["rank"] is not None else "")
            try:
                problems += [f"{where}: {p}" for p in run(fn, call, ns.device, ns.exact_buffers)]
            except Exception as exc:
                problems.append(f"{where}: raised {type(exc).__name__}: {exc}")
        if problems:
            break
    if culprit:
        print("the culprit's own problems (not what this report is about):")
        for p in culprit[:10]:
            print("  " + p)
    if problems:
        print(f"BUG PRESENT in {ns.impl} ({DIALECT}"
              + (", after the culprit" if CULPRIT else "") + "):")
        for p in problems[:20]:
            print("  " + p)
        return 1
    print(f"ok: {ns.impl} passes every check of this case ({repeats} run(s)"
          + (", each after the culprit" if CULPRIT else "") + ")")
    if OK_NOTE and ns.impl == IMPL:
        print(OK_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def module_path(impl_name: str) -> list[str]:
    """The folder a ``py:`` implementation's module was imported from (its import root,
    above any packages), so that ``repro.py`` finds it from anywhere; else ``[]``."""
    kind, _, rest = impl_name.partition(":")
    module = sys.modules.get(rest.partition(":")[0]) if kind == "py" else None
    file = getattr(module, "__file__", None)
    if not file:
        return []
    root = os.path.dirname(os.path.abspath(file))
    for _ in range(module.__name__.count(".") + (os.path.basename(file) == "__init__.py")):
        root = os.path.dirname(root)
    return [root]


def repro_script(case: Case, impl_name: str, stable: bool, title: str, signature: str,
                 culprit: Case | None = None, libraries: tuple[str, ...] = ()) -> str:
    """The script's text, every call record inline; with ``culprit``, each run calls the
    culprit's case first; ``libraries``: the op libraries the implementation needs
    (loaded first)."""
    return _script(call_records(case), case, impl_name, stable, title, signature, culprit,
                   libraries)


def repro_files(case: Case, impl_name: str, stable: bool, title: str, signature: str,
                culprit: Case | None = None,
                libraries: tuple[str, ...] = ()) -> tuple[str, dict[str, Any]]:
    """A bug report's ``repro.py`` text and ``case.json`` content: the call records inline
    for a case of at most ``INLINE_ELEMENTS`` array elements, else in ``case.json``."""
    records = call_records(case)
    case_json = case.to_dict()
    if _elements(records) <= INLINE_ELEMENTS:
        return (_script(records, case, impl_name, stable, title, signature, culprit,
                        libraries), case_json)
    case_json[REPRO_CALLS] = [_deflated(r) for r in records]
    return (_script(None, case, impl_name, stable, title, signature, culprit, libraries),
            case_json)


def _elements(records: list[dict[str, Any]]) -> int:
    arrays = [a for r in records for part in ("inputs", "expected")
              for a in r[part].values() if isinstance(a, dict)]
    return sum(len(a["data"]) for a in arrays)


def _deflated(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its arrays as deflated little-endian bytes (the script's ``array``)."""
    def pack(a: dict[str, Any]) -> dict[str, Any]:
        little = np.dtype(a["dtype"]).newbyteorder("<")
        raw = np.asarray(a["data"], dtype=a["dtype"]).astype(little)
        return {"dtype": a["dtype"], "shape": a["shape"],
                "zlib": base64.b64encode(zlib.compress(raw.tobytes(), 6)).decode()}

    out = dict(record)
    for part in ("inputs", "expected"):
        out[part] = {k: pack(v) if isinstance(v, dict) else v for k, v in record[part].items()}
    return out


def _ok_note(signature: str) -> str:
    """What ``repro.py`` adds to its ``ok`` for a failure its own process may not see."""
    from .evaluate import faults_where_it_lands
    from .sanitizer import unseen_elsewhere_note

    if not faults_where_it_lands(signature):
        return ""
    return ("note: this case crashed with an illegal address where it was found. "
            + unseen_elsewhere_note())


def _script(records: list[dict[str, Any]] | None, case: Case, impl_name: str, stable: bool,
            title: str, signature: str, culprit: Case | None,
            libraries: tuple[str, ...]) -> str:
    calls = ("None" if records is None
             else f"json.loads({json.dumps(records, separators=(',', ':'))!r})")
    before = json.dumps(call_records(culprit) if culprit is not None else [],
                        separators=(",", ":"))
    note = ("" if culprit is None else "\n\nA pair: every run calls the culprit's case "
            f"({culprit.case_id}) first, then this\ncase ({case.case_id}), which fails only "
            "after it.")
    text = _TEMPLATE
    for key, value in {
        "__OK_NOTE_JSON__": json.dumps(_ok_note(signature)),
        "__TITLE__": title.replace('"""', "'''"),
        "__IMPL__": impl_name,
        "__DIALECT__": case.dialect,
        "__SIGNATURE__": signature,
        "__IMPL_JSON__": json.dumps(impl_name),
        "__LIBRARIES_JSON__": json.dumps(list(libraries)),
        "__DIALECT_JSON__": json.dumps(case.dialect),
        "__STABLE__": repr(bool(stable)),
        "__SENTINEL__": str(SENTINEL),
        "__GUARD__": str(GUARD),
        "__GUARD_LEN__": str(GUARD_LEN),
        "__REPRO_CALLS__": REPRO_CALLS,
        "__CALLS__": calls,
        "__CULPRIT_JSON__": repr(before),
        "__PAIR_NOTE__": note,
        "__MODULE_PATH__": repr(module_path(impl_name)),
    }.items():
        text = text.replace(key, value)
    return text
