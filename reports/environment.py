"""What a bug report says about the machine it was found on."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
import shutil
import subprocess
import sys
from typing import Any

__all__ = ["environment"]

_PACKAGES = ("numpy", "pandas", "pyarrow", "hypothesis", "matplotlib")


def environment() -> dict[str, Any]:
    """Describe this process's environment for a bug report.

    Returns a dict with the keys ``Python``, ``platform``, ``packages``
    (name -> version, ``None`` when not installed), ``torch``, ``CUDA``
    (``torch.version.cuda``), ``GPU`` and ``driver``; unknown values are
    ``None``.  torch is described without importing it (a campaign's own process
    never does; its workers run the same installation): its version from the
    package's metadata, its CUDA from ``torch/version.py`` read as text; a torch
    already imported is read directly.  CUDA is never initialised.  GPU and
    driver come from ``nvidia-smi`` when it is on PATH (5 s timeout; any
    failure leaves them ``None``).
    """
    info: dict[str, Any] = {
        "Python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "torch": None,
        "CUDA": None,
        "GPU": None,
        "driver": None,
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = getattr(torch, "__version__", None)
        info["CUDA"] = getattr(getattr(torch, "version", None), "cuda", None)
    else:
        info["torch"], info["CUDA"] = _torch_unimported()
    gpus = _nvidia_smi()
    if gpus:
        info["GPU"] = "; ".join(name for name, _ in gpus)
        info["driver"] = "; ".join(sorted({driver for _, driver in gpus}))
    return info


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_unimported() -> tuple[str | None, str | None]:
    """torch's version and the CUDA it was built for, without importing it."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None, None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        return None, None
    try:
        text = open(f"{folders[0]}/version.py", encoding="utf-8").read()
    except OSError:
        text = ""
    found = {name: re.search(rf"^{name}\b[^=\n]*=\s*(?:'([^']*)'|\"([^\"]*)\")", text, re.M)
             for name in ("__version__", "cuda")}
    version, cuda = ((m.group(1) or m.group(2)) if m else None for m in found.values())
    return version or _version("torch"), cuda


def _nvidia_smi() -> list[tuple[str, str]]:
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []
    try:
        result = subprocess.run(
            [executable, "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in result.stdout.splitlines():
        name, _, driver = line.rpartition(",")
        if name.strip():
            gpus.append((name.strip(), driver.strip()))
    return gpus
