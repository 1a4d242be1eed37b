"""Exact NumPy reference for MoE block-alignment kernels (SPEC §2–§7).

Public names live here; the steps live in ``_align`` (SPEC §3), ``_lora``
(§4, §5), ``_sglang`` (SGLang's plain align) and :mod:`oracle.ep` (§6);
argument checks in ``_validate``.
NumPy only — nothing under ``oracle/`` imports torch.

The oracle is *stable*: inside each expert segment, route indices ascend.
Bad arguments raise :class:`OracleError`, which is also a ``ValueError``
(a bad value) or a ``TypeError`` (a bad type), with a one-line message
naming the argument, its value and what is allowed.
"""

from __future__ import annotations

from . import ep
from ._align import Alignment, align, padded_size
from ._lora import LoraAlignment, active_lora_ids, lora_align, sglang_token_lora_mapping
from ._sglang import sglang_align, sglang_padded_size
from ._validate import OracleError

__all__ = [
    "Alignment",
    "LoraAlignment",
    "OracleError",
    "active_lora_ids",
    "align",
    "ep",
    "lora_align",
    "padded_size",
    "sglang_align",
    "sglang_padded_size",
    "sglang_token_lora_mapping",
]
