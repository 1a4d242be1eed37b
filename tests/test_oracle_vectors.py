"""Hand-computed vectors for SPEC §2–§5: every expected array is a literal.

Each test spells out its routes in a comment (``r<i> -> e<expert>``) so the
expected arrays can be checked by hand against SPEC §3: counts, padded
segments in expert order, pad value ``N``, ``-1`` for inactive blocks.
"""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import oracle
import oracle._align
import oracle._lora
import oracle.ep


def assert_int32_equal(actual: np.ndarray, expected: list) -> None:
    assert actual.dtype == np.int32
    np.testing.assert_array_equal(actual, np.array(expected, dtype=np.int32), strict=True)


def assert_alignment(a: oracle.Alignment, sorted_token_ids, expert_ids, total) -> None:
    assert_int32_equal(a.sorted_token_ids, sorted_token_ids)
    assert_int32_equal(a.expert_ids, expert_ids)
    assert type(a.num_tokens_post_pad) is int
    assert a.num_tokens_post_pad == total


# SPEC §2


@pytest.mark.parametrize(
    ("numel", "num_experts", "block_size", "expected"),
    [
        (10, 4, 4, 24),  # round_up(10 + 12, 4)
        (4, 4, 4, 16),  # N == E is not the N < E case: round_up(4 + 12, 4)
        (3, 4, 4, 12),  # N < E: N * B
        (0, 4, 16, 0),  # empty batch: N < E gives 0
        (1023, 64, 16, 1984),  # round_up(1023 + 960, 16)
        (1024, 64, 16, 1984),
        (7, 3, 1, 7),  # B = 1: no padding at all
        (5, 0, 4, 8),  # E = 0 (a rank without experts): round_up(5, 4)
    ],
)
def test_padded_size_follows_production_formula(numel, num_experts, block_size, expected):
    assert oracle.padded_size(numel, num_experts, block_size) == expected


# SPEC §3


def test_align_sorts_routes_by_expert_and_pads_each_segment():
    # r0->2 r1->0 r2->2 r3->2 r4->0 r5->3; counts [2,0,3,1], padded [2,0,4,2]
    topk_ids = np.array([[2, 0], [2, 2], [0, 3]], dtype=np.int32)
    a = oracle.align(topk_ids, num_experts=4, block_size=2)  # P = round_up(6 + 4, 2) = 10
    assert_alignment(a, [1, 4, 0, 2, 3, 6, 5, 6, 6, 6], [0, 2, 2, 3, -1], 8)


def test_align_gives_the_same_answer_for_int64_topk_ids():
    topk_ids = np.array([[2, 0], [2, 2], [0, 3]], dtype=np.int64)
    a = oracle.align(topk_ids, num_experts=4, block_size=2)
    assert_alignment(a, [1, 4, 0, 2, 3, 6, 5, 6, 6, 6], [0, 2, 2, 3, -1], 8)


def test_negative_and_too_large_expert_ids_are_dropped():
    # r0->-1 dropped, r1->1, r2->4 dropped (E=4), r3->1, r4->0, r5->7 dropped
    topk_ids = np.array([[-1, 1], [4, 1], [0, 7]], dtype=np.int32)
    a = oracle.align(topk_ids, num_experts=4, block_size=2)  # P = 10, pad value N = 6
    assert_alignment(a, [4, 6, 1, 3, 6, 6, 6, 6, 6, 6], [0, 1, -1, -1, -1], 4)


def test_expert_map_minus_one_entries_drop_routes_and_others_relabel():
    # map g0->drop g1->0 g2->drop g3->1: r0 g3->1, r1 g1->0, r2 g0 drop,
    # r3 g3->1, r4 g2 drop, r5 g1->0
    topk_ids = np.array([[3, 1], [0, 3], [2, 1]], dtype=np.int32)
    expert_map = np.array([-1, 0, -1, 1], dtype=np.int32)
    a = oracle.align(topk_ids, 4, 2, expert_map=expert_map, max_num_tokens_padded=8)
    assert_alignment(a, [1, 5, 0, 3, 6, 6, 6, 6], [0, 1, -1, -1], 4)


def test_loose_padding_fills_trailing_positions_with_n_and_blocks_with_minus_one():
    # r0->1 r1->1 r2->0, B=4: padded [4, 4]; production P would be 12
    topk_ids = np.array([[1], [1], [0]], dtype=np.int32)
    a = oracle.align(topk_ids, 2, 4, max_num_tokens_padded=20)
    assert_alignment(a, [2, 3, 3, 3, 0, 1] + [3] * 14, [0, 1, -1, -1, -1], 8)


def test_block_size_that_does_not_divide_p_rounds_m_up():
    # r0->0 r1->0 r2->0, B=3: one full block; P=7 gives M=ceil(7/3)=3
    a = oracle.align(np.array([[0, 0, 0]], dtype=np.int32), 1, 3, max_num_tokens_padded=7)
    assert_alignment(a, [0, 1, 2, 3, 3, 3, 3], [0, -1, -1], 3)


def test_block_size_one_needs_no_padding():
    # r0->1 r1->0 r2->1 (one token routes to expert 1 twice)
    a = oracle.align(np.array([[1, 0, 1]], dtype=np.int32), 2, 1)
    assert_alignment(a, [1, 0, 2], [0, 1, 1], 3)


def test_empty_batch_with_production_p_has_no_positions_and_no_blocks():
    a = oracle.align(np.zeros((0, 2), dtype=np.int32), 4, 4)  # padded_size(0, 4, 4) == 0
    assert_alignment(a, [], [], 0)


def test_empty_batch_with_loose_p_is_all_pad_value_zero_and_inactive_blocks():
    a = oracle.align(np.zeros((0, 2), dtype=np.int64), 4, 4, max_num_tokens_padded=8)
    assert_alignment(a, [0] * 8, [-1, -1], 0)


def test_all_routes_dropped_gives_total_zero():
    a = oracle.align(np.array([[-1, 5]], dtype=np.int32), 2, 2)  # P = round_up(2 + 2, 2)
    assert_alignment(a, [2, 2, 2, 2], [-1, -1], 0)


def test_rank_without_experts_drops_every_route():
    a = oracle.align(np.array([[0, 1]], dtype=np.int32), 0, 2)  # P = round_up(2, 2)
    assert_alignment(a, [2, 2], [-1], 0)


# SPEC §4

# Shared batch: tok0 slot1: r0->0 r1->1; tok1 base: r2->1 r3->1;
# tok2 slot0: r4->2 r5->0; tok3 slot1: r6->0 r7->2.  N = 8, E = 3, B = 2,
# production P = round_up(8 + 3, 2) = 12, M = 6.
TOPK = np.array([[0, 1], [1, 1], [2, 0], [0, 2]], dtype=np.int32)
MAPPING = np.array([1, -1, 0, 1], dtype=np.int32)
SLOT0_SORTED = [5, 8, 4, 8] + [8] * 8  # e0: r5, e2: r4
SLOT0_EXPERTS = [0, 2, -1, -1, -1, -1]
SLOT1_SORTED = [0, 6, 1, 8, 7, 8] + [8] * 6  # e0: r0 r6, e1: r1, e2: r7
SLOT1_EXPERTS = [0, 1, 2, -1, -1, -1]


def test_active_lora_ids_puts_base_first_and_pads_with_minus_one():
    assert_int32_equal(oracle.active_lora_ids(MAPPING, max_loras=3), [-1, 0, 1, -1])
    assert_int32_equal(oracle.active_lora_ids(np.array([2, 2]), 4), [2, -1, -1, -1, -1])
    assert_int32_equal(oracle.active_lora_ids(np.array([], dtype=np.int32), 2), [-1, -1, -1])


def test_last_real_slot_is_written_when_base_tokens_present():
    # L = 1, tok0 base, tok1 slot 0: lora_ids = [-1, 0], the real slot at index L
    topk_ids = np.array([[0], [0]], dtype=np.int32)
    mapping = np.array([-1, 0], dtype=np.int32)
    assert_int32_equal(oracle.active_lora_ids(mapping, 1), [-1, 0])
    la = oracle.lora_align(topk_ids, mapping, num_experts=1, block_size=2, max_loras=1)
    # r1->0 only; P = round_up(2 + 1, 2) = 4, pad value N = 2
    assert_int32_equal(la.sorted_token_ids, [[1, 2, 2, 2]])
    assert_int32_equal(la.expert_ids, [[0, -1]])
    assert_int32_equal(la.num_tokens_post_pad, [2])
    np.testing.assert_array_equal(la.written, [True], strict=True)


def test_lora_rows_align_each_slot_with_batch_route_indices():
    la = oracle.lora_align(TOPK, MAPPING, 3, 2, 3)  # lora_ids [-1, 0, 1, -1]
    assert_int32_equal(la.sorted_token_ids[0], SLOT0_SORTED)
    assert_int32_equal(la.expert_ids[0], SLOT0_EXPERTS)
    assert_int32_equal(la.sorted_token_ids[1], SLOT1_SORTED)
    assert_int32_equal(la.expert_ids[1], SLOT1_EXPERTS)
    assert_int32_equal(la.num_tokens_post_pad[:2], [4, 6])
    np.testing.assert_array_equal(la.written, [True, True, False], strict=True)
    assert la.sorted_token_ids.shape == (3, 12) and la.expert_ids.shape == (3, 6)


def test_disabled_adapter_listed_in_lora_ids_leaves_its_row_unwritten():
    enabled = np.array([1, 0, 1, 1], dtype=np.int32)
    la = oracle.lora_align(TOPK, MAPPING, 3, 2, 3, adapter_enabled=enabled)
    np.testing.assert_array_equal(la.written, [True, False, False], strict=True)
    assert_int32_equal(la.sorted_token_ids[0], SLOT0_SORTED)
    assert_int32_equal(la.expert_ids[0], SLOT0_EXPERTS)
    assert la.num_tokens_post_pad[0] == 4


def test_lora_ids_value_at_or_above_max_loras_is_skipped():
    lora_ids = np.array([-1, 0, 3, 5], dtype=np.int32)  # 3 and 5 are >= L = 3
    la = oracle.lora_align(TOPK, MAPPING, 3, 2, 3, lora_ids=lora_ids)
    np.testing.assert_array_equal(la.written, [True, False, False], strict=True)
    assert_int32_equal(la.sorted_token_ids[0], SLOT0_SORTED)


def test_listed_slot_without_routes_is_written_with_total_zero():
    lora_ids = np.arange(3, dtype=np.int32)  # SGLang layout: length L
    la = oracle.lora_align(TOPK, MAPPING, 3, 2, 3, lora_ids=lora_ids)
    np.testing.assert_array_equal(la.written, [True, True, True], strict=True)
    assert_int32_equal(la.sorted_token_ids[2], [8] * 12)
    assert_int32_equal(la.expert_ids[2], [-1] * 6)
    assert_int32_equal(la.num_tokens_post_pad, [4, 6, 0])


def test_token_mapped_outside_the_slot_range_joins_no_row():
    # tok0 maps to 5 (>= L = 2): its routes r0, r1 are in no row; tok1 slot 0: r2->1, r3->1
    topk_ids = np.array([[0, 1], [1, 1]], dtype=np.int32)
    mapping = np.array([5, 0], dtype=np.int32)
    lora_ids = np.array([0, 1], dtype=np.int32)
    la = oracle.lora_align(topk_ids, mapping, 2, 2, 2, lora_ids=lora_ids)
    # P = round_up(4 + 2, 2) = 6, pad value N = 4
    assert_int32_equal(la.sorted_token_ids, [[2, 3, 4, 4, 4, 4], [4, 4, 4, 4, 4, 4]])
    assert_int32_equal(la.expert_ids, [[1, -1, -1], [-1, -1, -1]])
    assert_int32_equal(la.num_tokens_post_pad, [2, 0])
    np.testing.assert_array_equal(la.written, [True, True], strict=True)


def test_lora_rows_use_the_callers_stride_under_loose_padding():
    la = oracle.lora_align(TOPK, MAPPING, 3, 2, 3, max_num_tokens_padded=16)
    assert la.sorted_token_ids.shape == (3, 16) and la.expert_ids.shape == (3, 8)
    assert_int32_equal(la.sorted_token_ids[0], [5, 8, 4, 8] + [8] * 12)
    assert_int32_equal(la.expert_ids[0], [0, 2, -1, -1, -1, -1, -1, -1])


def test_lora_align_applies_expert_map_inside_each_slot():
    # map g0,g1 -> drop, g2 -> 0, g3 -> 1 (linear rank 1 of 2); both tokens slot 0
    # r0 g0 drop, r1 g1 drop, r2 g2->0, r3 g3->1; P = round_up(4 + 4, 2) = 8
    topk_ids = np.array([[0, 1], [2, 3]], dtype=np.int64)
    expert_map = np.array([-1, -1, 0, 1], dtype=np.int32)
    la = oracle.lora_align(topk_ids, np.array([0, 0]), 4, 2, 1, expert_map=expert_map)
    assert_int32_equal(la.sorted_token_ids, [[2, 4, 3, 4, 4, 4, 4, 4]])
    assert_int32_equal(la.expert_ids, [[0, 1, -1, -1]])
    assert_int32_equal(la.num_tokens_post_pad, [4])


def test_empty_batch_processes_no_slot_by_default():
    la = oracle.lora_align(np.zeros((0, 1), dtype=np.int32), np.zeros(0, np.int32), 2, 2, 2)
    np.testing.assert_array_equal(la.written, [False, False], strict=True)
    assert la.sorted_token_ids.shape == (2, 0) and la.expert_ids.shape == (2, 0)


def test_empty_batch_with_listed_slots_writes_pad_rows():
    la = oracle.lora_align(
        np.zeros((0, 1), dtype=np.int32),
        np.zeros(0, np.int32),
        2,
        2,
        2,
        lora_ids=np.array([0, 1], dtype=np.int32),
        max_num_tokens_padded=4,
    )
    assert_int32_equal(la.sorted_token_ids, [[0, 0, 0, 0], [0, 0, 0, 0]])
    assert_int32_equal(la.expert_ids, [[-1, -1], [-1, -1]])
    assert_int32_equal(la.num_tokens_post_pad, [0, 0])
    np.testing.assert_array_equal(la.written, [True, True], strict=True)


# SPEC §5


def test_sglang_tokens_outside_every_request_have_no_adapter():
    mapping = oracle.sglang_token_lora_mapping(np.array([1, 3, 4]), np.array([2, 0]), 6)
    assert_int32_equal(mapping, [-1, 2, 2, 0, -1, -1])


def test_sglang_request_without_adapter_and_empty_request():
    # request 0: tokens 0-1 slot 1; request 1: empty; request 2: tokens 2-4, no adapter
    mapping = oracle.sglang_token_lora_mapping(np.array([0, 2, 2, 5]), np.array([1, 0, -1]), 6)
    assert_int32_equal(mapping, [1, 1, -1, -1, -1, -1])


def test_sglang_convention_aligns_each_requests_slot():
    # seg [1, 3, 4], req_to_lora [1, 0]: tokens 1-2 slot 1, token 3 slot 0, 0 and 4 none
    topk_ids = np.array([[1], [0], [1], [1], [0]], dtype=np.int32)
    mapping = oracle.sglang_token_lora_mapping(np.array([1, 3, 4]), np.array([1, 0]), 5)
    la = oracle.lora_align(
        topk_ids,
        mapping,
        2,
        2,
        2,
        lora_ids=np.arange(2, dtype=np.int32),
        adapter_enabled=np.ones(2, dtype=np.int32),
    )
    # slot 0: r3->1; slot 1: r1->0, r2->1; P = round_up(5 + 2, 2) = 8, N = 5
    assert_int32_equal(la.sorted_token_ids, [[3, 5, 5, 5, 5, 5, 5, 5], [1, 5, 2, 5, 5, 5, 5, 5]])
    assert_int32_equal(la.expert_ids, [[1, -1, -1, -1], [0, 1, -1, -1]])
    assert_int32_equal(la.num_tokens_post_pad, [2, 4])
    np.testing.assert_array_equal(la.written, [True, True], strict=True)


# Docstring examples


@pytest.mark.parametrize("module", [oracle._align, oracle._lora, oracle.ep])
def test_docstring_examples_hold(module):
    failed, attempted = doctest.testmod(module, extraglobs={"np": np}, report=False)
    assert attempted > 0
    assert failed == 0
