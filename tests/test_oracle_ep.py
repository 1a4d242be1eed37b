"""Hand-computed vectors for SPEC §6: placements, remap, even-split policy.

G = 10 experts over R = 4 ranks, the uneven split used throughout:
linear gives base 2, rem 2: rank 0 owns 0-2, rank 1 3-5, rank 2 6-7,
rank 3 8-9; round_robin gives rank 0 {0,4,8}, 1 {1,5,9}, 2 {2,6}, 3 {3,7}.
"""

from __future__ import annotations

import numpy as np
import pytest

import oracle
from oracle.ep import EvenSplit, expert_map, owned_experts, to_local_topk


def assert_int_equal(actual: np.ndarray, expected: list, dtype=np.int32) -> None:
    np.testing.assert_array_equal(actual, np.array(expected, dtype=dtype), strict=True)


@pytest.mark.parametrize(
    ("strategy", "rank", "expected"),
    [
        ("linear", 0, [0, 1, 2]),
        ("linear", 1, [3, 4, 5]),
        ("linear", 2, [6, 7]),
        ("linear", 3, [8, 9]),
        ("round_robin", 0, [0, 4, 8]),
        ("round_robin", 1, [1, 5, 9]),
        ("round_robin", 2, [2, 6]),
        ("round_robin", 3, [3, 7]),
    ],
)
def test_uneven_split_gives_the_remainder_to_the_first_ranks(strategy, rank, expected):
    assert_int_equal(owned_experts(10, 4, rank, strategy), expected)


def test_even_linear_split_gives_contiguous_equal_slices():
    assert_int_equal(owned_experts(8, 4, 2), [4, 5])


def test_rank_beyond_expert_count_owns_nothing():
    assert_int_equal(owned_experts(2, 4, 3), [])
    num_local, mapping = expert_map(2, 4, 3)
    assert num_local == 0
    assert_int_equal(mapping, [-1, -1])


def test_linear_expert_map_marks_foreign_experts_minus_one():
    num_local, mapping = expert_map(10, 4, 2, "linear")
    assert num_local == 2
    assert_int_equal(mapping, [-1, -1, -1, -1, -1, -1, 0, 1, -1, -1])


def test_round_robin_expert_map_uses_global_id_floor_divided_by_ep_size():
    num_local, mapping = expert_map(10, 4, 1, "round_robin")
    assert num_local == 3
    assert_int_equal(mapping, [-1, 0, -1, -1, -1, 1, -1, -1, -1, 2])


def test_single_rank_has_no_expert_map():
    assert expert_map(8, 1, 0) == (8, None)
    assert expert_map(8, 1, 0, "round_robin") == (8, None)


def test_to_local_topk_linear_keeps_int64_and_marks_foreign_and_invalid_routes():
    topk_ids = np.array([[3, 9], [5, -1], [10, 4]], dtype=np.int64)
    _, mapping = expert_map(10, 4, 1, "linear")  # owns 3, 4, 5
    assert_int_equal(to_local_topk(topk_ids, mapping), [[0, -1], [2, -1], [-1, 1]], np.int64)


def test_to_local_topk_round_robin_keeps_int32():
    topk_ids = np.array([[3, 9], [5, -1], [10, 4]], dtype=np.int32)
    _, mapping = expert_map(10, 4, 1, "round_robin")  # owns 1, 5, 9
    assert_int_equal(to_local_topk(topk_ids, mapping), [[-1, 2], [1, -1], [-1, -1]])


def test_to_local_topk_without_map_is_identity_on_valid_ids():
    topk_ids = np.array([[3, 9], [5, -2], [10, 4]], dtype=np.int32)
    assert_int_equal(to_local_topk(topk_ids, None), [[3, 9], [5, -1], [10, 4]])
    assert_int_equal(to_local_topk(topk_ids, None, num_experts=10), [[3, 9], [5, -1], [-1, 4]])


def test_to_local_topk_does_not_modify_its_input():
    topk_ids = np.array([[3, 9]], dtype=np.int32)
    to_local_topk(topk_ids, expert_map(10, 4, 1)[1])
    assert_int_equal(topk_ids, [[3, 9]])


def test_both_dispatch_forms_align_uneven_rank_identically():
    # rank 0 of G=10, R=4 linear owns 0, 1, 2; r0 g2->2, r1 g9 foreign,
    # r2 g0->0, r3 g2->2, r4 g5 foreign, r5 g1->1; B = 2, P = 12, pad value 6
    topk_ids = np.array([[2, 9], [0, 2], [5, 1]], dtype=np.int32)
    num_local, mapping = expert_map(10, 4, 0)
    by_map = oracle.align(topk_ids, 10, 2, expert_map=mapping, max_num_tokens_padded=12)
    local_ids = to_local_topk(topk_ids, mapping)
    assert_int_equal(local_ids, [[2, -1], [0, 2], [-1, 1]])
    by_local = oracle.align(local_ids, num_local, 2, max_num_tokens_padded=12)
    for a in (by_map, by_local):
        assert_int_equal(a.sorted_token_ids, [2, 6, 5, 6, 0, 3, 6, 6, 6, 6, 6, 6])
        assert_int_equal(a.expert_ids, [0, 1, 2, -1, -1, -1])
        assert a.num_tokens_post_pad == 6


def test_every_route_lands_on_exactly_one_rank_when_split_is_uneven():
    # g = 0..9 once each: every rank's map form keeps exactly its owned experts
    topk_ids = np.arange(10, dtype=np.int32).reshape(5, 2)
    for strategy, owners in [
        ("linear", [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]),
        ("round_robin", [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]),
    ]:
        for rank, owned in enumerate(owners):
            _, mapping = expert_map(10, 4, rank, strategy)
            a = oracle.align(topk_ids, 10, 1, expert_map=mapping)
            assert_int_equal(a.sorted_token_ids[: a.num_tokens_post_pad], owned)


# even-split policy


def test_even_split_uses_local_ids_when_experts_divide_evenly():
    split = EvenSplit(8, 2, 1)
    assert split.use_local_ids is True
    assert split.num_local_experts == 4
    assert [split.global_to_local(g) for g in (3, 4, 5, 7, 8, -1)] == [None, 0, 1, 3, None, None]


def test_even_split_keeps_global_ids_when_experts_do_not_divide():
    split = EvenSplit(10, 4, 1)
    assert split.use_local_ids is False
    assert split.num_local_experts == 10
    assert [split.global_to_local(g) for g in (0, 9, 10, -1)] == [0, 9, None, None]


def test_even_split_keeps_global_ids_when_runner_keeps_them():
    split = EvenSplit(8, 2, 1, runner_keeps_global_ids=True)
    assert split.use_local_ids is False
    assert split.num_local_experts == 8
    assert split.global_to_local(2) == 2


def test_even_split_keeps_global_ids_on_a_single_rank():
    split = EvenSplit(8, 1, 0)
    assert (split.use_local_ids, split.num_local_experts, split.global_to_local(7)) == (
        False,
        8,
        7,
    )


def test_iter_local_weights_from_dict_remaps_owned_ids_in_local_order():
    weights = {7: "w7", 1: "w1", 4: "w4", 5: "w5"}
    assert list(EvenSplit(8, 2, 1).iter_local_weights(weights)) == [
        (0, "w4"),
        (1, "w5"),
        (3, "w7"),
    ]


def test_iter_local_weights_from_dict_without_local_ids_skips_out_of_range():
    weights = {9: "a", 2: "b", 12: "c"}
    assert list(EvenSplit(10, 4, 1).iter_local_weights(weights)) == [(2, "b"), (9, "a")]


def test_iter_local_weights_from_3d_array_takes_the_owned_slice_clipped():
    weights = np.arange(12).reshape(6, 2, 1)  # 6 experts, rank 1 of 2 owns 4-7
    pairs = list(EvenSplit(8, 2, 1).iter_local_weights(weights))
    assert [lid for lid, _ in pairs] == [0, 1]
    np.testing.assert_array_equal(pairs[0][1], [[8], [9]])
    np.testing.assert_array_equal(pairs[1][1], [[10], [11]])


def test_iter_local_weights_from_3d_array_of_full_length():
    weights = np.arange(8).reshape(8, 1, 1)
    pairs = list(EvenSplit(8, 2, 0).iter_local_weights(weights))
    assert [(lid, int(w[0, 0])) for lid, w in pairs] == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_iter_local_weights_without_local_ids_walks_global_ids_clipped():
    weights = np.arange(3).reshape(3, 1, 1)
    pairs = list(EvenSplit(10, 4, 1).iter_local_weights(weights))
    assert [(lid, int(w[0, 0])) for lid, w in pairs] == [(0, 0), (1, 1), (2, 2)]


def test_iter_local_weights_owned_slice_past_tensor_end_is_empty():
    weights = np.zeros((3, 1, 1))
    assert list(EvenSplit(8, 2, 1).iter_local_weights(weights)) == []


def test_iter_local_weights_accepts_any_object_with_a_3d_shape():
    class FakeTensor:
        shape = (4, 2, 2)

        def __getitem__(self, index):
            return f"expert{index}"

    pairs = list(EvenSplit(4, 2, 1).iter_local_weights(FakeTensor()))
    assert pairs == [(0, "expert2"), (1, "expert3")]


@pytest.mark.parametrize("weights", [[np.zeros((2, 2))], np.zeros((2, 3)), "w", None])
def test_iter_local_weights_rejects_other_containers_at_call_time(weights):
    with pytest.raises(TypeError, match=r"^weights="):
        EvenSplit(8, 2, 0).iter_local_weights(weights)


def test_remap_on_a_single_rank_marks_ids_past_global_count():
    topk_ids = np.array([[0, 8], [7, -1]], dtype=np.int64)
    assert_int_equal(oracle.ep.remap(topk_ids, 8, 1, 0), [[0, -1], [7, -1]], np.int64)


def test_remap_uses_the_named_placement():
    topk_ids = np.array([[3, 9], [5, 10]], dtype=np.int32)
    assert_int_equal(oracle.ep.remap(topk_ids, 10, 4, 1, "round_robin"), [[-1, 2], [1, -1]])
