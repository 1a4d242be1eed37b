"""Argument checks of the torch backend: ValueError/TypeError naming ``name=value``."""

from __future__ import annotations

import operator

import torch

ID_DTYPES = (torch.int32, torch.int64)


def check_int(name: str, value: object) -> int:
    """``value`` as a Python int (numpy and 0-d integer tensors allowed)."""
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: must be an int")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}={value!r}: must be an int") from None


def check_positive(name: str, value: object) -> int:
    number = check_int(name, value)
    if number <= 0:
        raise ValueError(f"{name}={value!r}: must be a positive int")
    return number


def check_non_negative(name: str, value: object) -> int:
    number = check_int(name, value)
    if number < 0:
        raise ValueError(f"{name}={value!r}: must be a non-negative int")
    return number


def check_topk_ids(topk_ids: torch.Tensor) -> None:
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"topk_ids: expected a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids.shape={tuple(topk_ids.shape)}: must be [T, K]")
    if topk_ids.dtype not in ID_DTYPES:
        raise TypeError(f"topk_ids.dtype={topk_ids.dtype}: must be torch.int32 or torch.int64")


def check_ids(name: str, t: torch.Tensor, min_numel: int = 0) -> None:
    """An integer input array (token_lora_mapping, lora_ids, adapter_enabled, ...)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in ID_DTYPES:
        raise TypeError(f"{name}.dtype={t.dtype}: must be torch.int32 or torch.int64")
    if t.numel() < min_numel:
        raise ValueError(f"{name}.numel()={t.numel()}: must be at least {min_numel}")


def check_output(name: str, t: torch.Tensor, numel: int) -> None:
    """An int32 output written in place, addressed row by row through its storage."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name}.dtype={t.dtype}: must be torch.int32")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (rows are addressed by storage offset)")
    if t.numel() < numel:
        raise ValueError(f"{name}.numel()={t.numel()}: must be at least {numel}")


def check_expert_map(expert_map: torch.Tensor | None, num_experts: int) -> None:
    if expert_map is None:
        return
    check_ids("expert_map", expert_map, num_experts)
    if expert_map.numel() != num_experts:
        raise ValueError(
            f"expert_map.numel()={expert_map.numel()}: must equal num_experts={num_experts}"
        )
    if bool(((expert_map < -1) | (expert_map >= num_experts)).any()):
        raise ValueError(f"expert_map: entries must be in [-1, num_experts={num_experts})")
