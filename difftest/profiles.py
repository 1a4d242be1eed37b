"""Budget profiles: ``ci`` (bounded, deterministic), ``dev``, ``nightly`` (long).

The same names are registered as Hypothesis settings profiles
(``difftest-ci`` …) for a user's own property tests; the ``ci`` one is
derandomised, and the seed it uses is recorded in every run directory.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    max_examples: int | None
    seconds: float | None
    seed: int | None  # None: a fresh random seed per run
    shrink_seconds: float


PROFILES = {
    "ci": Profile("ci", max_examples=500, seconds=60.0, seed=0, shrink_seconds=20.0),
    "dev": Profile("dev", max_examples=None, seconds=20.0, seed=None, shrink_seconds=30.0),
    "nightly": Profile("nightly", max_examples=None, seconds=3600.0, seed=None,
                       shrink_seconds=120.0),
}


def register_hypothesis_profiles() -> None:
    from hypothesis import HealthCheck, settings

    settings.register_profile("difftest-ci", max_examples=200, derandomize=True, deadline=None,
                              database=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("difftest-dev", max_examples=100, deadline=None)
    settings.register_profile("difftest-nightly", max_examples=10_000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
