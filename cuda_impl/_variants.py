"""The compile-time variants of the CUDA library: which defines switch each fault on.

Every fault of SPEC §10 that the CUDA backend ships is the same source
(``csrc/moe_align.cu``) built with one ``MOE_FAULT_*`` switch of
``csrc/moe_config.cuh`` set; the correct build sets none. Standard library
only: ``scripts/check-cuda`` loads this file by path, without torch.

>>> defines_for("inactive-blocks-zero")
('MOE_FAULT_INACTIVE_BLOCKS_ZERO=1',)
"""

from __future__ import annotations

FAULT_DEFINES: dict[str, tuple[str, ...]] = {
    "grid-skips-last-slot": ("MOE_FAULT_GRID_SKIPS_LAST_SLOT=1",),
    "sort-ignores-disabled": ("MOE_FAULT_SORT_IGNORES_DISABLED=1",),
    "no-slot-upper-guard": ("MOE_FAULT_NO_SLOT_UPPER_GUARD=1",),
    "negative-expert-kept": ("MOE_FAULT_NEGATIVE_EXPERT_KEPT=1",),
    "inactive-blocks-zero": ("MOE_FAULT_INACTIVE_BLOCKS_ZERO=1",),
    "uneven-ep-truncates": ("MOE_FAULT_UNEVEN_EP_TRUNCATES=1",),
    "odd-block-resets-count": ("MOE_FAULT_ODD_BLOCK_RESETS_COUNT=1",),
    "vector-tail-overrun": ("MOE_FAULT_VECTOR_TAIL_OVERRUN=1",),
    "zero-grid-launch": ("MOE_FAULT_ZERO_GRID_LAUNCH=1",),
}
"""Fault name → preprocessor defines (``NAME=VALUE``, no ``-D``) of its build."""


def defines_for(fault: str | None) -> tuple[str, ...]:
    """The defines of ``fault``'s build (``None``: the correct build, no defines).

    Raises ``ValueError`` for a fault the CUDA backend does not ship.
    """
    if fault is None:
        return ()
    try:
        return FAULT_DEFINES[fault]
    except KeyError:
        raise ValueError(
            f"fault={fault!r}: the CUDA backend has no such variant; "
            f"it has {', '.join(FAULT_DEFINES)}"
        ) from None


def variants() -> dict[str, tuple[str, ...]]:
    """Every build of the library, ``{"default": (), fault: defines, ...}``."""
    return {"default": (), **FAULT_DEFINES}


def compile_flag_sets() -> list[str]:
    """nvcc flags of every build, one comma-joined string each (``""`` for the default).

    >>> compile_flag_sets()[:2]
    ['', '-DMOE_FAULT_GRID_SKIPS_LAST_SLOT=1']
    """
    return [",".join(f"-D{define}" for define in defines) for defines in variants().values()]
