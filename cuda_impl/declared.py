"""What each backend declares about itself, importable without torch or a GPU.

A campaign's own process reads these (``difftest.registry``) and never imports
torch: only its worker processes load a backend, so the run's start-up does
not pay for torch twice.
"""

from __future__ import annotations

__all__ = ["LIMITS", "MAX_EXPERTS", "SMALL_PATH_MAX_EXPERTS", "SMALL_PATH_MAX_ROUTES",
           "STABLE"]

SMALL_PATH_MAX_ROUTES = 1023
"""The CUDA kernels' small (single-kernel) path takes batches of at most this many
routes N ..."""
SMALL_PATH_MAX_EXPERTS = 64
"""... and at most this many experts E; N = 1023/1024 and E = 64/65 straddle the switch."""
MAX_EXPERTS = 1024
"""Most experts the CUDA kernels take (one expert per thread of the large path's scan
block)."""

STABLE = {
    "torch": True,  # routes inside an expert segment are in ascending route index
    "cuda": False,  # ... in atomic (unspecified) order
}
"""Whether a backend's ``sorted_token_ids`` segments are in a deterministic order."""

LIMITS: dict[str, dict[str, tuple[int, int]]] = {
    "torch": {},
    # an E above MAX_EXPERTS is rejected with ValueError before anything is launched
    "cuda": {"num_experts": (1, MAX_EXPERTS)},
}
"""The input domain each backend declares to difftest (``difftest.limits``)."""
