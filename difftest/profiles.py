"""Budget profiles: ``ci`` (bounded, deterministic), ``dev``, ``nightly`` (long).

A profile is a :class:`~difftest.budget.Budget` with a name: its seconds are
the whole run (see :mod:`difftest.budget` for the split), and
:meth:`Profile.describe` states the total it holds. The same names are
registered as Hypothesis settings profiles (``difftest-ci`` …) for a user's
own property tests; the ``ci`` one is derandomised, and the seed it uses is
recorded in every run directory.
"""

from __future__ import annotations

from dataclasses import dataclass

from .budget import Budget


@dataclass(frozen=True)
class Profile:
    name: str
    budget: Budget

    def describe(self) -> str:
        seed = "a fresh seed" if self.budget.seed is None else f"seed {self.budget.seed}"
        return f"{self.name}: {self.budget.describe()}; {seed}"


PROFILES = {
    "ci": Profile("ci", Budget(seconds=60.0, max_examples=500, shrink_seconds=20.0, seed=0)),
    "dev": Profile("dev", Budget(seconds=20.0, shrink_seconds=30.0)),
    "nightly": Profile("nightly", Budget(seconds=3600.0, shrink_seconds=120.0)),
}


def register_hypothesis_profiles() -> None:
    from hypothesis import HealthCheck, settings

    settings.register_profile("difftest-ci", max_examples=200, derandomize=True, deadline=None,
                              database=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("difftest-dev", max_examples=100, deadline=None)
    settings.register_profile("difftest-nightly", max_examples=10_000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
