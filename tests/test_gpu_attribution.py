"""On the GPU: a wild write is its writer's failure, a pending launch error its caller's.

The faulty launches come from ``tests/cuda/faulty_kernels.cu``, built here as the
project's library is (``cuda_impl._build``: the CUDA runtime shared, the one torch and its
extensions use), and from the ``zero-grid-launch`` fault of our CUDA kernels.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SOURCE = Path(__file__).resolve().parent / "cuda" / "faulty_kernels.cu"


@pytest.fixture(scope="module")
def faulty():
    from cuda_impl import _build
    from difftest import execute

    if _build.find_nvcc() is None:
        pytest.skip("nvcc not found")
    torch.cuda.init()
    # built as the project's library is: the CUDA runtime shared, found through torch's
    # copy (same soname) or the toolkit's (rpath)
    lib = ctypes.CDLL(str(_build.build_library(SOURCE)))
    lib.store_at.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int32,
                             ctypes.c_void_p]
    lib.launch_empty_grid.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    # the runtimes mapped so far are read once per process: read them again with this one
    execute._pending_cuda_errors.cache_clear()
    return lib


# how CUDA words a zero-block grid: "invalid argument" (CUDA 13, as on the H200), "invalid
# configuration argument" (earlier)
ZERO_GRID = ("invalid argument", "invalid configuration argument")


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


@pytest.mark.parametrize("queued", [False, True])  # queued: it changed an input, run again
def test_a_write_far_into_other_cases_blames_its_writer_and_no_other_case(faulty, queued):
    import _wild

    from difftest.evaluate import evaluate
    from difftest.execute import run_batch
    from difftest.sandbox import Outcome

    ahead, behind = _wild.offsets()
    assert min(ahead, -behind) > 64 * 4  # far past the guard bands

    def store(tensor, offset):
        faulty.store_at(tensor.data_ptr(), offset // 4, 2, _stream())

    cases = _wild.CASES
    runs = run_batch(cases, {"align": _wild.writer(store)}, "cuda", repeats=1, queued=queued)
    assert not any(run.queued for case in runs for repeat in case for run in repeat)
    verdicts = [evaluate(c, Outcome(r), stable=False) for c, r in zip(cases, runs)]
    assert [v.verdict for v in verdicts] == ["pass", "pass", "mismatch", "pass", "pass"]
    assert verdicts[2].checks_failed == ["wild_write"]
    writes = runs[2][0][0].wild_writes
    assert [(w.case_id, w.buffer, w.role, w.position, w.value) for w in writes] == _wild.WRITES
    assert f"into case {cases[1].case_id}'s output expert_ids[1]: value 2" in verdicts[2].detail


@pytest.mark.parametrize("far", ["ahead and behind", "behind"])
@pytest.mark.parametrize("queued", [False, True])
def test_a_campaign_reports_the_writer_confirmed_alone_and_no_victim(faulty, tmp_path, queued,
                                                                     far):
    # behind alone: only into the second case's outputs, which a queued batch does not see
    # (the second case fails there, and the batch runs again case by case)
    import _wild

    from difftest.campaign import Campaign
    from difftest.registry import Implementation
    from difftest.sandbox import InProcessRunner

    def store(tensor, offset):
        faulty.store_at(tensor.data_ptr(), offset // 4, 2, _stream())

    impl = Implementation("py:test:writes_far", "py", ("align",), ("cuda",), False, "test",
                          target="test:writes_far")
    runner = InProcessRunner(impl, "cuda", repeats=1, queued_batches=queued,
                             callables={"align": _wild.writer(store, far == "behind")})
    campaign = Campaign(impl, runner, tmp_path, seed=0)
    campaign.dispatch(list(_wild.CASES))
    campaign.drain()
    campaign.log.close()
    assert campaign.result.verdicts == {"pass": 4, "mismatch": 1}
    assert [row["verdict"] for row in campaign.case_rows] == [
        "pass", "pass", "mismatch", "pass", "pass"]
    [(sig, failure)] = campaign.result.failures.items()
    assert sig == "align--mismatch--wild_write" and failure.case == _wild.CASES[2]
    # alone, its stores land in the zones around its block: the same failure
    assert failure.confirmation.reproduced and failure.confirmation.attempts == 1


@pytest.mark.parametrize("queued", [False, True])  # queued: a launch error, run again
def test_a_launch_error_left_pending_is_pinned_on_its_call_and_the_next_case_passes(faulty,
                                                                                   queued):
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
    runs = run_batch(cases, {"align": launches_empty_grid}, "cuda", repeats=2, queued=queued)
    assert len(runs) == 4  # nothing was fatal
    assert not any(run.queued for case in runs for repeat in case for run in repeat)
    verdicts = [evaluate(c, Outcome(r), stable=False) for c, r in zip(cases, runs)]
    assert [v.verdict for v in verdicts] == ["pass", "error", "pass", "pass"]
    assert verdicts[1].checks_failed == ["launch_error"]
    pinned = [run[0] for run in runs[1]]
    assert [(r.launch_error, r.fatal) for r in pinned] == [(True, False)] * 2
    texts = {r.error.removeprefix("launch error left pending by the call: ") for r in pinned}
    assert len(texts) == 1 and texts <= set(ZERO_GRID), texts
    assert verdicts[1].detail == f"call: launch error left pending by the call: {texts.pop()}"
    torch.cuda.synchronize()  # nothing is left pending for whatever runs next
    assert torch.zeros(4, device="cuda").add_(1).sum().item() == 4


@pytest.mark.parametrize("queued", [False, True])
def test_the_zero_grid_launch_fault_is_a_launch_error_of_its_case_in_a_batch(queued):
    # cuda:zero-grid-launch launches its large path with zero blocks when T = 0, E > 64
    from _wild import align

    from cuda_impl import cuda
    from difftest.case import Case
    from difftest.evaluate import evaluate
    from difftest.execute import run_batch
    from difftest.sandbox import Outcome

    empty = Case("align", "defensive", np.zeros((0, 2), dtype=np.int32), 100, 2)
    cases = [align(0), empty, align(1), empty.replace(num_experts=4)]
    fns = cuda.implementation("zero-grid-launch")
    runs = run_batch(cases, fns, "cuda", repeats=2, queued=queued)
    verdicts = [evaluate(c, Outcome(r), stable=cuda.STABLE) for c, r in zip(cases, runs)]
    assert [v.verdict for v in verdicts] == ["pass", "error", "pass", "pass"]
    assert verdicts[1].checks_failed == ["launch_error"]
    assert verdicts[1].detail in {f"call: launch error left pending by the call: {text}"
                                  for text in ZERO_GRID}
