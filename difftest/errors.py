"""The exceptions of difftest: one root, argument errors that are also ValueError."""

from __future__ import annotations


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
