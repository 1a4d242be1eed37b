"""Caller errors: the documented exception type and one line naming ``argument=value``."""

from __future__ import annotations

import numpy as np
import pytest

import oracle
from oracle.ep import EvenSplit, expert_map, owned_experts, remap, to_local_topk

TOPK = np.array([[0, 1], [1, 1]], dtype=np.int32)
MAPPING = np.array([0, -1], dtype=np.int32)

CASES = [
    # (id, call, exception, text the message starts with, text it contains)
    ("block_size zero", lambda: oracle.align(TOPK, 2, 0), ValueError, "block_size=0:", "positive"),
    ("block_size negative", lambda: oracle.align(TOPK, 2, -3), ValueError, "block_size=-3:", "positive"),
    ("block_size float", lambda: oracle.align(TOPK, 2, 4.0), TypeError, "block_size=4.0:", "integer"),
    ("block_size bool", lambda: oracle.align(TOPK, 2, True), TypeError, "block_size=True:", "integer"),
    ("num_experts zero", lambda: oracle.align(TOPK, 0, 4), ValueError, "num_experts=0:", "positive"),
    ("topk float", lambda: oracle.align(TOPK.astype(np.float32), 2, 4), TypeError,
     "topk_ids.dtype=float32:", "int32 or int64"),
    ("topk int16", lambda: oracle.align(TOPK.astype(np.int16), 2, 4), TypeError,
     "topk_ids.dtype=int16:", "int32 or int64"),
    ("topk 1-d", lambda: oracle.align(np.array([0, 1]), 2, 4), ValueError, "topk_ids.ndim=1:", "2"),
    ("P too small", lambda: oracle.align(np.array([[0], [1]]), 2, 4, max_num_tokens_padded=4),
     ValueError, "max_num_tokens_padded=4:", "at least 8"),
    ("P negative", lambda: oracle.align(TOPK, 2, 4, max_num_tokens_padded=-1), ValueError,
     "max_num_tokens_padded=-1:", "non-negative"),
    ("expert_map length", lambda: oracle.align(TOPK, 2, 1, expert_map=np.array([0, 1, -1])),
     ValueError, "expert_map.shape=(3,):", "(2,)"),
    ("expert_map too large", lambda: oracle.align(TOPK, 4, 1, expert_map=np.array([0, 4, -1, 1])),
     ValueError, "expert_map[1]=4:", "[-1, 4)"),
    ("expert_map below -1", lambda: oracle.align(TOPK, 2, 1, expert_map=np.array([-2, 0])),
     ValueError, "expert_map[0]=-2:", "[-1, 2)"),
    ("expert_map float", lambda: oracle.align(TOPK, 2, 1, expert_map=np.array([0.0, 1.0])),
     TypeError, "expert_map.dtype=float64:", "integer"),
    ("max_loras zero", lambda: oracle.lora_align(TOPK, MAPPING, 2, 4, 0), ValueError,
     "max_loras=0:", "positive"),
    ("mapping shape", lambda: oracle.lora_align(TOPK, np.array([0, 0, 0]), 2, 4, 1), ValueError,
     "token_lora_mapping.shape=(3,):", "(2,)"),
    ("mapping slot too large", lambda: oracle.lora_align(TOPK, np.array([0, 2]), 2, 4, 2),
     ValueError, "token_lora_mapping[1]=2:", "[-1, 2)"),
    ("lora_ids 2-d", lambda: oracle.lora_align(TOPK, MAPPING, 2, 4, 1, lora_ids=np.zeros((1, 2), int)),
     ValueError, "lora_ids.ndim=2:", "1"),
    ("adapter_enabled short", lambda: oracle.lora_align(TOPK, MAPPING, 2, 4, 2, adapter_enabled=np.ones(1, int)),
     ValueError, "adapter_enabled.shape=(1,):", "max_loras=2"),
    ("lora P too small", lambda: oracle.lora_align(TOPK, np.array([0, 1]), 2, 4, 2, max_num_tokens_padded=4),
     ValueError, "max_num_tokens_padded=4:", "slot 1"),
    ("active mapping below -1", lambda: oracle.active_lora_ids(np.array([-2, 0]), 2), ValueError,
     "token_lora_mapping[0]=-2:", "[-1, 2)"),
    ("active max_loras", lambda: oracle.active_lora_ids(MAPPING, -1), ValueError, "max_loras=-1:", "positive"),
    ("seg_indptr decreasing", lambda: oracle.sglang_token_lora_mapping(np.array([0, 3, 1]), np.array([0, 1]), 4),
     ValueError, "seg_indptr[2]=1:", "non-decreasing"),
    ("seg_indptr past tokens", lambda: oracle.sglang_token_lora_mapping(np.array([0, 9]), np.array([0]), 4),
     ValueError, "seg_indptr[1]=9:", "[0, 5)"),
    ("seg_indptr empty", lambda: oracle.sglang_token_lora_mapping(np.array([], int), np.array([], int), 4),
     ValueError, "seg_indptr.shape=(0,):", "at least one"),
    ("req_to_lora shape", lambda: oracle.sglang_token_lora_mapping(np.array([0, 2]), np.array([0, 1]), 4),
     ValueError, "req_to_lora.shape=(2,):", "(1,)"),
    ("num_tokens negative", lambda: oracle.sglang_token_lora_mapping(np.array([0]), np.array([], int), -1),
     ValueError, "num_tokens=-1:", "non-negative"),
    ("padded_size numel", lambda: oracle.padded_size(-1, 4, 4), ValueError, "numel=-1:", "non-negative"),
    ("padded_size experts", lambda: oracle.padded_size(4, 0, 4), ValueError, "num_experts=0:", "positive"),
    ("padded_size block", lambda: oracle.padded_size(4, 4, 0), ValueError, "block_size=0:", "positive"),
    ("ep_rank too large", lambda: expert_map(10, 4, 4), ValueError, "ep_rank=4:", "[0, 4)"),
    ("ep_rank negative", lambda: owned_experts(10, 4, -1), ValueError, "ep_rank=-1:", "[0, 4)"),
    ("ep_size zero", lambda: expert_map(10, 0, 0), ValueError, "ep_size=0:", "positive"),
    ("global experts zero", lambda: expert_map(0, 1, 0), ValueError, "global_num_experts=0:", "positive"),
    ("unknown placement", lambda: owned_experts(10, 4, 0, "striped"), ValueError,
     "strategy='striped':", "'linear', 'round_robin'"),
    ("remap placement", lambda: remap(TOPK, 10, 4, 0, "Linear"), ValueError, "strategy='Linear':", "'linear'"),
    ("to_local float", lambda: to_local_topk(TOPK.astype(np.float64), None), TypeError,
     "topk_ids.dtype=float64:", "int32 or int64"),
    ("to_local num_experts", lambda: to_local_topk(TOPK, np.array([0, -1]), num_experts=9), ValueError,
     "num_experts=9:", "len(expert_map)=2"),
    ("to_local map entry", lambda: to_local_topk(TOPK, np.array([0, -3])), ValueError,
     "expert_map[1]=-3:", "[-1, 2)"),
    ("even split rank", lambda: EvenSplit(8, 2, 2), ValueError, "ep_rank=2:", "[0, 2)"),
    ("even split size", lambda: EvenSplit(8, 0, 0), ValueError, "ep_size=0:", "positive"),
    ("even split experts", lambda: EvenSplit(0, 1, 0), ValueError, "num_experts=0:", "positive"),
    ("global_to_local str", lambda: EvenSplit(8, 2, 0).global_to_local("3"), TypeError,
     "gid='3':", "integer"),
    ("weights list", lambda: EvenSplit(8, 2, 0).iter_local_weights([1, 2]), TypeError,
     "weights=list:", "3-D"),
    ("weights 2-d", lambda: EvenSplit(8, 2, 0).iter_local_weights(np.zeros((2, 3))), TypeError,
     "weights=ndarray of shape (2, 3):", "3-D"),
]


@pytest.mark.parametrize(("call", "exception", "start", "contains"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_caller_error_names_argument_and_value_in_one_line(call, exception, start, contains):
    with pytest.raises(exception) as info:
        call()
    message = str(info.value)
    assert message.startswith(start)
    assert contains in message
    assert "\n" not in message
    assert isinstance(info.value, oracle.OracleError)
