"""The switchable faults of SPEC §10: one record per fault, shared by every backend.

Each fault reproduces one real bug class of the align kernels, so the
framework can prove that it catches it. A backend builds its faulty variant
by flipping exactly the step the bug lives in; this module only says which
faults exist, what they break, and where they can be switched on.
"""

from __future__ import annotations

from dataclasses import dataclass

DIALECTS: tuple[str, ...] = ("align", "vllm-lora", "sglang-lora", "ep-remap", "sglang-align")
"""The calling conventions under test (DESIGN.md, "Implementations under test")."""

BACKENDS: tuple[str, ...] = ("torch", "cuda")


@dataclass(frozen=True)
class Fault:
    """One switchable fault.

    ``name`` is what follows ``torch:`` / ``cuda:`` on the command line;
    ``summary`` the bug it reproduces in one line; ``dialects`` the calling
    conventions whose output it changes; ``backends`` the implementations
    that ship it.
    """

    name: str
    summary: str
    dialects: tuple[str, ...]
    backends: tuple[str, ...]


_LORA = ("vllm-lora", "sglang-lora")
_ALIGNS = ("align", "vllm-lora", "sglang-lora")

FAULTS: dict[str, Fault] = {
    fault.name: fault
    for fault in (
        Fault(
            "grid-skips-last-slot",
            "the launch covers L entries of lora_ids, not L + 1: a real slot at lora_ids[L] "
            "is never written",
            ("vllm-lora",),
            BACKENDS,
        ),
        Fault(
            "sort-ignores-disabled",
            "the scatter pass does not check adapter_enabled: a disabled slot's "
            "sorted_token_ids row is written",
            _LORA,
            BACKENDS,
        ),
        Fault(
            "no-slot-upper-guard",
            "a lora_ids value >= L is used as a row index: its row lands past the output",
            _LORA,
            BACKENDS,
        ),
        Fault(
            "negative-expert-kept",
            "a -1 expert id is used as an index: the route is counted for another expert "
            "(sglang-align: ignore_invalid_expert keeps the -1 routes)",
            _ALIGNS + ("sglang-align",),
            BACKENDS,
        ),
        Fault(
            "inactive-blocks-zero",
            "unused expert_ids blocks get 0 instead of -1",
            _ALIGNS,
            BACKENDS,
        ),
        Fault(
            "uneven-ep-truncates",
            "the EP remap gives every rank G // R experts: when G % R != 0 the remainder "
            "belongs to no rank and its routes vanish",
            ("ep-remap",),
            BACKENDS,
        ),
        Fault(
            "vector-tail-overrun",
            "SGLang align's pad fill stores ceil(P / 4) 16-byte vectors: when P % 4 != 0 the "
            "last one writes 1-3 ints past sorted_token_ids",
            ("sglang-align",),
            BACKENDS,
        ),
        Fault(
            "zero-grid-launch",
            "an empty batch (T = 0) on the large path launches a kernel with a zero-block "
            "grid and does not check the launch: the launch error stays pending for the "
            "next CUDA call",
            ("align",),
            ("cuda",),
        ),
        Fault(
            "odd-block-resets-count",
            "a race: the block that fills sorted_token_ids also resets the slot's "
            "num_tokens_post_pad, sometimes after the counting block wrote it",
            _LORA,
            ("cuda",),
        ),
    )
}
