"""On the GPU: a wild write is its writer's failure, a pending launch error its caller's.

The faulty launches come from ``tests/cuda/faulty_kernels.cu``, built here with nvcc
against the shared CUDA runtime (the one torch and its extensions use).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

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
    # where the toolkit's libcudart may be, should it not be the one torch loaded already
    homes = {Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda").resolve()}
    homes |= {Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)}
    libs = [home / d for home in sorted(homes) for d in ("lib64", "lib") if (home / d).is_dir()]
    rpath = ["-Xlinker", ",".join(f"-rpath,{lib}" for lib in libs)] if libs else []
    built = subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-cudart", "shared",
                            f"-arch={_build.default_arch()}", "-std=c++17", "-O2", *rpath,
                            str(SOURCE), "-o", str(target)], capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    torch.cuda.init()
    lib = ctypes.CDLL(str(target))
    lib.store_at.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int32,
                             ctypes.c_void_p]
    lib.launch_empty_grid.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    # the runtimes mapped so far are read once per process: read them again with this one
    execute._pending_cuda_errors.cache_clear()
    return lib


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def test_a_write_far_into_other_cases_blames_its_writer_and_no_other_case(faulty):
    import _wild

    from difftest.evaluate import evaluate
    from difftest.execute import run_batch
    from difftest.sandbox import Outcome

    ahead, behind = _wild.offsets()
    assert min(ahead, -behind) > 64 * 4  # far past the guard bands

    def store(tensor, offset):
        faulty.store_at(tensor.data_ptr(), offset // 4, 2, _stream())

    cases = _wild.CASES
    runs = run_batch(cases, {"align": _wild.writer(store)}, "cuda", repeats=1)
    verdicts = [evaluate(c, Outcome(r), stable=False) for c, r in zip(cases, runs)]
    assert [v.verdict for v in verdicts] == ["pass", "pass", "mismatch", "pass", "pass"]
    assert verdicts[2].checks_failed == ["wild_write"]
    writes = runs[2][0][0].wild_writes
    assert [(w.case_id, w.buffer, w.role, w.position, w.value) for w in writes] == _wild.WRITES
    assert f"into case {cases[1].case_id}'s output expert_ids[1]: value 2" in verdicts[2].detail


def test_a_campaign_reports_the_writer_confirmed_alone_and_no_victim(faulty, tmp_path):
    import _wild

    from difftest.campaign import Campaign
    from difftest.registry import Implementation
    from difftest.sandbox import InProcessRunner

    def store(tensor, offset):
        faulty.store_at(tensor.data_ptr(), offset // 4, 2, _stream())

    impl = Implementation("py:test:writes_far", "py", ("align",), ("cuda",), False, "test",
                          target="test:writes_far")
    runner = InProcessRunner(impl, "cuda", repeats=1,
                             callables={"align": _wild.writer(store)})
    campaign = Campaign(impl, runner, tmp_path, seed=0)
    campaign.dispatch(list(_wild.CASES))
    campaign.drain()
    campaign.log.close()
    assert campaign.result.verdicts == {"pass": 4, "mismatch": 1}
    [(sig, failure)] = campaign.result.failures.items()
    assert sig == "align--mismatch--wild_write" and failure.case == _wild.CASES[2]
    # alone, its stores land in the zones around its block: the same failure
    assert failure.confirmation.reproduced and failure.confirmation.attempts == 1


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

    from _wild import align

    cases = [align(0), align(1, num_experts=5), align(2), align(0)]
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
