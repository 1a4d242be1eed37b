"""difftest — differential testing of MoE align kernels against the oracle.

Public names live here; everything else is internal. Heavy parts (torch,
hypothesis, pandas) are imported only where they are used.
"""

from .case import CONTRACTS, DIALECTS, EDGE_CLASSES, Case, EPGroup
from .errors import CaseError, DifftestError, ImplementationError, UsageError

__all__ = [
    "CONTRACTS", "DIALECTS", "EDGE_CLASSES", "Case", "EPGroup", "CaseError", "DifftestError",
    "ImplementationError", "UsageError", "check_callable",
]


def check_callable(fn, dialect, **kwargs):
    """Run a campaign against ``fn`` in this process; see :func:`difftest.api.check_callable`."""
    from .api import check_callable as _check

    return _check(fn, dialect, **kwargs)
