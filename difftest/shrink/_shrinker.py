"""The shrinker's state, the one gate every candidate goes through, and its order."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..case import Case, check_case, rank_inputs
from ._surgery import INVALID


@dataclass
class ShrinkResult:
    """What :func:`shrink` found.

    ``case``: the smallest failing case (the original when nothing smaller
    fails); ``passes_applied``: one line per accepted step, e.g.
    ``"drop_tokens: T 37 -> 12"``; ``calls``: how many times ``still_fails``
    ran; ``elapsed_s``: wall time; ``minimal``: ``True`` when a full round
    of every pass made no progress (1-minimal), ``False`` when a budget ran
    out first.
    """

    case: Case
    passes_applied: list[str] = field(default_factory=list)
    calls: int = 0
    elapsed_s: float = 0.0
    minimal: bool = False


SMALL_FIRST = 4
"""How many of the smallest values a dimension tries before halving (``T = 0, 1, 2, 3``)."""


class _BudgetExhausted(Exception):
    """Raised inside a pass when ``max_seconds`` or ``max_calls`` is spent."""


class Shrinker:
    """The state of one shrink: the current case, the cache, the budget and the log.

    ``passes`` run in their order, round after round (:meth:`run`). A pass
    raises nothing of its own: whatever it raises is a bug of the pass and
    propagates; a candidate that is not a valid case is ``None`` from
    :meth:`build` (or rejected by :meth:`consider`), never an exception.
    """

    def __init__(self, case: Case, still_fails: Callable[[Case], bool],
                 passes: Sequence[Callable[[Shrinker], None]], *,
                 max_seconds: float, max_calls: int) -> None:
        from ..classify import contract_of

        self.passes = list(passes)
        self.original = case
        self.current = case
        self.still_fails = still_fails
        self.max_calls = max_calls
        self.calls = 0
        self.log: list[str] = []
        self.pass_name = ""
        self._start = time.perf_counter()
        self._deadline = self._start + max_seconds
        self.contract = contract_of(case)
        self._key = order_key(case)
        # case_id -> verdict; None: ill-formed or of another contract (never run)
        self._seen: dict[str, bool | None] = {case.case_id: True}

    def run(self) -> ShrinkResult:
        minimal = False
        try:
            while True:
                before = len(self.log)
                for shrink_pass in self.passes:
                    self.pass_name = shrink_pass.__name__
                    shrink_pass(self)
                if len(self.log) == before:
                    minimal = True
                    break
        except _BudgetExhausted:
            pass
        return ShrinkResult(self.current, self.log, self.calls,
                            time.perf_counter() - self._start, minimal)

    # -- the one gate every candidate goes through ------------------------------
    def consider(self, candidate: Case | None, step: str) -> bool:
        """Make ``candidate`` the current case if it is simpler, valid and still fails.

        ``step`` says what changed (``"T 37 -> 12"``); an accepted step is
        logged as ``"<pass>: <step>"``.
        """
        if time.perf_counter() >= self._deadline:
            raise _BudgetExhausted
        if candidate is None:
            return False
        if self._attempt(candidate, step):
            return True
        pinned = self._pinned(candidate)
        return pinned is not None and self._attempt(
            pinned, f"{step} (P pinned at {pinned.max_num_tokens_padded})")

    def _attempt(self, candidate: Case, step: str) -> bool:
        key = order_key(candidate)
        if not key < self._key or candidate.case_id in self._seen:
            return False
        candidate = self._admissible(candidate)
        if candidate is None:
            return False
        if self.calls >= self.max_calls:
            raise _BudgetExhausted
        self.calls += 1
        fails = bool(self.still_fails(candidate))
        self._seen[candidate.case_id] = fails
        if fails:
            self.current, self._key = candidate, key
            self.log.append(f"{self.pass_name}: {step}")
        return fails

    def _pinned(self, candidate: Case) -> Case | None:
        """A defensive candidate with a smaller production ``P``, given the current one instead.

        Some defensive failures need a long output row (a row written past
        the output overruns the guard band only when ``P`` is large); pinning
        ``P`` lets tokens, routes and experts go while the row stays long.
        """
        if (self.contract != "defensive" or candidate.dialect == "ep-remap"
                or candidate.max_num_tokens_padded is not None
                or self.current.max_num_tokens_padded is not None):
            return None
        old, new = _production_padding(self.current), _production_padding(candidate)
        if old is None or new is None or new >= old:
            return None
        try:
            return candidate.replace(max_num_tokens_padded=old)
        except INVALID:
            return None

    def _admissible(self, candidate: Case) -> Case | None:
        """The candidate, re-tagged, if the oracle takes it and its contract is unchanged."""
        from ..classify import contract_of, edge_classes_of

        try:
            check_case(candidate)
            same_contract = contract_of(candidate) == self.contract
            classes = edge_classes_of(candidate) if same_contract else ()
        except INVALID:
            same_contract = False
        if not same_contract:
            self._seen[candidate.case_id] = None
            return None
        return dataclasses.replace(candidate, contract=self.original.contract,
                                   edge_classes=classes, case_id=candidate.case_id)

    # -- helpers the passes share -----------------------------------------------
    def build(self, **changes: Any) -> Case | None:
        """The current case with ``changes``, or ``None`` when that is not a well-formed case."""
        try:
            return self.current.replace(**changes)
        except INVALID:
            return None

    def delete_chunks(self, count: Callable[[Case], int],
                      without: Callable[[Case, int, int], Case | None], label: str) -> None:
        """Delta debugging, with the smallest counts tried early.

        Delete ``[i, i + size)`` for sizes all, half, quarter, ..., 1; right
        after the halves, keep just the first ``0, 1, ..., SMALL_FIRST - 1``
        elements (the first that still fails ends that stage), so that a
        failure that needs a few elements of any kind (``T % 3 == 2``) gets
        there in a handful of runs, not one deletion at a time; the halves
        come first because which half still fails says which elements matter.
        ``without(case, start, stop)`` is the case without those elements
        (``None`` if not allowed); ``label`` names the count in the log.
        """
        def consider_without(start: int, stop: int) -> bool:
            n = count(self.current)
            candidate = without(self.current, start, stop)
            step = f"{label} {n} -> {n - (stop - start)}"
            if candidate is not None and label != "T":
                step += _also_changed(self.current, candidate, skip=label)
            return self.consider(candidate, step)

        level = 0
        size = count(self.current)
        while size >= 1:
            i = 0
            while i < count(self.current):
                if not consider_without(i, min(i + size, count(self.current))):
                    i += size
            level += 1
            if level == 2:  # after all, then halves: the smallest counts
                for keep in range(SMALL_FIRST):
                    n = count(self.current)
                    if keep >= n or consider_without(keep, n):
                        break
            size //= 2

    def descend(self, value: int, floor: int, attempt: Callable[[int], bool]) -> None:
        """Lower an integer towards ``floor``: the smallest values first
        (``floor, floor + 1, ...``, :data:`SMALL_FIRST` of them), then bisect
        down to ``value - 1``.

        ``attempt(v)`` proposes the current case with the integer set to
        ``v``.  The search ends next to a rejected value, so one step down
        from the result has always been tried.
        """
        for small in range(floor, min(floor + SMALL_FIRST, value)):
            if attempt(small):
                return
        rejected, held = floor + SMALL_FIRST - 1, value
        while held - rejected > 1:
            middle = (rejected + held) // 2
            if attempt(middle):
                held = middle
            else:
                rejected = middle


def _production_padding(case: Case) -> int | None:
    """The largest production ``P`` over the case's ranks (``None`` if it has none)."""
    try:
        return max(int(rank_inputs(case, rank)["max_num_tokens_padded"])
                   for rank in case.ranks())
    except INVALID:
        return None


def _also_changed(old: Case, new: Case, skip: str) -> str:
    """`` (T 5 -> 3, L 4 -> 2)``: the other sizes a compound step changed."""
    def sizes(case: Case) -> dict[str, int]:
        return {"T": case.num_tokens, "K": case.topk, "E": case.num_experts,
                "L": case.max_loras, "R": case.ep.ep_size if case.ep else 0}

    before, after = sizes(old), sizes(new)
    parts = [f"{name} {before[name]} -> {after[name]}" for name in before
             if name != skip and before[name] != after[name]]
    return f" ({', '.join(parts)})" if parts else ""


# -- the order ------------------------------------------------------------------
def order_key(case: Case) -> tuple[int, ...]:
    """The total order the shrinker descends: :meth:`Case.size_key`, then :func:`value_key`."""
    return tuple(case.size_key()) + value_key(case)


def value_key(case: Case) -> tuple[int, ...]:
    """Ties of ``size_key`` broken by how plain the values are (smaller is plainer).

    Components, in order: ``topk_ids`` int64; EP round robin; EP ``local_ids``
    dispatch; number of EP ranks run; an ``expert_map`` given; number of
    SGLang requests; the adapter mapping's distance from base (``sum |m + 1|``
    over ``token_lora_mapping`` or ``req_to_lora``); ``lora_ids`` given, its
    length, and its distance from ``-1``; ``adapter_enabled`` given and its entries that
    are not ``1``.  The mapping comes before ``lora_ids`` because a
    production ``lora_ids`` is recomputed from the mapping.
    """
    def distance(values: np.ndarray | None) -> int:
        return 0 if values is None else int(np.abs(values.astype(np.int64) + 1).sum())

    ep = case.ep
    requests = 0 if case.seg_indptr is None else max(case.seg_indptr.size - 1, 0)
    mapping = case.token_lora_mapping if case.dialect == "vllm-lora" else case.req_to_lora
    enabled = case.adapter_enabled
    return (
        int(case.topk_ids.dtype == np.int64),
        int(ep is not None and ep.strategy == "round_robin"),
        int(ep is not None and ep.dispatch == "local_ids"),
        len(ep.ranks) if ep is not None else 0,
        int(case.expert_map is not None),
        requests,
        distance(mapping),
        0 if case.lora_ids is None else 1 + case.lora_ids.size,
        distance(case.lora_ids),
        0 if enabled is None else 1 + int((enabled != 1).sum()),
    )

