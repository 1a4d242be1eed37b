"""One flag per step a fault breaks; the correct implementation is all defaults."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Switches:
    """Where the torch backend departs from SPEC, one field per fault of SPEC §10."""

    grid_covers_all_lora_ids: bool = True
    """vLLM launch covers every entry of lora_ids (L + 1), not only the first L."""
    scatter_checks_enabled: bool = True
    """The scatter pass (pad fill and route scatter) skips disabled slots too."""
    slot_upper_guard: bool = True
    """A slot is processed only when ``l < L`` (not merely ``l >= 0``)."""
    drop_negative_experts: bool = True
    """A route with a negative expert id is dropped (not merely one with ``g >= E``)."""
    inactive_block_id: int = -1
    """What ``expert_ids`` holds for blocks from ``total / B`` on."""
    ep_owns_remainder: bool = True
    """EP placement hands the ``G % R`` remainder experts to the first ranks."""
    pad_fill_stops_at_end: bool = True
    """SGLang align's pad fill stops at P (not at the end of its last 4-int vector)."""


CORRECT = Switches()

_FAULTY: dict[str, Switches] = {
    "grid-skips-last-slot": replace(CORRECT, grid_covers_all_lora_ids=False),
    "sort-ignores-disabled": replace(CORRECT, scatter_checks_enabled=False),
    "no-slot-upper-guard": replace(CORRECT, slot_upper_guard=False),
    "negative-expert-kept": replace(CORRECT, drop_negative_experts=False),
    "inactive-blocks-zero": replace(CORRECT, inactive_block_id=0),
    "uneven-ep-truncates": replace(CORRECT, ep_owns_remainder=False),
    "vector-tail-overrun": replace(CORRECT, pad_fill_stops_at_end=False),
}
"""The faults the torch backend can reproduce (every fault of ``FAULTS`` listing "torch")."""


def for_fault(fault: str | None) -> Switches:
    """The switches of ``fault`` (``None``: the correct implementation); KeyError if unknown."""
    return CORRECT if fault is None else _FAULTY[fault]
