"""The device-agnostic torch implementation of the five dialects, with its faults.

An independent second implementation of SPEC §3–§6 (it shares no code with
the oracle), written like the kernels it stands for: per launched
``lora_ids`` entry a counting pass (per-expert counts → padded → exclusive
offsets, written as ``num_tokens_post_pad`` and ``expert_ids``) and a scatter
pass (pad fill, then routes into ``sorted_token_ids``). Each fault of
``cuda_impl.FAULTS`` that lists the ``"torch"`` backend flips exactly the
step its real bug lives in. Runs on CPU and CUDA tensors alike; writes its
outputs in place::

    fns = implementation()                      # every dialect, correct
    fns["align"](topk_ids, 8, 4, sorted_token_ids, expert_ids, num_tokens_post_pad)
    implementation("grid-skips-last-slot")      # {"vllm-lora": faulty callable}

Bad arguments raise ``ValueError`` or ``TypeError`` naming the argument; a
``max_num_tokens_padded`` too small for the data raises ``ValueError`` before
anything is written.
"""

from __future__ import annotations

from collections.abc import Callable

from cuda_impl import declared
from cuda_impl._torch import ep, launch, switches
from cuda_impl.faults import DIALECTS, FAULTS

__all__ = ["BACKEND", "FAULT_NAMES", "STABLE", "describe", "implementation"]

BACKEND = "torch"

STABLE = declared.STABLE[BACKEND]
"""Routes inside an expert segment of ``sorted_token_ids`` are in ascending route index."""

FAULT_NAMES: tuple[str, ...] = tuple(
    name for name, fault in FAULTS.items() if BACKEND in fault.backends
)
"""The faults this backend can switch on."""


def implementation(fault: str | None = None) -> dict[str, Callable[..., None]]:
    """``{dialect: callable}`` following DESIGN.md's calling conventions.

    Without ``fault``: every dialect, correct. With a fault name: only the
    dialects that fault affects, each with the fault switched on. A fault this
    backend does not ship (unknown, or CUDA-only) raises ``ValueError``.
    """
    if fault is not None and fault not in FAULT_NAMES:
        known = "unknown fault" if fault not in FAULTS else "a fault the torch backend lacks"
        raise ValueError(
            f"fault={fault!r}: {known}; the torch backend has {', '.join(FAULT_NAMES)}"
        )
    dialects = DIALECTS if fault is None else FAULTS[fault].dialects
    callables = _callables(switches.for_fault(fault))
    return {dialect: callables[dialect] for dialect in dialects}


def describe() -> str:
    """One paragraph for ``difftest list``."""
    return (
        "torch: device-agnostic torch implementation (CPU and CUDA tensors), stable "
        f"segments; dialects: {', '.join(DIALECTS)}; faults: {', '.join(FAULT_NAMES)}"
    )


def _callables(sw: switches.Switches) -> dict[str, Callable[..., None]]:
    """The dialect callables with the switches ``sw`` bound in."""

    def align(
        topk_ids,
        num_experts,
        block_size,
        sorted_token_ids,
        expert_ids,
        num_tokens_post_pad,
        expert_map=None,
    ) -> None:
        launch.align(
            topk_ids,
            num_experts,
            block_size,
            sorted_token_ids,
            expert_ids,
            num_tokens_post_pad,
            expert_map,
            sw,
        )

    def vllm_lora_align(
        topk_ids,
        token_lora_mapping,
        num_experts,
        block_size,
        max_loras,
        max_num_tokens_padded,
        max_num_m_blocks,
        sorted_token_ids,
        expert_ids,
        num_tokens_post_pad,
        adapter_enabled,
        lora_ids,
        expert_map=None,
    ) -> None:
        launch.vllm_lora_align(
            topk_ids,
            token_lora_mapping,
            num_experts,
            block_size,
            max_loras,
            max_num_tokens_padded,
            max_num_m_blocks,
            sorted_token_ids,
            expert_ids,
            num_tokens_post_pad,
            adapter_enabled,
            lora_ids,
            expert_map,
            sw,
        )

    def sglang_lora_align(
        topk_ids,
        seg_indptr,
        req_to_lora,
        num_experts,
        block_size,
        max_loras,
        max_num_tokens_padded,
        max_num_m_blocks,
        sorted_token_ids,
        expert_ids,
        num_tokens_post_pad,
        adapter_enabled,
        lora_ids,
        expert_map,
        cumsum_buffer,
        token_mask,
    ) -> None:
        launch.sglang_lora_align(
            topk_ids,
            seg_indptr,
            req_to_lora,
            num_experts,
            block_size,
            max_loras,
            max_num_tokens_padded,
            max_num_m_blocks,
            sorted_token_ids,
            expert_ids,
            num_tokens_post_pad,
            adapter_enabled,
            lora_ids,
            expert_map,
            sw,
        )

    def ep_remap(topk_ids, global_num_experts, ep_size, ep_rank, strategy, local_topk_ids) -> None:
        ep.remap(topk_ids, global_num_experts, ep_size, ep_rank, strategy, local_topk_ids, sw)

    def sglang_align(
        topk_ids,
        num_experts,
        block_size,
        sorted_token_ids,
        experts_ids,
        num_tokens_post_pad,
        cumsum_buffer,
        pad_sorted_token_ids=False,
        ignore_invalid_expert=False,
    ) -> None:
        """SGLang's plain align; ``cumsum_buffer`` (work buffer) is not needed and left alone."""
        del cumsum_buffer
        launch.sglang_align(
            topk_ids,
            num_experts,
            block_size,
            sorted_token_ids,
            experts_ids,
            num_tokens_post_pad,
            pad_sorted_token_ids,
            ignore_invalid_expert,
            sw,
        )

    return {
        "align": align,
        "vllm-lora": vllm_lora_align,
        "sglang-lora": sglang_lora_align,
        "ep-remap": ep_remap,
        "sglang-align": sglang_align,
    }
