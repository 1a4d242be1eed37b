"""Shrinking: reduce a failing case to a minimal one a kernel author can act on.

A generated failure is rarely readable: forty tokens, four routes each,
sixteen experts, a block size of sixteen and four adapters, of which one
detail matters.  :func:`shrink` searches for a smaller case that still shows
*the same failure* (the caller's ``still_fails`` predicate decides what
"same" means; the campaign uses the failure signature: dialect, verdict,
primary check) and returns the smallest one it found.

Design
------
The shrinker is a list of named, deterministic passes (:data:`PASSES`), in
the manner of Hypothesis' ``internal/conjecture/shrinker.py``.  A pass looks
at the current case, proposes candidates, and hands each one to
:meth:`Shrinker.consider`, which accepts it — it becomes the current case —
only when all of these hold, cheapest test first:

1. it is *strictly simpler*: smaller by :meth:`Case.size_key` (routes,
   tokens, topk, slots, experts, ranks, block size, padding, the sum of
   ``|expert id|``), ties broken by a value order (:func:`value_key`: int32
   before int64, linear before round robin, fewer ranks run, no
   ``expert_map``, adapter mapping towards ``-1``, fewer requests,
   ``lora_ids`` towards ``-1``, adapters enabled).  Both keys are tuples of
   non-negative integers of fixed length, so the order is well founded and
   shrinking terminates whatever the passes propose;
2. it was never tried before (results are cached by ``case_id``, the content
   hash, so a candidate two passes propose costs one run);
3. the oracle accepts it for every rank (a ``ValueError``/``TypeError``
   from the reference marks an ill-formed candidate, e.g. a ``P`` too small);
4. the *contract guard*: it belongs to the same contract as the original
   (:func:`difftest.classify.contract_of`).  Without it a production failure
   would happily shrink into a defensive one — an empty batch, a ``-1``
   expert id, a hand-made ``lora_ids`` — which the kernel author may rightly
   call out of scope, and a defensive failure could turn into a different,
   production-looking bug.  The minimal case must be a bug of the same kind
   as the one the campaign found;
5. ``still_fails(candidate)`` — the only expensive step (each call may run a
   kernel in a sandbox worker), counted against ``max_calls``.

One step is not a pass of its own: for a defensive case whose ``P`` is the
production size, a candidate with a smaller production ``P`` that is
rejected is tried once more with ``P`` pinned at the current size
(:meth:`Shrinker._pinned`) — a row written past the output overruns the
guard band only when rows are long, and pinning lets tokens and experts go.
:func:`lower_padding` lowers the pinned ``P`` afterwards.

Passes prefer big steps: deletions go the delta-debugging way (everything,
then halves, then quarters, ... then single elements) and an integer is
tried at its floor first, then bisected, so that the value one below the
result has always been tried (``B -> 1``, ``B -> 8``, ..., ``B -> B - 1``).  The passes run in
order — deletions first (tokens, requests, topk columns, whole adapter
slots, entries of a hand-made ``lora_ids``), since removing data is what lets the dimensions drop; then the
dimensions (EP ranks, experts, slots, block size, padding); values last,
because there are many of them and they are cheapest to judge on a small
case.  Rounds repeat until one full round accepts nothing.

That end state is what *1-minimal* means here: no single step of any pass —
deleting any one token, request, column or slot, lowering any one size by
one, simplifying any one value — gives a candidate of the same contract
that still fails.  It is not a global minimum (no pass reshapes ``[T, K]``
or swaps tokens), but it is the same for the same input: passes use no
randomness and iterate in a fixed order, so the same case and predicate give
the same minimal case and the same log.  Only a budget (``max_seconds``,
``max_calls``) stops the search early; then ``minimal`` is ``False``.

Candidates keep the original's ``contract`` and carry ``edge_classes``
recomputed by :func:`difftest.classify.edge_classes_of`, so a tag is always
true of the case it sits on.

Example (a log of the grid-skips-last-slot fault, shortened)::

    result = shrink(case, same_failure)     # vllm-lora, T=40 K=4 E=16 B=16 L=4
    result.passes_applied
    # ['drop_tokens: T 40 -> 20', ..., 'lower_topk: K 4 -> 2', ...,
    #  'drop_slots: slots 4 -> 2 (T 5 -> 3, L 4 -> 2)', ..., 'lower_block_size: B 16 -> 1']
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

import oracle

from .case import LORA_DIALECTS, Case, EPGroup, check_case, rank_inputs
from .dialects import DIALECT_INFO
from .errors import UsageError

__all__ = ["PASSES", "ShrinkResult", "Shrinker", "compressed_log", "shrink", "value_key"]


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


_STEP = re.compile(r"^(?P<pass>\w+): (?P<label>.+?) (?P<old>-?\d+) -> (?P<new>-?\d+)(?P<rest>.*)$")
_RUN_SHOWN = 4  # a longer run of one pass's other steps shows its first and last two


def compressed_log(steps: Sequence[str]) -> list[str]:
    """``ShrinkResult.passes_applied`` for a reader: a chain of one pass lowering one
    size (``drop_tokens: T 16384 -> 8192``, ``T 8192 -> 4096``, ...) is one line,
    ``drop_tokens: T 16384 → 2 in 13 steps``; a longer run of one pass's other steps
    keeps its first and last two and counts the rest."""
    chained: list[tuple[str, str]] = []  # (pass, line)
    chain: dict[str, Any] | None = None

    def close() -> None:
        if chain is not None:
            n = chain["steps"]
            line = (f"{chain['pass']}: {chain['label']} {chain['old']} → {chain['new']} "
                    f"in {n} steps" if n > 1 else chain["line"])
            chained.append((chain["pass"], line))

    for step in steps:
        m = _STEP.match(step)
        if (m and chain is not None and m["pass"] == chain["pass"]
                and m["label"] == chain["label"] and m["old"] == chain["new"]):
            chain.update(new=m["new"], steps=chain["steps"] + 1)
            continue
        close()
        chain = None
        if m:
            chain = {"pass": m["pass"], "label": m["label"], "old": m["old"], "new": m["new"],
                     "steps": 1, "line": step}
        else:
            chained.append((step.partition(":")[0], step))
    close()
    out: list[str] = []
    i = 0
    while i < len(chained):
        j = i
        while j < len(chained) and chained[j][0] == chained[i][0]:
            j += 1
        run = [line for _, line in chained[i:j]]
        if len(run) > _RUN_SHOWN + 1:
            run = run[:2] + [f"{chained[i][0]}: … {len(run) - _RUN_SHOWN} more steps …"] + run[-2:]
        out += run
        i = j
    return out


def shrink(case: Case, still_fails: Callable[[Case], bool], *, max_seconds: float = 60.0,
           max_calls: int = 5000) -> ShrinkResult:
    """Shrink the failing ``case`` while ``still_fails`` holds (see the module docstring).

    ``case`` is taken to fail as given; it is not re-run.  ``still_fails``
    gets well-formed candidates of the same contract only and returns whether
    each shows the same failure.  Raises ``ValueError`` for a non-positive
    budget (:class:`~difftest.errors.UsageError`, a ``ValueError``); an
    exception from ``still_fails`` propagates.
    """
    if not max_seconds > 0:
        raise UsageError(f"max_seconds={max_seconds!r}: must be a positive number of seconds")
    if max_calls < 1:
        raise UsageError(f"max_calls={max_calls!r}: must be at least 1")
    return Shrinker(case, still_fails, max_seconds=max_seconds, max_calls=max_calls).run()


class _BudgetExhausted(Exception):
    """Raised inside a pass when ``max_seconds`` or ``max_calls`` is spent."""


class _PredicateRaised(Exception):
    """Carries an exception of ``still_fails`` past the guard around each pass."""


class Shrinker:
    """The state of one shrink: the current case, the cache, the budget and the log."""

    def __init__(self, case: Case, still_fails: Callable[[Case], bool], *,
                 max_seconds: float, max_calls: int) -> None:
        from .classify import contract_of

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
                for shrink_pass in PASSES:
                    self.pass_name = shrink_pass.__name__
                    try:
                        shrink_pass(self)
                    except (ValueError, TypeError, IndexError):
                        # a case the pass cannot take apart: the other passes still can
                        continue
                if len(self.log) == before:
                    minimal = True
                    break
        except _BudgetExhausted:
            pass
        except _PredicateRaised as wrapped:
            raise wrapped.__cause__ from None
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
        try:
            fails = bool(self.still_fails(candidate))
        except Exception as exc:  # noqa: BLE001 - the caller's error, raised unchanged
            raise _PredicateRaised from exc
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
        except (ValueError, TypeError):
            return None

    def _admissible(self, candidate: Case) -> Case | None:
        """The candidate, re-tagged, if the oracle takes it and its contract is unchanged."""
        from .classify import contract_of, edge_classes_of

        try:
            check_case(candidate)
            same_contract = contract_of(candidate) == self.contract
            classes = edge_classes_of(candidate) if same_contract else ()
        except (ValueError, TypeError, IndexError):
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
        except (ValueError, TypeError):
            return None

    def delete_chunks(self, count: Callable[[Case], int],
                      without: Callable[[Case, int, int], Case | None], label: str) -> None:
        """Delta debugging: delete ``[i, i + size)`` for sizes all, half, quarter, ..., 1.

        ``without(case, start, stop)`` is the case without those elements
        (``None`` if not allowed); ``label`` names the count in the log.
        """
        size = count(self.current)
        while size >= 1:
            i = 0
            while i < count(self.current):
                n = count(self.current)
                stop = min(i + size, n)
                candidate = without(self.current, i, stop)
                step = f"{label} {n} -> {n - (stop - i)}"
                if candidate is not None and label != "T":
                    step += _also_changed(self.current, candidate, skip=label)
                if not self.consider(candidate, step):
                    i += size
            size //= 2

    def descend(self, value: int, floor: int, attempt: Callable[[int], bool]) -> None:
        """Lower an integer towards ``floor``: the floor first, then bisect down to ``value - 1``.

        ``attempt(v)`` proposes the current case with the integer set to
        ``v``.  The search ends next to a rejected value, so one step down
        from the result has always been tried.
        """
        if value <= floor or attempt(floor):
            return
        rejected, held = floor, value
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
    except (ValueError, TypeError):
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


# -- case surgery -----------------------------------------------------------------
def _is_production_lora_ids(case: Case) -> bool:
    """vLLM ``lora_ids`` in the layout :func:`oracle.active_lora_ids` gives (kept in step)."""
    if case.dialect != "vllm-lora" or case.lora_ids is None:
        return False
    try:
        layout = oracle.active_lora_ids(case.token_lora_mapping, case.max_loras)
    except (ValueError, TypeError):
        return False
    return np.array_equal(case.lora_ids, layout)


def _with_mapping(case: Case, mapping: np.ndarray, num_slots: int | None = None
                  ) -> dict[str, Any]:
    """Changes giving ``case`` the vLLM ``mapping``; a production ``lora_ids`` follows it."""
    changes: dict[str, Any] = {"token_lora_mapping": mapping.astype(np.int32)}
    if _is_production_lora_ids(case):
        try:
            changes["lora_ids"] = oracle.active_lora_ids(mapping, num_slots or case.max_loras)
        except (ValueError, TypeError):
            pass
    return changes


def _keep_tokens(case: Case, keep: np.ndarray) -> dict[str, Any]:
    """Changes that keep the tokens where ``keep`` (bool ``[T]``), inputs consistent.

    SGLang: each ``seg_indptr`` entry becomes the number of kept tokens before
    it, so deleting a token inside request ``r`` lowers ``seg_indptr[r+1:]``.
    """
    changes: dict[str, Any] = {"topk_ids": case.topk_ids[keep]}
    if case.token_lora_mapping is not None:
        changes.update(_with_mapping(case, case.token_lora_mapping[keep]))
    if case.seg_indptr is not None:
        kept_before = np.concatenate([[0], np.cumsum(keep)])
        seg = np.clip(case.seg_indptr.astype(np.int64), 0, case.num_tokens)
        changes["seg_indptr"] = kept_before[seg].astype(np.int32)
    return changes


def _without_tokens(case: Case, start: int, stop: int) -> dict[str, Any]:
    keep = np.ones(case.num_tokens, dtype=bool)
    keep[start:stop] = False
    return _keep_tokens(case, keep)


def _without_requests(case: Case, requests: Iterable[int]) -> dict[str, Any]:
    """Changes deleting SGLang ``requests`` together with their tokens."""
    seg = case.seg_indptr.astype(np.int64)
    drop = sorted(set(requests))
    keep = np.ones(case.num_tokens, dtype=bool)
    for r in drop:
        keep[max(seg[r], 0):max(seg[r + 1], 0)] = False
    changes = _keep_tokens(case, keep)
    # each deleted request is empty now: drop its entry and its end in seg_indptr
    changes["seg_indptr"] = np.delete(changes["seg_indptr"], [r + 1 for r in drop])
    changes["req_to_lora"] = np.delete(case.req_to_lora, drop)
    return changes


def _token_slots(case: Case) -> np.ndarray:
    from .classify import token_slots

    return token_slots(case)


def _used_slots(case: Case) -> list[int]:
    """Slots in ``[0, L)`` the case refers to, ascending.

    Those the mapping (``req_to_lora``) uses, those a hand-made ``lora_ids``
    lists, and listed slots whose adapter is disabled (SGLang's default
    ``lora_ids`` lists every slot).
    """
    num_slots = case.max_loras
    values = [_token_slots(case)]
    if case.dialect == "sglang-lora" and case.req_to_lora is not None:
        values.append(case.req_to_lora)
    if case.lora_ids is not None and not _is_production_lora_ids(case):
        values.append(case.lora_ids)
    enabled = case.adapter_enabled
    if enabled is not None:
        listed = (case.lora_ids if case.lora_ids is not None else
                  np.arange(num_slots) if case.dialect == "sglang-lora" else np.zeros(0))
        listed = listed[(listed >= 0) & (listed < min(num_slots, enabled.size))]
        values.append(listed[enabled[listed] == 0])
    used = np.unique(np.concatenate([v.astype(np.int64).reshape(-1) for v in values]))
    return [int(v) for v in used if 0 <= v < num_slots]


def _relabel_slots(case: Case, keep: list[int], num_slots: int,
                   changes: dict[str, Any] | None = None,
                   keep_length: bool = False) -> Case | None:
    """``case`` with slot ``keep[i]`` renamed ``i`` and ``L = num_slots``.

    A value ``>= L`` keeps its distance past the end (``v - L + num_slots``),
    so an out-of-range slot stays out of range; a value in ``[0, L)`` not in
    ``keep`` becomes ``-1``.  ``adapter_enabled`` moves with its slots and
    keeps any surplus length; a production or default ``lora_ids`` is rebuilt.
    """
    old = case.max_loras
    changes = dict(changes or {})
    base = case.replace(**changes) if changes else case
    index = {slot: i for i, slot in enumerate(keep)}

    def relabel(values: np.ndarray) -> np.ndarray:
        out = [index.get(int(v), -1) if 0 <= v < old else
               (int(v) - old + num_slots if v >= old else int(v)) for v in values.reshape(-1)]
        return np.asarray(out, dtype=np.int32).reshape(values.shape)

    changes["max_loras"] = num_slots
    if case.dialect == "vllm-lora":
        mapping = relabel(base.token_lora_mapping)
        changes["token_lora_mapping"] = mapping
        if base.lora_ids is not None:
            if _is_production_lora_ids(base):
                try:
                    changes["lora_ids"] = oracle.active_lora_ids(mapping, num_slots)
                except (ValueError, TypeError):
                    return None
            else:
                changes["lora_ids"] = (relabel(base.lora_ids) if keep_length else
                                       _resized_lora_ids(relabel(base.lora_ids), num_slots + 1))
    else:
        changes["req_to_lora"] = relabel(base.req_to_lora)
        if base.lora_ids is not None:
            if np.array_equal(base.lora_ids, np.arange(old)):
                changes["lora_ids"] = np.arange(num_slots, dtype=np.int32)
            else:
                changes["lora_ids"] = (relabel(base.lora_ids) if keep_length else
                                       _resized_lora_ids(relabel(base.lora_ids), num_slots))
    if base.adapter_enabled is not None:
        enabled = base.adapter_enabled
        length = max(num_slots + enabled.size - old, num_slots)
        moved = np.ones(length, dtype=enabled.dtype)
        for i, slot in enumerate(keep):
            if slot < enabled.size:
                moved[i] = enabled[slot]
        surplus = enabled[old:]
        moved[num_slots:num_slots + surplus.size] = surplus
        changes["adapter_enabled"] = moved
    try:
        return case.replace(**changes)
    except (ValueError, TypeError):
        return None


def _resized_lora_ids(lora_ids: np.ndarray, length: int) -> np.ndarray:
    """``lora_ids`` padded with ``-1``, or cut by trailing ``-1`` entries, towards ``length``."""
    values = [int(v) for v in lora_ids]
    while len(values) > length and values[-1] == -1:
        values.pop()
    values += [-1] * (length - len(values))
    return np.asarray(values, dtype=np.int32)


def _expert_changes(case: Case, num_experts: int) -> dict[str, Any]:
    """``E = num_experts``, with EP's ``global_num_experts`` kept equal."""
    changes: dict[str, Any] = {"num_experts": num_experts}
    if case.ep is not None:
        changes["ep"] = dataclasses.replace(case.ep, global_num_experts=num_experts)
    return changes


def _expert_floor(case: Case) -> int:
    """The smallest ``E`` that keeps every in-range id in range (and ``G >= R`` under EP)."""
    flat = case.topk_ids.reshape(-1).astype(np.int64)
    valid = flat[(flat >= 0) & (flat < case.num_experts)]
    floor = int(valid.max()) + 1 if valid.size else 1
    if case.ep is not None:
        floor = max(floor, min(case.ep.ep_size, case.num_experts))
    return floor


def _toward_zero(value: int, num_experts: int) -> list[int]:
    """Simpler expert ids for ``value``: 0, the first out-of-range id, half, one step."""
    if value > 0:
        targets = [0, num_experts if value > num_experts else 0, value // 2, value - 1]
    elif value < 0:
        targets = [0, -1, -((-value) // 2), value + 1]
    else:
        return []
    return [t for t in dict.fromkeys(targets) if abs(t) < abs(value)]


def _toward_base(value: int, num_slots: int) -> list[int]:
    """Simpler slot values for ``value``: ``-1`` (base), 0, ``L`` when past it, half, one step."""
    targets = [-1, 0]
    if value > num_slots:
        targets.append(num_slots)
    targets += [value // 2, value - 1] if value >= 0 else [value + 1]
    return [t for t in dict.fromkeys(targets) if abs(t + 1) < abs(value + 1)]


# -- the passes -------------------------------------------------------------------
PASSES: list[Callable[[Shrinker], None]] = []
"""The shrink passes, in the order one round runs them."""


def shrink_pass(fn: Callable[[Shrinker], None]) -> Callable[[Shrinker], None]:
    """Register ``fn`` as the next pass of :data:`PASSES`."""
    PASSES.append(fn)
    return fn


@shrink_pass
def drop_tokens(s: Shrinker) -> None:
    """Delete tokens: rows of ``topk_ids`` with their adapter mapping (SGLang: requests shrink)."""
    def without(case: Case, start: int, stop: int) -> Case | None:
        return s.build(**_without_tokens(case, start, stop))

    s.delete_chunks(lambda c: c.num_tokens, without, "T")


@shrink_pass
def drop_requests(s: Shrinker) -> None:
    """SGLang: delete whole requests with their tokens (an empty request costs nothing else)."""
    if s.current.dialect != "sglang-lora" or s.current.seg_indptr is None:
        return

    def count(case: Case) -> int:
        return max(case.seg_indptr.size - 1, 0)

    def without(case: Case, start: int, stop: int) -> Case | None:
        if case.req_to_lora is None or case.req_to_lora.size != count(case):
            return None
        return s.build(**_without_requests(case, range(start, stop)))

    s.delete_chunks(count, without, "requests")


@shrink_pass
def lower_topk(s: Shrinker) -> None:
    """Delete columns of ``topk_ids`` (``K -> K - 1``), keeping ``K >= 1``."""
    def without(case: Case, start: int, stop: int) -> Case | None:
        if stop - start >= case.topk:
            return None
        return s.build(topk_ids=np.delete(case.topk_ids, range(start, stop), axis=1))

    s.delete_chunks(lambda c: c.topk, without, "K")


@shrink_pass
def drop_slots(s: Shrinker) -> None:
    """LoRA: delete adapter slots with every token (request) mapped to them, renumber, lower L.

    The compound step that gets past ``full-slots-with-base``: there no
    single token can go (each adapter's last token keeps the last real slot
    at ``lora_ids[L]``), but a whole slot and one from ``L`` can.
    """
    if s.current.dialect not in LORA_DIALECTS:
        return

    def without(case: Case, start: int, stop: int) -> Case | None:
        used = _used_slots(case)
        gone = set(used[start:stop])
        keep = [slot for slot in used if slot not in gone]
        slots = _token_slots(case)
        if case.dialect == "vllm-lora":
            changes = _keep_tokens(case, ~np.isin(slots, list(gone)))
        else:
            requests = [r for r, slot in enumerate(case.req_to_lora) if int(slot) in gone]
            changes = _without_requests(case, requests)
        try:
            return _relabel_slots(case, keep, max(len(keep), 1), changes)
        except (ValueError, TypeError):
            return None

    s.delete_chunks(lambda c: len(_used_slots(c)), without, "slots")


@shrink_pass
def drop_lora_ids(s: Shrinker) -> None:
    """Defensive LoRA: delete entries of a hand-made ``lora_ids`` (the launch covers fewer)."""
    case = s.current
    if (case.dialect not in LORA_DIALECTS or case.lora_ids is None
            or s.contract != "defensive" or _is_production_lora_ids(case)):
        return

    def without(case: Case, start: int, stop: int) -> Case | None:
        return s.build(lora_ids=np.delete(case.lora_ids, range(start, stop)))

    s.delete_chunks(lambda c: c.lora_ids.size, without, "lora_ids entries")


@shrink_pass
def lower_ep(s: Shrinker) -> None:
    """EP: fewer ranks (alone, then with ``G`` lowered alongside), fewer ranks run, no EP at
    one rank, linear placement, ``expert_map`` dispatch."""
    if s.current.ep is None:
        return

    def with_ranks(size: int) -> bool:
        case = s.current
        return s.consider(s.build(ep=_smaller_group(case.ep, size)),
                          f"R {case.ep.ep_size} -> {size}")

    def with_ranks_and_experts(size: int) -> bool:
        # G % R is what a placement gets wrong: lower both so the remainder stays
        case = s.current
        d = case.ep.ep_size - size
        num_experts = case.num_experts - d
        if num_experts < 1:
            return False
        changes = _expert_changes(case, num_experts)
        changes["ep"] = _smaller_group(changes["ep"], size)
        return s.consider(s.build(topk_ids=_ids_following(case, num_experts), **changes),
                          f"R {case.ep.ep_size} -> {size}, E {case.num_experts} -> {num_experts}")

    s.descend(s.current.ep.ep_size, 1, with_ranks)
    s.descend(s.current.ep.ep_size, 1, with_ranks_and_experts)

    def without_ranks(case: Case, start: int, stop: int) -> Case | None:
        ranks = case.ep.ranks[:start] + case.ep.ranks[stop:]
        if not ranks:
            return None
        return s.build(ep=dataclasses.replace(case.ep, ranks=ranks))

    s.delete_chunks(lambda c: len(c.ep.ranks), without_ranks, "ranks run")
    ep = s.current.ep
    if ep.ep_size == 1 and s.current.dialect != "ep-remap":
        s.consider(s.build(ep=None), "EP removed (R 1)")
    if s.current.ep is not None and s.current.ep.strategy == "round_robin":
        s.consider(s.build(ep=dataclasses.replace(s.current.ep, strategy="linear")),
                   "strategy round_robin -> linear")
    if s.current.ep is not None and s.current.ep.dispatch == "local_ids":
        s.consider(s.build(ep=dataclasses.replace(s.current.ep, dispatch="expert_map")),
                   "dispatch local_ids -> expert_map")


def _smaller_group(ep: EPGroup, size: int) -> EPGroup:
    """``ep`` with ``size`` ranks: all of them if it ran all, else the ranks that remain."""
    full = ep.ranks == tuple(range(ep.ep_size))
    ranks = tuple(r for r in ep.ranks if r < size)
    return dataclasses.replace(ep, ep_size=size,
                               ranks=tuple(range(size)) if full or not ranks else ranks)


def _ids_following(case: Case, num_experts: int) -> np.ndarray:
    """``topk_ids`` for ``E = num_experts``: ids ``>= num_experts`` move down by the difference.

    The highest experts stay the highest (at least 0); ids past the old
    ``E`` stay past the new one.
    """
    d = case.num_experts - num_experts
    ids = case.topk_ids.astype(np.int64)
    moved = np.where(ids >= num_experts, np.maximum(ids - d, 0), ids)
    return moved.astype(case.topk_ids.dtype)


@shrink_pass
def renumber_experts(s: Shrinker) -> None:
    """Map the experts in use onto ``0..k-1`` in order and drop the unused ones (``E -> k``).

    Ids past ``E`` keep their distance past the end; negative ids stay.  A
    non-EP ``expert_map`` keeps the rows of the experts in use, its local
    ids renumbered the same way.  Under EP ``G`` stays at least ``R``.
    """
    case = s.current
    flat = case.topk_ids.astype(np.int64)
    used = np.unique(flat[(flat >= 0) & (flat < case.num_experts)])
    new_e = max(int(used.size), 1)
    if case.ep is not None:
        new_e = max(new_e, min(case.ep.ep_size, case.num_experts))
    relabelled = np.where(flat >= case.num_experts, flat - case.num_experts + new_e, flat)
    inside = (flat >= 0) & (flat < case.num_experts)
    relabelled[inside] = np.searchsorted(used, flat[inside])
    changes = {"topk_ids": relabelled.astype(case.topk_ids.dtype), **_expert_changes(case, new_e)}
    if case.expert_map is not None and case.ep is None:
        rows = case.expert_map[used].astype(np.int64) if used.size else np.full(1, -1)
        local = np.unique(rows[rows >= 0])
        mapped = np.where(rows >= 0, np.searchsorted(local, rows), -1)
        changes["expert_map"] = np.concatenate(
            [mapped, np.full(new_e - mapped.size, -1)]).astype(np.int32)
    moved = f"experts {used.tolist()} -> 0..{used.size - 1}" if used.size else "no expert in use"
    s.consider(s.build(**changes), f"E {case.num_experts} -> {new_e} ({moved})")


@shrink_pass
def lower_experts(s: Shrinker) -> None:
    """Lower ``E`` while every in-range id stays in range; then with the top ids following.

    The first search cuts ``E`` (and a non-EP ``expert_map``) down to the
    largest id in use.  The second lowers ``E`` below that by ``d`` and moves
    every id ``>= E - d`` down by ``d`` (at least to 0): the highest experts
    stay the highest, which is what an EP placement with a remainder
    (``G % R != 0``) or an id past ``E`` is about.
    """
    def cut(num_experts: int) -> bool:
        case = s.current
        changes = _expert_changes(case, num_experts)
        if case.expert_map is not None and case.ep is None:
            changes["expert_map"] = case.expert_map[:num_experts]
        return s.consider(s.build(**changes), f"E {case.num_experts} -> {num_experts}")

    s.descend(s.current.num_experts, _expert_floor(s.current), cut)
    if s.current.expert_map is not None:
        return

    def follow(num_experts: int) -> bool:
        case = s.current
        d = case.num_experts - num_experts
        return s.consider(s.build(topk_ids=_ids_following(case, num_experts),
                                  **_expert_changes(case, num_experts)),
                          f"E {case.num_experts} -> {num_experts} "
                          f"(ids >= {num_experts} down by {d})")

    floor = max(1, min(s.current.ep.ep_size, s.current.num_experts)) if s.current.ep else 1
    s.descend(s.current.num_experts, floor, follow)


@shrink_pass
def lower_loras(s: Shrinker) -> None:
    """LoRA: renumber the slots in use onto ``0..k-1`` and lower ``L`` towards ``k``.

    Mapping, ``req_to_lora``, ``lora_ids`` and ``adapter_enabled`` move
    together; a production vLLM ``lora_ids`` is recomputed with
    :func:`oracle.active_lora_ids`, ``adapter_enabled`` keeps ``L + 1``
    (vLLM) or ``L`` (SGLang) entries.
    """
    if s.current.dialect not in LORA_DIALECTS:
        return
    used = _used_slots(s.current)

    def attempt(num_slots: int) -> bool:
        case = s.current
        now = _used_slots(case)
        moved = f"slots {now} -> 0..{len(now) - 1}" if now else "no slot in use"
        step = f"L {case.max_loras} -> {num_slots} ({moved})"
        if s.consider(_relabel_slots(case, now, num_slots), step):
            return True
        # a short defensive lora_ids keeps its length: padding it to the new L
        # could turn the case into a production one, which the contract guard refuses
        short = case.lora_ids is not None and case.lora_ids.size <= num_slots
        return short and s.consider(_relabel_slots(case, now, num_slots, keep_length=True),
                                    step + ", lora_ids length kept")

    floor = max(len(used), 1)
    if s.current.max_loras > floor:
        s.descend(s.current.max_loras, floor, attempt)
    else:  # L is as small as the slots in use allow; still move them onto 0..k-1
        attempt(s.current.max_loras)


@shrink_pass
def lower_block_size(s: Shrinker) -> None:
    """``B -> 1``, then half way, then ``B - 1``."""
    def attempt(block_size: int) -> bool:
        return s.consider(s.build(block_size=block_size),
                          f"B {s.current.block_size} -> {block_size}")

    s.descend(s.current.block_size, 1, attempt)


@shrink_pass
def lower_padding(s: Shrinker) -> None:
    """An explicit ``P``: the production size (``None``), else lower while every row still fits."""
    case = s.current
    if case.max_num_tokens_padded is None or case.dialect == "ep-remap":
        return
    if s.consider(s.build(max_num_tokens_padded=None),
                  f"P {case.max_num_tokens_padded} -> production"):
        return
    info = DIALECT_INFO[case.dialect]
    try:
        need = max(int(np.max(e.num_tokens_post_pad[e.written], initial=0))
                   for e in (info.reference(case, rank) for rank in case.ranks()))
    except (ValueError, TypeError):
        return

    def attempt(padded: int) -> bool:
        return s.consider(s.build(max_num_tokens_padded=padded),
                          f"P {s.current.max_num_tokens_padded} -> {padded}")

    s.descend(case.max_num_tokens_padded, max(need, 1), attempt)


@shrink_pass
def simplify_values(s: Shrinker) -> None:
    """Plainer values: int32 ids; ids towards 0; adapters towards base; defaults for the rest.

    Order: whole-array steps first (dtype, no ``expert_map``, default
    ``adapter_enabled``, default sglang-align flags), then every occurrence
    of one expert id at once, then single routes; then the adapter mapping, ``lora_ids`` entries and
    disabled adapters, one at a time.
    """
    case = s.current
    if case.topk_ids.dtype == np.int64:
        info = np.iinfo(np.int32)
        if case.topk_ids.size == 0 or (case.topk_ids.min() >= info.min
                                       and case.topk_ids.max() <= info.max):
            s.consider(s.build(topk_ids=case.topk_ids.astype(np.int32)),
                       "topk_ids int64 -> int32")
    if s.current.expert_map is not None:
        s.consider(s.build(expert_map=None), "expert_map -> none")
    if s.current.adapter_enabled is not None:
        s.consider(s.build(adapter_enabled=None), "adapter_enabled -> all enabled")
    if not s.current.pad_sorted_token_ids:
        s.consider(s.build(pad_sorted_token_ids=True), "pad_sorted_token_ids -> true")
    if s.current.ignore_invalid_expert:
        s.consider(s.build(ignore_invalid_expert=False), "ignore_invalid_expert -> false")
    _simplify_expert_ids(s)
    if s.current.dialect == "vllm-lora":
        _simplify_slots(s, "token_lora_mapping")
    elif s.current.dialect == "sglang-lora":
        _simplify_slots(s, "req_to_lora")
    if s.current.lora_ids is not None and not _is_production_lora_ids(s.current):
        _simplify_slots(s, "lora_ids")
    enabled = s.current.adapter_enabled
    for i in range(0 if enabled is None else enabled.size):
        enabled = s.current.adapter_enabled
        if enabled is not None and i < enabled.size and enabled[i] != 1:
            changed = enabled.copy()
            changed[i] = 1
            s.consider(s.build(adapter_enabled=changed),
                       f"adapter_enabled[{i}] {int(enabled[i])} -> 1")


def _simplify_expert_ids(s: Shrinker) -> None:
    values = np.unique(s.current.topk_ids)
    for value in sorted((int(v) for v in values), key=lambda v: (-abs(v), v)):
        for target in _toward_zero(value, s.current.num_experts):
            ids = s.current.topk_ids
            if not (ids == value).any():
                break
            count = int((ids == value).sum())
            if count > 1 and s.consider(s.build(topk_ids=np.where(ids == value, target, ids)
                                                .astype(ids.dtype)),
                                        f"expert id {value} -> {target} ({count} routes)"):
                break
    for flat_index in range(s.current.topk_ids.size):
        progress = True
        while progress:
            progress = False
            ids = s.current.topk_ids
            t, k = divmod(flat_index, ids.shape[1])
            value = int(ids[t, k])
            for target in _toward_zero(value, s.current.num_experts):
                changed = ids.copy()
                changed[t, k] = target
                if s.consider(s.build(topk_ids=changed), f"topk_ids[{t}, {k}] {value} -> {target}"):
                    progress = True
                    break


def _simplify_slots(s: Shrinker, name: str) -> None:
    """Entries of ``name`` towards ``-1`` (base / no adapter), one at a time."""
    size = getattr(s.current, name).size
    for i in range(size):
        progress = True
        while progress:
            progress = False
            values = getattr(s.current, name)
            value = int(values[i])
            for target in _toward_base(value, s.current.max_loras):
                changed = values.copy()
                changed[i] = target
                changes = (_with_mapping(s.current, changed) if name == "token_lora_mapping"
                           else {name: changed})
                if s.consider(s.build(**changes), f"{name}[{i}] {value} -> {target}"):
                    progress = True
                    break
