"""Adapters to the engines our users run: ``vllm`` and ``sglang``.

Each adapter points a dialect at the engine's installed op; the ops already
follow DESIGN.md's calling conventions (which were taken from them), so an
adapter is a lookup, not a wrapper — except where an op's signature changed
between versions (SGLang's plain align, :data:`_CALL_WRAPPERS`). Names
register only when the engine is importable; asking for an absent one is a
usage error that says what to install. The lookups go through :data:`SOURCES`,
which tests replace with fakes of the same signature to pin the conventions.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Any, Callable

from .errors import ImplementationError

# engine -> dialect -> candidate (module, attribute) pairs, first importable wins
SOURCES: dict[str, dict[str, list[tuple[str, str]]]] = {
    "vllm": {
        "vllm-lora": [("vllm._custom_ops", "moe_lora_align_block_size")],
        "align": [("vllm._custom_ops", "moe_align_block_size")],
    },
    "sglang": {
        "sglang-lora": [("sglang.jit_kernel.moe_lora_align", "moe_lora_align_block_size"),
                        ("sgl_kernel", "moe_lora_align_block_size")],
        "sglang-align": [("sgl_kernel", "moe_align_block_size"),
                         ("sglang.jit_kernel.moe_align", "moe_align_block_size")],
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
    tops = {module.split(".")[0] for candidates in SOURCES[engine].values()
            for module, _ in candidates}
    for top in sorted(tops):
        try:
            if importlib.util.find_spec(top) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def _lookup(engine: str, dialect: str) -> Callable[..., Any] | None:
    for module_name, attr in SOURCES[engine][dialect]:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        fn = getattr(module, attr, None)
        if callable(fn):
            return fn
    return None


def load(engine: str) -> dict[str, Callable[..., Any]]:
    """The engine's ops by dialect (only those present in the installed version)."""
    ops = {d: fn for d in SOURCES[engine] if (fn := _lookup(engine, d)) is not None}
    for dialect, fn in ops.items():
        wrap = _CALL_WRAPPERS.get((engine, dialect))
        if wrap is not None:
            ops[dialect] = wrap(fn)
    if not ops:
        raise ImplementationError(
            f"--impl {engine}: {engine} is installed but has none of "
            f"{[f'{m}.{a}' for c in SOURCES[engine].values() for m, a in c]}")
    return ops


def implementation(engine: str) -> Any:
    from .registry import Implementation

    if not importable(engine):
        raise ImplementationError(
            f"--impl {engine}: the {engine} package is not importable here; install it "
            f"({_INSTALL_HINT[engine]}) or choose another implementation (see `difftest list`)")
    dialects = tuple(load(engine))
    return Implementation(engine, engine, dialects, ("cuda",), stable=False,
                          summary=f"the installed {engine} ops")
