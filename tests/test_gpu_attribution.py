"""On the GPU: a wild write is its writer's failure, a pending launch error its caller's.

The faulty launches come from ``tests/cuda/faulty_kernels.cu``, built here with nvcc
against the shared CUDA runtime (the one torch and its extensions use).
"""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SOURCE = Path(__file__).resolve().parent / "cuda" / "faulty_kernels.cu"


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    from cuda_impl import _build
    from difftest import execute

    nvcc = _build.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    target = tmp_path_factory.mktemp("faulty") / "faulty_kernels.so"
    toolkit = Path(nvcc).resolve().parent.parent
    rpath = ",".join(f"-rpath,{toolkit / d}" for d in ("lib64", "lib"))
    subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-cudart", "shared",
                    f"-arch={_build.default_arch()}", "-std=c++17", "-O2", "-Xlinker", rpath,
                    str(SOURCE), "-o", str(target)], check=True, capture_output=True,
                   timeout=600)
    torch.cuda.init()
    lib = ctypes.CDLL(str(target))
    lib.store_at.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int32,
                             ctypes.c_void_p]
    lib.launch_empty_grid.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    # the runtimes mapped so far are read once per process: read them again with this one
    execute._pending_cuda_errors.cache_clear()
    return lib


def _align(first_expert: int, num_experts: int = 3):
    from difftest.case import Case

    return Case("align", "production", np.array([[first_expert, 1]], dtype=np.int32),
                num_experts, 2)


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def test_a_write_far_into_other_cases_blames_its_writer_and_no_other_case(faulty):
    from cuda_impl import torch_impl
    from difftest.dialects import DIALECT_INFO
    from difftest.evaluate import evaluate
    from difftest.execute import Staged, run_batch
    from difftest.sandbox import Outcome

    # the writer (E = 7) runs third: it stores into the inputs of the fourth case,
    # before that one runs, and into the outputs of the second, already read back
    cases = [_align(0), _align(1), _align(2, num_experts=7), _align(0), _align(1)]
    staged = [Staged(DIALECT_INFO["align"].plan(c, None)) for c in cases]
    bases = np.cumsum([0] + [s.nbytes for s in staged])

    def data(k: int, name: str) -> int:
        return int(bases[k] + next(b.data for b in staged[k].buffers if b.name == name))

    ahead = (data(3, "topk_ids") - data(2, "sorted_token_ids")) // 4
    behind = (data(1, "expert_ids") - data(2, "sorted_token_ids")) // 4 + 1
    assert min(ahead, -behind) > 64  # far past the guard bands
    ok = torch_impl.implementation()["align"]

    def writes_far(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                   num_tokens_post_pad, expert_map=None):
        ok(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
           num_tokens_post_pad, expert_map)
        if num_experts == 7:
            for offset in (ahead, behind):
                faulty.store_at(sorted_token_ids.data_ptr(), offset, 2, _stream())

    runs = run_batch(cases, {"align": writes_far}, "cuda", repeats=1)
    verdicts = [evaluate(c, Outcome(r), stable=False) for c, r in zip(cases, runs)]
    assert [v.verdict for v in verdicts] == ["pass", "pass", "mismatch", "pass", "pass"]
    assert verdicts[2].checks_failed == ["wild_write"]
    writes = runs[2][0][0].wild_writes
    assert [(w.case_id, w.buffer, w.role, w.position, w.value) for w in writes] == [
        (cases[1].case_id, "expert_ids", "output", 1, 2),
        (cases[3].case_id, "topk_ids", "input", 0, 2)]
    assert f"into case {cases[1].case_id}'s output expert_ids[1]: value 2" in verdicts[2].detail


def test_a_launch_error_left_pending_is_pinned_on_its_call_and_the_next_case_passes(faulty):
    from cuda_impl import torch_impl
    from difftest.evaluate import evaluate
    from difftest.execute import run_batch
    from difftest.sandbox import Outcome

    ok = torch_impl.implementation()["align"]

    def launches_empty_grid(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                            num_tokens_post_pad, expert_map=None):
        ok(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
           num_tokens_post_pad, expert_map)
        if num_experts == 5:
            faulty.launch_empty_grid(expert_ids.data_ptr(), _stream())  # unchecked

    cases = [_align(0), _align(1, num_experts=5), _align(2), _align(0)]
    runs = run_batch(cases, {"align": launches_empty_grid}, "cuda", repeats=2)
    assert len(runs) == 4  # nothing was fatal
    verdicts = [evaluate(c, Outcome(r), stable=False) for c, r in zip(cases, runs)]
    assert [v.verdict for v in verdicts] == ["pass", "error", "pass", "pass"]
    assert verdicts[1].checks_failed == ["launch_error"]
    pinned = [run[0] for run in runs[1]]
    assert [(r.error, r.launch_error, r.fatal) for r in pinned] == [
        ("launch error left pending by the call: invalid configuration argument", True,
         False)] * 2
    assert verdicts[1].detail == (
        "call: launch error left pending by the call: invalid configuration argument")
    torch.cuda.synchronize()  # nothing is left pending for whatever runs next
    assert torch.zeros(4, device="cuda").add_(1).sum().item() == 4
