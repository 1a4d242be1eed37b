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


#: The arguments of ``repro.py`` a re-run passes (the report shows them in its command).
REPRO_ARGS = ("--device", "cuda", "--repeats", "1", "--exact-buffers")

# The interpreter a re-run runs in, started under memcheck before its case is known: it
# imports torch and creates its CUDA context (most of a re-run's time: ~4.4 s of the 5.7
# of a whole one on the H200), then reads the folder of the case's repro.py from stdin and
# runs it as `python repro.py <its own arguments>` would. An empty line or the end of stdin
# ends it.
_HOST = """\
import runpy, sys
import torch
try:
    torch.cuda.init()
    torch.cuda.synchronize()
except Exception:  # repro.py meets the same error and says so
    pass
folder = sys.stdin.readline().strip()
if not folder:
    sys.exit(0)
sys.argv = [folder + "/repro.py", *sys.argv[1:]]
sys.path.insert(0, folder)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def sanitizer_command() -> str:
    """The command a re-run stands for, as a user types it next to the report's repro.py."""
    return ("PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python "
            f"repro.py {' '.join(REPRO_ARGS)}")


def unseen_elsewhere_note() -> str:
    """Why a case that :func:`~difftest.evaluate.faults_where_it_lands` may pass in another
    process, and how to see it there (a bug report's and its ``repro.py``'s words)."""
    return ("An illegal address faults only where the stray access lands in unmapped memory: "
            "in another process (`repro.py`'s own buffers, another allocation history) the "
            "same access can land in mapped memory and pass unseen. `difftest replay "
            "case.json` runs the case as the campaign confirmed it, alone in a fresh worker; "
            f"compute-sanitizer names the access wherever it lands: `{sanitizer_command()}`.")


class SanitizerHost:
    """An interpreter started under memcheck, its torch imported and its CUDA context made,
    waiting for the case a :class:`SanitizerRun` gives it (one case each: memcheck reports
    per process, and a crash leaves the context unusable). Its folder and output file are
    the run's."""

    def __init__(self, tool: str) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="difftest-sanitizer-")
        env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        with open(Path(self.tmp.name) / "output.txt", "wb") as output:
            self.proc = subprocess.Popen([tool, "--tool", "memcheck", sys.executable, "-c",
                                          _HOST, *REPRO_ARGS],
                                         env=env, stdout=output, stderr=subprocess.STDOUT,
                                         stdin=subprocess.PIPE, start_new_session=True)

    @classmethod
    def start(cls) -> SanitizerHost | None:
        """A host starting up; ``None`` when compute-sanitizer is absent."""
        tool = find_sanitizer()
        return None if tool is None else cls(tool)

    def give(self, folder: Path) -> None:
        """Run the ``repro.py`` in ``folder`` (one that ended already runs nothing)."""
        try:
            self.proc.stdin.write(f"{folder}\n".encode())
        except OSError:
            pass
        finally:
            try:
                self.proc.stdin.close()
            except OSError:  # the flush of a pipe whose reader is gone
                pass

    def kill(self) -> None:
        """End the host and its children (no-op when it has ended), and remove its folder."""
        _kill_group(self.proc)
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.tmp.cleanup()


class SanitizerRun:
    """One compute-sanitizer re-run of a case, running in the background (the campaign
    shrinks the next signature meanwhile); :meth:`result` waits for it.

    The re-run uses ``repro.py --exact-buffers``: each output is an allocation of
    its own exact size, without the campaign's guard bands, so a write one element
    past a row's buffer is outside every allocation and memcheck names it. It runs in
    a :class:`SanitizerHost` (one given, else one started for it), whose output goes
    to a file (memcheck can print more than a pipe holds), in a process group of its
    own, so that a cut re-run ends with its child.
    """

    def __init__(self, proc: subprocess.Popen, tmp: tempfile.TemporaryDirectory,
                 command: str) -> None:
        self.proc, self._tmp, self.command = proc, tmp, command
        self.started = time.monotonic()

    @classmethod
    def start(cls, case: Case, impl: Any, host: SanitizerHost | None = None
              ) -> SanitizerRun | None:
        """The re-run of ``case`` under memcheck, started in ``host`` (else in a new one);
        ``None`` when the tool is absent."""
        host = host or SanitizerHost.start()
        if host is None:
            return None
        folder = Path(host.tmp.name)
        text, case_json = repro_files(case, impl.name, impl.stable, "sanitizer re-run", "-",
                                      libraries=impl.libraries)
        (folder / "repro.py").write_text(text)
        (folder / "case.json").write_text(json.dumps(case_json))
        host.give(folder)
        command = (f"$ {sanitizer_command()}\n(run in an interpreter started under memcheck "
                   "before the case was known, torch imported: the same repro.py, arguments "
                   "and environment)")
        return cls(host.proc, host.tmp, command)

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
        _kill_group(self.proc)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


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
