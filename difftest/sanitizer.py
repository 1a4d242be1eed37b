"""Re-run a minimised CUDA failure under compute-sanitizer (memcheck).

The caching allocator hides small out-of-bounds writes from the sanitizer, so
the re-run sets ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``. Used for crashes and
guard-band failures of CUDA implementations, when the tool is on the PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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


class SanitizerRun:
    """One compute-sanitizer re-run of a case, running in the background (the campaign
    shrinks the next signature meanwhile); :meth:`result` waits for it.

    The re-run uses ``repro.py --exact-buffers``: each output is an allocation of
    its own exact size, without the campaign's guard bands, so a write one element
    past a row's buffer is outside every allocation and memcheck names it. Its
    output goes to a file (memcheck can print more than a pipe holds), and it runs
    in a process group of its own, so that a cut re-run ends with its child.
    """

    def __init__(self, proc: subprocess.Popen, tmp: tempfile.TemporaryDirectory,
                 command: str) -> None:
        self.proc, self._tmp, self.command = proc, tmp, command
        self.started = time.monotonic()

    @classmethod
    def start(cls, case: Case, impl: Any) -> SanitizerRun | None:
        """The re-run of ``case`` under memcheck, started; ``None`` when the tool is absent."""
        tool = find_sanitizer()
        if tool is None:
            return None
        tmp = tempfile.TemporaryDirectory(prefix="difftest-sanitizer-")
        folder = Path(tmp.name)
        text, case_json = repro_files(case, impl.name, impl.stable, "sanitizer re-run", "-",
                                      libraries=impl.libraries)
        (folder / "repro.py").write_text(text)
        (folder / "case.json").write_text(json.dumps(case_json))
        env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        args = ["--device", "cuda", "--repeats", "1", "--exact-buffers"]
        with open(folder / "output.txt", "wb") as output:
            proc = subprocess.Popen([tool, "--tool", "memcheck", sys.executable,
                                     str(folder / "repro.py"), *args],
                                    env=env, stdout=output, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        command = ("$ PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck "
                   f"python repro.py {' '.join(args)}")
        return cls(proc, tmp, command)

    def done(self) -> bool:
        return self.proc.poll() is not None

    def result(self, timeout_s: float) -> str:
        """The command and memcheck's output (:func:`_head_and_tail`), waiting at most
        ``timeout_s`` more; a re-run still going then is killed, and its text says so."""
        cut = None
        try:
            self.proc.wait(timeout=max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            cut = time.monotonic() - self.started
            self.kill()
        try:
            text = (Path(self._tmp.name) / "output.txt").read_text(errors="replace")
        finally:
            self._tmp.cleanup()
        if cut is not None:
            text = (f"(compute-sanitizer cut after {cut:.0f} s: the run's budget ended; run "
                    f"repro.py under compute-sanitizer by hand, see its --exact-buffers)\n{text}")
        return f"{self.command}\n" + _head_and_tail(text)

    def kill(self) -> None:
        """End the re-run and its child (no-op when it has ended)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


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
