"""Adapters to the engines our users run: ``vllm`` and ``sglang``.

Each adapter points a dialect at the engine's installed function; the
functions follow DESIGN.md's calling conventions (which were taken from
them), so an adapter is a lookup, not a wrapper — except where a function's
signature changed between versions (SGLang's plain align,
:data:`_CALL_WRAPPERS`) — and it calls them positionally. That is only right
while the installed function declares the arguments in the order we pass
them: each :class:`Source` pins the argument names and order of the engine's
Python wrapper, and :func:`load` compares them with the installed function's
signature (or op schema) and refuses a mismatch, naming the first differing
argument (:mod:`difftest.signatures`).
Names register only when the engine is importable; asking for an absent one
is a usage error that says what to install. The lookups go through
:data:`SOURCES`, which tests replace with fakes to pin the conventions.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from . import signatures
from .errors import ImplementationError, LoadError


@dataclass(frozen=True)
class Source:
    """One engine function an adapter can call, and the arguments it declares."""

    module: str
    attr: str
    # the wrapper's argument names in order, as the engine publishes them (which is
    # the order difftest passes its dialect's arguments in)
    params: tuple[str, ...]
    # how many trailing ones older versions lack (a call wrapper leaves them out there)
    newer: int = 0

    @property
    def where(self) -> str:
        return f"{self.module}.{self.attr}"


# vllm/_custom_ops.py (the op schemas in csrc/moe/torch_bindings.cpp name the last
# argument maybe_expert_map; the wrappers call them positionally)
_VLLM_LORA = ("topk_ids", "token_lora_mapping", "num_experts", "block_size", "max_loras",
              "max_num_tokens_padded", "max_num_m_blocks", "sorted_token_ids", "experts_ids",
              "num_tokens_post_pad", "adapter_enabled", "lora_ids", "expert_map")
_VLLM_ALIGN = ("topk_ids", "num_experts", "block_size", "sorted_token_ids", "experts_ids",
               "num_tokens_post_pad", "expert_map")
# python/sglang/jit_kernel/moe_lora_align.py; sgl_kernel's older export is pinned to the
# same names (SGLang's own tests call it with the same positional order)
_SGLANG_LORA = ("topk_ids", "seg_indptr", "req_to_lora", "num_experts", "block_size",
                "max_loras", "max_num_tokens_padded", "max_num_m_blocks", "sorted_token_ids",
                "expert_ids", "num_tokens_post_pad", "adapter_enabled", "lora_ids",
                "maybe_expert_map", "cumsum_buffer", "token_mask")
# sgl-kernel's python/sgl_kernel/moe.py and its op schema (docs/SPEC.md, sglang-align);
# ignore_invalid_expert arrived in 2026
_SGLANG_ALIGN = ("topk_ids", "num_experts", "block_size", "sorted_token_ids", "experts_ids",
                 "num_tokens_post_pad", "cumsum_buffer", "pad_sorted_token_ids",
                 "ignore_invalid_expert")

# engine -> dialect -> candidate sources, the first importable one is called
SOURCES: dict[str, dict[str, list[Source]]] = {
    "vllm": {
        "vllm-lora": [Source("vllm._custom_ops", "moe_lora_align_block_size", _VLLM_LORA)],
        "align": [Source("vllm._custom_ops", "moe_align_block_size", _VLLM_ALIGN)],
    },
    "sglang": {
        "sglang-lora": [
            Source("sglang.jit_kernel.moe_lora_align", "moe_lora_align_block_size",
                   _SGLANG_LORA),
            Source("sgl_kernel", "moe_lora_align_block_size", _SGLANG_LORA)],
        "sglang-align": [
            Source("sgl_kernel", "moe_align_block_size", _SGLANG_ALIGN, newer=1),
            Source("sglang.jit_kernel.moe_align", "moe_align_block_size", _SGLANG_ALIGN,
                   newer=1)],
    },
}


def _sglang_align_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """SGLang's plain align across its versions (docs/SPEC.md, sglang-align).

    Versions before 2026 have no ``ignore_invalid_expert`` parameter: it is left
    out of the call when false; a case that sets it cannot run on them (ValueError).
    """
    try:
        has_ignore = "ignore_invalid_expert" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # an op without a Python signature: the newest schema
        has_ignore = True

    def call(topk_ids, num_experts, block_size, sorted_token_ids, experts_ids,
             num_tokens_post_pad, cumsum_buffer, pad_sorted_token_ids=False,
             ignore_invalid_expert=False):
        args = [topk_ids, num_experts, block_size, sorted_token_ids, experts_ids,
                num_tokens_post_pad, cumsum_buffer, pad_sorted_token_ids]
        if has_ignore:
            args.append(ignore_invalid_expert)
        elif ignore_invalid_expert:
            raise ValueError("ignore_invalid_expert=True: this sgl_kernel.moe_align_block_size "
                             "has no ignore_invalid_expert parameter (a 2026 addition)")
        fn(*args)

    return call


# (engine, dialect) -> wrapper turning the installed op into the dialect's calling convention
_CALL_WRAPPERS: dict[tuple[str, str], Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    ("sglang", "sglang-align"): _sglang_align_call,
}

_INSTALL_HINT = {"vllm": "pip install vllm", "sglang": "pip install sglang sgl-kernel"}


def importable(engine: str) -> bool:
    """True when a package of one of the engine's sources can be found (none is imported)."""
    tops = {source.module.split(".")[0] for candidates in SOURCES[engine].values()
            for source in candidates}
    for top in sorted(tops):
        try:
            if importlib.util.find_spec(top) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def describe(engine: str) -> str:
    """One line for ``difftest list``: what the adapter calls, or what to install."""
    calls = "; ".join(f"{d}: {' or '.join(s.where for s in c)}"
                      for d, c in SOURCES[engine].items())
    if not importable(engine):
        return f"not installed ({_INSTALL_HINT[engine]}); calls {calls}"
    return f"calls {calls}"


def _lookup(engine: str, dialect: str) -> Callable[..., Any] | None:
    for source in SOURCES[engine][dialect]:
        try:
            module = importlib.import_module(source.module)
        except ImportError:
            continue
        fn = getattr(module, source.attr, None)
        if callable(fn):
            signatures.check_arguments(fn, dialect, engine, pinned=source.params,
                                       newer=source.newer, source=source.where)
            wrap = _CALL_WRAPPERS.get((engine, dialect))
            return fn if wrap is None else wrap(fn)
    return None


def load(engine: str, dialects: Sequence[str] | None = None) -> dict[str, Callable[..., Any]]:
    """The engine's functions by dialect (those present in the installed version).

    ``dialects``: only these (default: every dialect the adapter knows). A
    function whose arguments differ from the pinned ones raises ``LoadError``.
    """
    wanted = [d for d in SOURCES[engine] if dialects is None or d in dialects]
    ops = {d: fn for d in wanted if (fn := _lookup(engine, d)) is not None}
    if not ops:
        raise LoadError(
            f"--impl {engine}: {engine} is installed but has none of "
            f"{[s.where for d in wanted for s in SOURCES[engine][d]]}")
    return ops


def implementation(engine: str, dialect: str | None = None) -> Any:
    """The :class:`~difftest.registry.Implementation` of an installed engine's functions."""
    from .registry import Implementation

    if not importable(engine):
        raise ImplementationError(
            f"--impl {engine}: the {engine} package is not importable here; install it "
            f"({_INSTALL_HINT[engine]}) or choose another implementation (see `difftest list`)")
    dialects = tuple(load(engine, (dialect,) if dialect in SOURCES[engine] else None))
    return Implementation(engine, engine, dialects, ("cuda",), stable=False,
                          summary=f"the installed {engine} ops")
