"""Caller errors: the documented exception type and one exact line naming ``argument=value``."""

from __future__ import annotations

import numpy as np
import pytest

import oracle
from oracle.ep import EvenSplit, expert_map, owned_experts, remap, to_local_topk

TOPK = np.array([[0, 1], [1, 1]], dtype=np.int32)
MAPPING = np.array([0, -1], dtype=np.int32)
ENTRY_OF_MAP = "(a local expert id or -1, num_experts={})"
WEIGHTS = "must be a {global_id: tensor} mapping or a 3-D tensor [experts, *, *]"


def assert_caller_error(call, exception, message):
    with pytest.raises(exception) as info:
        call()
    assert str(info.value) == message
    assert "\n" not in message
    assert isinstance(info.value, oracle.OracleError)


ALIGN_ERRORS = {
    "block_size zero": (
        lambda: oracle.align(TOPK, 2, 0),
        ValueError,
        "block_size=0: must be a positive integer",
    ),
    "block_size negative": (
        lambda: oracle.align(TOPK, 2, -3),
        ValueError,
        "block_size=-3: must be a positive integer",
    ),
    "block_size float": (
        lambda: oracle.align(TOPK, 2, 4.0),
        TypeError,
        "block_size=4.0: must be an integer, not float",
    ),
    "block_size bool": (
        lambda: oracle.align(TOPK, 2, True),
        TypeError,
        "block_size=True: must be an integer, not a bool",
    ),
    "num_experts negative": (
        lambda: oracle.align(TOPK, -1, 4),
        ValueError,
        "num_experts=-1: must be a non-negative integer",
    ),
    "topk_ids float": (
        lambda: oracle.align(TOPK.astype(np.float32), 2, 4),
        TypeError,
        "topk_ids.dtype=float32: must be int32 or int64",
    ),
    "topk_ids int16": (
        lambda: oracle.align(TOPK.astype(np.int16), 2, 4),
        TypeError,
        "topk_ids.dtype=int16: must be int32 or int64",
    ),
    "topk_ids 1-d": (
        lambda: oracle.align(np.array([0, 1]), 2, 4),
        ValueError,
        "topk_ids.ndim=1: must be 2 (got shape (2,))",
    ),
    "P too small": (
        # r0->0, r1->1 with B=4: two padded segments of 4
        lambda: oracle.align(np.array([[0], [1]]), 2, 4, max_num_tokens_padded=4),
        ValueError,
        "max_num_tokens_padded=4: must be at least 8, the padded total (block_size=4)",
    ),
    "P negative": (
        lambda: oracle.align(TOPK, 2, 4, max_num_tokens_padded=-1),
        ValueError,
        "max_num_tokens_padded=-1: must be a non-negative integer",
    ),
    "expert_map length": (
        lambda: oracle.align(TOPK, 2, 1, expert_map=np.array([0, 1, -1])),
        ValueError,
        "expert_map.shape=(3,): must be (2,), one entry per global expert (num_experts=2)",
    ),
    "expert_map entry too large": (
        lambda: oracle.align(TOPK, 4, 1, expert_map=np.array([0, 4, -1, 1])),
        ValueError,
        "expert_map[1]=4: must be in [-1, 4) " + ENTRY_OF_MAP.format(4),
    ),
    "expert_map entry below -1": (
        lambda: oracle.align(TOPK, 2, 1, expert_map=np.array([-2, 0])),
        ValueError,
        "expert_map[0]=-2: must be in [-1, 2) " + ENTRY_OF_MAP.format(2),
    ),
    "expert_map float": (
        lambda: oracle.align(TOPK, 2, 1, expert_map=np.array([0.0, 1.0])),
        TypeError,
        "expert_map.dtype=float64: must be an integer dtype",
    ),
    "padded_size numel": (
        lambda: oracle.padded_size(-1, 4, 4),
        ValueError,
        "numel=-1: must be a non-negative integer",
    ),
    "padded_size num_experts": (
        lambda: oracle.padded_size(4, -2, 4),
        ValueError,
        "num_experts=-2: must be a non-negative integer",
    ),
    "padded_size block_size": (
        lambda: oracle.padded_size(4, 4, 0),
        ValueError,
        "block_size=0: must be a positive integer",
    ),
}

LORA_ERRORS = {
    "max_loras zero": (
        lambda: oracle.lora_align(TOPK, MAPPING, 2, 4, 0),
        ValueError,
        "max_loras=0: must be a positive integer",
    ),
    "mapping shape": (
        lambda: oracle.lora_align(TOPK, np.array([0, 0, 0]), 2, 4, 1),
        ValueError,
        "token_lora_mapping.shape=(3,): must be (2,), one entry per token of topk_ids",
    ),
    "default lora_ids from a mapping past max_loras": (
        lambda: oracle.lora_align(TOPK, np.array([0, 2]), 2, 4, 2),
        ValueError,
        "token_lora_mapping[1]=2: must be in [-1, 2) (-1 or a slot, max_loras=2)",
    ),
    "lora_ids 2-d": (
        lambda: oracle.lora_align(TOPK, MAPPING, 2, 4, 1, lora_ids=np.zeros((1, 2), int)),
        ValueError,
        "lora_ids.ndim=2: must be 1 (got shape (1, 2))",
    ),
    "adapter_enabled shorter than max_loras": (
        lambda: oracle.lora_align(TOPK, MAPPING, 2, 4, 2, adapter_enabled=np.ones(1, int)),
        ValueError,
        "adapter_enabled.shape=(1,): must have at least max_loras=2 entries",
    ),
    "P too small for slot 1": (
        # slot 0: r2->1, r3->1 (total 4); slot 1: r0->0, r1->1 (total 8)
        lambda: oracle.lora_align(TOPK, np.array([1, 0]), 2, 4, 2, max_num_tokens_padded=4),
        ValueError,
        "max_num_tokens_padded=4: must be at least 8, the padded total of slot 1 (block_size=4)",
    ),
    "active_lora_ids mapping below -1": (
        lambda: oracle.active_lora_ids(np.array([-2, 0]), 2),
        ValueError,
        "token_lora_mapping[0]=-2: must be in [-1, 2) (-1 or a slot, max_loras=2)",
    ),
    "active_lora_ids max_loras": (
        lambda: oracle.active_lora_ids(MAPPING, -1),
        ValueError,
        "max_loras=-1: must be a positive integer",
    ),
    "seg_indptr decreasing": (
        lambda: oracle.sglang_token_lora_mapping(np.array([0, 3, 1]), np.array([0, 1]), 4),
        ValueError,
        "seg_indptr[2]=1: must be at least seg_indptr[1]=3 (non-decreasing)",
    ),
    "seg_indptr past num_tokens": (
        lambda: oracle.sglang_token_lora_mapping(np.array([0, 9]), np.array([0]), 4),
        ValueError,
        "seg_indptr[1]=9: must be in [0, 5) (token offsets, num_tokens=4)",
    ),
    "seg_indptr empty": (
        lambda: oracle.sglang_token_lora_mapping(np.array([], int), np.array([], int), 4),
        ValueError,
        "seg_indptr.shape=(0,): must have at least one entry (num_requests + 1)",
    ),
    "req_to_lora shape": (
        lambda: oracle.sglang_token_lora_mapping(np.array([0, 2]), np.array([0, 1]), 4),
        ValueError,
        "req_to_lora.shape=(2,): must be (1,), one entry per request of seg_indptr",
    ),
    "num_tokens negative": (
        lambda: oracle.sglang_token_lora_mapping(np.array([0]), np.array([], int), -1),
        ValueError,
        "num_tokens=-1: must be a non-negative integer",
    ),
}

EP_ERRORS = {
    "ep_rank past ep_size": (
        lambda: expert_map(10, 4, 4),
        ValueError,
        "ep_rank=4: must be in [0, 4) (ep_size=4)",
    ),
    "ep_rank negative": (
        lambda: owned_experts(10, 4, -1),
        ValueError,
        "ep_rank=-1: must be in [0, 4) (ep_size=4)",
    ),
    "ep_size zero": (
        lambda: expert_map(10, 0, 0),
        ValueError,
        "ep_size=0: must be a positive integer",
    ),
    "global_num_experts zero": (
        lambda: expert_map(0, 1, 0),
        ValueError,
        "global_num_experts=0: must be a positive integer",
    ),
    "unknown placement": (
        lambda: owned_experts(10, 4, 0, "striped"),
        ValueError,
        "strategy='striped': must be one of 'linear', 'round_robin'",
    ),
    "remap placement is case-sensitive": (
        lambda: remap(TOPK, 10, 4, 0, "Linear"),
        ValueError,
        "strategy='Linear': must be one of 'linear', 'round_robin'",
    ),
    "to_local_topk float ids": (
        lambda: to_local_topk(TOPK.astype(np.float64), None),
        TypeError,
        "topk_ids.dtype=float64: must be int32 or int64",
    ),
    "to_local_topk num_experts disagrees with map": (
        lambda: to_local_topk(TOPK, np.array([0, -1]), num_experts=9),
        ValueError,
        "num_experts=9: must equal len(expert_map)=2",
    ),
    "to_local_topk map entry below -1": (
        lambda: to_local_topk(TOPK, np.array([0, -3])),
        ValueError,
        "expert_map[1]=-3: must be in [-1, 2) (a local expert id or -1, G=2)",
    ),
    "EvenSplit ep_rank": (
        lambda: EvenSplit(8, 2, 2),
        ValueError,
        "ep_rank=2: must be in [0, 2) (ep_size=2)",
    ),
    "EvenSplit ep_size": (
        lambda: EvenSplit(8, 0, 0),
        ValueError,
        "ep_size=0: must be a positive integer",
    ),
    "EvenSplit num_experts": (
        lambda: EvenSplit(0, 1, 0),
        ValueError,
        "num_experts=0: must be a positive integer",
    ),
    "global_to_local str": (
        lambda: EvenSplit(8, 2, 0).global_to_local("3"),
        TypeError,
        "gid='3': must be an integer, not str",
    ),
    "iter_local_weights list": (
        lambda: EvenSplit(8, 2, 0).iter_local_weights([1, 2]),
        TypeError,
        "weights=list: " + WEIGHTS,
    ),
    "iter_local_weights 2-d array": (
        lambda: EvenSplit(8, 2, 0).iter_local_weights(np.zeros((2, 3))),
        TypeError,
        "weights=ndarray of shape (2, 3): " + WEIGHTS,
    ),
}


@pytest.mark.parametrize(("call", "exception", "message"), ALIGN_ERRORS.values(), ids=ALIGN_ERRORS)
def test_align_caller_error_names_argument_and_value_in_one_line(call, exception, message):
    assert_caller_error(call, exception, message)


@pytest.mark.parametrize(("call", "exception", "message"), LORA_ERRORS.values(), ids=LORA_ERRORS)
def test_lora_caller_error_names_argument_and_value_in_one_line(call, exception, message):
    assert_caller_error(call, exception, message)


@pytest.mark.parametrize(("call", "exception", "message"), EP_ERRORS.values(), ids=EP_ERRORS)
def test_ep_caller_error_names_argument_and_value_in_one_line(call, exception, message):
    assert_caller_error(call, exception, message)


def test_value_errors_and_type_errors_share_the_oracle_root():
    assert issubclass(oracle._validate.InvalidArgument, ValueError)
    assert issubclass(oracle._validate.InvalidArgumentType, TypeError)
    assert issubclass(oracle._validate.InvalidArgument, oracle.OracleError)
