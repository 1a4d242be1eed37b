"""JIT build of the CUDA library with nvcc, cached on disk.

``build_library()`` compiles one ``.cu`` (plus the ``.cuh`` headers beside it)
into a shared library in the cache directory — ``$DIFFTEST_CACHE/cuda``, else
``~/.cache/difftest/cuda`` — named by a SHA-256 over the source texts, the
defines, the target architecture, the compiler flags and the identity of the
nvcc binary. A library already there is reused without running nvcc; a new
one is compiled to a temporary file and moved into place with
``os.replace``, under a per-library file lock, so parallel workers never see
a half-written file and compile it only once.

What can go wrong: nvcc missing, failing or hanging raises ``CudaBuildError``,
whose message holds the command and nvcc's complete output.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

CSRC = Path(__file__).resolve().with_name("csrc")
SOURCE = CSRC / "moe_align.cu"
"""The one translation unit of the library (it includes the headers of ``CSRC``)."""

NVCC_FLAGS: tuple[str, ...] = (
    "-O2", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
    # The CUDA runtime as a shared library, as torch's extensions have it: a launch
    # error our kernels leave pending is then in a runtime the harness can read
    # (difftest's launch_error check reads every mapped libcudart; a statically
    # linked runtime would keep its errors to itself). Found at load time through
    # torch's copy (same soname) or the toolkit's (rpath, see _runtime_rpath).
    "-cudart", "shared",
)
DEFAULT_ARCH = "sm_90"
"""Target when no GPU can be asked (the project's GPU machine is an H100)."""

BUILD_TIMEOUT_S = 600


class CudaBuildError(RuntimeError):
    """nvcc is missing or failed; the message holds the command and nvcc's full output."""


def find_nvcc() -> str | None:
    """Path of nvcc: ``$PATH``, then ``$CUDA_HOME/bin``, then ``/usr/local/cuda/bin``."""
    found = shutil.which("nvcc")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in homes:
        if home:
            candidate = Path(home) / "bin" / "nvcc"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def default_cache_dir() -> Path:
    """``$DIFFTEST_CACHE/cuda`` when that variable is set, else ``~/.cache/difftest/cuda``."""
    root = os.environ.get("DIFFTEST_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "difftest"
    return base / "cuda"


def default_arch() -> str:
    """``sm_XY`` of the current CUDA device, or ``DEFAULT_ARCH`` when there is none."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"sm_{major}{minor}"
    except Exception:  # no torch, or a driver that cannot answer: build for the default
        pass
    return DEFAULT_ARCH


def build_library(
    source: Path | str = SOURCE,
    defines: Sequence[str] = (),
    *,
    arch: str | None = None,
    cache_dir: Path | str | None = None,
    nvcc: str | None = None,
) -> Path:
    """Path of the shared library built from ``source`` with ``-D`` ``defines``; cached.

    ``defines`` are ``NAME=VALUE`` strings (see ``cuda_impl._variants``).
    Raises ``CudaBuildError`` when nvcc is missing or fails.
    """
    source = Path(source).resolve()
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise CudaBuildError(
            "nvcc not found on PATH, in $CUDA_HOME/bin or in /usr/local/cuda/bin; "
            "install the CUDA toolkit or put nvcc on PATH"
        )
    arch = arch or default_arch()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(source, tuple(defines), arch, nvcc)
    target = cache / f"{source.stem}-{arch}-{key[:24]}.so"
    if target.is_file():
        return target

    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache / f"{target.name}.lock"):
        if target.is_file():  # another worker built it while we waited
            return target
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".so", dir=cache)
        os.close(fd)
        command = [
            nvcc,
            *NVCC_FLAGS,
            *_runtime_rpath(nvcc),
            f"-arch={arch}",
            *(f"-D{define}" for define in defines),
            f"-I{source.parent}",
            str(source),
            "-o",
            tmp,
        ]
        try:
            _run_nvcc(command)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return target


def _run_nvcc(command: list[str]) -> None:
    shown = shlex.join(command)
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise CudaBuildError(
            f"nvcc did not finish within {BUILD_TIMEOUT_S} s\ncommand: {shown}"
        ) from error
    except OSError as error:
        raise CudaBuildError(f"nvcc could not be started: {error}\ncommand: {shown}") from error
    if proc.returncode != 0:
        raise CudaBuildError(
            f"nvcc failed with exit status {proc.returncode}\ncommand: {shown}\n"
            f"{proc.stdout}{proc.stderr}"
        )


def _runtime_rpath(nvcc: str) -> list[str]:
    """Linker flags that let the library find the toolkit's libcudart when it is loaded."""
    root = _real_nvcc(nvcc).parent.parent
    dirs = [root / "lib64", root / "targets" / "x86_64-linux" / "lib",
            root / "targets" / "sbsa-linux" / "lib"]
    return [f"-Xlinker=-rpath={d}" for d in dirs if (d / "libcudart.so").exists()]


def _real_nvcc(nvcc: str, depth: int = 0) -> Path:
    """The nvcc binary itself: ``nvcc`` resolved, through a small wrapper script naming it."""
    real = Path(os.path.realpath(nvcc))
    if depth < 2 and real.stat().st_size < 4096:
        for word in real.read_bytes().decode("utf-8", "replace").split():
            if word.endswith("/nvcc") and Path(word).is_file():
                return _real_nvcc(word, depth + 1)
    return real


def _cache_key(source: Path, defines: tuple[str, ...], arch: str, nvcc: str) -> str:
    digest = hashlib.sha256()

    def part(label: str, data: bytes) -> None:
        digest.update(f"{label}:{len(data)}:".encode())
        digest.update(data)

    part("source", source.read_bytes())
    for header in sorted(source.parent.glob("*.cuh")):
        part(f"header {header.name}", header.read_bytes())
    part("defines", "\n".join(defines).encode())
    part("arch", arch.encode())
    part("flags", "\n".join(NVCC_FLAGS).encode())
    part("nvcc", _toolkit_identity(nvcc).encode())
    return digest.hexdigest()


def _toolkit_identity(nvcc: str, depth: int = 0) -> str:
    """Stands in for ``nvcc --version`` without running it: path, size and mtime of the
    binary (and the text of a small wrapper script, which names the real one), plus the
    toolkit's ``version.json`` when there is one."""
    real = Path(os.path.realpath(nvcc))
    stat = real.stat()
    parts = [str(real), str(stat.st_size), str(stat.st_mtime_ns)]
    if stat.st_size < 4096:
        text = real.read_bytes().decode("utf-8", "replace")
        parts.append(text)
        for word in text.split():
            if depth < 2 and word.endswith("/nvcc") and Path(word).is_file():
                parts.append(_toolkit_identity(word, depth + 1))
    version = real.parent.parent / "version.json"
    if version.is_file():
        parts.append(version.read_text("utf-8", "replace"))
    return "\n".join(parts)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``lock_path`` (POSIX); elsewhere just runs the body."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
