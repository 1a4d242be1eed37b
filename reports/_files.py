"""Writing run-directory files so that a reader never sees half of one."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable


def replace_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` to create a temporary file beside ``path``, then
    move it over ``path`` with ``os.replace`` (atomic within one file system).
    On any failure the temporary file is removed and ``path`` is left as it was.
    """
    # Not tempfile.mkstemp: its files are mode 0600, and run directories are shared.
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(str(temp))
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def replace_text_atomically(path: Path, text: str, *, executable: bool = False) -> None:
    """Write ``text`` (UTF-8, newlines untranslated) to ``path`` atomically;
    ``executable`` adds the execute bits wherever the read bits are set.
    """

    def write(temp: str) -> None:
        with open(temp, "x", encoding="utf-8", newline="") as file:
            file.write(text)
        if executable:
            mode = os.stat(temp).st_mode
            os.chmod(temp, mode | (mode & 0o444) >> 2)

    replace_atomically(path, write)
