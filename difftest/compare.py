"""Compare what an implementation wrote with what the oracle expects (SPEC §9).

Every failed check becomes a :class:`Mismatch` with a breadcrumb path
(``rank 1 / slot 3 / expert 7 / sorted_token_ids[112:128]``) and a message in
the manner of ``torch.testing.assert_close``: what differs, how many elements
of how many, and the first differing position with expected and actual.

Checks, by name (the ``check`` column of ``mismatches.parquet``):

``num_tokens_post_pad``  exact, per processed slot
``expert_ids``           exact, per processed row (the blocks its dialect
                         specifies: sglang-align leaves those past the total)
``sorted_token_ids``     per expert segment: the same multiset of routes (same
                         order for a stable implementation)
``pad_value``            positions from the total to ``P`` hold ``N`` (or stay
                         unwritten, where the dialect says so)
``unwritten_row``        rows of unprocessed slots still hold the sentinel
``guard_band``           nothing written outside a buffer
``input_mutated``        inputs unchanged
``local_topk_ids``       ``ep-remap`` output, exact
``ep_conservation``      across ranks: every valid route exactly once, under
                         the right global expert
``repeat_disagree``      repeated runs of one case agree after canonicalisation
``wild_write``           nothing written into another case's buffers (CUDA batches)
``launch_error``         no CUDA error left pending by the call (CUDA)
``exception``, ``crash``, ``timeout``  the call did not finish normally
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

import oracle.ep

from .case import Case
from .dialects import DIALECT_INFO, RemapExpected, RowsExpected

MAX_SHOWN = 8  # elements shown in one message
MAX_SEGMENTS = 4  # differing segments reported per row


@dataclass(frozen=True)
class Mismatch:
    """One failed check."""

    check: str
    message: str
    rank: int | None = None
    slot: int | None = None
    expert: int | None = None
    position: int | None = None
    expected: int | None = None
    actual: int | None = None

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def breadcrumb(rank: int | None = None, slot: int | None = None, expert: int | None = None,
               where: str = "") -> str:
    parts = []
    if rank is not None:
        parts.append(f"rank {rank}")
    if slot is not None:
        parts.append(f"slot {slot}")
    if expert is not None:
        parts.append(f"expert {expert}")
    if where:
        parts.append(where)
    return " / ".join(parts)


def _short(values: np.ndarray) -> str:
    values = np.asarray(values).reshape(-1)
    if values.size <= 2 * MAX_SHOWN:
        return "[" + ", ".join(str(int(v)) for v in values) + "]"
    head = ", ".join(str(int(v)) for v in values[:MAX_SHOWN])
    tail = ", ".join(str(int(v)) for v in values[-4:])
    return f"[{head}, … ({values.size - MAX_SHOWN - 4} more) …, {tail}]"


def array_mismatch(check: str, expected: np.ndarray, actual: np.ndarray, *, name: str,
                   offset: int = 0, rank: int | None = None, slot: int | None = None,
                   expert: int | None = None, what: str = "") -> Mismatch | None:
    """Exact comparison of two 1-D arrays; ``None`` when equal.

    ``offset`` is the position of ``expected[0]`` in the named buffer row, so
    the breadcrumb and ``position`` name the real index.
    """
    expected = np.asarray(expected).reshape(-1)
    actual = np.asarray(actual).reshape(-1)
    where = f"{name}[{offset}:{offset + expected.size}]"
    crumb = breadcrumb(rank, slot, expert, where)
    if expected.shape != actual.shape:
        return Mismatch(check, f"{crumb}: shape differs: expected {expected.shape}, "
                        f"actual {actual.shape}", rank, slot, expert)
    diff = np.flatnonzero(expected != actual)
    if diff.size == 0:
        return None
    i = int(diff[0])
    lines = [
        f"{crumb}: {what or 'values differ'}",
        f"Mismatched elements: {diff.size} / {expected.size} "
        f"({100.0 * diff.size / expected.size:.1f}%)",
        f"First difference at {name}[{offset + i}]: expected {int(expected[i])}, "
        f"actual {int(actual[i])}",
        f"expected: {_short(expected)}",
        f"actual:   {_short(actual)}",
    ]
    return Mismatch(check, "\n".join(lines), rank, slot, expert, offset + i,
                    int(expected[i]), int(actual[i]))


def segments(expert_row: np.ndarray, block_size: int,
             active: int | None = None) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` of each padded segment of an expected ``expert_ids`` row.

    ``active``: the blocks inside segments (``total / B``); by default the
    blocks before the first ``-1`` (sglang-align's ``-1`` segment needs it given).
    """
    row = np.asarray(expert_row)
    if active is None:
        active = int(np.argmax(row < 0)) if (row < 0).any() else row.size
    if active == 0:
        return []
    starts = np.flatnonzero(np.diff(row[:active], prepend=row[0] - 1) != 0)
    ends = np.append(starts[1:], active)
    return [(int(row[b]), int(b) * block_size, int(e) * block_size)
            for b, e in zip(starts, ends)]


class RowOrder:
    """Canonical [L, P] rows for one expected value: each expected segment sorted.

    Built once per expected value (rank) and used for every run compared with
    it. Only the positions of the expected segments (the blocks before the
    row's total) are unspecified in order, so only those are gathered and
    sorted -- one int64 sort of (segment number, value) packed into 32 + 32
    bits -- and put back where they were; every other position keeps its value.
    """

    def __init__(self, expected: RowsExpected) -> None:
        self.expected = expected  # the layout is worked out when first needed

    @functools.cached_property
    def _layout(self) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
        expected = self.expected
        ids = np.asarray(expected.expert_ids)
        L, M = ids.shape
        P, B = expected.sorted_token_ids.shape[1], expected.block_size
        change = np.ones_like(ids, dtype=bool)
        change[:, 1:] = ids[:, 1:] != ids[:, :-1]
        segment = np.cumsum(change, axis=1)  # [L, M], 1-based segment number in its row
        inside = np.arange(M)[None, :] < expected.active_blocks()[:, None]
        rows, blocks = np.nonzero(inside)  # row-major, so the keys below never decrease
        index = ((rows * P + blocks * B)[:, None] + np.arange(B)).reshape(-1)
        key = segment[rows, blocks].astype(np.int64) + rows * (M + 1)
        return (L, P), index, np.repeat(key << 32, B)

    @functools.cached_property
    def want(self) -> np.ndarray:
        """The expected ``sorted_token_ids``, canonical."""
        return self.rows(self.expected.sorted_token_ids)

    def rows(self, values: np.ndarray) -> np.ndarray:
        """A copy of ``values`` [L, P] (int32) with each expected segment sorted."""
        shape, index, high = self._layout
        flat = np.array(values, dtype=np.int32).reshape(-1)
        packed = high | (flat[index].astype(np.int64) & 0xFFFFFFFF)
        packed.sort()
        flat[index] = (packed & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
        return flat.reshape(shape)


@dataclass(frozen=True)
class RepeatKey:
    """What a sandbox worker needs to tell whether a repeat of a call gave the same
    result as its first run, as :func:`canonical` defines it, without the oracle's
    arrays: the expected segments of each ``sorted_token_ids`` row (their lengths in
    blocks, row after row) and the entries the dialect leaves unspecified. The
    worker's form (:class:`difftest.execute.CanonicalForm`) is this module's
    :func:`canonical` computed on the device; ``tests/test_repeat_key.py`` holds
    the two to each other."""

    rows: int  # L
    positions: int  # P
    blocks: int  # M, the width of an expert_ids row
    block_size: int
    lengths: np.ndarray  # int32: blocks of each expected segment, row-major
    per_row: np.ndarray  # int32 [L]: segments in each row
    checked_blocks: np.ndarray | None = None  # as RowsExpected's
    checked_positions: np.ndarray | None = None

    def block_keys(self) -> np.ndarray:
        """int64 [L, M]: each block's segment, numbered through all rows; -1 for a block
        outside every segment (its positions keep their place in the canonical form)."""
        keys = np.full((self.rows, self.blocks), -1, dtype=np.int64)
        ends = np.cumsum(self.per_row)
        for row in range(self.rows):
            lengths = self.lengths[ends[row] - self.per_row[row]:ends[row]]
            first = ends[row] - self.per_row[row]
            keys[row, :int(lengths.sum())] = np.repeat(
                np.arange(first, ends[row], dtype=np.int64), lengths)
        return keys


def repeat_key(expected: Any) -> RepeatKey | None:
    """The :class:`RepeatKey` of an expected value; ``None`` where the canonical form is
    the outputs' bytes (``ep-remap``)."""
    if not isinstance(expected, RowsExpected):
        return None
    L, M = np.asarray(expected.expert_ids).shape
    B = expected.block_size
    rows = [segments(expected.expert_ids[row], B, int(active))
            for row, active in enumerate(expected.active_blocks())]
    lengths = [(end - start) // B for row in rows for _, start, end in row]
    per_row = [len(row) for row in rows]
    return RepeatKey(L, expected.sorted_token_ids.shape[1], M, B,
                     np.array(lengths, dtype=np.int32),
                     np.array(per_row, dtype=np.int32),
                     None if expected.checked_blocks is None
                     else np.asarray(expected.checked_blocks, dtype=np.int64).reshape(L),
                     None if expected.checked_positions is None
                     else np.asarray(expected.checked_positions, dtype=np.int64).reshape(L))


def compare_rows(expected: RowsExpected, outputs: dict[str, np.ndarray], *, stable: bool,
                 rank: int | None = None, sentinel: int, order: RowOrder | None = None,
                 have_rows: np.ndarray | None = None) -> list[Mismatch]:
    """Checks 1–4 of SPEC §9 for an align-type call (``have_rows``: the canonical
    ``sorted_token_ids`` rows when the caller has them already)."""
    L, P = expected.sorted_token_ids.shape
    M = expected.expert_ids.shape[1]
    got_sorted = outputs["sorted_token_ids"].reshape(L, P)
    got_experts = outputs["expert_ids"].reshape(L, M)
    got_total = outputs["num_tokens_post_pad"].reshape(L)
    slot_of = (lambda row: row) if expected.sorted_token_ids.shape[0] > 1 else (lambda row: None)
    written = np.asarray(expected.written, dtype=bool)
    # what is compared: the written rows, or only their specified leading entries
    checked = written if expected.checked_blocks is None else (
        expected.expert_ids_checked() & written[:, None])
    positions = written if expected.checked_positions is None else (
        expected.sorted_token_ids_checked() & written[:, None])
    if stable or (have_rows is None and np.array_equal(
            expected.sorted_token_ids[positions], got_sorted[positions])):
        # stable, or in the oracle's own order: equal as written is equal canonically
        want_rows, have_rows = expected.sorted_token_ids, got_sorted
    else:
        order = RowOrder(expected) if order is None else order
        want_rows = order.want
        have_rows = order.rows(got_sorted) if have_rows is None else have_rows
    if (np.array_equal(want_rows[positions], have_rows[positions])
            and np.array_equal(expected.expert_ids[checked], got_experts[checked])
            and np.array_equal(expected.num_tokens_post_pad[written], got_total[written])
            and (got_sorted[~written] == sentinel).all()
            and (got_experts[~written] == sentinel).all()
            and (got_total[~written] == sentinel).all()):
        return []  # the common case at once; the loop below names what differs
    found: list[Mismatch] = []
    for row in range(L):
        slot = slot_of(row)
        if not expected.written[row]:
            for name, got, size in (("sorted_token_ids", got_sorted[row], P),
                                    ("expert_ids", got_experts[row], M),
                                    ("num_tokens_post_pad", got_total[row:row + 1], 1)):
                m = array_mismatch("unwritten_row", np.full(size, sentinel), got, name=name,
                                   offset=row * size, rank=rank, slot=slot,
                                   what="row of an unprocessed slot was written "
                                        "(expected the sentinel)")
                if m:
                    found.append(m)
            continue
        total = int(expected.num_tokens_post_pad[row])
        m = array_mismatch("num_tokens_post_pad", expected.num_tokens_post_pad[row:row + 1],
                           got_total[row:row + 1], name="num_tokens_post_pad", offset=row,
                           rank=rank, slot=slot)
        if m:
            found.append(m)
        blocks = M if checked.ndim == 1 else int(np.count_nonzero(checked[row]))
        m = array_mismatch("expert_ids", expected.expert_ids[row, :blocks],
                           got_experts[row, :blocks], name="expert_ids", offset=row * M,
                           rank=rank, slot=slot)
        if m:
            found.append(m)
        exp_row, got_row = expected.sorted_token_ids[row], got_sorted[row]
        exp_experts = expected.expert_ids[row]
        want, have = want_rows[row], have_rows[row]
        differ = want[:total] != have[:total]
        if differ.any():
            # one record per differing segment (the first few), named by its expert
            bad_blocks = np.unique(np.flatnonzero(differ) // expected.block_size)
            shown = 0
            for e, start, end in segments(exp_experts, expected.block_size,
                                          total // expected.block_size):
                if shown == MAX_SEGMENTS:
                    break
                if not ((bad_blocks >= start // expected.block_size)
                        & (bad_blocks < end // expected.block_size)).any():
                    continue
                shown += 1
                found.append(array_mismatch(
                    "sorted_token_ids", want[start:end], have[start:end],
                    name="sorted_token_ids", offset=row * P + start, rank=rank, slot=slot,
                    expert=e, what="segment holds different routes"
                    + ("" if stable else " (compared as sorted multisets)")))
        if expected.pad_value == sentinel:
            what = f"positions past the total {total} must be left unwritten (the sentinel)"
        else:
            what = f"positions past the total {total} must hold the pad value " \
                   f"{expected.pad_value}"
        tail = P if positions.ndim == 1 else int(np.count_nonzero(positions[row]))
        m = array_mismatch("pad_value", exp_row[total:tail], got_row[total:tail],
                           name="sorted_token_ids", offset=row * P + total, rank=rank,
                           slot=slot, what=what)
        if m:
            found.append(m)
    return found


def compare_run(case: Case, expected: Any, run: Any, *, stable: bool, sentinel: int,
                order: RowOrder | None = None,
                have_rows: np.ndarray | None = None) -> list[Mismatch]:
    """All checks of one call (one rank, one repeat) except the cross-rank ones."""
    rank = run.rank
    found = [Mismatch("wild_write", f"{breadcrumb(rank) or 'call'}: wrote outside its own "
                      f"buffers, into {w.where()}: value {w.value} ({w.changed()})", rank,
                      position=w.position, actual=w.value)
             for w in run.wild_writes]
    if run.launch_error:
        return [Mismatch("launch_error", f"{breadcrumb(rank) or 'call'}: {run.error}", rank)
                ] + found
    if run.error is not None:
        return [Mismatch("exception", f"{breadcrumb(rank) or 'call'}: raised {run.error}",
                         rank)] + found
    if isinstance(expected, RowsExpected):
        found += compare_rows(expected, run.outputs, stable=stable, rank=rank, sentinel=sentinel,
                              order=order, have_rows=have_rows)
    elif isinstance(expected, RemapExpected):
        m = array_mismatch("local_topk_ids", expected.local_topk_ids,
                           run.outputs["local_topk_ids"], name="local_topk_ids", rank=rank)
        if m:
            found.append(m)
    for name, damage in run.guard_damage.items():
        pos, value = damage[0]
        side = "before" if pos < 0 else "after"
        found.append(Mismatch(
            "guard_band",
            f"{breadcrumb(rank, where=name)}: write outside the buffer, {len(damage)}+ "
            f"element(s) of the guard band changed; first at offset {pos} ({side} the "
            f"buffer): expected guard value, actual {value}", rank, None, None, pos, None,
            value))
    for name, (i, before, after) in run.mutated_inputs.items():
        found.append(Mismatch(
            "input_mutated", f"{breadcrumb(rank, where=name)}: input changed by the call; "
            f"first at [{i}]: was {before}, now {after}", rank, None, None, i, before, after))
    return found


def canonical(case: Case, expected: Any, run: Any, order: RowOrder | None = None) -> tuple:
    """A run's outputs with the unspecified order inside segments removed.

    For rows, the first item is the canonical ``sorted_token_ids`` array;
    everything else is bytes, so two canonical forms compare with ``==`` via
    :func:`same_canonical`."""
    if run.error is not None:
        return ("error", run.error)
    if isinstance(expected, RowsExpected):
        order = RowOrder(expected) if order is None else order
        # expert_ids blocks the dialect leaves unspecified are not part of the result
        experts = run.outputs["expert_ids"]
        if expected.checked_blocks is not None:
            experts = np.where(expected.expert_ids_checked(),
                               experts.reshape(expected.expert_ids.shape), 0)
        rows = order.rows(run.outputs["sorted_token_ids"])
        if expected.checked_positions is not None:
            rows = np.where(expected.sorted_token_ids_checked(), rows, 0)
        return (rows, experts.tobytes(),
                run.outputs["num_tokens_post_pad"].tobytes())
    return tuple(v.tobytes() for _, v in sorted(run.outputs.items()))


def same_canonical(a: tuple, b: tuple | None) -> bool:
    if b is None or len(a) != len(b):
        return False
    return all(np.array_equal(x, y) if isinstance(x, np.ndarray) else
               (not isinstance(y, np.ndarray) and x == y) for x, y in zip(a, b))


def _valid_global_routes(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """(route index, global expert) of every route a rank should receive."""
    flat = case.topk_ids.reshape(-1).astype(np.int64)
    routes = np.flatnonzero((flat >= 0) & (flat < case.ep.global_num_experts))
    return routes, flat[routes]


def compare_conservation(case: Case, runs: list[Any], expected: dict) -> list[Mismatch]:
    """SPEC §6 conservation across all ranks of an EP case (one repeat).

    Every valid route the oracle gives a slot must appear on exactly one rank,
    in a block whose local expert is, on that rank, the route's global expert.
    """
    ep = case.ep
    if ep is None or ep.ep_size < 2 or set(ep.ranks) != set(range(ep.ep_size)):
        return []
    if any(r.error is not None for r in runs):
        return []
    owned = {r: oracle.ep.owned_experts(ep.global_num_experts, ep.ep_size, r, ep.strategy)
             for r in range(ep.ep_size)}
    if case.dialect == "ep-remap":
        return _remap_conservation(case, runs, owned)
    N, B = case.num_routes, case.block_size
    routes, experts = _valid_global_routes(case)
    global_of = np.full(N, -1, dtype=np.int64)
    global_of[routes] = experts
    first = expected[runs[0].rank]
    L = first.sorted_token_ids.shape[0]
    # sglang-align: a rank's foreign (-1) routes sit in its -1 segment, not lost
    foreign_segment = DIALECT_INFO[case.dialect].sentinel_segment
    found: list[Mismatch] = []
    for row in range(L):
        if not first.written[row]:
            continue
        slot = row if L > 1 else None
        want = np.zeros(N, dtype=bool)  # routes the oracle gives this slot, on any rank
        for run in runs:
            rank_expected = expected[run.rank]
            values = rank_expected.sorted_token_ids[row]
            block_expert = np.repeat(rank_expected.expert_ids[row].astype(np.int64), B)
            mine = (values >= 0) & (values < N) & (block_expert[:values.size] >= 0)
            want[values[mine]] = True
        hits = np.zeros(N, dtype=np.int64)
        wrong: Mismatch | None = None
        for run in runs:
            srt = run.outputs["sorted_token_ids"].reshape(L, -1)[row]
            eid = run.outputs["expert_ids"].reshape(L, -1)[row].astype(np.int64)
            pos = np.flatnonzero((srt >= 0) & (srt < N))
            route = srt[pos].astype(np.int64)
            # each block's local expert (-1 past the expert_ids row), and the global
            # expert it is on this rank (-1 for a local id this rank does not own)
            block = np.minimum(pos // B, eid.size)
            own = owned[run.rank]
            owned_block = (eid >= 0) & (eid < own.size)
            block_glob = np.full(eid.size + 1, -1, dtype=np.int64)
            block_glob[:-1][owned_block] = own[eid[owned_block]]
            if foreign_segment:
                total = int(run.outputs["num_tokens_post_pad"].reshape(L)[row])
                local = np.append(eid, -1)[block]
                keep = ~((local == -1) & (pos < total))  # the rank's -1 segment
                route, block = route[keep], block[keep]
            glob = block_glob[block]
            hits += np.bincount(route, minlength=N)  # route: values in [0, N)
            bad = np.flatnonzero((glob != global_of[route]) | ~want[route])
            if bad.size and wrong is None:
                i = int(bad[0])
                wrong = Mismatch(
                    "ep_conservation",
                    f"{breadcrumb(run.rank, slot, int(glob[i]))}: route {int(route[i])} appears "
                    f"under global expert {int(glob[i])}; the oracle gives it "
                    + (f"global expert {int(global_of[route[i]])}" if want[route[i]]
                       else "to no rank of this slot"),
                    run.rank, slot, int(glob[i]), int(route[i]), int(global_of[route[i]]),
                    int(glob[i]))
        if wrong is not None:
            found.append(wrong)
        idx = np.arange(N)
        found += _lost_or_duplicated(want & (hits == 0), hits > 1, idx, global_of, hits, slot)
    return found


def _lost_or_duplicated(lost: np.ndarray, duplicated: np.ndarray, routes: np.ndarray,
                        experts: np.ndarray, hits: np.ndarray, slot: int | None
                        ) -> list[Mismatch]:
    """One record for the routes no rank took, one for those several ranks took."""
    found = []
    for label, mask in (("landed on no rank", lost), ("landed on several ranks", duplicated)):
        idx = np.flatnonzero(mask)
        if idx.size:
            i = int(idx[0])
            found.append(Mismatch(
                "ep_conservation",
                f"{breadcrumb(slot=slot, expert=int(experts[i]))}: {idx.size} route(s) {label}; "
                f"first: route {int(routes[i])} (global expert {int(experts[i])}) on "
                f"{int(hits[i])} ranks", None, slot, int(experts[i]), int(routes[i]), 1,
                int(hits[i])))
    return found


def _remap_conservation(case: Case, runs: list[Any], owned: dict) -> list[Mismatch]:
    routes, experts = _valid_global_routes(case)
    hits = np.zeros(routes.size, dtype=np.int64)
    wrong: list[Mismatch] = []
    for rank_run in runs:
        local = rank_run.outputs["local_topk_ids"].reshape(-1)[routes].astype(np.int64)
        own = owned[rank_run.rank]
        taken = local >= 0
        hits += taken
        inside = taken & (local < own.size)
        back = np.full(routes.size, -1, dtype=np.int64)
        back[inside] = own[local[inside]]
        bad = np.flatnonzero(taken & (back != experts))
        if bad.size and not wrong:
            i = int(bad[0])
            wrong.append(Mismatch(
                "ep_conservation",
                f"{breadcrumb(rank_run.rank, where='local_topk_ids')}: route {int(routes[i])} "
                f"(global expert {int(experts[i])}) got local id {int(local[i])}, which is "
                f"global expert {int(back[i])} on this rank", rank_run.rank, None,
                int(experts[i]), int(routes[i]), int(experts[i]), int(back[i])))
    return wrong + _lost_or_duplicated(hits == 0, hits > 1, routes, experts, hits, None)
