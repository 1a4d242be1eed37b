"""What every part of :mod:`difftest.strategies` uses: the seeded values of a case
(:class:`Values`) and small drawing helpers."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from hypothesis import strategies as st

from ..errors import UsageError

#: A case of up to this many routes (a layout alone: tokens) is small: it draws a value
#: style of :data:`VALUE_STYLES`, gets 1..3 invalid ids and up to 16 SGLang requests.
#: A larger one is ``"uniform"``, gets 1..16 and up to 64, and at most
#: ``LARGE_CASE_MAX_LORAS`` adapter slots.  (The name is from when small cases drew
#: each value as a Hypothesis choice.)
ELEMENTWISE_MAX_ROUTES = 512
#: How the values of a case are spread in their range ``[low, high]``: ``"small"``
#: mostly ``low`` and just above (expert 0, slot -1/0, repeats), ``"uniform"``,
#: ``"edges"`` only ``low``, ``low + 1``, ``high - 1``, ``high``, ``"mixed"`` each
#: value in one of the three.  Small first, so examples shrink towards it.
VALUE_STYLES = ("small", "uniform", "edges", "mixed")


class Values:
    """Every value of one case (ids, slots, positions, permutations) from its seed.

    Hypothesis draws the case's structure and ``seed`` (a few dozen choices); the
    arrays come from ``np.random.default_rng(seed)`` in ``style``
    (:data:`VALUE_STYLES`), so a draw costs the same for 1 route or 10^5, and so
    do the weighted coin flips of the structure (:meth:`chance`).
    """

    def __init__(self, seed: int, style: str = "uniform") -> None:
        _check_choice("style", style, VALUE_STYLES)
        self.seed, self.style = seed, style
        self.rng = np.random.default_rng(seed)
        self.coins: list[tuple[float, bool]] = []  # every chance(p) so far: (p, result)
        self._replayed: Iterator[tuple[float, bool]] | None = None

    def sibling(self, index: int) -> Values:
        """The values of another seed (derived from this one's and ``index``) whose
        :meth:`chance` coins fall as this one's fell, in the same order and with the
        same ``p`` (else :class:`Diverged`): the same structure, other arrays."""
        seed = int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
        other = Values(seed, self.style)
        other._replayed = iter(self.coins)
        return other

    def ints(self, size: int, low: int, high: int) -> np.ndarray:
        """``size`` int64 values in ``[low, high]``, spread as :attr:`style` says."""
        rng, span = self.rng, high - low
        if span <= 0 or size == 0:
            return np.full(size, low, dtype=np.int64)
        style = self.style
        if style == "uniform":
            return rng.integers(low, high + 1, size=size, dtype=np.int64)
        small = low + np.minimum(rng.geometric(0.5, size=size) - 1, span)
        if style == "small":
            return small.astype(np.int64)
        edges = np.unique([low, low + 1, high - 1, high])
        edge = rng.choice(edges, size=size)
        if style == "edges":
            return edge.astype(np.int64)
        uniform = rng.integers(low, high + 1, size=size, dtype=np.int64)
        return np.choose(rng.integers(0, 3, size=size), (small, uniform, edge)).astype(np.int64)

    def one(self, low: int, high: int) -> int:
        """One value of :meth:`ints`."""
        return int(self.ints(1, low, high)[0])

    def pick(self, options: Sequence[int], size: int | None = None):
        """One of ``options`` (or ``size`` of them, with repeats); the first ones
        are the small values."""
        where = self.ints(1 if size is None else size, 0, len(options) - 1)
        chosen = np.asarray(options, dtype=np.int64)[where]
        return int(chosen[0]) if size is None else chosen

    def subset(self, options: Sequence[int], least: int, most: int) -> np.ndarray:
        """``least..most`` distinct elements of ``options`` (``most`` at most its size)."""
        count = self.one(least, min(most, len(options)))
        return self.rng.choice(np.asarray(options, dtype=np.int64), size=count, replace=False)

    def permutation(self, size: int) -> np.ndarray:
        return self.rng.permutation(size)

    def chance(self, p: float) -> bool:
        """True with probability ``p``; never for seed 0, the simplest case, which
        Hypothesis shrinks the seed towards (so a shrunk case has no coin's extra).

        A coin of the structure comes from here, not from Hypothesis: a Hypothesis
        boolean leans to 1/2 whatever ``p`` is, and ``integers(0, 99) >= k`` gives
        100 choices two results, so that mutated choices draw a case again and again.
        """
        if self._replayed is not None:
            coin = next(self._replayed, None)
            if coin is None or coin[0] != p:
                raise Diverged(f"coin {len(self.coins)} is not the first case's")
            self.coins.append(coin)
            return coin[1]
        result = self.seed != 0 and bool(self.rng.random() < p)
        self.coins.append((p, result))
        return result


class Diverged(Exception):
    """A sibling case's build asked for another draw or coin than its first case's did
    at that point (its values steered the builder elsewhere): the sibling is dropped."""


class Tape:
    """The draws of one case's build, to build its siblings with the same ones.

    :meth:`record` draws as Hypothesis' ``draw`` and keeps each strategy and value;
    :meth:`replay` is a ``draw`` that gives the kept values back in order, each only
    to the very strategy object it came from (the builder's strategies are cached, one
    object per argument set), else :class:`Diverged` — but a draw of :func:`_integers`
    whose range the sibling's values moved (a request count over a span that starts
    elsewhere) gets the kept value moved into the new range; with ``vary``, the draws of
    :func:`_integers` (the sizes) are drawn again from that generator instead, each in
    its strategy's range.
    """

    def __init__(self, draw: st.DrawFn) -> None:
        self._draw = draw
        self.draws: list[tuple[Any, Any]] = []

    def record(self, strategy: Any) -> Any:
        value = self._draw(strategy)
        self.draws.append((strategy, value))
        return value

    def replay(self, vary: np.random.Generator | None = None) -> Callable[[Any], Any]:
        kept = iter(self.draws)

        def draw(strategy: Any) -> Any:
            entry = next(kept, None)
            integers = _INTEGER_RANGES.get(strategy)  # (low, high) of an _integers draw
            if entry is None or (entry[0] is not strategy and (
                    integers is None or entry[0] not in _INTEGER_RANGES)):
                raise Diverged("a draw the first case did not make")
            if integers is None:
                return entry[1]
            low, high = integers
            if vary is not None:
                return int(vary.integers(low, high + 1))
            return min(max(entry[1], low), high)

        return draw


def _draw_seed(draw: st.DrawFn) -> Values:
    """The values of a drawn seed, ``"uniform"`` until :func:`_draw_style` says."""
    return Values(draw(_integers(0, 2**32 - 1)))


def _draw_style(draw: st.DrawFn, values: Values, routes: int) -> Values:
    """``values`` in a drawn style when they are for up to :data:`ELEMENTWISE_MAX_ROUTES`
    routes (larger arrays stay ``"uniform"``)."""
    if routes <= ELEMENTWISE_MAX_ROUTES:
        values.style = draw(_sampled_from(VALUE_STYLES))
    return values


#: The range of each strategy :func:`_integers` made (for :meth:`Tape.replay`).
_INTEGER_RANGES: dict[Any, tuple[int, int]] = {}


#: ``st.integers`` and ``st.sampled_from`` (options a tuple), one strategy object per
#: argument set: building one and validating it costs more than drawing from it.
@functools.lru_cache(maxsize=8192)
def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    strategy = st.integers(low, high)
    _INTEGER_RANGES[strategy] = (low, high)
    return strategy


_sampled_from = functools.lru_cache(maxsize=4096)(st.sampled_from)


def _rank_counts(num_global: int, dispatch: str, min_ranks: int, max_ranks: int,
                 non_divisible: bool | None) -> tuple[int, ...]:
    high = max_ranks if dispatch == "expert_map" else min(max_ranks, num_global)
    return tuple(r for r in range(max(min_ranks, 1), high + 1)
                 if non_divisible is None or bool(num_global % r) == non_divisible)


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise UsageError(f"{name}={value!r}: must be one of {tuple(allowed)}")
