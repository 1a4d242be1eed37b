"""The budget of a run, resolved once, and the deadlines of its phases.

``--seconds S`` is the budget of the *whole* run: replaying saved failures,
generating, worker restarts after crashes, timeout confirmations, shrinking,
compute-sanitizer re-runs and writing reports. The split, measured from the
start of the campaign, once its first worker is ready (start-up: loading or
building the implementation, is not in the budget):

* **replay** of the failure database stops at ``REPLAY_SHARE`` (25 %) of S;
  what it did not reach waits for the next run. The database holds at most
  the minimal and the first failing case per signature, so replay is capped
  at two cases per signature as well.
* **replay + generation** start no new case after ``GENERATE_SHARE`` (70 %) of
  S (or ``max_examples`` cases run, replayed ones included, whichever comes
  first). Once failures are on record it ends earlier, as far as their
  shrinking needs (each signature up to ``--shrink-seconds`` before 90 %), but
  not before ``FAILING_GENERATE_SHARE`` (40 %) of S: turning the failures found
  into small reports is then worth more than more cases. The batch in flight
  may finish until ``DRAIN_SHARE`` (80 %) of S, so that the worker need not be
  killed (and restarted for shrinking). The first
  generated case may run until S: a run on a slow machine still runs a case
  (a check of no case at all does not pass: :class:`difftest.api.CheckResult`).
* **confirmations** of a new signature's first cases (re-run alone, see
  :meth:`difftest.campaign.Campaign.confirm`) may run until S whatever the
  phase; a failure the budget leaves no time to confirm is entered unconfirmed.
* **shrinking** shares the rest, up to ``SHRINK_SHARE`` (90 %) of S, between
  the signatures in turn:
  each gets what is left divided by the signatures still to do, at most
  ``--shrink-seconds``; what one does not use passes to the next. Crashes and
  timeouts shrink last (each failing candidate costs a worker), so that what
  the others leave passes to them.
* **compute-sanitizer re-runs** of CUDA crashes start in the background as soon
  as their signature's minimal case is known, while the next signatures shrink
  (two at a time), and may run until ``SANITIZER_SHARE`` (115 %) of S — they are
  the last step before the reports, inside the overrun below; one still running
  then is cut, and its report says so. Each runs in an interpreter started under
  memcheck when its signature was found (``campaign._Sanitizing``), so that the
  re-run itself costs seconds, not a torch import and a context.
* **reports** (bug reports, summary, parquet, JUnit) are always written,
  whatever is left (the last 10 % of S and the slack below are theirs).

A worker's wait is cut at the deadline of its phase (a case cut short is not
run, not recorded; a warm spare takes over after a crash, so a restart costs
little), so the run ends within ``OVERRUN`` × S (1.25 × S) plus
start-up: the slack is for the step in flight at a phase's end (a worker
restart) and for writing the reports. A timeout whose 4× confirmation the
budget cannot hold is recorded unconfirmed, and says so.

Without ``--seconds`` (and without a profile) a run is bounded by cases:
``DEFAULT_MAX_EXAMPLES``, and ``--shrink-seconds`` per signature.

Two more rules keep crash- and hang-heavy runs inside the budget: a case id
runs at most once per run (replay and generation share one set of ids;
Hypothesis may draw the same case again), and a signature is no longer
pursued after ``TIMEOUT_PURSUIT`` timeouts while shrinking it (no more
candidates for it: the smallest failing case so far is its minimal case).
While a hang shrinks, its candidates are not confirmed one by one (each costs
one timeout, not five); its minimal case is confirmed once at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .errors import UsageError

REPLAY_SHARE = 0.25
GENERATE_SHARE = 0.70
DRAIN_SHARE = 0.80
SHRINK_SHARE = 0.90
FAILING_GENERATE_SHARE = 0.40
SANITIZER_SHARE = 1.15
OVERRUN = 1.25
DEFAULT_MAX_EXAMPLES = 1000
DEFAULT_SHRINK_SECONDS = 30.0
TIMEOUT_PURSUIT = 3


class BudgetSpent(Exception):
    """A wait was cut at its phase's deadline: the cases it was waiting for did not run."""


@dataclass(frozen=True)
class Budget:
    """What a run may spend: ``seconds`` in all (``None``: no time limit), at most
    ``max_examples`` cases run (``None``: no count limit), ``shrink_seconds`` per
    signature, and the seed (``None``: a fresh one)."""

    seconds: float | None = None
    max_examples: int | None = None
    shrink_seconds: float = DEFAULT_SHRINK_SECONDS
    seed: int | None = None

    @property
    def limit_s(self) -> float | None:
        """The longest the run may take, start-up aside (``OVERRUN`` × ``seconds``)."""
        return None if self.seconds is None else OVERRUN * self.seconds

    def describe(self) -> str:
        """One line: what this budget holds, e.g. for a profile's help."""
        parts = []
        if self.max_examples is not None:
            parts.append(f"{self.max_examples} cases")
        if self.seconds is not None:
            parts.append(f"{self.seconds:g} s")
        text = " or ".join(parts) or "no limit"
        if self.seconds is not None:
            text += f" (the whole run; ends within {self.limit_s:g} s plus start-up)"
        return text

    def start(self, now: Callable[[], float] = time.monotonic) -> Clock:
        return Clock(self, now)


class Clock:
    """The deadlines of one run under ``budget``, from the moment it was made.

    Deadlines are ``now()`` values (``time.monotonic`` by default), ``None`` when
    the budget has no time limit.
    """

    def __init__(self, budget: Budget, now: Callable[[], float] = time.monotonic) -> None:
        self.budget, self.now = budget, now
        self.started = now()

    def _at(self, share: float) -> float | None:
        s = self.budget.seconds
        return None if s is None else self.started + share * s

    @property
    def replay_end(self) -> float | None:
        return self._at(REPLAY_SHARE)

    @property
    def generate_end(self) -> float | None:
        return self.generation_end(0)

    def generation_end(self, signatures: int) -> float | None:
        """When generation ends with ``signatures`` failure signatures on record: at
        ``GENERATE_SHARE`` of S, earlier as far as their shrinking needs (each up to
        ``shrink_seconds`` before ``SHRINK_SHARE``), never before ``FAILING_GENERATE_SHARE``."""
        end = self._at(GENERATE_SHARE)
        if signatures and end is not None:
            room = self._at(SHRINK_SHARE) - signatures * self.budget.shrink_seconds
            end = min(end, max(self._at(FAILING_GENERATE_SHARE), room))
        return end

    @property
    def drain_end(self) -> float | None:
        return self._at(DRAIN_SHARE)

    @property
    def shrink_end(self) -> float | None:
        return self._at(SHRINK_SHARE)

    @property
    def sanitizer_end(self) -> float | None:
        return self._at(SANITIZER_SHARE)

    @property
    def end(self) -> float | None:
        return self._at(1.0)

    def elapsed(self) -> float:
        return self.now() - self.started

    def left(self, deadline: float | None) -> float:
        """Seconds until ``deadline`` (never negative; infinite without one)."""
        return float("inf") if deadline is None else max(0.0, deadline - self.now())

    def signature_seconds(self, signatures_left: int, cap: float | None = None) -> float:
        """The share of the next signature to shrink, ``signatures_left`` counting it:
        what is left until :attr:`shrink_end` divided by them, at most ``cap`` (default:
        the budget's ``shrink_seconds``)."""
        if signatures_left < 1:
            raise ValueError(f"signatures_left={signatures_left}: must be at least 1")
        cap = self.budget.shrink_seconds if cap is None else cap
        if self.shrink_end is None:
            return cap
        return min(cap, self.left(self.shrink_end) / signatures_left)


def resolve_budget(profile: str | None = None, *, seconds: float | None = None,
                   max_examples: int | None = None, shrink_seconds: float | None = None,
                   seed: int | None = None, default_seconds: float | None = None) -> Budget:
    """The one budget resolver: an explicit value wins, then the profile's, then the default.

    ``seed=None`` means "not given" (the profile's seed, else a fresh one);
    ``default_seconds`` is the caller's time budget when neither an explicit
    value nor a profile sets one. With no time budget and no case count at
    all, a run is bounded by ``DEFAULT_MAX_EXAMPLES`` cases.
    """
    from .profiles import PROFILES

    p = None
    if profile is not None:
        if profile not in PROFILES:
            raise UsageError(f"profile={profile!r}: must be one of {', '.join(PROFILES)}")
        p = PROFILES[profile]
    for name, value in (("seconds", seconds), ("shrink_seconds", shrink_seconds),
                        ("max_examples", max_examples)):
        if value is not None and not value > 0:
            raise UsageError(f"{name}={value!r}: must be > 0")
    if seconds is None:
        seconds = p.budget.seconds if p is not None else default_seconds
    if max_examples is None and p is not None:
        max_examples = p.budget.max_examples
    if seconds is None and max_examples is None:
        max_examples = DEFAULT_MAX_EXAMPLES
    if shrink_seconds is None:
        shrink_seconds = p.budget.shrink_seconds if p is not None else DEFAULT_SHRINK_SECONDS
    if seed is None and p is not None:
        seed = p.budget.seed
    return Budget(seconds=seconds, max_examples=max_examples, shrink_seconds=shrink_seconds,
                  seed=seed)


def nothing_checked(elapsed_s: float) -> str:
    """What a run in which no case ran says: a check of nothing is not a pass (``difftest
    run`` exits 2, ``check_callable`` does not pass)."""
    return (f"no case ran within the budget ({elapsed_s:.1f} s): give it more seconds "
            "(the worker's start-up is not counted)")
