"""What an implementation can be called with, checked before any case runs.

One checker for every kind of implementation: a ``py:`` callable (read with
``inspect.signature``), an ``op:`` of a compiled library (its schema,
``torch.ops.NS.NAME.default._schema``) and the engine adapters, whose
argument names and order are also pinned (:mod:`difftest.adapters`). A dialect
passes all its arguments positionally (DESIGN.md's calling conventions), so a
callable that cannot take them would turn a campaign into a wall of ``error``
verdicts; :func:`check_arguments` refuses it up front with one line saying what
the dialect passes and what the callable takes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .dialects import DIALECT_INFO
from .errors import LoadError


@dataclass(frozen=True)
class Parameter:
    """One parameter of a callable or op, as far as calling it goes."""

    name: str
    positional: bool  # can be passed by position
    required: bool  # has no default
    variadic: bool = False  # ``*args``: takes any number of further positional arguments


def dialect_arguments(dialect: str) -> tuple[str, ...]:
    """The names of the arguments ``dialect`` passes, in order (its DialectInfo)."""
    return DIALECT_INFO[dialect].arguments


def schema_of(fn: Any) -> Any | None:
    """The schema of a torch op (of a packet: its ``default`` or only overload), else None."""
    if type(fn).__module__ != "torch._ops":
        return None
    if hasattr(fn, "overloads"):  # OpOverloadPacket
        names = fn.overloads()
        name = "default" if "default" in names else (names[0] if len(names) == 1 else None)
        if name is None:
            return None
        fn = getattr(fn, name)
    return getattr(fn, "_schema", None)


def parameters(fn: Callable[..., Any]) -> tuple[Parameter, ...] | None:
    """``fn``'s parameters from its op schema or signature; None when neither can be read."""
    schema = schema_of(fn)
    if schema is not None:
        return tuple(Parameter(a.name, not a.kwarg_only, not a.has_default_value())
                     for a in schema.arguments)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    out = []
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            continue
        out.append(Parameter(p.name, p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                p.VAR_POSITIONAL),
                             p.default is p.empty and p.kind is not p.VAR_POSITIONAL,
                             variadic=p.kind is p.VAR_POSITIONAL))
    return tuple(out)


def positional_names(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The names of ``fn``'s positional parameters, in order (empty when unreadable)."""
    return tuple(p.name for p in parameters(fn) or () if p.positional and not p.variadic)


def check_arguments(fn: Callable[..., Any], dialect: str, name: str, *,
                    pinned: Sequence[str] | None = None, newer: int = 0,
                    source: str | None = None) -> None:
    """Refuse ``fn`` (called ``name``) unless it can be called with ``dialect``'s arguments.

    ``pinned``: the argument names, in order, that ``source`` (the engine's
    function an adapter calls) is known to declare, and the arguments it is
    called with; the first one that differs is named. ``newer``: how many
    trailing pinned arguments older versions lack (the adapter's call wrapper
    leaves them out where absent). Raises :class:`LoadError`; a callable whose
    parameters cannot be read is let through.
    """
    params = parameters(fn)
    if params is None:
        return
    positional = [p for p in params if p.positional and not p.variadic]
    if pinned is not None:
        for i, want in enumerate(pinned):
            have = positional[i].name if i < len(positional) else None
            if have is None and i >= len(pinned) - newer:
                pinned = pinned[:i]  # an older version: called without the newer ones
                break
            if have != want:
                found = f"is {have!r}" if have is not None else "is missing"
                raise LoadError(
                    f"--impl {name}: {source or name} does not match the {dialect} calling "
                    f"convention difftest pins for it: argument {i + 1} {found}, expected "
                    f"{want!r} (pinned: {', '.join(pinned)}; installed: "
                    f"{', '.join(p.name for p in positional)})")
    # an adapter passes the engine function its pinned arguments (a call wrapper, where
    # an engine's versions differ, makes the dialect's arguments into those)
    args = tuple(pinned) if pinned is not None else dialect_arguments(dialect)
    variadic = any(p.variadic for p in params)
    required = [p for p in positional if p.required]
    keyword_only = [p for p in params if not p.positional and p.required]
    if len(positional) < len(args) and not variadic:
        takes = f"takes {len(positional)}"
    elif len(required) > len(args):
        takes = f"requires {len(required)}"
    elif keyword_only:
        takes = f"also requires the keyword argument {keyword_only[0].name!r}"
    else:
        return
    raise LoadError(f"--impl {name}: {dialect} passes {len(args)} arguments: "
                    f"{', '.join(args)}; {source or name} {takes}")
