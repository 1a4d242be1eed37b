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
3. the oracle accepts it for every rank (an :class:`oracle.OracleError`
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

Passes prefer big steps, and try the smallest values early, as Hypothesis
shrinks towards the simplest value: deletions go the delta-debugging way
(everything, then halves, then keeping just the first 0, 1, 2, 3 elements,
then quarters, ... then single elements), and an integer is tried at its
floor and the next three values first, then bisected, so that the value one
below the result has always been tried (``B -> 1, 2, 3, 4``, ``B -> 10``,
..., ``B -> B - 1``).  A crash at ``T = 2`` is so found in a handful of runs
whatever ``T`` it started from, where single deletions (``T -> T - 1``)
would never get there.  The passes run in order (:data:`PASSES`, in
``_passes.py``) — deletions first (tokens, requests, topk columns, whole
adapter slots, entries of a hand-made ``lora_ids``), since removing data is
what lets the dimensions drop; then a trade across the kernels' path switch
(:func:`~difftest.shrink._passes.trade_routes_for_experts`: a large-path
failure held at a thousand routes goes to one token with ``E`` past the
small-path limit); then the dimensions (EP ranks, experts, slots, block
size, padding); values last, because there are many of them and they are
cheapest to judge on a small case.  Rounds repeat until one full round
accepts nothing.

A pass raises nothing on purpose: what it raises is a bug of the pass, and
propagates (so does an exception of ``still_fails``).  The only errors
caught are those a candidate raises when it is not a valid case — a
:class:`~difftest.errors.CaseError` from its construction or an
:class:`oracle.OracleError` from the reference (``_surgery.INVALID``) —
where the candidate is built; such a candidate is never run.

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

from typing import Callable

from ..case import Case
from ..errors import UsageError
from ._log import compressed_log
from ._passes import COSTLY_PASSES, PASSES
from ._shrinker import Shrinker, ShrinkResult, order_key, value_key

__all__ = [
    "COSTLY_PASSES", "PASSES", "ShrinkResult", "Shrinker", "compressed_log", "order_key",
    "shrink", "value_key",
]


def shrink(case: Case, still_fails: Callable[[Case], bool], *, max_seconds: float = 60.0,
           max_calls: int = 5000, costly: bool = False) -> ShrinkResult:
    """Shrink the failing ``case`` while ``still_fails`` holds (see the module docstring).

    ``case`` is taken to fail as given; it is not re-run.  ``still_fails``
    gets well-formed candidates of the same contract only and returns whether
    each shows the same failure.  Raises ``ValueError`` for a non-positive
    budget (:class:`~difftest.errors.UsageError`, a ``ValueError``); an
    exception from ``still_fails`` propagates, and so does one of a pass.
    ``costly=True`` (a crash or a hang: each candidate that still fails costs a
    worker) runs :data:`COSTLY_PASSES`, which first try every size the deletions
    leave at its floor in one candidate (:func:`~difftest.shrink._passes.leap_to_floors`).
    """
    if not max_seconds > 0:
        raise UsageError(f"max_seconds={max_seconds!r}: must be a positive number of seconds")
    if max_calls < 1:
        raise UsageError(f"max_calls={max_calls!r}: must be at least 1")
    return Shrinker(case, still_fails, COSTLY_PASSES if costly else PASSES,
                    max_seconds=max_seconds, max_calls=max_calls).run()
