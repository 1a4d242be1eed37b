"""One declarative record per dialect, in the spirit of PyTorch's OpInfo.

A :class:`DialectInfo` says, for one calling convention of DESIGN.md, how to
turn a :class:`~difftest.case.Case` (one rank of it) into the call's inputs,
which output buffers the call writes (and their shapes), how to build the
positional arguments, and what the oracle expects — and every other fact that
differs between dialects (parameter names, the signature head a user's
callable is recognised by, the edge classes cases are built around, the
defensive-only classes and ingredients). Everything here is NumPy; the
execution layer turns inputs into tensors on the device under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import oracle
import oracle.ep

from .case import Case, rank_inputs
from .errors import CaseError

SENTINEL = -559038737  # 0xDEADBEEF as int32: every output is pre-filled with it ("never written")


@dataclass(frozen=True)
class RowsExpected:
    """What the oracle expects of an align-type call, one row per slot.

    Plain ``align`` has a single row that is always written. Positions a call
    must leave alone hold :data:`SENTINEL` (``pad_value`` is then the
    sentinel too: ``sglang-align`` without ``pad_sorted_token_ids``).
    """

    sorted_token_ids: np.ndarray  # int32 [L, P]
    expert_ids: np.ndarray  # int32 [L, M]
    num_tokens_post_pad: np.ndarray  # int32 [L]
    written: np.ndarray  # bool [L]
    pad_value: int
    block_size: int
    # Leading blocks of each expert_ids row whose value is specified, int [L];
    # None: all M. The rest (sglang-align: from total / B on) is not checked.
    checked_blocks: np.ndarray | None = None
    # Leading positions of each sorted_token_ids row whose value is specified,
    # int [L]; None: all P (sglang-align with padding: up to the total).
    checked_positions: np.ndarray | None = None

    def expert_ids_checked(self) -> np.ndarray:
        """bool [L, M]: the ``expert_ids`` entries a comparison checks."""
        L, M = self.expert_ids.shape
        if self.checked_blocks is None:
            return np.ones((L, M), dtype=bool)
        return np.arange(M)[None, :] < np.asarray(self.checked_blocks).reshape(L, 1)

    def sorted_token_ids_checked(self) -> np.ndarray:
        """bool [L, P]: the ``sorted_token_ids`` positions a comparison checks."""
        L, P = self.sorted_token_ids.shape
        if self.checked_positions is None:
            return np.ones((L, P), dtype=bool)
        return np.arange(P)[None, :] < np.asarray(self.checked_positions).reshape(L, 1)

    def active_blocks(self) -> np.ndarray:
        """int [L]: blocks inside the padded segments of each row (0 for unwritten rows)."""
        totals = np.asarray(self.num_tokens_post_pad, dtype=np.int64) // self.block_size
        return np.where(np.asarray(self.written, dtype=bool), totals, 0)


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
    """The record of one dialect: every per-dialect fact lives here."""

    name: str
    # Parameter names of the calling convention, in order (DESIGN.md; for
    # sglang-align, sgl_kernel's own names). Adapters compare installed
    # functions with these; len() is the arity.
    arguments: tuple[str, ...]
    # Defaults the convention gives trailing parameters (for `difftest list`).
    defaults: dict[str, str]
    # The leading parameter names that identify a user's callable as this
    # dialect when --dialect is not given (registry._dialect_of).
    signature_head: tuple[str, ...]
    # Case -> the call's inputs, outputs, scratch and positional arguments.
    plan: Callable[[Case, int | None], CallPlan]
    # Case -> what the oracle expects (RowsExpected / RemapExpected).
    reference: Callable[[Case, int | None], Any]
    # Edge classes a generated case can be built around (strategies' foci).
    edge_focus: tuple[str, ...]
    # Edge classes only defensive inputs have (SPEC §7).
    defensive_only: tuple[str, ...]
    # Defensive ingredients a defensive case gets when no focus is defensive.
    ingredients: tuple[str, ...]
    # -1 routes form a segment of their own at the start of sorted_token_ids
    # (under expert -1): the kernel's num_experts is E + 1 (SGLang's plain align).
    sentinel_segment: bool = False

    @property
    def arity(self) -> int:
        """Number of positional parameters of the calling convention."""
        return len(self.arguments)

    @property
    def signature(self) -> str:
        """The calling convention as one line: ``fn(topk_ids, ..., expert_map=None)``."""
        params = (f"{a}={self.defaults[a]}" if a in self.defaults else a
                  for a in self.arguments)
        return f"fn({', '.join(params)})"


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


# -- sglang-align ----------------------------------------------------------
def _sglang_align_plan(case: Case, rank: int | None) -> CallPlan:
    ri = rank_inputs(case, rank)
    padded, buckets = ri["max_num_tokens_padded"], ri["num_experts"] + 1
    i32 = np.dtype(np.int32)
    # SGLang's caller allocates num_experts + 2 entries (its num_experts is E).
    scratch = {"cumsum_buffer": ((buckets + 1,), i32)}
    args = (TensorArg("topk_ids"), buckets, case.block_size, TensorArg("sorted_token_ids"),
            TensorArg("expert_ids"), TensorArg("num_tokens_post_pad"),
            TensorArg("cumsum_buffer"), case.pad_sorted_token_ids, case.ignore_invalid_expert)
    return CallPlan({"topk_ids": ri["topk_ids"]},
                    _align_outputs(1, padded, _num_m_blocks(padded, case.block_size)),
                    scratch, args)


def _sglang_align_reference(case: Case, rank: int | None) -> RowsExpected:
    ri = rank_inputs(case, rank)
    a = oracle.sglang_align(ri["topk_ids"], ri["num_experts"], case.block_size,
                            max_num_tokens_padded=ri["max_num_tokens_padded"],
                            ignore_invalid_expert=case.ignore_invalid_expert)
    sorted_ids, pad_value = a.sorted_token_ids, case.num_routes
    total = a.num_tokens_post_pad
    # With the flag, the positions past the total are SGLang's to fill or not (its
    # 2025 fill stopped near the total, later ones fill all of P; nothing reads them).
    checked_positions = np.array([total])
    if not case.pad_sorted_token_ids:
        # Without the flag the call writes only the routes' places (the caller prefills).
        sorted_ids = np.where(sorted_ids == pad_value, SENTINEL, sorted_ids).astype(np.int32)
        pad_value, checked_positions = SENTINEL, None
    return RowsExpected(sorted_ids[None, :], a.expert_ids[None, :],
                        np.array([total], dtype=np.int32), np.array([True]), pad_value,
                        case.block_size, np.array([total // case.block_size]),
                        checked_positions)


_COMMON_FOCUS = (
    "block-edges", "int64-ids", "hot-expert", "empty-expert", "duplicate-route",
    "ep-sentinel", "expert-map", "non-divisible-experts", "empty-batch",
    "invalid-expert-id", "loose-padding", "many-experts", "path-boundary", "huge-batch",
)
_LORA_FOCUS = ("full-slots-with-base", "base-only", "disabled-adapter", "slot-out-of-range")
_ALWAYS_DEFENSIVE = ("empty-batch", "invalid-expert-id", "loose-padding")

DIALECT_INFO: dict[str, DialectInfo] = {
    info.name: info
    for info in (
        DialectInfo(
            "align",
            ("topk_ids", "num_experts", "block_size", "sorted_token_ids", "expert_ids",
             "num_tokens_post_pad", "expert_map"),
            {"expert_map": "None"},
            ("topk_ids", "num_experts"),
            _align_plan, _align_reference,
            edge_focus=_COMMON_FOCUS,
            defensive_only=_ALWAYS_DEFENSIVE,
            ingredients=("loose-padding", "invalid-expert-id")),
        DialectInfo(
            "vllm-lora",
            ("topk_ids", "token_lora_mapping", "num_experts", "block_size", "max_loras",
             "max_num_tokens_padded", "max_num_m_blocks", "sorted_token_ids", "expert_ids",
             "num_tokens_post_pad", "adapter_enabled", "lora_ids", "expert_map"),
            {"expert_map": "None"},
            ("topk_ids", "token_lora_mapping"),
            _vllm_plan, _vllm_reference,
            edge_focus=_LORA_FOCUS + _COMMON_FOCUS,
            defensive_only=_ALWAYS_DEFENSIVE + ("disabled-adapter", "slot-out-of-range"),
            ingredients=("loose-padding", "invalid-expert-id", "slot-out-of-range",
                         "disabled-adapter", "lora-layout")),
        DialectInfo(
            "sglang-lora",
            ("topk_ids", "seg_indptr", "req_to_lora", "num_experts", "block_size", "max_loras",
             "max_num_tokens_padded", "max_num_m_blocks", "sorted_token_ids", "expert_ids",
             "num_tokens_post_pad", "adapter_enabled", "lora_ids", "expert_map",
             "cumsum_buffer", "token_mask"),
            {},
            ("topk_ids", "seg_indptr"),
            _sglang_plan, _sglang_reference,
            edge_focus=_LORA_FOCUS + ("request-gap",) + _COMMON_FOCUS,
            # SGLang production has no token without adapter; disabling an unused
            # slot is production, so disabled-adapter is reachable in both contracts.
            defensive_only=_ALWAYS_DEFENSIVE + (
                "slot-out-of-range", "request-gap", "full-slots-with-base", "base-only"),
            ingredients=("loose-padding", "invalid-expert-id", "slot-out-of-range",
                         "disabled-adapter", "request-gap", "unassigned-request")),
        DialectInfo(
            "ep-remap",
            ("topk_ids", "global_num_experts", "ep_size", "ep_rank", "strategy",
             "local_topk_ids"),
            {},
            ("topk_ids", "global_num_experts"),
            _remap_plan, _remap_reference,
            edge_focus=("int64-ids", "hot-expert", "empty-expert", "duplicate-route",
                        "ep-sentinel", "non-divisible-experts", "empty-batch",
                        "invalid-expert-id", "many-experts", "huge-batch"),
            defensive_only=("empty-batch", "invalid-expert-id"),
            ingredients=("invalid-expert-id",)),
        DialectInfo(
            "sglang-align",
            ("topk_ids", "num_experts", "block_size", "sorted_token_ids", "experts_ids",
             "num_tokens_post_pad", "cumsum_buffer", "pad_sorted_token_ids",
             "ignore_invalid_expert"),
            {"pad_sorted_token_ids": "False", "ignore_invalid_expert": "False"},
            ("topk_ids", "num_experts", "block_size", "sorted_token_ids", "experts_ids"),
            _sglang_align_plan, _sglang_align_reference,
            # No expert_map: EP reaches SGLang's align as local ids with -1.
            edge_focus=tuple(c for c in _COMMON_FOCUS if c != "expert-map"),
            defensive_only=_ALWAYS_DEFENSIVE,
            ingredients=("loose-padding", "invalid-expert-id"),
            sentinel_segment=True),
    )
}


def smallest_case(dialect: str) -> Case:
    """The smallest well-formed production case of ``dialect``: one token, one route to
    expert 0, ``B = 1`` (warms up a worker without exercising anything)."""
    from .case import EPGroup

    ids = np.zeros((1, 1), dtype=np.int32)
    if dialect in ("align", "sglang-align"):
        return Case(dialect, "production", ids, 1, 1)
    if dialect == "vllm-lora":
        return Case("vllm-lora", "production", ids, 1, 1, max_loras=1,
                    token_lora_mapping=np.zeros(1, np.int32))
    if dialect == "sglang-lora":
        return Case("sglang-lora", "production", ids, 1, 1, max_loras=1,
                    seg_indptr=np.array([0, 1], np.int32), req_to_lora=np.zeros(1, np.int32))
    if dialect == "ep-remap":
        return Case("ep-remap", "production", ids, 2, 1, ep=EPGroup(2, 2))
    raise CaseError(f"dialect={dialect!r}: must be one of {tuple(DIALECT_INFO)}")
