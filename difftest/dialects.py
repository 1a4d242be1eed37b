"""One declarative record per dialect, in the spirit of PyTorch's OpInfo.

A :class:`DialectInfo` says, for one calling convention of DESIGN.md, how to
turn a :class:`~difftest.case.Case` (one rank of it) into the call's inputs,
which output buffers the call writes (and their shapes), how to build the
positional arguments, and what the oracle expects. Everything here is NumPy;
the execution layer turns inputs into tensors on the device under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import oracle
import oracle.ep

from .case import Case, rank_inputs


@dataclass(frozen=True)
class RowsExpected:
    """What the oracle expects of an align-type call, one row per slot.

    Plain ``align`` has a single row that is always written.
    """

    sorted_token_ids: np.ndarray  # int32 [L, P]
    expert_ids: np.ndarray  # int32 [L, M]
    num_tokens_post_pad: np.ndarray  # int32 [L]
    written: np.ndarray  # bool [L]
    pad_value: int
    block_size: int


@dataclass(frozen=True)
class RemapExpected:
    """What the oracle expects of an ``ep-remap`` call."""

    local_topk_ids: np.ndarray  # [T, K], dtype of topk_ids


@dataclass(frozen=True)
class CallPlan:
    """Everything one call needs, as NumPy values.

    ``inputs`` become tensors and are checked for mutation; ``outputs`` are
    (shape, dtype) of the buffers the call writes (guarded, sentinel-filled);
    ``scratch`` are work buffers (guarded, zero-filled, contents ignored);
    ``arguments`` names the positional arguments in order: a string is the
    name of an input, output or scratch tensor, anything else is passed as is.
    """

    inputs: dict[str, np.ndarray]
    outputs: dict[str, tuple[tuple[int, ...], np.dtype]]
    scratch: dict[str, tuple[tuple[int, ...], np.dtype]]
    arguments: tuple[Any, ...]


@dataclass(frozen=True)
class TensorArg:
    """Marks a positional argument that is one of the plan's tensors."""

    name: str


@dataclass(frozen=True)
class DialectInfo:
    """The record of one dialect: calling convention, plan builder, reference."""

    name: str
    summary: str
    signature: str
    plan: Callable[[Case, int | None], CallPlan]
    reference: Callable[[Case, int | None], Any]
    lora: bool


def _num_m_blocks(padded: int, block_size: int) -> int:
    return -(-padded // block_size)


def _vllm_lora_ids(case: Case) -> np.ndarray:
    if case.lora_ids is not None:
        return case.lora_ids
    return oracle.active_lora_ids(case.token_lora_mapping, case.max_loras)


def _enabled(case: Case, length: int) -> np.ndarray:
    if case.adapter_enabled is not None:
        return case.adapter_enabled
    return np.ones(length, dtype=np.int32)


def _sglang_lora_ids(case: Case) -> np.ndarray:
    if case.lora_ids is not None:
        return case.lora_ids
    return np.arange(case.max_loras, dtype=np.int32)


def _align_outputs(rows: int, padded: int, blocks: int) -> dict:
    i32 = np.dtype(np.int32)
    return {
        "sorted_token_ids": ((rows * padded,), i32),
        "expert_ids": ((rows * blocks,), i32),
        "num_tokens_post_pad": ((rows,), i32),
    }


# -- align -----------------------------------------------------------------
def _align_plan(case: Case, rank: int | None) -> CallPlan:
    ri = rank_inputs(case, rank)
    padded = ri["max_num_tokens_padded"]
    inputs = {"topk_ids": ri["topk_ids"]}
    if ri["expert_map"] is not None:
        inputs["expert_map"] = ri["expert_map"]
    args = (TensorArg("topk_ids"), ri["num_experts"], case.block_size,
            TensorArg("sorted_token_ids"), TensorArg("expert_ids"),
            TensorArg("num_tokens_post_pad"),
            TensorArg("expert_map") if ri["expert_map"] is not None else None)
    return CallPlan(inputs, _align_outputs(1, padded, _num_m_blocks(padded, case.block_size)),
                    {}, args)


def _align_reference(case: Case, rank: int | None) -> RowsExpected:
    ri = rank_inputs(case, rank)
    a = oracle.align(ri["topk_ids"], ri["num_experts"], case.block_size,
                     expert_map=ri["expert_map"],
                     max_num_tokens_padded=ri["max_num_tokens_padded"])
    return RowsExpected(a.sorted_token_ids[None, :], a.expert_ids[None, :],
                        np.array([a.num_tokens_post_pad], dtype=np.int32),
                        np.array([True]), case.num_routes, case.block_size)


# -- vllm-lora -------------------------------------------------------------
def _vllm_plan(case: Case, rank: int | None) -> CallPlan:
    ri = rank_inputs(case, rank)
    padded, L = ri["max_num_tokens_padded"], case.max_loras
    blocks = _num_m_blocks(padded, case.block_size)
    inputs = {
        "topk_ids": ri["topk_ids"],
        "token_lora_mapping": case.token_lora_mapping,
        "adapter_enabled": _enabled(case, L + 1),
        "lora_ids": _vllm_lora_ids(case),
    }
    if ri["expert_map"] is not None:
        inputs["expert_map"] = ri["expert_map"]
    args = (TensorArg("topk_ids"), TensorArg("token_lora_mapping"), ri["num_experts"],
            case.block_size, L, padded, blocks, TensorArg("sorted_token_ids"),
            TensorArg("expert_ids"), TensorArg("num_tokens_post_pad"),
            TensorArg("adapter_enabled"), TensorArg("lora_ids"),
            TensorArg("expert_map") if ri["expert_map"] is not None else None)
    return CallPlan(inputs, _align_outputs(L, padded, blocks), {}, args)


def _lora_rows(case: Case, rank: int | None, mapping: np.ndarray, lora_ids: np.ndarray,
               enabled: np.ndarray) -> RowsExpected:
    ri = rank_inputs(case, rank)
    a = oracle.lora_align(ri["topk_ids"], mapping, ri["num_experts"], case.block_size,
                          case.max_loras, lora_ids=lora_ids, adapter_enabled=enabled,
                          expert_map=ri["expert_map"],
                          max_num_tokens_padded=ri["max_num_tokens_padded"])
    return RowsExpected(a.sorted_token_ids, a.expert_ids,
                        np.asarray(a.num_tokens_post_pad, dtype=np.int32),
                        np.asarray(a.written, dtype=bool), case.num_routes, case.block_size)


def _vllm_reference(case: Case, rank: int | None) -> RowsExpected:
    return _lora_rows(case, rank, case.token_lora_mapping, _vllm_lora_ids(case),
                      _enabled(case, case.max_loras + 1))


# -- sglang-lora -----------------------------------------------------------
def _sglang_plan(case: Case, rank: int | None) -> CallPlan:
    ri = rank_inputs(case, rank)
    padded, L = ri["max_num_tokens_padded"], case.max_loras
    blocks = _num_m_blocks(padded, case.block_size)
    inputs = {
        "topk_ids": ri["topk_ids"],
        "seg_indptr": case.seg_indptr,
        "req_to_lora": case.req_to_lora,
        "adapter_enabled": _enabled(case, L),
        "lora_ids": _sglang_lora_ids(case),
    }
    if ri["expert_map"] is not None:
        inputs["expert_map"] = ri["expert_map"]
    i32 = np.dtype(np.int32)
    scratch = {
        "cumsum_buffer": ((L * (ri["num_experts"] + 1),), i32),
        "token_mask": ((L * case.num_tokens,), i32),
    }
    args = (TensorArg("topk_ids"), TensorArg("seg_indptr"), TensorArg("req_to_lora"),
            ri["num_experts"], case.block_size, L, padded, blocks,
            TensorArg("sorted_token_ids"), TensorArg("expert_ids"),
            TensorArg("num_tokens_post_pad"), TensorArg("adapter_enabled"),
            TensorArg("lora_ids"),
            TensorArg("expert_map") if ri["expert_map"] is not None else None,
            TensorArg("cumsum_buffer"), TensorArg("token_mask"))
    return CallPlan(inputs, _align_outputs(L, padded, blocks), scratch, args)


def _sglang_reference(case: Case, rank: int | None) -> RowsExpected:
    mapping = oracle.sglang_token_lora_mapping(case.seg_indptr, case.req_to_lora,
                                               case.num_tokens)
    return _lora_rows(case, rank, mapping, _sglang_lora_ids(case),
                      _enabled(case, case.max_loras))


# -- ep-remap --------------------------------------------------------------
def _remap_plan(case: Case, rank: int | None) -> CallPlan:
    ep = case.ep
    outputs = {"local_topk_ids": (tuple(case.topk_ids.shape), case.topk_ids.dtype)}
    args = (TensorArg("topk_ids"), ep.global_num_experts, ep.ep_size, rank, ep.strategy,
            TensorArg("local_topk_ids"))
    return CallPlan({"topk_ids": case.topk_ids}, outputs, {}, args)


def _remap_reference(case: Case, rank: int | None) -> RemapExpected:
    ep = case.ep
    _, rank_map = oracle.ep.expert_map(ep.global_num_experts, ep.ep_size, rank, ep.strategy)
    local = oracle.ep.to_local_topk(case.topk_ids, rank_map, num_experts=ep.global_num_experts)
    return RemapExpected(np.asarray(local, dtype=case.topk_ids.dtype))


DIALECT_INFO: dict[str, DialectInfo] = {
    info.name: info
    for info in (
        DialectInfo(
            "align", "plain block alignment (SPEC §3)",
            "fn(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids, "
            "num_tokens_post_pad, expert_map=None)",
            _align_plan, _align_reference, lora=False),
        DialectInfo(
            "vllm-lora", "LoRA-aware alignment, vLLM calling convention (SPEC §4)",
            "fn(topk_ids, token_lora_mapping, num_experts, block_size, max_loras, "
            "max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids, "
            "num_tokens_post_pad, adapter_enabled, lora_ids, expert_map=None)",
            _vllm_plan, _vllm_reference, lora=True),
        DialectInfo(
            "sglang-lora", "LoRA-aware alignment, SGLang calling convention (SPEC §5)",
            "fn(topk_ids, seg_indptr, req_to_lora, num_experts, block_size, max_loras, "
            "max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids, "
            "num_tokens_post_pad, adapter_enabled, lora_ids, expert_map, cumsum_buffer, "
            "token_mask)",
            _sglang_plan, _sglang_reference, lora=True),
        DialectInfo(
            "ep-remap", "global expert ids to one EP rank's local ids (SPEC §6)",
            "fn(topk_ids, global_num_experts, ep_size, ep_rank, strategy, local_topk_ids)",
            _remap_plan, _remap_reference, lora=False),
    )
}
