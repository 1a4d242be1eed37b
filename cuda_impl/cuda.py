"""The project's CUDA kernels (``csrc/moe_align.cu``) behind the five dialects.

The kernels are plain CUDA C++ with an ``extern "C"`` host API; this module
JIT-builds them with nvcc (``cuda_impl._build``, cached on disk), binds them
with ctypes and exposes DESIGN.md's calling conventions. Tensors must be on a
CUDA device; outputs are written in place, asynchronously, on the current
stream of that device::

    fns = implementation()                      # builds (or reuses) the library
    fns["align"](topk_ids, 8, 4, sorted_token_ids, expert_ids, num_tokens_post_pad)
    implementation("odd-block-resets-count")    # {"vllm-lora": ..., "sglang-lora": ...}

Paths: a batch with ``N <= SMALL_PATH_MAX_ROUTES`` routes and ``E <=
SMALL_PATH_MAX_EXPERTS`` experts runs one kernel with per-slot histograms in
shared memory; anything larger runs count → scan/fill → scatter kernels with
global atomics and grid-stride loops. ``E`` above ``MAX_EXPERTS`` raises
``ValueError``. Inside an expert segment the route order comes from atomics
(``STABLE = False``).

What can go wrong: a bad argument raises ``ValueError`` / ``TypeError`` naming
it; a CUDA launch error raises ``RuntimeError`` with CUDA's message; a failed
build raises ``cuda_impl._build.CudaBuildError`` (a ``RuntimeError``). A
``max_num_tokens_padded`` too small for the data is not detected (the kernels
only never write past the row). Importing this module needs neither a GPU nor
nvcc; nothing is built before ``implementation()`` or ``build()``.
"""

from __future__ import annotations

import ctypes
import functools
import operator
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from cuda_impl import _build, _variants, declared
from cuda_impl.declared import MAX_EXPERTS, SMALL_PATH_MAX_EXPERTS, SMALL_PATH_MAX_ROUTES
from cuda_impl.faults import DIALECTS, FAULTS

__all__ = [
    "BACKEND",
    "FAULT_NAMES",
    "MAX_EXPERTS",
    "SMALL_PATH_MAX_EXPERTS",
    "SMALL_PATH_MAX_ROUTES",
    "STABLE",
    "align",
    "available",
    "build",
    "describe",
    "difftest_limits",
    "ep_remap",
    "implementation",
    "load_library",
    "sglang_align",
    "sglang_lora",
    "uses_small_path",
    "vllm_lora",
]

BACKEND = "cuda"

STABLE = declared.STABLE[BACKEND]
"""Routes inside an expert segment are in atomic (unspecified) order, not ascending."""

difftest_limits = declared.LIMITS[BACKEND]
"""The input domain the kernels declare to difftest (``difftest.limits``)."""

FAULT_NAMES: tuple[str, ...] = tuple(
    name for name, fault in FAULTS.items() if BACKEND in fault.backends
)
"""The faults this backend can switch on (one build of the library each)."""

_INT32_MAX = 2**31 - 1
_MODES = {"align": 0, "vllm-lora": 1, "sglang-lora": 2, "sglang-align": 3}
_OPT_PAD, _OPT_IGNORE_INVALID = 1, 2  # moe_config.cuh's kOptPad, kOptIgnoreInvalid
_LORA_MODES = ("vllm-lora", "sglang-lora")
_STRATEGIES = {"linear": 0, "round_robin": 1}


def available() -> bool:
    """True when torch sees a CUDA device and nvcc can be found (nothing is built)."""
    return torch.cuda.is_available() and _build.find_nvcc() is not None


def uses_small_path(num_routes: int, num_experts: int) -> bool:
    """Whether ``num_routes`` routes over ``num_experts`` experts take the small path."""
    return num_routes <= SMALL_PATH_MAX_ROUTES and num_experts <= SMALL_PATH_MAX_EXPERTS


def describe() -> str:
    """One paragraph for ``difftest list``."""
    return (
        f"cuda: the project's CUDA kernels (JIT-built with nvcc, CUDA tensors only), "
        f"atomic segment order; small path up to N={SMALL_PATH_MAX_ROUTES} routes and "
        f"E={SMALL_PATH_MAX_EXPERTS} experts, at most E={MAX_EXPERTS}; dialects: "
        f"{', '.join(DIALECTS)}; faults: {', '.join(FAULT_NAMES)}"
    )


def build(fault: str | None = None) -> Path:
    """Path of the library of ``fault``'s build (``None``: correct), compiled if need be."""
    _dialects_of(fault)
    return _build.build_library(defines=_variants.defines_for(fault))


def implementation(fault: str | None = None) -> dict[str, Callable[..., None]]:
    """``{dialect: callable}`` following DESIGN.md's calling conventions.

    Without ``fault``: every dialect, correct. With a fault name: only the
    dialects that fault affects, each running the faulty build. Builds and
    loads the library now, so a build error surfaces here. A fault this backend
    does not ship (unknown, or torch-only) raises ``ValueError``.
    """
    dialects = _dialects_of(fault)
    _library(fault)
    callables: dict[str, Callable[..., None]] = {
        "align": align,
        "vllm-lora": vllm_lora,
        "sglang-lora": sglang_lora,
        "ep-remap": ep_remap,
        "sglang-align": sglang_align,
    }
    if fault is None:
        return {dialect: callables[dialect] for dialect in dialects}
    return {dialect: functools.partial(callables[dialect], fault=fault) for dialect in dialects}


# ---- the dialects ---------------------------------------------------------------


def align(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_pad: torch.Tensor,
    expert_map: torch.Tensor | None = None,
    *,
    fault: str | None = None,
) -> None:
    """SPEC §3 into the whole of ``sorted_token_ids`` [P] and ``expert_ids`` [M]."""
    device = _device_of(topk_ids)
    _launch_align(
        fault,
        "align",
        device,
        topk_ids,
        num_experts,
        block_size,
        expert_map,
        max_loras=1,
        max_num_tokens_padded=_output("sorted_token_ids", sorted_token_ids, device, 0).numel(),
        max_num_m_blocks=_output("expert_ids", expert_ids, device, 0).numel(),
        sorted_token_ids=sorted_token_ids,
        expert_ids=expert_ids,
        num_tokens_post_pad=num_tokens_post_pad,
    )


def sglang_align(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    sorted_token_ids: torch.Tensor,
    experts_ids: torch.Tensor,
    num_tokens_post_pad: torch.Tensor,
    cumsum_buffer: torch.Tensor,
    pad_sorted_token_ids: bool = False,
    ignore_invalid_expert: bool = False,
    *,
    fault: str | None = None,
) -> None:
    """SGLang's plain align: ``num_experts`` is its bucket count ``E + 1`` (bucket 0 the
    ``-1`` routes, expert id -1). ``expert_ids`` blocks from the total on, and without
    ``pad_sorted_token_ids`` every position holding no route, are left as they were; the
    work buffer ``cumsum_buffer`` is not used."""
    del cumsum_buffer
    for name, flag in (("pad_sorted_token_ids", pad_sorted_token_ids),
                       ("ignore_invalid_expert", ignore_invalid_expert)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}={flag!r}: expected a bool")
    device = _device_of(topk_ids)
    _launch_align(
        fault,
        "sglang-align",
        device,
        topk_ids,
        num_experts,
        block_size,
        None,
        max_loras=1,
        max_num_tokens_padded=_output("sorted_token_ids", sorted_token_ids, device, 0).numel(),
        max_num_m_blocks=_output("expert_ids", experts_ids, device, 0).numel(),
        sorted_token_ids=sorted_token_ids,
        expert_ids=experts_ids,
        num_tokens_post_pad=num_tokens_post_pad,
        options=(_OPT_PAD if pad_sorted_token_ids else 0)
        | (_OPT_IGNORE_INVALID if ignore_invalid_expert else 0),
    )


def vllm_lora(
    topk_ids: torch.Tensor,
    token_lora_mapping: torch.Tensor,
    num_experts: int,
    block_size: int,
    max_loras: int,
    max_num_tokens_padded: int,
    max_num_m_blocks: int,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_pad: torch.Tensor,
    adapter_enabled: torch.Tensor,
    lora_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
    *,
    fault: str | None = None,
) -> None:
    """SPEC §4, vLLM convention: one slot entry per element of ``lora_ids`` (L + 1)."""
    device = _device_of(topk_ids)
    num_tokens = _topk_ids(topk_ids, device).shape[0]
    _launch_align(
        fault,
        "vllm-lora",
        device,
        topk_ids,
        num_experts,
        block_size,
        expert_map,
        token_lora_mapping=_input("token_lora_mapping", token_lora_mapping, device, num_tokens),
        lora_ids=_input("lora_ids", lora_ids, device),
        adapter_enabled=adapter_enabled,
        max_loras=max_loras,
        max_num_tokens_padded=max_num_tokens_padded,
        max_num_m_blocks=max_num_m_blocks,
        sorted_token_ids=sorted_token_ids,
        expert_ids=expert_ids,
        num_tokens_post_pad=num_tokens_post_pad,
    )


def sglang_lora(
    topk_ids: torch.Tensor,
    seg_indptr: torch.Tensor,
    req_to_lora: torch.Tensor,
    num_experts: int,
    block_size: int,
    max_loras: int,
    max_num_tokens_padded: int,
    max_num_m_blocks: int,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_pad: torch.Tensor,
    adapter_enabled: torch.Tensor,
    lora_ids: torch.Tensor,
    expert_map: torch.Tensor | None,
    cumsum_buffer: torch.Tensor,
    token_mask: torch.Tensor,
    *,
    fault: str | None = None,
) -> None:
    """SPEC §5, SGLang convention: tokens map to slots through requests (``seg_indptr``
    ascending). The work buffers ``cumsum_buffer`` and ``token_mask`` are not used (the
    kernels bring their own workspace) and are left as they were."""
    del cumsum_buffer, token_mask
    device = _device_of(topk_ids)
    seg_indptr = _input("seg_indptr", seg_indptr, device)
    num_requests = max(seg_indptr.numel() - 1, 0)
    _launch_align(
        fault,
        "sglang-lora",
        device,
        topk_ids,
        num_experts,
        block_size,
        expert_map,
        seg_indptr=seg_indptr,
        req_to_lora=_input("req_to_lora", req_to_lora, device, num_requests),
        num_requests=num_requests,
        lora_ids=_input("lora_ids", lora_ids, device),
        adapter_enabled=adapter_enabled,
        max_loras=max_loras,
        max_num_tokens_padded=max_num_tokens_padded,
        max_num_m_blocks=max_num_m_blocks,
        sorted_token_ids=sorted_token_ids,
        expert_ids=expert_ids,
        num_tokens_post_pad=num_tokens_post_pad,
    )


def ep_remap(
    topk_ids: torch.Tensor,
    global_num_experts: int,
    ep_size: int,
    ep_rank: int,
    strategy: str,
    local_topk_ids: torch.Tensor,
    *,
    fault: str | None = None,
) -> None:
    """SPEC §6: ``local_topk_ids`` (shape and dtype of ``topk_ids``) gets each route's
    local id on rank ``ep_rank``, or -1."""
    device = _device_of(topk_ids)
    topk_ids = _topk_ids(topk_ids, device)
    num_global = _int_arg("global_num_experts", global_num_experts, 1)
    ranks = _int_arg("ep_size", ep_size, 1)
    rank = _int_arg("ep_rank", ep_rank, 0)
    if rank >= ranks:
        raise ValueError(f"ep_rank={ep_rank!r}: must be in [0, ep_size={ranks})")
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: must be one of {', '.join(_STRATEGIES)}")
    if not isinstance(local_topk_ids, torch.Tensor):
        raise TypeError(
            f"local_topk_ids: expected a torch.Tensor, got {type(local_topk_ids).__name__}"
        )
    if local_topk_ids.shape != topk_ids.shape or local_topk_ids.dtype != topk_ids.dtype:
        raise ValueError(
            f"local_topk_ids: shape {tuple(local_topk_ids.shape)} dtype {local_topk_ids.dtype} "
            f"must match topk_ids ({tuple(topk_ids.shape)}, {topk_ids.dtype})"
        )
    _same_device("local_topk_ids", local_topk_ids, device)
    if not local_topk_ids.is_contiguous():
        raise ValueError("local_topk_ids: must be contiguous (it is written in place)")
    lib = _library(fault)
    is_int64 = int(topk_ids.dtype == torch.int64)
    with torch.cuda.device(device):
        status = lib.moe_ep_remap_launch(
            topk_ids.data_ptr(),
            is_int64,
            local_topk_ids.data_ptr(),
            is_int64,
            topk_ids.numel(),
            num_global,
            ranks,
            rank,
            _STRATEGIES[strategy],
            device.index,
            torch.cuda.current_stream(device).cuda_stream,
        )
    _check_status(lib, status, "ep-remap")


# ---- argument handling and the launch ---------------------------------------------


def _launch_align(
    fault: str | None,
    dialect: str,
    device: torch.device,
    topk_ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    expert_map: torch.Tensor | None,
    *,
    token_lora_mapping: torch.Tensor | None = None,
    seg_indptr: torch.Tensor | None = None,
    req_to_lora: torch.Tensor | None = None,
    num_requests: int = 0,
    lora_ids: torch.Tensor | None = None,
    adapter_enabled: torch.Tensor | None = None,
    max_loras: int,
    max_num_tokens_padded: int,
    max_num_m_blocks: int,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_pad: torch.Tensor,
    options: int = _OPT_PAD,
) -> None:
    topk_ids = _topk_ids(topk_ids, device)
    num_tokens, topk = topk_ids.shape
    E = _int_arg("num_experts", num_experts, 1)
    if E > MAX_EXPERTS:
        raise ValueError(
            f"num_experts={num_experts!r}: the CUDA kernels take at most "
            f"MAX_EXPERTS={MAX_EXPERTS} experts (one per thread of the scan block)"
        )
    B = _int_arg("block_size", block_size, 1)
    L = _int_arg("max_loras", max_loras, 1)
    P = _int_arg("max_num_tokens_padded", max_num_tokens_padded, 0)
    M = _int_arg("max_num_m_blocks", max_num_m_blocks, 0)
    N = num_tokens * topk
    if N > _INT32_MAX:
        raise ValueError(f"topk_ids.numel()={N}: at most 2**31 - 1 routes (int32 route indices)")
    if expert_map is not None:
        expert_map = _input("expert_map", expert_map, device, E)
    if dialect in _LORA_MODES:
        adapter_enabled = _input("adapter_enabled", adapter_enabled, device, L)
    _output("sorted_token_ids", sorted_token_ids, device, L * P)
    _output("expert_ids", expert_ids, device, L * M)
    _output("num_tokens_post_pad", num_tokens_post_pad, device, L)
    num_lora_ids = 1 if lora_ids is None else lora_ids.numel()

    lib = _library(fault)
    workspace_bytes = lib.moe_align_workspace_bytes(N, E, num_lora_ids, L)
    workspace = (
        torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        if workspace_bytes > 0
        else None
    )
    args = {
        "mode": _MODES[dialect],
        "options": options,
        "topk_ids": topk_ids.data_ptr(),
        "ids_int64": int(topk_ids.dtype == torch.int64),
        "num_tokens": num_tokens,
        "topk": topk,
        "num_experts": E,
        "block_size": B,
        "expert_map": _pointer(expert_map),
        "token_lora_mapping": _pointer(token_lora_mapping),
        "seg_indptr": _pointer(seg_indptr),
        "req_to_lora": _pointer(req_to_lora),
        "num_requests": num_requests,
        "lora_ids": _pointer(lora_ids),
        "num_lora_ids": num_lora_ids,
        "adapter_enabled": _pointer(adapter_enabled),
        "num_adapter_enabled": 0 if adapter_enabled is None else adapter_enabled.numel(),
        "max_loras": L,
        "max_num_tokens_padded": P,
        "max_num_m_blocks": M,
        "sorted_token_ids": sorted_token_ids.data_ptr(),
        "expert_ids": expert_ids.data_ptr(),
        "num_tokens_post_pad": num_tokens_post_pad.data_ptr(),
        "workspace": _pointer(workspace),
        "workspace_bytes": workspace_bytes,
        "device": device.index,
        "stream": torch.cuda.current_stream(device).cuda_stream,
    }
    with torch.cuda.device(device):
        status = lib.moe_align_launch(*(args[name] for name, _ in _LAUNCH_SIGNATURE))
    _check_status(lib, status, dialect)


def _device_of(topk_ids: object) -> torch.device:
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"topk_ids: expected a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.device.type != "cuda":
        raise ValueError(
            f"topk_ids.device={topk_ids.device}: the CUDA backend needs CUDA tensors"
        )
    return topk_ids.device


def _same_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name}.device={tensor.device}: must be {device}, like topk_ids")


def _topk_ids(topk_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids.shape={tuple(topk_ids.shape)}: must be [T, K]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids.dtype={topk_ids.dtype}: must be torch.int32 or torch.int64")
    _same_device("topk_ids", topk_ids, device)
    return topk_ids.contiguous()


def _input(name: str, tensor: object, device: torch.device, min_numel: int = 0) -> torch.Tensor:
    """An int32 input as the kernels read it: contiguous int32 (a converted copy if need be)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"{name}.dtype={tensor.dtype}: must be an integer dtype (int32)")
    _same_device(name, tensor, device)
    if tensor.numel() < min_numel:
        raise ValueError(f"{name}.numel()={tensor.numel()}: must be at least {min_numel}")
    return tensor.to(torch.int32).contiguous()


def _output(name: str, tensor: object, device: torch.device, min_numel: int) -> torch.Tensor:
    """An output the kernels write in place: contiguous int32 with at least ``min_numel``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.int32:
        raise ValueError(f"{name}.dtype={tensor.dtype}: must be torch.int32")
    _same_device(name, tensor, device)
    if not tensor.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (it is written in place)")
    if tensor.numel() < min_numel:
        raise ValueError(f"{name}.numel()={tensor.numel()}: must be at least {min_numel}")
    return tensor


def _int_arg(name: str, value: object, minimum: int) -> int:
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name}={value!r}: expected an int") from None
    if number < minimum:
        raise ValueError(f"{name}={value!r}: must be >= {minimum}")
    return number


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _dialects_of(fault: str | None) -> tuple[str, ...]:
    if fault is None:
        return DIALECTS
    if fault not in FAULT_NAMES:
        known = "unknown fault" if fault not in FAULTS else "a fault the CUDA backend lacks"
        raise ValueError(
            f"fault={fault!r}: {known}; the CUDA backend has {', '.join(FAULT_NAMES)}"
        )
    return FAULTS[fault].dialects


# ---- the library ------------------------------------------------------------------

_c_int, _c_int64, _c_void_p = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p

_LAUNCH_SIGNATURE: tuple[tuple[str, type], ...] = (
    ("mode", _c_int),
    ("options", _c_int),
    ("topk_ids", _c_void_p),
    ("ids_int64", _c_int),
    ("num_tokens", _c_int64),
    ("topk", _c_int64),
    ("num_experts", _c_int64),
    ("block_size", _c_int64),
    ("expert_map", _c_void_p),
    ("token_lora_mapping", _c_void_p),
    ("seg_indptr", _c_void_p),
    ("req_to_lora", _c_void_p),
    ("num_requests", _c_int64),
    ("lora_ids", _c_void_p),
    ("num_lora_ids", _c_int64),
    ("adapter_enabled", _c_void_p),
    ("num_adapter_enabled", _c_int64),
    ("max_loras", _c_int64),
    ("max_num_tokens_padded", _c_int64),
    ("max_num_m_blocks", _c_int64),
    ("sorted_token_ids", _c_void_p),
    ("expert_ids", _c_void_p),
    ("num_tokens_post_pad", _c_void_p),
    ("workspace", _c_void_p),
    ("workspace_bytes", _c_int64),
    ("device", _c_int),
    ("stream", _c_void_p),
)
"""Parameters of ``moe_align_launch`` in moe_align.cu, in order."""

_LIBRARIES: dict[str | None, ctypes.CDLL] = {}
_LIBRARIES_LOCK = threading.Lock()


def _library(fault: str | None) -> ctypes.CDLL:
    """The loaded library of ``fault``'s build, built on first use (once per process)."""
    with _LIBRARIES_LOCK:
        lib = _LIBRARIES.get(fault)
        if lib is None:
            lib = load_library(build(fault), fault)
            _LIBRARIES[fault] = lib
    return lib


def load_library(path: Path | str, fault: str | None = None) -> ctypes.CDLL:
    """Loads a built library, declares its entry points and checks that its limits and
    its fault switch are the ones this module expects (``RuntimeError`` otherwise)."""
    lib = ctypes.CDLL(str(path))
    lib.moe_align_limits.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    lib.moe_align_limits.restype = None
    lib.moe_align_fault.argtypes = []
    lib.moe_align_fault.restype = ctypes.c_char_p
    lib.moe_align_uses_small_path.argtypes = [_c_int64, _c_int64]
    lib.moe_align_uses_small_path.restype = _c_int
    lib.moe_align_workspace_bytes.argtypes = [_c_int64, _c_int64, _c_int64, _c_int64]
    lib.moe_align_workspace_bytes.restype = _c_int64
    lib.moe_align_status_string.argtypes = [_c_int]
    lib.moe_align_status_string.restype = ctypes.c_char_p
    lib.moe_align_launch.argtypes = [ctype for _, ctype in _LAUNCH_SIGNATURE]
    lib.moe_align_launch.restype = _c_int
    lib.moe_ep_remap_launch.argtypes = [
        _c_void_p, _c_int, _c_void_p, _c_int, _c_int64, _c_int64, _c_int64, _c_int64,
        _c_int, _c_int, _c_void_p,
    ]  # fmt: skip
    lib.moe_ep_remap_launch.restype = _c_int

    limits = (ctypes.c_int64 * 3)()
    lib.moe_align_limits(limits)
    expected = (SMALL_PATH_MAX_ROUTES, SMALL_PATH_MAX_EXPERTS, MAX_EXPERTS)
    if tuple(limits) != expected:
        raise RuntimeError(
            f"{path}: kernel limits {tuple(limits)} differ from cuda.py's {expected} "
            "(SMALL_PATH_MAX_ROUTES, SMALL_PATH_MAX_EXPERTS, MAX_EXPERTS)"
        )
    built_fault = lib.moe_align_fault().decode() or None
    if built_fault != fault:
        raise RuntimeError(f"{path}: built with fault {built_fault!r}, expected {fault!r}")
    return lib


def _check_status(lib: ctypes.CDLL, status: int, dialect: str) -> None:
    if status == 0:
        return
    message = lib.moe_align_status_string(status).decode()
    if status < 0:
        raise ValueError(f"{dialect}: {message}")
    raise RuntimeError(f"{dialect}: CUDA error {status}: {message}")
