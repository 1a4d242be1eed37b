"""Compiled op libraries: ``--load PATH`` and ``--impl op:NAMESPACE::NAME``.

A kernel developer's fresh build (``_moe_C.abi3.so`` and the like) registers
its ops with torch when loaded (``torch.ops.load_library``); ``op:NS::NAME``
then calls ``torch.ops.NS.NAME``. Every failure here is a :class:`LoadError`
naming what was found: a path that is not there or does not load, an op that
the loaded libraries did not register (with the ops its namespace does have).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ImplementationError, LoadError

_QUALNAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*::[A-Za-z_][A-Za-z0-9_]*")


def check_qualname(qualname: str) -> str:
    """``NAMESPACE::NAME`` as given after ``op:``; a usage error otherwise."""
    if not _QUALNAME.fullmatch(qualname):
        raise ImplementationError(
            f"--impl op:{qualname}: expected op:NAMESPACE::NAME (e.g. op:_moe_C::"
            f"moe_align_block_size), the op as torch.ops.NAMESPACE.NAME")
    return qualname


def library_paths(paths: Iterable[str]) -> tuple[str, ...]:
    """``--load`` paths made absolute (workers and repro scripts may run elsewhere)."""
    return tuple(str(Path(p).expanduser().absolute()) for p in paths)


def load_libraries(paths: Sequence[str]) -> None:
    """``torch.ops.load_library`` each path, in order (loading one twice is harmless)."""
    if not paths:
        return
    import torch

    for path in paths:
        if not Path(path).is_file():
            raise LoadError(f"--load {path}: no such file (build the library first)")
        try:
            torch.ops.load_library(path)
        except (OSError, RuntimeError) as exc:  # dlopen; an op registered twice
            text = " ".join(str(exc).split())
            raise LoadError(f"--load {path}: cannot load it ({type(exc).__name__}: "
                            f"{text})") from None


def op_names() -> set[str]:
    """``NAMESPACE::NAME`` of every op torch has registered (overload names dropped)."""
    import torch

    return {name.split(".", 1)[0] for name in torch._C._dispatch_get_all_op_names()}


def registered_by(path: str) -> list[str]:
    """The ops that loading ``path`` registered, sorted (empty when it was loaded before)."""
    before = op_names()
    load_libraries([path])
    return sorted(op_names() - before)


def find_op(qualname: str, libraries: Sequence[str] = ()) -> Any:
    """``torch.ops.NAMESPACE.NAME`` after loading ``libraries``; :class:`LoadError` if absent."""
    import torch

    load_libraries(libraries)
    namespace, _, name = check_qualname(qualname).partition("::")
    names = op_names()
    if qualname not in names:
        siblings = sorted(n.split("::", 1)[1] for n in names if n.startswith(namespace + "::"))
        found = (f"namespace {namespace} has {', '.join(siblings)}" if siblings
                 else f"no op of namespace {namespace} is registered")
        where = (f"after loading {', '.join(libraries)}" if libraries
                 else "no library loaded: pass --load PATH")
        raise LoadError(f"--impl op:{qualname}: no such op; {found} ({where})")
    return getattr(getattr(torch.ops, namespace), name)
