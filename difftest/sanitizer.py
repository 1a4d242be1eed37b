"""Re-run a minimised CUDA failure under compute-sanitizer (memcheck).

The caching allocator hides small out-of-bounds writes from the sanitizer, so
the re-run sets ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``. Used for crashes and
guard-band failures of CUDA implementations, when the tool is on the PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .case import Case
from .checks import sanitized
from .repro import repro_files

# memcheck's output kept in a report: its first errors (the invalid access itself) and its end
HEAD, TAIL = 4000, 2000


def find_sanitizer() -> str | None:
    """compute-sanitizer: ``$PATH``, then beside nvcc, ``$CUDA_HOME/bin``, ``/usr/local/cuda/bin``
    (CUDA images often put only nvcc's folder, or neither, on the PATH)."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    nvcc = shutil.which("nvcc")
    folders = [Path(nvcc).resolve().parent if nvcc else None]
    folders += [Path(home) / "bin" for home in (os.environ.get("CUDA_HOME"),
                                                os.environ.get("CUDA_PATH"), "/usr/local/cuda")
                if home]
    for folder in folders:
        if folder is not None:
            candidate = folder / "compute-sanitizer"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def run_sanitizer(case: Case, impl: Any, timeout_s: float = 300.0) -> str | None:
    """memcheck's output for one run of ``case`` (``None`` when the tool is absent).

    The re-run uses ``repro.py --exact-buffers``: each output is an allocation of
    its own exact size, without the campaign's guard bands, so a write one element
    past a row's buffer is outside every allocation and memcheck names it.
    """
    tool = find_sanitizer()
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "repro.py"
        text, case_json = repro_files(case, impl.name, impl.stable, "sanitizer re-run", "-",
                                      libraries=impl.libraries)
        script.write_text(text)
        (Path(tmp) / "case.json").write_text(json.dumps(case_json))
        env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        cmd = [tool, "--tool", "memcheck", sys.executable, str(script), "--device", "cuda",
               "--repeats", "1", "--exact-buffers"]
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
            text = done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            text = f"(compute-sanitizer timed out after {timeout_s:.0f} s)\n{exc.stdout or ''}"
    return (f"$ PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python "
            f"repro.py {' '.join(cmd[5:])}\n" + _head_and_tail(text))


def _head_and_tail(text: str) -> str:
    """``text`` whole when short; else its first HEAD and last TAIL characters: the
    first error memcheck reports is the access that matters, later ones (frees, exit)
    follow from it."""
    if len(text) <= HEAD + TAIL:
        return text
    return f"{text[:HEAD]}\n[… {len(text) - HEAD - TAIL} characters left out …]\n{text[-TAIL:]}"


def wants_sanitizer(failure: Any) -> bool:
    """Whether a CUDA failure gets a compute-sanitizer re-run: its check asks for one
    (:func:`difftest.checks.sanitized`) and the tool is here."""
    return sanitized(failure.evaluation.primary_check) and find_sanitizer() is not None
