"""The torch backend of cuda_impl against hand-computed expected outputs (SPEC §3–§6, §10).

Every expected array below was worked out by hand from SPEC; none is
recomputed by the code under test. Outputs live inside one allocation with
guard bands either side, as the harness lays them out, so an out-of-row
write is visible.
"""

from __future__ import annotations

import pytest
import torch

import cuda_impl
from cuda_impl import torch_impl

SENTINEL = -559038737  # 0xDEADBEEF as int32
GUARD = -1163005939  # 0xBAADF00D as int32
BAND = 64

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


class Guarded:
    """An int32 output of ``numel`` elements filled with SENTINEL, inside guard bands."""

    def __init__(self, numel: int, device: str):
        self.buffer = torch.full((numel + 2 * BAND,), GUARD, dtype=torch.int32, device=device)
        self.out = self.buffer[BAND : BAND + numel]
        self.out.fill_(SENTINEL)

    def list(self) -> list[int]:
        return self.out.tolist()

    def after(self) -> list[int]:
        return self.buffer[BAND + self.out.numel() :].tolist()

    def before(self) -> list[int]:
        return self.buffer[:BAND].tolist()


def ids(values, device="cpu", dtype=torch.int32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def run_align(topk, E, B, P, M, expert_map=None, fault=None, device="cpu", dtype=torch.int32):
    fn = torch_impl.implementation(fault)["align"]
    out = Guarded(P, device), Guarded(M, device), Guarded(1, device)
    em = None if expert_map is None else ids(expert_map, device)
    fn(ids(topk, device, dtype), E, B, out[0].out, out[1].out, out[2].out, em)
    for o in out:
        assert o.before() == [GUARD] * BAND and o.after() == [GUARD] * BAND
    return tuple(o.list() for o in out)


# topk flat = [0, 2, 1, -1, 2, 4, 0, 2], N = 8, E = 4: route 3 (-1) and 5 (4 >= E) drop.
# expert 0: routes 0, 6 -> 2 | expert 1: route 2 -> pad 2 | expert 2: 1, 4, 7 -> pad 4.
ALIGN_TOPK = [[0, 2], [1, -1], [2, 4], [0, 2]]
ALIGN_SORTED = [0, 6, 2, 8, 1, 4, 7, 8, 8, 8, 8, 8]
ALIGN_EXPERTS = [0, 1, 2, 2, -1, -1]


# ---------------------------------------------------------------- align


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_align_drops_negative_and_out_of_range_ids(device, dtype):
    got = run_align(ALIGN_TOPK, 4, 2, 12, 6, device=device, dtype=dtype)
    assert got == (ALIGN_SORTED, ALIGN_EXPERTS, [8])


def test_align_with_expert_map_remaps_and_drops_foreign_experts():
    # map: 0 -> drop, 1 -> 0, 2 -> 1, 3 -> drop. local 0: route 2; local 1: 1, 4, 7.
    got = run_align(ALIGN_TOPK, 4, 2, 12, 6, expert_map=[-1, 0, 1, -1])
    assert got == ([2, 8, 1, 4, 7, 8] + [8] * 6, [0, 1, 1, -1, -1, -1], [6])


def test_loose_padding_fills_trailing_pad_value_and_inactive_blocks():
    got = run_align(ALIGN_TOPK, 4, 2, 20, 10)
    assert got == (ALIGN_SORTED + [8] * 8, ALIGN_EXPERTS + [-1] * 4, [8])


def test_empty_batch_writes_pad_zero_and_inactive_blocks():
    topk = torch.zeros((0, 2), dtype=torch.int32)
    fn = torch_impl.implementation()["align"]
    s, e, n = Guarded(4, "cpu"), Guarded(2, "cpu"), Guarded(1, "cpu")
    fn(topk, 4, 2, s.out, e.out, n.out)
    assert (s.list(), e.list(), n.list()) == ([0, 0, 0, 0], [-1, -1], [0])


def test_too_small_padded_length_raises_before_writing():
    fn = torch_impl.implementation()["align"]
    s, e, n = Guarded(6, "cpu"), Guarded(3, "cpu"), Guarded(1, "cpu")
    with pytest.raises(ValueError, match="max_num_tokens_padded=6"):
        fn(ids(ALIGN_TOPK), 4, 2, s.out, e.out, n.out)
    assert s.list() == [SENTINEL] * 6 and n.list() == [SENTINEL]


def test_negative_expert_kept_counts_the_route_for_the_last_expert():
    # Route 3 (-1) wraps to expert 3 = E - 1; route 5 (4 >= E) is still dropped.
    got = run_align(ALIGN_TOPK, 4, 2, 12, 6, fault="negative-expert-kept")
    assert got == ([0, 6, 2, 8, 1, 4, 7, 8, 3, 8, 8, 8], [0, 1, 2, 2, 3, -1], [10])


def test_inactive_blocks_zero_writes_zero_past_the_total():
    got = run_align(ALIGN_TOPK, 4, 2, 12, 6, fault="inactive-blocks-zero")
    assert got == (ALIGN_SORTED, [0, 1, 2, 2, 0, 0], [8])


# ---------------------------------------------------------------- vllm-lora


def run_vllm(topk, tlm, E, B, L, P, M, lora_ids, enabled, fault=None, device="cpu"):
    fn = torch_impl.implementation(fault)["vllm-lora"]
    s, e, n = Guarded(L * P, device), Guarded(L * M, device), Guarded(L, device)
    fn(
        ids(topk, device),
        ids(tlm, device),
        E,
        B,
        L,
        P,
        M,
        s.out,
        e.out,
        n.out,
        ids(enabled, device),
        ids(lora_ids, device),
    )
    return s, e, n


# L = 1, a base token and an adapter token: lora_ids = [-1, 0] puts slot 0 at
# lora_ids[L]. Slot 0 routes: 2 (expert 2), 3 (expert 1); N = 4, P = 8, M = 4.
BASE_AND_ONE = dict(topk=[[1, 3], [2, 1]], tlm=[-1, 0], E=4, B=2, L=1, P=8, M=4)


@pytest.mark.parametrize("device", DEVICES)
def test_last_real_slot_is_written_when_base_tokens_present(device):
    s, e, n = run_vllm(**BASE_AND_ONE, lora_ids=[-1, 0], enabled=[1, 1], device=device)
    assert s.list() == [3, 4, 2, 4, 4, 4, 4, 4]
    assert e.list() == [1, 2, -1, -1]
    assert n.list() == [4]


def test_grid_skips_last_slot_leaves_the_last_slot_row_unwritten():
    s, e, n = run_vllm(
        **BASE_AND_ONE, lora_ids=[-1, 0], enabled=[1, 1], fault="grid-skips-last-slot"
    )
    assert s.list() == [SENTINEL] * 8
    assert e.list() == [SENTINEL] * 4
    assert n.list() == [SENTINEL]


# L = 2, tokens -> slots [0, 1, -1]; N = 6, P = 10, M = 5.
# Slot 0: routes 0 (expert 0), 1 (expert 1). Slot 1: routes 2, 3 (both expert 1).
TWO_SLOTS = dict(topk=[[0, 1], [1, 1], [3, 2]], tlm=[0, 1, -1], E=4, B=2, L=2, P=10, M=5)
SLOT0_SORTED = [0, 6, 1, 6, 6, 6, 6, 6, 6, 6]
SLOT0_EXPERTS = [0, 1, -1, -1, -1]


def test_disabled_adapter_rows_keep_the_sentinel():
    s, e, n = run_vllm(**TWO_SLOTS, lora_ids=[-1, 0, 1], enabled=[1, 0, 1])
    assert s.list() == SLOT0_SORTED + [SENTINEL] * 10
    assert e.list() == SLOT0_EXPERTS + [SENTINEL] * 5
    assert n.list() == [4, SENTINEL]


def test_both_enabled_slots_are_written():
    s, e, n = run_vllm(**TWO_SLOTS, lora_ids=[-1, 0, 1], enabled=[1, 1, 1])
    assert s.list() == SLOT0_SORTED + [2, 3, 6, 6, 6, 6, 6, 6, 6, 6]
    assert e.list() == SLOT0_EXPERTS + [1, -1, -1, -1, -1]
    assert n.list() == [4, 2]


def test_sort_ignores_disabled_writes_the_sorted_row_only():
    s, e, n = run_vllm(
        **TWO_SLOTS, lora_ids=[-1, 0, 1], enabled=[1, 0, 1], fault="sort-ignores-disabled"
    )
    assert s.list() == SLOT0_SORTED + [2, 3, 6, 6, 6, 6, 6, 6, 6, 6]
    assert e.list() == SLOT0_EXPERTS + [SENTINEL] * 5
    assert n.list() == [4, SENTINEL]


def test_lora_id_at_or_past_max_loras_is_skipped():
    # Slot 1 is not listed; lora_ids[1] = 2 >= L must not be used as a row.
    s, e, n = run_vllm(**TWO_SLOTS, lora_ids=[0, 2, -1], enabled=[1, 1, 1])
    assert s.list() == SLOT0_SORTED + [SENTINEL] * 10
    assert e.list() == SLOT0_EXPERTS + [SENTINEL] * 5
    assert n.list() == [4, SENTINEL]
    assert s.after() == e.after() == n.after() == [GUARD] * BAND


def test_no_slot_upper_guard_writes_row_l_into_the_guard_band():
    s, e, n = run_vllm(
        **TWO_SLOTS, lora_ids=[0, 2, -1], enabled=[1, 1, 1], fault="no-slot-upper-guard"
    )
    assert s.list() == SLOT0_SORTED + [SENTINEL] * 10
    # Row 2 starts right past the view: slot 2 has no routes, so pad and -1.
    assert s.after()[:10] == [6] * 10 and s.after()[10:] == [GUARD] * (BAND - 10)
    assert e.after()[:5] == [-1] * 5 and e.after()[5:] == [GUARD] * (BAND - 5)
    assert n.list() == [4, SENTINEL] and n.after()[:2] == [0, GUARD]


def test_no_slot_upper_guard_past_the_storage_raises():
    with pytest.raises(RuntimeError, match="out of bounds"):
        run_vllm(**TWO_SLOTS, lora_ids=[0, 60, -1], enabled=[1, 1, 1], fault="no-slot-upper-guard")


# ---------------------------------------------------------------- sglang-lora


def run_sglang(topk, seg_indptr, req_to_lora, E, B, L, P, M, lora_ids, enabled, fault=None):
    fn = torch_impl.implementation(fault)["sglang-lora"]
    s, e, n = Guarded(L * P, "cpu"), Guarded(L * M, "cpu"), Guarded(L, "cpu")
    T = len(topk)
    cumsum, mask = Guarded(L * (E + 1), "cpu"), Guarded(L * T, "cpu")
    cumsum.out.zero_()
    fn(
        ids(topk),
        ids(seg_indptr),
        ids(req_to_lora),
        E,
        B,
        L,
        P,
        M,
        s.out,
        e.out,
        n.out,
        ids(enabled),
        ids(lora_ids),
        None,
        cumsum.out,
        mask.out,
    )
    for work in (cumsum, mask):
        assert work.before() == work.after() == [GUARD] * BAND
    return s, e, n


# T = 4, K = 2, N = 8; request 0 = token 1 (slot 0), request 1 = token 2 (slot -1);
# tokens 0 and 3 are outside every request. Slot 0: routes 2 (expert 2), 3 (expert 3).
SGLANG = dict(
    topk=[[0, 1], [2, 3], [1, 1], [0, 3]],
    seg_indptr=[1, 2, 3],
    req_to_lora=[0, -1],
    E=4,
    B=2,
    L=2,
    P=12,
    M=6,
)
SG_SLOT0_SORTED = [2, 8, 3, 8] + [8] * 8
SG_SLOT0_EXPERTS = [2, 3, -1, -1, -1, -1]


def test_sglang_tokens_outside_every_request_have_no_adapter():
    s, e, n = run_sglang(**SGLANG, lora_ids=[0, 1], enabled=[1, 1])
    # Slot 1 is listed and enabled but gets no route: written all pad / inactive.
    assert s.list() == SG_SLOT0_SORTED + [8] * 12
    assert e.list() == SG_SLOT0_EXPERTS + [-1] * 6
    assert n.list() == [4, 0]


def test_sglang_disabled_slot_is_untouched_and_sort_ignores_disabled_breaks_it():
    s, e, n = run_sglang(**SGLANG, lora_ids=[0, 1], enabled=[0, 1])
    assert (s.list()[:12], e.list()[:6], n.list()) == (
        [SENTINEL] * 12,
        [SENTINEL] * 6,
        [SENTINEL, 0],
    )
    s, e, n = run_sglang(**SGLANG, lora_ids=[0, 1], enabled=[0, 1], fault="sort-ignores-disabled")
    assert (s.list()[:12], e.list()[:6], n.list()) == (
        SG_SLOT0_SORTED,
        [SENTINEL] * 6,
        [SENTINEL, 0],
    )


def test_sglang_slot_past_max_loras_is_skipped_unless_unguarded():
    s, e, n = run_sglang(**SGLANG, lora_ids=[0, 2], enabled=[1, 1, 1])
    assert s.list() == SG_SLOT0_SORTED + [SENTINEL] * 12
    assert s.after() == [GUARD] * BAND
    s, e, n = run_sglang(**SGLANG, lora_ids=[0, 2], enabled=[1, 1, 1], fault="no-slot-upper-guard")
    assert s.list() == SG_SLOT0_SORTED + [SENTINEL] * 12
    assert s.after()[:12] == [8] * 12 and n.after()[:1] == [0]


# ---------------------------------------------------------------- ep-remap

# G = 10, R = 4: base 2, rem 2. linear: rank 0 owns 0-2, 1 owns 3-5, 2 owns 6-7, 3 owns 8-9.
EP_TOPK = [[0, 2, 3], [5, 6, 9], [-1, 10, 7]]
_ = -1
EP_EXPECTED = {
    ("linear", None): [
        [[0, 2, _], [_, _, _], [_, _, _]],
        [[_, _, 0], [2, _, _], [_, _, _]],
        [[_, _, _], [_, 0, _], [_, _, 1]],
        [[_, _, _], [_, _, 1], [_, _, _]],
    ],
    ("round_robin", None): [
        [[0, _, _], [_, _, _], [_, _, _]],
        [[_, _, _], [1, _, 2], [_, _, _]],
        [[_, 0, _], [_, 1, _], [_, _, _]],
        [[_, _, 0], [_, _, _], [_, _, 1]],
    ],
    # Every rank gets 2 experts: ranks own 0-1, 2-3, 4-5, 6-7; 8 and 9 nobody.
    ("linear", "uneven-ep-truncates"): [
        [[0, _, _], [_, _, _], [_, _, _]],
        [[_, 0, 1], [_, _, _], [_, _, _]],
        [[_, _, _], [1, _, _], [_, _, _]],
        [[_, _, _], [_, 0, _], [_, _, 1]],
    ],
    # Ids >= 8 belong to nobody: 9 (rank 1's local 2) vanishes.
    ("round_robin", "uneven-ep-truncates"): [
        [[0, _, _], [_, _, _], [_, _, _]],
        [[_, _, _], [1, _, _], [_, _, _]],
        [[_, 0, _], [_, 1, _], [_, _, _]],
        [[_, _, 0], [_, _, _], [_, _, 1]],
    ],
}


@pytest.mark.parametrize("strategy, fault", list(EP_EXPECTED))
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_ep_remap_uneven_split(strategy, fault, dtype):
    fn = torch_impl.implementation(fault)["ep-remap"]
    topk = ids(EP_TOPK, dtype=dtype)
    for rank, expected in enumerate(EP_EXPECTED[strategy, fault]):
        local = torch.full_like(topk, 99)
        fn(topk, 10, 4, rank, strategy, local)
        assert local.dtype == dtype
        assert local.tolist() == expected, f"rank {rank}"


def test_ep_remap_rejects_bad_arguments():
    fn = torch_impl.implementation()["ep-remap"]
    topk = ids(EP_TOPK)
    with pytest.raises(ValueError, match="strategy='blocked'"):
        fn(topk, 10, 4, 0, "blocked", torch.empty_like(topk))
    with pytest.raises(ValueError, match="ep_rank=4"):
        fn(topk, 10, 4, 4, "linear", torch.empty_like(topk))


# ---------------------------------------------------------------- the fault table


def test_fault_table_matches_internals():
    both = ("torch", "cuda")
    lora = ("vllm-lora", "sglang-lora")
    aligns = ("align", "vllm-lora", "sglang-lora")
    assert {name: (f.dialects, f.backends) for name, f in cuda_impl.FAULTS.items()} == {
        "grid-skips-last-slot": (("vllm-lora",), both),
        "sort-ignores-disabled": (lora, both),
        "no-slot-upper-guard": (lora, both),
        "negative-expert-kept": (aligns + ("sglang-align",), both),
        "inactive-blocks-zero": (aligns, both),
        "uneven-ep-truncates": (("ep-remap",), both),
        "vector-tail-overrun": (("sglang-align",), both),
        "zero-grid-launch": (("align",), ("cuda",)),
        "odd-block-resets-count": (lora, ("cuda",)),
    }
    assert cuda_impl.DIALECTS == ("align", "vllm-lora", "sglang-lora", "ep-remap",
                                  "sglang-align")


def test_implementation_returns_the_dialects_a_fault_affects():
    assert list(torch_impl.implementation()) == list(cuda_impl.DIALECTS)
    assert list(torch_impl.implementation("grid-skips-last-slot")) == ["vllm-lora"]
    assert list(torch_impl.implementation("inactive-blocks-zero")) == [
        "align",
        "vllm-lora",
        "sglang-lora",
    ]
    assert torch_impl.STABLE is True
    assert "uneven-ep-truncates" in torch_impl.describe()


@pytest.mark.parametrize("fault", ["no-such-fault", "odd-block-resets-count"])
def test_unknown_or_cuda_only_fault_raises(fault):
    with pytest.raises(ValueError, match=f"fault='{fault}'.*grid-skips-last-slot"):
        torch_impl.implementation(fault)
