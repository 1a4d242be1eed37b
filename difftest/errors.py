"""The exceptions of difftest: one root, argument errors that are also ValueError."""

from __future__ import annotations

from typing import Any


class DifftestError(Exception):
    """Root of every error difftest raises on purpose."""


class UsageError(DifftestError, ValueError):
    """A caller's mistake (bad option, unknown implementation, bad file).

    The CLI prints its message as one line and exits 2.
    """


class CaseError(UsageError):
    """A case that is not well formed (bad field, shape or dtype)."""


class ImplementationError(UsageError):
    """An implementation name that cannot be resolved or loaded."""


class LoadError(ImplementationError):
    """An implementation that cannot be loaded or built here.

    A library that does not load, an op or module that is not there, a failed
    build, a callable whose signature cannot take its dialect's arguments. The
    CLI exits 2 on it, except ``difftest replay``, which exits 125 so that
    ``git bisect run`` skips the commit.
    """
class InternalError(Exception):
    """A bug of difftest itself (never of the implementation under test, never the
    caller's): the CLI exits 3 with one line saying what broke, how to reproduce
    it and where the full traceback was saved.

    ``what`` is that line's first part (``"the case generator raised AssertionError:
    ..."``); ``seed`` and ``draw`` (the 1-based number of the Hypothesis example that
    generated the case, with its siblings) say how to draw it again; ``traceback`` is
    the formatted traceback of the cause.
    """

    def __init__(self, what: str, *, seed: int | None = None, draw: int | None = None,
                 traceback: str = "") -> None:
        super().__init__(what)
        self.what, self.seed, self.draw, self.traceback = what, seed, draw, traceback
        self.saved_to: str | None = None  # where :meth:`save` wrote the traceback

    @classmethod
    def wrap(cls, exc: BaseException, where: str, *, seed: int | None = None,
             draw: int | None = None) -> InternalError:
        """``exc`` (an unexpected exception raised in ``where``) as an InternalError."""
        import traceback

        if isinstance(exc, InternalError):
            return exc
        text = " ".join(str(exc).split())
        if len(text) > 300:
            text = text[:300] + " …"
        return cls(f"{where} raised {type(exc).__name__}" + (f": {text}" if text else ""),
                   seed=seed, draw=draw,
                   traceback="".join(traceback.format_exception(type(exc), exc,
                                                                exc.__traceback__)))

    def save(self, directory: Any) -> str:
        """Write the traceback to ``directory/internal-error.txt``; returns its path."""
        from pathlib import Path

        path = Path(directory) / "internal-error.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{self.what}\nseed: {self.seed}\ndraw: {self.draw}\n\n"
                        f"{self.traceback}")
        self.saved_to = str(path)
        return self.saved_to

    def line(self) -> str:
        """The one line the CLI prints."""
        how = []
        if self.seed is not None:
            how.append(f"seed {self.seed}")
        if self.draw is not None:
            how.append(f"draw {self.draw}")
        return (f"internal error of difftest (not a failure of the implementation): "
                f"{self.what}"
                + (f"; reproduce with {', '.join(how)}" if how else "")
                + (f"; traceback in {self.saved_to}" if self.saved_to else ""))
