"""Implementations under test: the project's CUDA kernels and a device-agnostic torch version.

``cuda_impl.FAULTS`` lists the switchable faults of SPEC §10; each backend's
``implementation(fault=None)`` returns ``{dialect: callable}``. The backends
are submodules loaded on first use, so that importing the fault table needs
neither torch nor a CUDA toolchain::

    import cuda_impl
    fns = cuda_impl.torch_impl.implementation("grid-skips-last-slot")
"""

from __future__ import annotations

import importlib as _importlib
from types import ModuleType as _ModuleType

from cuda_impl.faults import BACKENDS, DIALECTS, FAULTS, Fault

__all__ = ["BACKENDS", "DIALECTS", "FAULTS", "Fault", "cuda", "torch_impl"]

_BACKEND_MODULES = ("torch_impl", "cuda")


def __getattr__(name: str) -> _ModuleType:
    if name in _BACKEND_MODULES:
        qualified = f"{__name__}.{name}"
        try:
            return _importlib.import_module(qualified)
        except ModuleNotFoundError as error:
            if error.name != qualified:
                raise  # the backend exists but one of its own imports failed
            # A backend not shipped in this checkout reads as a missing attribute,
            # so hasattr(cuda_impl, "cuda") is False rather than an ImportError.
            raise AttributeError(f"module {__name__!r} has no backend {name!r}") from error
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
