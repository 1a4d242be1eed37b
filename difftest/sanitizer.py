"""Re-run a minimised CUDA failure under compute-sanitizer (memcheck).

The caching allocator hides small out-of-bounds writes from the sanitizer, so
the re-run sets ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``. Used for crashes and
guard-band failures of CUDA implementations, when the tool is on the PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from .case import Case
from .repro import repro_script

SANITIZED_CHECKS = ("crash", "guard_band", "exception", "timeout")
TAIL = 6000


def run_sanitizer(case: Case, impl: Any, timeout_s: float = 300.0) -> str | None:
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "repro.py"
        script.write_text(repro_script(case, impl.name, impl.stable, "sanitizer re-run", "-"))
        env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        cmd = [tool, "--tool", "memcheck", sys.executable, str(script), "--device", "cuda",
               "--repeats", "1"]
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
            text = done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            text = f"(compute-sanitizer timed out after {timeout_s:.0f} s)\n{exc.stdout or ''}"
    return f"$ PYTORCH_NO_CUDA_MEMORY_CACHING=1 {' '.join(cmd[:3])} python repro.py\n" + \
        text[-TAIL:]


def sanitizer_extra(impl: Any) -> Callable[[Any, Case], dict]:
    def extra(failure: Any, minimal: Case) -> dict:
        if failure.evaluation.primary_check not in SANITIZED_CHECKS:
            return {}
        output = run_sanitizer(minimal, impl)
        return {"sanitizer": output} if output else {}

    return extra
