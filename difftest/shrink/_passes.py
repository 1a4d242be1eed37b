"""The shrink passes; :data:`PASSES` is the order one round runs them in."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ..case import LORA_DIALECTS, Case
from ..dialects import DIALECT_INFO
from ._shrinker import Shrinker
from ._surgery import (
    INVALID,
    expert_changes,
    expert_floor,
    ids_following,
    is_production_lora_ids,
    keep_tokens,
    relabel_slots,
    smaller_group,
    token_slots,
    toward_base,
    toward_zero,
    used_slots,
    with_mapping,
    without_requests,
    without_tokens,
)


def drop_tokens(s: Shrinker) -> None:
    """Delete tokens: rows of ``topk_ids`` with their adapter mapping (SGLang: requests shrink)."""
    def without(case: Case, start: int, stop: int) -> Case | None:
        return s.build(**without_tokens(case, start, stop))

    s.delete_chunks(lambda c: c.num_tokens, without, "T")


def drop_requests(s: Shrinker) -> None:
    """SGLang: delete whole requests with their tokens (an empty request costs nothing else)."""
    if s.current.dialect != "sglang-lora" or s.current.seg_indptr is None:
        return

    def count(case: Case) -> int:
        return max(case.seg_indptr.size - 1, 0)

    def without(case: Case, start: int, stop: int) -> Case | None:
        if case.req_to_lora is None or case.req_to_lora.size != count(case):
            return None
        return s.build(**without_requests(case, range(start, stop)))

    s.delete_chunks(count, without, "requests")


def lower_topk(s: Shrinker) -> None:
    """Delete columns of ``topk_ids`` (``K -> K - 1``), keeping ``K >= 1``."""
    def without(case: Case, start: int, stop: int) -> Case | None:
        if stop - start >= case.topk:
            return None
        return s.build(topk_ids=np.delete(case.topk_ids, range(start, stop), axis=1))

    s.delete_chunks(lambda c: c.topk, without, "K")


def drop_slots(s: Shrinker) -> None:
    """LoRA: delete adapter slots with every token (request) mapped to them, renumber, lower L.

    The compound step that gets past ``full-slots-with-base``: there no
    single token can go (each adapter's last token keeps the last real slot
    at ``lora_ids[L]``), but a whole slot and one from ``L`` can.
    """
    if s.current.dialect not in LORA_DIALECTS:
        return

    def without(case: Case, start: int, stop: int) -> Case | None:
        used = used_slots(case)
        gone = set(used[start:stop])
        keep = [slot for slot in used if slot not in gone]
        slots = token_slots(case)
        if case.dialect == "vllm-lora":
            changes = keep_tokens(case, ~np.isin(slots, list(gone)))
        else:
            requests = [r for r, slot in enumerate(case.req_to_lora) if int(slot) in gone]
            changes = without_requests(case, requests)
        try:
            return relabel_slots(case, keep, max(len(keep), 1), changes)
        except INVALID:
            return None

    s.delete_chunks(lambda c: len(used_slots(c)), without, "slots")


def drop_lora_ids(s: Shrinker) -> None:
    """Defensive LoRA: delete entries of a hand-made ``lora_ids`` (the launch covers fewer)."""
    case = s.current
    if (case.dialect not in LORA_DIALECTS or case.lora_ids is None
            or s.contract != "defensive" or is_production_lora_ids(case)):
        return

    def without(case: Case, start: int, stop: int) -> Case | None:
        return s.build(lora_ids=np.delete(case.lora_ids, range(start, stop)))

    s.delete_chunks(lambda c: c.lora_ids.size, without, "lora_ids entries")


def trade_routes_for_experts(s: Shrinker) -> None:
    """Past the small path by its routes, take it by its experts: a few tokens, ``E = 65``.

    Our kernels leave the small path past :data:`~difftest.classify.SMALL_PATH_MAX_ROUTES`
    routes or :data:`~difftest.classify.SMALL_PATH_MAX_EXPERTS` experts. A failure
    of the large path that deletions brought down to about a thousand routes
    can stop there (fewer routes would take the small path); the same path
    is reached with one route and one expert past the limit. So keep windows
    of 1, 2, 4, ... tokens, in order, with every kernel ``E`` raised just
    past the limit (ids past ``E`` stay past it). The reverse trade, experts
    for routes, is never simpler: routes come first in the order.
    """
    from ..classify import SMALL_PATH_MAX_EXPERTS, SMALL_PATH_MAX_ROUTES, kernel_num_experts

    case = s.current
    if (case.dialect == "ep-remap" or case.num_routes <= SMALL_PATH_MAX_ROUTES
            or max(kernel_num_experts(case)) > SMALL_PATH_MAX_EXPERTS):
        return
    past = SMALL_PATH_MAX_EXPERTS + 1
    local = case.ep is not None and case.ep.dispatch == "local_ids"
    num_experts = past * case.ep.ep_size if local else past  # every rank's E past it too
    width = 1
    while width * case.topk < case.num_routes:
        for start in range(0, case.num_tokens, width):
            keep = np.zeros(case.num_tokens, dtype=bool)
            keep[start:start + width] = True
            changes = keep_tokens(case, keep)
            ids = changes["topk_ids"].astype(np.int64)
            changes["topk_ids"] = np.where(ids >= case.num_experts,
                                           ids - case.num_experts + num_experts,
                                           ids).astype(case.topk_ids.dtype)
            changes.update(expert_changes(case, num_experts))
            if case.expert_map is not None and case.ep is None:
                changes["expert_map"] = np.concatenate(
                    [case.expert_map, np.full(num_experts - case.num_experts, -1)]
                ).astype(np.int32)
            kept = int(keep.sum())
            if s.consider(s.build(**changes),
                          f"T {case.num_tokens} -> {kept} (tokens {start}..{start + kept - 1}), "
                          f"E {case.num_experts} -> {num_experts}"):
                return
        width *= 2


def lower_ep(s: Shrinker) -> None:
    """EP: fewer ranks (alone, then with ``G`` lowered alongside), fewer ranks run, no EP at
    one rank, linear placement, ``expert_map`` dispatch."""
    if s.current.ep is None:
        return

    def with_ranks(size: int) -> bool:
        case = s.current
        return s.consider(s.build(ep=smaller_group(case.ep, size)),
                          f"R {case.ep.ep_size} -> {size}")

    def with_ranks_and_experts(size: int) -> bool:
        # G % R is what a placement gets wrong: lower both so the remainder stays
        case = s.current
        d = case.ep.ep_size - size
        num_experts = case.num_experts - d
        if num_experts < 1:
            return False
        changes = expert_changes(case, num_experts)
        changes["ep"] = smaller_group(changes["ep"], size)
        return s.consider(s.build(topk_ids=ids_following(case, num_experts), **changes),
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
    changes = {"topk_ids": relabelled.astype(case.topk_ids.dtype), **expert_changes(case, new_e)}
    if case.expert_map is not None and case.ep is None:
        rows = case.expert_map[used].astype(np.int64) if used.size else np.full(1, -1)
        local = np.unique(rows[rows >= 0])
        mapped = np.where(rows >= 0, np.searchsorted(local, rows), -1)
        changes["expert_map"] = np.concatenate(
            [mapped, np.full(new_e - mapped.size, -1)]).astype(np.int32)
    moved = f"experts {used.tolist()} -> 0..{used.size - 1}" if used.size else "no expert in use"
    s.consider(s.build(**changes), f"E {case.num_experts} -> {new_e} ({moved})")


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
        changes = expert_changes(case, num_experts)
        if case.expert_map is not None and case.ep is None:
            changes["expert_map"] = case.expert_map[:num_experts]
        return s.consider(s.build(**changes), f"E {case.num_experts} -> {num_experts}")

    s.descend(s.current.num_experts, expert_floor(s.current), cut)
    if s.current.expert_map is not None:
        return

    def follow(num_experts: int) -> bool:
        case = s.current
        d = case.num_experts - num_experts
        return s.consider(s.build(topk_ids=ids_following(case, num_experts),
                                  **expert_changes(case, num_experts)),
                          f"E {case.num_experts} -> {num_experts} "
                          f"(ids >= {num_experts} down by {d})")

    floor = max(1, min(s.current.ep.ep_size, s.current.num_experts)) if s.current.ep else 1
    s.descend(s.current.num_experts, floor, follow)


def lower_loras(s: Shrinker) -> None:
    """LoRA: renumber the slots in use onto ``0..k-1`` and lower ``L`` towards ``k``.

    Mapping, ``req_to_lora``, ``lora_ids`` and ``adapter_enabled`` move
    together; a production vLLM ``lora_ids`` is recomputed with
    :func:`oracle.active_lora_ids`, ``adapter_enabled`` keeps ``L + 1``
    (vLLM) or ``L`` (SGLang) entries.
    """
    if s.current.dialect not in LORA_DIALECTS:
        return
    used = used_slots(s.current)

    def attempt(num_slots: int) -> bool:
        case = s.current
        now = used_slots(case)
        moved = f"slots {now} -> 0..{len(now) - 1}" if now else "no slot in use"
        step = f"L {case.max_loras} -> {num_slots} ({moved})"
        if s.consider(relabel_slots(case, now, num_slots), step):
            return True
        # a short defensive lora_ids keeps its length: padding it to the new L
        # could turn the case into a production one, which the contract guard refuses
        short = case.lora_ids is not None and case.lora_ids.size <= num_slots
        return short and s.consider(relabel_slots(case, now, num_slots, keep_length=True),
                                    step + ", lora_ids length kept")

    floor = max(len(used), 1)
    if s.current.max_loras > floor:
        s.descend(s.current.max_loras, floor, attempt)
    else:  # L is as small as the slots in use allow; still move them onto 0..k-1
        attempt(s.current.max_loras)


def lower_block_size(s: Shrinker) -> None:
    """``B -> 1``, then half way, then ``B - 1``."""
    def attempt(block_size: int) -> bool:
        return s.consider(s.build(block_size=block_size),
                          f"B {s.current.block_size} -> {block_size}")

    s.descend(s.current.block_size, 1, attempt)


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
    except INVALID:
        return

    def attempt(padded: int) -> bool:
        return s.consider(s.build(max_num_tokens_padded=padded),
                          f"P {s.current.max_num_tokens_padded} -> {padded}")

    s.descend(case.max_num_tokens_padded, max(need, 1), attempt)


def simplify_values(s: Shrinker) -> None:
    """Plainer values: int32 ids; ids towards 0; adapters towards base; defaults for the rest.

    Order: whole-array steps first (dtype, no ``expert_map``, default
    ``adapter_enabled``, default sglang-align flags), then every occurrence
    of one expert id at once, then single routes; then the adapter mapping,
    ``lora_ids`` entries and disabled adapters, one at a time.
    """
    _plain_arrays(s)
    _simplify_expert_ids(s)
    if s.current.dialect == "vllm-lora":
        _simplify_slots(s, "token_lora_mapping")
    elif s.current.dialect == "sglang-lora":
        _simplify_slots(s, "req_to_lora")
    if s.current.lora_ids is not None and not is_production_lora_ids(s.current):
        _simplify_slots(s, "lora_ids")
    enabled = s.current.adapter_enabled
    for i in range(0 if enabled is None else enabled.size):
        enabled = s.current.adapter_enabled
        if enabled is not None and i < enabled.size and enabled[i] != 1:
            changed = enabled.copy()
            changed[i] = 1
            s.consider(s.build(adapter_enabled=changed),
                       f"adapter_enabled[{i}] {int(enabled[i])} -> 1")


def _plain_arrays(s: Shrinker) -> None:
    """The whole-array steps: int32 ids, no ``expert_map``, every adapter enabled, the
    default sglang-align flags."""
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


def leap_to_floors(s: Shrinker) -> None:
    """One candidate with every dimension the deletions leave at its floor at once: the
    first step each of :data:`FLOOR_PASSES` would take, and the whole-array steps of
    :func:`simplify_values`, composed without running them (each on the last), then run
    once.  For a costly predicate only (:data:`COSTLY_PASSES`: a crash or a hang, where
    every candidate that still fails costs a worker): accepted, it saves a failing run
    per step (``E``, ``R``, ``L``, ``B``, ``P``, dtype, adapters); rejected, the passes
    after it take the steps one by one as for any failure.  Values are left alone."""
    dry = Shrinker(s.current, lambda candidate: True, (), max_seconds=60.0,
                   max_calls=1 << 30)
    for floor_pass in FLOOR_PASSES:
        dry.pass_name = floor_pass.__name__
        floor_pass(dry)
    dry.pass_name = "simplify_values"
    _plain_arrays(dry)
    if dry.current is not s.current:
        s.consider(dry.current, "; ".join(dry.log))


def _simplify_expert_ids(s: Shrinker) -> None:
    values = np.unique(s.current.topk_ids)
    for value in sorted((int(v) for v in values), key=lambda v: (-abs(v), v)):
        for target in toward_zero(value, s.current.num_experts):
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
            for target in toward_zero(value, s.current.num_experts):
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
            for target in toward_base(value, s.current.max_loras):
                changed = values.copy()
                changed[i] = target
                changes = (with_mapping(s.current, changed) if name == "token_lora_mapping"
                           else {name: changed})
                if s.consider(s.build(**changes), f"{name}[{i}] {value} -> {target}"):
                    progress = True
                    break


DELETIONS: list[Callable[[Shrinker], None]] = [
    drop_tokens,
    drop_requests,
    lower_topk,
    drop_slots,
    drop_lora_ids,
]
"""The passes that remove data, first in every round."""

FLOOR_PASSES: list[Callable[[Shrinker], None]] = [
    lower_ep,
    renumber_experts,
    lower_experts,
    lower_loras,
    lower_block_size,
    lower_padding,
]
"""The passes lowering one size each, whose first steps :func:`leap_to_floors` composes."""

PASSES: list[Callable[[Shrinker], None]] = [
    *DELETIONS, trade_routes_for_experts, *FLOOR_PASSES, simplify_values]
"""The shrink passes, in the order one round runs them."""

COSTLY_PASSES: list[Callable[[Shrinker], None]] = [
    *DELETIONS, leap_to_floors, trade_routes_for_experts, *FLOOR_PASSES, simplify_values]
""":data:`PASSES` with :func:`leap_to_floors` after the deletions, for a predicate whose
failing candidates are costly (``shrink(..., costly=True)``)."""
