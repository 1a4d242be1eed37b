"""What a bug report says about the machine it was found on."""

from __future__ import annotations

import importlib.metadata
import platform
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
    ``None``.  torch is described only if some caller already imported it:
    this function never imports torch and never initialises CUDA.  GPU and
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
