"""The implementation registry: names on the command line → implementations.

``torch``, ``torch:<fault>``, ``cuda``, ``cuda:<fault>``, ``py:package.module:function``,
``op:NAMESPACE::NAME`` (an op of a compiled library, loaded with ``--load PATH``),
and the engine adapters ``vllm`` and ``sglang`` (when importable). Resolving a
name is cheap and never initialises CUDA: the callables are loaded by
:meth:`Implementation.load` inside the process that runs them (the sandbox
worker), so a name and the library paths are all that cross a process boundary.
A ``py:`` or ``op:`` callable whose signature cannot take its dialect's
arguments is refused while resolving (:mod:`difftest.signatures`).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from cuda_impl import declared

from . import limits as domain
from . import oplib, signatures
from .case import DIALECTS
from .dialects import DIALECT_INFO
from .errors import ImplementationError, LoadError

CUDA_REPEATS = 4  # CUDA runs of one case: a race that loses half the time escapes 1 in 16


@dataclass(frozen=True)
class Implementation:
    """One implementation under test, as the registry describes it."""

    name: str
    kind: str  # torch | cuda | py | op | vllm | sglang
    dialects: tuple[str, ...]
    devices: tuple[str, ...]
    stable: bool
    summary: str
    fault: str | None = None
    target: str | None = None  # "module:function" for py:, "NAMESPACE::NAME" for op:
    libraries: tuple[str, ...] = ()  # --load paths (absolute), loaded before anything else
    #: the declared input domain (difftest.limits): name -> inclusive (min, max)
    limits: dict[str, tuple[int, int]] = field(default_factory=dict, hash=False)

    def with_limits(self, overrides: dict[str, tuple[int, int]] | None) -> Implementation:
        """This implementation with ``overrides`` (``--limit``, ``limits=``) over its
        declared limits."""
        if not overrides:
            return self
        return Implementation(**{**self.__dict__,
                                 "limits": domain.merged(self.limits, overrides)})

    def repeats(self, device: str) -> int:
        """Runs per case: CUDA kernels run repeatedly so a race shows itself."""
        return CUDA_REPEATS if device.startswith("cuda") else 1

    def load(self) -> dict[str, Callable[..., Any]]:
        """The callables, one per dialect. Imports torch; call it in the worker."""
        oplib.load_libraries(self.libraries)
        if self.kind == "torch":
            from cuda_impl import torch_impl

            return torch_impl.implementation(self.fault)
        if self.kind == "cuda":
            from cuda_impl import cuda

            return cuda.implementation(self.fault)
        if self.kind == "py":
            fn = _import_callable(self.target)
            return {d: fn for d in self.dialects}
        if self.kind == "op":
            op = oplib.find_op(self.target, self.libraries)
            return {d: op for d in self.dialects}
        if self.kind in ("vllm", "sglang"):
            from . import adapters

            return adapters.load(self.kind, self.dialects)
        raise ImplementationError(f"impl kind {self.kind!r} cannot be loaded")


def _import_callable(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LoadError(
            f"--impl py:{target}: cannot import module {module_name!r} ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise LoadError(
            f"--impl py:{target}: importing {module_name!r} raised "
            f"{type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise LoadError(
            f"--impl py:{target}: module {module_name!r} has no callable {attr!r}")
    return fn


def dialect_of(fn: Callable[..., Any], name: str) -> str:
    """The dialect ``fn``'s parameter names (signature or op schema) say it follows."""
    params = signatures.positional_names(fn)
    # The dialects whose signature head the parameters start with; among them
    # one of the right arity, the longest head first; else the only dialect of
    # that arity (a callable naming its parameters its own way).
    heads = sorted((info for info in DIALECT_INFO.values()
                    if tuple(params[:len(info.signature_head)]) == info.signature_head),
                   key=lambda info: (info.arity != len(params), -len(info.signature_head)))
    if heads and heads[0].arity == len(params):
        return heads[0].name
    arity = [info.name for info in DIALECT_INFO.values() if info.arity == len(params)]
    if len(arity) == 1:
        return arity[0]
    if heads:
        return heads[0].name
    raise LoadError(
        f"--impl {name}: cannot tell its dialect from its signature ({', '.join(params)}); "
        f"pass --dialect, one of {', '.join(DIALECTS)}")


def faults() -> dict[str, Any]:
    from cuda_impl import FAULTS

    return FAULTS


def names() -> list[str]:
    """Every implementation name this machine can resolve, for ``difftest list``."""
    out = ["torch"] + [f"torch:{f}" for f, v in faults().items() if "torch" in v.backends]
    out += ["cuda"] + [f"cuda:{f}" for f, v in faults().items() if "cuda" in v.backends]
    from . import adapters

    out += [k for k in ("vllm", "sglang") if adapters.importable(k)]
    return out


def resolve(name: str, dialect: str | None = None, load: Sequence[str] = ()) -> Implementation:
    """The :class:`Implementation` called ``name``; ``ImplementationError`` otherwise.

    ``load``: op libraries (``--load``) loaded first, here and wherever the
    implementation is loaded later; what cannot be loaded raises :class:`LoadError`.
    """
    if dialect is not None and dialect not in DIALECTS:
        raise ImplementationError(f"--dialect={dialect!r}: must be one of {', '.join(DIALECTS)}")
    libraries = oplib.library_paths(load)
    oplib.load_libraries(libraries)
    kind, _, rest = name.partition(":")
    if kind in ("torch", "cuda"):
        impl = _resolve_builtin(kind, rest or None, name)
    elif kind == "py":
        if not rest or ":" not in rest:
            raise ImplementationError(
                f"--impl {name!r}: expected py:package.module:function")
        fn = _import_callable(rest)
        found = dialect or dialect_of(fn, name)
        signatures.check_arguments(fn, found, name)
        impl = Implementation(name, "py", (found,), ("cpu", "cuda"),
                              stable=bool(getattr(fn, "difftest_stable", False)),
                              summary=(fn.__doc__ or "user callable").strip().splitlines()[0],
                              target=rest,
                              limits=domain.declared(fn, f"--impl {name}: {domain.ATTRIBUTE}"))
    elif kind == "op":
        op = oplib.find_op(oplib.check_qualname(rest), libraries)
        found = dialect or dialect_of(op, name)
        signatures.check_arguments(op, found, name)
        impl = Implementation(name, "op", (found,), ("cpu", "cuda"), stable=False,
                              summary=str(signatures.schema_of(op)), target=rest)
    elif kind in ("vllm", "sglang") and not rest:
        from . import adapters

        impl = adapters.implementation(kind, dialect)
    else:
        raise ImplementationError(
            f"--impl {name!r}: unknown implementation; allowed: torch, torch:<fault>, cuda, "
            f"cuda:<fault>, vllm, sglang, py:package.module:function, op:NAMESPACE::NAME "
            f"(see `difftest list`)")
    if dialect is not None:
        if dialect not in impl.dialects:
            raise ImplementationError(
                f"--dialect={dialect!r}: {name} supports {', '.join(impl.dialects)}")
        impl = dataclasses.replace(impl, dialects=(dialect,))
    return dataclasses.replace(impl, libraries=libraries)


def _resolve_builtin(kind: str, fault: str | None, name: str) -> Implementation:
    table = faults()
    if fault is None:
        dialects = DIALECTS
        summary = ("device-agnostic torch implementation" if kind == "torch"
                   else "the project's CUDA kernels (JIT-built)")
    else:
        info = table.get(fault)
        allowed = sorted(f for f, v in table.items() if kind in v.backends)
        if info is None or kind not in info.backends:
            raise ImplementationError(
                f"--impl {name!r}: {kind} has no fault {fault!r}; allowed: {', '.join(allowed)}")
        dialects, summary = tuple(info.dialects), info.summary
    devices = ("cpu", "cuda") if kind == "torch" else ("cuda",)
    return Implementation(name, kind, tuple(dialects), devices, declared.STABLE[kind],
                          summary, fault,
                          limits=domain.validate(declared.LIMITS[kind], "cuda_impl.declared"))


def _backend(kind: str) -> Any:
    # the backend module (a worker's, or a zygote's before it forks: it imports torch);
    # importing it builds nothing and initialises no CUDA
    return importlib.import_module("cuda_impl.torch_impl" if kind == "torch"
                                   else "cuda_impl.cuda")
