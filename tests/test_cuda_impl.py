"""The CUDA backend: its build and cache (CPU, needs nvcc) and its kernels (GPU).

GPU tests compare against small literal alignments worked out by hand (SPEC
§3–§6); segments are compared as sets (``cuda.STABLE`` is False). Tests at
the path switch and past the grid caps check the kernels' own invariants and
compare the two paths with each other.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess

import numpy as np
import pytest
import torch

from cuda_impl import _build, _variants, cuda
from cuda_impl.faults import FAULTS
from difftest.execute import _PendingCudaErrors

SENTINEL = -559038737  # what every output holds before a call (0xDEADBEEF)

needs_nvcc = pytest.mark.skipif(_build.find_nvcc() is None, reason="needs nvcc")
_HAS_CUDA = torch.cuda.is_available() and _build.find_nvcc() is not None


def gpu_test(fn):
    """Marks a test ``gpu`` and skips it cleanly without a CUDA device (or nvcc)."""
    skip = pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA device and nvcc")
    return pytest.mark.gpu(skip(fn))


# ---- CPU: variants, build and cache ----------------------------------------------------


def test_every_cuda_fault_has_exactly_one_build_variant():
    assert set(_variants.FAULT_DEFINES) == set(cuda.FAULT_NAMES)
    assert set(cuda.FAULT_NAMES) == {n for n, f in FAULTS.items() if "cuda" in f.backends}
    flag_sets = _variants.compile_flag_sets()
    assert flag_sets[0] == ""
    assert len(flag_sets) == 1 + len(cuda.FAULT_NAMES)
    assert all(s.startswith("-DMOE_FAULT_") and s.endswith("=1") for s in flag_sets[1:])
    assert len(set(flag_sets)) == len(flag_sets)


def test_path_switch_sits_at_1023_routes_and_64_experts():
    assert cuda.uses_small_path(1023, 64)
    assert not cuda.uses_small_path(1024, 64)
    assert not cuda.uses_small_path(1023, 65)
    assert (cuda.SMALL_PATH_MAX_ROUTES, cuda.SMALL_PATH_MAX_EXPERTS) == (1023, 64)


def test_unknown_fault_is_rejected_before_any_build():
    with pytest.raises(ValueError, match="no-such-fault"):
        cuda.implementation("no-such-fault")
    with pytest.raises(ValueError, match="no-such-fault"):
        cuda.build("no-such-fault")


def test_cpu_tensors_are_rejected_with_a_value_error():
    ids = torch.zeros((2, 2), dtype=torch.int32)
    out = torch.zeros(8, dtype=torch.int32)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda.align(ids, 4, 2, out, out[:4], out[:1])


def test_sglang_align_rejects_cpu_tensors_and_flags_that_are_not_bools():
    ids = torch.zeros((2, 2), dtype=torch.int32)
    out = torch.zeros(8, dtype=torch.int32)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda.sglang_align(ids, 4, 2, out, out[:4], out[:1], out[:5], True, False)
    with pytest.raises(TypeError, match="ignore_invalid_expert=1"):
        cuda.sglang_align(ids, 4, 2, out, out[:4], out[:1], out[:5], True, 1)


@needs_nvcc
def test_build_caches_each_variant_and_reuses_it_without_nvcc(tmp_path, monkeypatch):
    variants = [None, "inactive-blocks-zero"]

    def build(fault):
        return _build.build_library(
            defines=_variants.defines_for(fault), arch="sm_90", cache_dir=tmp_path
        )

    with concurrent.futures.ThreadPoolExecutor(len(variants)) as pool:
        first = list(pool.map(build, variants))
    assert first[0] != first[1]
    assert all(path.is_file() and path.parent == tmp_path for path in first)
    for path, fault in zip(first, variants):
        cuda.load_library(path, fault)  # limits and fault switch as cuda.py expects

    def no_nvcc(*args, **kwargs):
        raise AssertionError(f"nvcc invoked on a cache hit: {args}")

    monkeypatch.setattr(subprocess, "run", no_nvcc)
    monkeypatch.setattr(subprocess, "Popen", no_nvcc)
    assert [build(fault) for fault in variants] == first
    assert not list(tmp_path.glob(".*.so")), "a temporary build file was left behind"


@needs_nvcc
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf")
def test_library_links_the_cuda_runtime_shared_so_pending_launch_errors_are_visible(tmp_path):
    # A statically linked runtime keeps its "last error" to itself, out of reach of
    # the harness's check of the runtimes mapped into the process (launch_error).
    path = _build.build_library(arch="sm_90", cache_dir=tmp_path)
    dynamic = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True,
                             check=True).stdout
    assert "Shared library: [libcudart.so" in dynamic


@needs_nvcc
def test_broken_source_raises_cuda_build_error_with_nvcc_output(tmp_path):
    source = tmp_path / "broken.cu"
    source.write_text("__global__ void kernel(int* out) { int x = ; out[0] = x; }\n")
    with pytest.raises(_build.CudaBuildError) as info:
        _build.build_library(source, arch="sm_90", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "expected an expression" in message
    assert "broken.cu" in message and "-arch=sm_90" in message
    assert not list((tmp_path / "cache").glob("*.so"))


# ---- GPU helpers -----------------------------------------------------------------------


def _cuda(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device="cuda")


def _filled(numel):
    return torch.full((numel,), SENTINEL, dtype=torch.int32, device="cuda")


def _canonical(sorted_row, expert_ids_row, block_size):
    """``sorted_row`` with every expert segment (a run of equal ``expert_ids``) sorted."""
    out = list(sorted_row)
    start = 0
    while start < len(expert_ids_row):
        end = start
        while end < len(expert_ids_row) and expert_ids_row[end] == expert_ids_row[start]:
            end += 1
        if expert_ids_row[start] >= 0:
            lo, hi = start * block_size, end * block_size
            out[lo:hi] = sorted(out[lo:hi])
        start = end
    return out


def _run_align(fn, ids, E, B, P, M, expert_map=None, dtype=torch.int32, K=2):
    topk = _cuda(ids, dtype) if len(ids) else torch.empty((0, K), dtype=dtype, device="cuda")
    sorted_ids, expert_ids, ntpp = _filled(P), _filled(M), _filled(1)
    fn(topk, E, B, sorted_ids, expert_ids, ntpp, expert_map)
    torch.cuda.synchronize()
    return sorted_ids.tolist(), expert_ids.tolist(), ntpp.item()


# Case "lora": T=4, K=2, E=3, B=2, L=2; token 0 is base (-1), so lora_ids = [-1, 0, 1]
# puts the real slot 1 at lora_ids[L]. Routes: slot 0 = {4: e1, 5: e0},
# slot 1 = {2: e2, 3: e2, 6: e0, 7: e2}; pad value N = 8; P = 12, M = 6.
LORA_IDS = [[0, 1], [2, 2], [1, 0], [0, 2]]
LORA_MAPPING = [-1, 1, 0, 1]
LORA_P, LORA_M = 12, 6
ROW0 = ([5, 8, 4, 8] + [8] * 8, [0, 1, -1, -1, -1, -1], 4)
ROW1 = ([6, 8, 2, 3, 7, 8] + [8] * 6, [0, 2, 2, -1, -1, -1], 6)
UNTOUCHED = ([SENTINEL] * LORA_P, [SENTINEL] * LORA_M, SENTINEL)


def _run_vllm(fn, E, lora_ids, enabled, mapping=LORA_MAPPING, L=2, P=LORA_P, M=LORA_M):
    sorted_ids, expert_ids, ntpp = _filled(L * P), _filled(L * M), _filled(L)
    fn(_cuda(LORA_IDS), _cuda(mapping), E, 2, L, P, M, sorted_ids, expert_ids, ntpp,
       _cuda(enabled), _cuda(lora_ids))  # fmt: skip
    torch.cuda.synchronize()
    return _rows(sorted_ids, expert_ids, ntpp, L, P, M)


def _rows(sorted_ids, expert_ids, ntpp, L, P, M):
    s, e, n = sorted_ids.tolist(), expert_ids.tolist(), ntpp.tolist()
    return [(s[l * P : (l + 1) * P], e[l * M : (l + 1) * M], n[l]) for l in range(L)]


def _assert_row(actual, expected, block_size=2):
    sorted_row, expert_ids_row, ntpp = actual
    assert ntpp == expected[2]
    assert expert_ids_row == expected[1]
    assert _canonical(sorted_row, expected[1], block_size) == expected[0]


def _check_invariants(experts, E, B, row, pad):
    """One row against SPEC §3, given each route's effective expert (-1: not in this row)."""
    sorted_row, expert_ids_row, ntpp = (np.asarray(row[0]), np.asarray(row[1]), row[2])
    counts = np.bincount(experts[experts >= 0], minlength=E)
    padded = (counts + B - 1) // B * B
    offsets = np.concatenate([[0], np.cumsum(padded)])
    total = int(offsets[-1])
    assert ntpp == total
    expected_blocks = np.repeat(np.arange(E), padded // B)
    assert (expert_ids_row[: len(expected_blocks)] == expected_blocks).all()
    assert (expert_ids_row[len(expected_blocks) :] == -1).all()
    order = np.argsort(experts, kind="stable")
    for e in np.nonzero(counts)[0]:
        segment = sorted_row[offsets[e] : offsets[e] + counts[e]]
        routes = order[np.searchsorted(experts[order], e) :][: counts[e]]
        assert np.array_equal(np.sort(segment), routes), f"expert {e}"
        assert (sorted_row[offsets[e] + counts[e] : offsets[e + 1]] == pad).all()
    assert (sorted_row[total:] == pad).all()


@pytest.fixture(scope="module")
def fns():
    return cuda.implementation()


# ---- GPU: literal alignments -----------------------------------------------------------

# T=3, K=2, E=4, B=2: routes 1, 2 -> e0; 4 -> e1; 0, 3, 5 -> e2; pad N = 6; P = 10, M = 5.
PLAIN_IDS = [[2, 0], [0, 2], [1, 2]]
PLAIN = ([1, 2, 4, 6, 0, 3, 5, 6, 6, 6], [0, 1, 2, 2, -1], 8)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_align_pads_each_expert_to_a_block_multiple(fns, dtype):
    _assert_row(_run_align(fns["align"], PLAIN_IDS, 4, 2, 10, 5, dtype=dtype), PLAIN)


@gpu_test
def test_align_expert_map_remaps_and_drops_minus_one(fns):
    expert_map = _cuda([1, -1, 0, -1])  # g2 -> 0, g0 -> 1, g1 and g3 dropped
    actual = _run_align(fns["align"], PLAIN_IDS, 4, 2, 10, 5, expert_map=expert_map)
    _assert_row(actual, ([0, 3, 5, 6, 1, 2, 6, 6, 6, 6], [0, 0, 1, -1, -1], 6))


@gpu_test
def test_align_drops_negative_and_too_large_expert_ids(fns):
    # routes 1 (-1) and 2 (4 = E) dropped: e0 = {0}, e1 = {3}; pad N = 4.
    actual = _run_align(fns["align"], [[0, -1], [4, 1]], 4, 1, 8, 8)
    _assert_row(actual, ([0, 3, 4, 4, 4, 4, 4, 4], [0, 1, -1, -1, -1, -1, -1, -1], 2), 1)


@gpu_test
@pytest.mark.parametrize("E", [4, 100], ids=["small-path", "large-path"])
def test_empty_batch_writes_an_empty_alignment(fns, E):
    actual = _run_align(fns["align"], [], E, 2, 8, 4)
    assert actual == ([0] * 8, [-1] * 4, 0)


@gpu_test
@pytest.mark.parametrize("E", [3, 70], ids=["small-path", "large-path"])
def test_last_real_slot_is_written_when_base_tokens_present(fns, E):
    rows = _run_vllm(fns["vllm-lora"], E, lora_ids=[-1, 0, 1], enabled=[1, 1, 1])
    _assert_row(rows[0], ROW0)
    _assert_row(rows[1], ROW1)


@gpu_test
@pytest.mark.parametrize("E", [3, 70], ids=["small-path", "large-path"])
def test_disabled_slot_rows_are_untouched(fns, E):
    rows = _run_vllm(fns["vllm-lora"], E, lora_ids=[-1, 0, 1], enabled=[1, 0, 1])
    _assert_row(rows[0], ROW0)
    assert rows[1] == UNTOUCHED


@gpu_test
@pytest.mark.parametrize("E", [3, 70], ids=["small-path", "large-path"])
def test_out_of_range_and_repeated_lora_ids_are_skipped(fns, E):
    rows = _run_vllm(fns["vllm-lora"], E, lora_ids=[0, 5, 0], enabled=[1, 1, 1])
    _assert_row(rows[0], ROW0)
    assert rows[1] == UNTOUCHED


@gpu_test
def test_vllm_empty_batch_writes_listed_slots_only(fns):
    sorted_ids, expert_ids, ntpp = _filled(2 * 8), _filled(2 * 4), _filled(2)
    empty = torch.empty((0, 2), dtype=torch.int32, device="cuda")
    fns["vllm-lora"](empty, _cuda([]), 4, 2, 2, 8, 4, sorted_ids, expert_ids, ntpp,
                     _cuda([1, 1, 1]), _cuda([0, -1, -1]))  # fmt: skip
    torch.cuda.synchronize()
    rows = _rows(sorted_ids, expert_ids, ntpp, 2, 8, 4)
    assert rows[0] == ([0] * 8, [-1] * 4, 0)
    assert rows[1] == ([SENTINEL] * 8, [SENTINEL] * 4, SENTINEL)


@gpu_test
@pytest.mark.parametrize(
    ("seg_indptr", "req_to_lora", "row1"),
    [
        ([0, 1, 2, 3, 4], [-1, 1, 0, 1], ROW1),
        # token 3 is outside every request: slot 1 keeps routes 2 and 3 (e2) only
        ([0, 1, 2, 3], [-1, 1, 0], ([2, 3] + [8] * 10, [2, -1, -1, -1, -1, -1], 2)),
    ],
    ids=["every-token-in-a-request", "token-outside-requests"],
)
def test_sglang_maps_tokens_to_slots_through_requests(fns, seg_indptr, req_to_lora, row1):
    L, P, M = 2, LORA_P, LORA_M
    sorted_ids, expert_ids, ntpp = _filled(L * P), _filled(L * M), _filled(L)
    cumsum, mask = torch.zeros(L * 4, dtype=torch.int32, device="cuda"), _filled(L * 4)
    fns["sglang-lora"](_cuda(LORA_IDS), _cuda(seg_indptr), _cuda(req_to_lora), 3, 2, L, P, M,
                       sorted_ids, expert_ids, ntpp, _cuda([1, 1]), _cuda([0, 1]), None,
                       cumsum, mask)  # fmt: skip
    torch.cuda.synchronize()
    rows = _rows(sorted_ids, expert_ids, ntpp, L, P, M)
    _assert_row(rows[0], ROW0)
    _assert_row(rows[1], row1)


EP_IDS = [[0, 3], [4, 9], [7, -1]]  # G = 10, R = 3: linear ranks own [0,4), [4,7), [7,10)


@gpu_test
@pytest.mark.parametrize(
    ("strategy", "rank", "expected"),
    [
        ("linear", 0, [0, 3, -1, -1, -1, -1]),
        ("linear", 1, [-1, -1, 0, -1, -1, -1]),
        ("linear", 2, [-1, -1, -1, 2, 0, -1]),
        ("round_robin", 0, [0, 1, -1, 3, -1, -1]),
        ("round_robin", 1, [-1, -1, 1, -1, 2, -1]),
        ("round_robin", 2, [-1] * 6),
    ],
)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_ep_remap_gives_each_rank_its_local_ids(fns, strategy, rank, expected, dtype):
    ids = _cuda(EP_IDS, dtype)
    local = torch.full_like(ids, 99)
    fns["ep-remap"](ids, 10, 3, rank, strategy, local)
    assert local.flatten().tolist() == expected


@gpu_test
def test_too_many_experts_raise_value_error(fns):
    ids = _cuda([[0, 1]])
    with pytest.raises(ValueError, match="MAX_EXPERTS"):
        fns["align"](ids, cuda.MAX_EXPERTS + 1, 4, _filled(64), _filled(16), _filled(1))


# ---- GPU: path switch and grid caps ----------------------------------------------------


@gpu_test
@pytest.mark.parametrize("num_routes", [1023, 1024])
def test_paths_agree_across_the_switch(fns, num_routes):
    generator = torch.Generator().manual_seed(num_routes)
    ids = torch.randint(0, 64, (num_routes, 1), generator=generator, dtype=torch.int32)
    B = 16
    P = (num_routes + 65 * (B - 1) + B - 1) // B * B
    M = P // B
    results = []
    for E in (64, 65):  # no route goes to expert 64: the same alignment, other path when N=1023
        results.append(_run_align(fns["align"], ids.tolist(), E, B, P, M))
        _check_invariants(ids.flatten().numpy(), E, B, results[-1], num_routes)
    (s64, e64, n64), (s65, e65, n65) = results
    assert (n64, e64) == (n65, e65)
    assert _canonical(s64, e64, B) == _canonical(s65, e65, B)


@gpu_test
@pytest.mark.parametrize("E", [1, 64, cuda.MAX_EXPERTS], ids=["hot-expert", "64", "max"])
def test_huge_batch_past_grid_caps_aligns_every_route(fns, E):
    num_routes, B = 70_000, 16
    ids = torch.randint(-1, E + 1, (num_routes // 2, 2), generator=torch.Generator().manual_seed(E))
    P = (num_routes + E * (B - 1) + B - 1) // B * B
    row = _run_align(fns["align"], ids.tolist(), E, B, P, P // B)
    experts = ids.flatten().numpy()
    experts = np.where((experts >= 0) & (experts < E), experts, -1)
    _check_invariants(experts, E, B, row, num_routes)


@gpu_test
@pytest.mark.parametrize("T", [300, 40_000], ids=["small-path", "huge-batch"])
def test_vllm_random_batch_aligns_every_slot(fns, T):
    K, E, B, L = 2, 8, 4, 3
    generator = torch.Generator().manual_seed(T)
    ids = torch.randint(0, E, (T, K), generator=generator, dtype=torch.int32)
    mapping = torch.randint(-1, L, (T,), generator=generator, dtype=torch.int32)
    lora_ids = [-1, 0, 1, 2]
    P = (T * K + E * (B - 1) + B - 1) // B * B
    M = P // B
    sorted_ids, expert_ids, ntpp = _filled(L * P), _filled(L * M), _filled(L)
    fns["vllm-lora"](ids.cuda(), mapping.cuda(), E, B, L, P, M, sorted_ids, expert_ids, ntpp,
                     _cuda([1] * (L + 1)), _cuda(lora_ids))  # fmt: skip
    torch.cuda.synchronize()
    route_slot = mapping.repeat_interleave(K).numpy()
    for slot, row in enumerate(_rows(sorted_ids, expert_ids, ntpp, L, P, M)):
        experts = np.where(route_slot == slot, ids.flatten().numpy(), -1)
        _check_invariants(experts, E, B, row, T * K)


# ---- GPU: each fault shows its bug -----------------------------------------------------


@gpu_test
@pytest.mark.parametrize("fault", sorted(_variants.FAULT_DEFINES))
def test_fault_build_serves_exactly_the_dialects_it_affects(fault):
    assert set(cuda.implementation(fault)) == set(FAULTS[fault].dialects)


@gpu_test
def test_fault_grid_skips_last_slot_leaves_the_last_real_slot_unwritten():
    fn = cuda.implementation("grid-skips-last-slot")["vllm-lora"]
    rows = _run_vllm(fn, 3, lora_ids=[-1, 0, 1], enabled=[1, 1, 1])
    _assert_row(rows[0], ROW0)
    assert rows[1] == UNTOUCHED


@gpu_test
def test_fault_sort_ignores_disabled_writes_a_disabled_row():
    fn = cuda.implementation("sort-ignores-disabled")["vllm-lora"]
    rows = _run_vllm(fn, 3, lora_ids=[-1, 0, 1], enabled=[1, 0, 1])
    assert {2, 3, 6, 7} <= set(rows[1][0])
    assert rows[1][1:] == UNTOUCHED[1:]


@gpu_test
def test_fault_no_slot_upper_guard_writes_past_the_outputs():
    fn = cuda.implementation("no-slot-upper-guard")["vllm-lora"]
    L, P, M, guard = 2, LORA_P, LORA_M, 64
    storage = [_filled(L * n + P + guard) for n in (P, M, 1)]
    sorted_ids, expert_ids, ntpp = (s[: L * n] for s, n in zip(storage, (P, M, 1)))
    fn(_cuda(LORA_IDS), _cuda(LORA_MAPPING), 3, 2, L, P, M, sorted_ids, expert_ids, ntpp,
       _cuda([1, 1, 1]), _cuda([0, 2, -1]))  # fmt: skip
    torch.cuda.synchronize()
    assert storage[2][L].item() == 0  # num_tokens_post_pad[2]: slot 2 has no routes
    assert storage[0][L * P : L * P + P].tolist() == [8] * P


@gpu_test
def test_fault_negative_expert_kept_counts_minus_one_as_the_last_expert():
    fn = cuda.implementation("negative-expert-kept")["align"]
    ids = [[0, -1], [1, 1]]  # correct: e0 = {0}, e1 = {2, 3}, total 3
    assert _run_align(cuda.implementation()["align"], ids, 2, 1, 4, 4)[2] == 3
    sorted_row, _, total = _run_align(fn, ids, 2, 1, 4, 4)
    assert total == 4 and sorted(sorted_row[1:4]) == [1, 2, 3]


@gpu_test
def test_fault_inactive_blocks_zero_marks_unused_blocks_as_expert_zero():
    fn = cuda.implementation("inactive-blocks-zero")["align"]
    assert _run_align(fn, PLAIN_IDS, 4, 2, 10, 5)[1] == [0, 1, 2, 2, 0]


@gpu_test
def test_fault_uneven_ep_truncates_loses_the_remainder_experts():
    fn = cuda.implementation("uneven-ep-truncates")["ep-remap"]
    ids = _cuda(EP_IDS)
    local = torch.full_like(ids, 99)
    fn(ids, 10, 3, 2, "linear", local)
    assert local.flatten().tolist() == [-1, -1, -1, -1, 1, -1]  # correct: [.., 2, 0, -1]


@gpu_test
def test_fault_odd_block_resets_count_is_wrong_on_some_runs_only():
    fn = cuda.implementation("odd-block-resets-count")["vllm-lora"]
    totals = []
    for _ in range(300):
        rows = _run_vllm(fn, 3, lora_ids=[-1, 0, 1], enabled=[1, 1, 1])
        _assert_row(rows[0][:2] + (ROW0[2],), ROW0)
        _assert_row(rows[1][:2] + (ROW1[2],), ROW1)
        totals.append(tuple(row[2] for row in rows))
    right = totals.count((4, 6))
    assert 0 < right < len(totals), f"{right} of {len(totals)} runs right"


# ---- GPU: sglang-align (SGLang's plain align: E + 1 buckets, bucket 0 the -1 routes) ----

# T=2, K=2, E=2 (3 buckets), B=3: routes 0, 3 -> -1; 2 -> e0; 1 -> e1; N = 4; P = 10, M = 4.
SGL_IDS = [[-1, 1], [0, -1]]


def _run_sglang_align(fn, ids, buckets, B, P, M, pad=True, ignore=False, dtype=torch.int32,
                      spare=0):
    """Runs one call; returns (sorted_token_ids and ``spare`` elements past it, expert_ids,
    total)."""
    storage = _filled(P + spare)
    expert_ids, ntpp = _filled(M), _filled(1)
    cumsum = torch.zeros(buckets + 1, dtype=torch.int32, device="cuda")
    fn(_cuda(ids, dtype), buckets, B, storage[:P], expert_ids, ntpp, cumsum, pad, ignore)
    torch.cuda.synchronize()
    return storage.tolist(), expert_ids.tolist(), ntpp.item()


def _segments(row, bounds):
    return [sorted(row[lo:hi]) for lo, hi in bounds]


@gpu_test
@pytest.mark.parametrize("E", [2, 100], ids=["small-path", "large-path"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_sglang_align_puts_minus_one_routes_first_and_leaves_the_expert_ids_tail(fns, E, dtype):
    row, blocks, total = _run_sglang_align(fns["sglang-align"], SGL_IDS, E + 1, 3, 10, 4,
                                           dtype=dtype)
    assert total == 9
    assert blocks == [-1, 0, 1, SENTINEL]  # block 3 is past the total: SGLang leaves it
    assert _segments(row, [(0, 3), (3, 6), (6, 9)]) == [[0, 3, 4], [2, 4, 4], [1, 4, 4]]
    assert row[9] == 4


@gpu_test
@pytest.mark.parametrize("E", [2, 100], ids=["small-path", "large-path"])
def test_sglang_align_without_pad_flag_writes_only_the_routes(fns, E):
    row, blocks, total = _run_sglang_align(fns["sglang-align"], SGL_IDS, E + 1, 3, 10, 4,
                                           pad=False)
    assert (total, blocks[:3]) == (9, [-1, 0, 1])
    s = SENTINEL
    assert sorted(row[0:2]) == [0, 3] and row[2:] == [s, 2, s, s, 1, s, s, s]


@gpu_test
@pytest.mark.parametrize("E", [2, 100], ids=["small-path", "large-path"])
def test_sglang_align_ignore_invalid_expert_drops_minus_one_routes(fns, E):
    row, blocks, total = _run_sglang_align(fns["sglang-align"], SGL_IDS, E + 1, 3, 10, 4,
                                           ignore=True)
    assert (total, blocks[:2], blocks[2:]) == (6, [0, 1], [SENTINEL, SENTINEL])
    assert row == [2, 4, 4, 1, 4, 4, 4, 4, 4, 4]


@gpu_test
def test_fault_vector_tail_overrun_writes_up_to_three_ints_past_sorted_token_ids():
    fn = cuda.implementation("vector-tail-overrun")["sglang-align"]
    # T=1 K=1 E=1 (2 buckets) B=1: P = N * B = 1, so the last vector covers 3 ints past it
    row, _, total = _run_sglang_align(fn, [[0]], 2, 1, 1, 1, spare=4)
    assert total == 1 and row == [0, 1, 1, 1, SENTINEL]
    # E = 256 at SGLang's own sizing: P = 320 + 257 * 63 = 16511, one int past it
    ids = (np.arange(40 * 8).reshape(40, 8) % 256).tolist()
    P = 320 + 257 * 63
    row, _, _ = _run_sglang_align(fn, ids, 257, 64, P, -(-P // 64), spare=2)
    assert row[P:] == [320, SENTINEL]
    row, _, _ = _run_sglang_align(cuda.implementation()["sglang-align"], ids, 257, 64, P,
                                  -(-P // 64), spare=2)
    assert row[P:] == [SENTINEL, SENTINEL]


@gpu_test
def test_fault_zero_grid_launch_leaves_a_launch_error_pending_for_the_next_call():
    correct = cuda.implementation()["align"]
    faulty = cuda.implementation("zero-grid-launch")["align"]
    topk = torch.empty((0, 2), dtype=torch.int32, device="cuda")
    pending = _PendingCudaErrors()  # the campaign's reader; binds the runtimes mapped now
    pending.take()
    correct(topk, 100, 2, _filled(8), _filled(4), _filled(1))
    assert pending.take() is None
    faulty(topk, 100, 2, _filled(8), _filled(4), _filled(1))  # returns normally ...
    # ... but left it pending (CUDA 13 reports a zero-block grid as an invalid value)
    assert pending.take() == "invalid argument"
    faulty(topk, 4, 2, _filled(8), _filled(4), _filled(1))  # the small path launches fine
    assert pending.take() is None
    torch.ones(4, device="cuda").add_(1)  # not sticky: the device stays usable
