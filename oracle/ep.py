"""Expert parallelism (SPEC §6): which rank owns which expert, and under what id.

``G`` global experts are spread over ``R`` ranks (``ep_size``).

* **linear**: ``base = G // R``, ``rem = G % R``; rank ``r`` owns
  ``base + (r < rem)`` contiguous experts from ``r * base + min(r, rem)``.
* **round_robin**: rank ``r`` owns ``r, r + R, r + 2R, …``; local id ``g // R``.
* **even split** (:class:`EvenSplit`, SGLang's memory pool): local ids only
  when ``R > 1``, the runner drops global ids and ``G % R == 0``.

A rank sees its routes in one of two dispatch forms that must align the
same: global ``topk_ids`` plus :func:`expert_map`, or local ids from
:func:`to_local_topk` with ``E`` = the local count.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _validate

__all__ = ["PLACEMENTS", "EvenSplit", "expert_map", "owned_experts", "remap", "to_local_topk"]

#: Placement strategies of :func:`expert_map` and :func:`owned_experts`.
PLACEMENTS = ("linear", "round_robin")


def owned_experts(
    global_num_experts: int, ep_size: int, ep_rank: int, strategy: str = "linear"
) -> np.ndarray:
    """Global ids rank ``ep_rank`` owns, int32, in local-id order (local id = position).

    >>> owned_experts(10, 4, 1).tolist(), owned_experts(10, 4, 1, "round_robin").tolist()
    ([3, 4, 5], [1, 5, 9])
    """
    num_global, num_ranks, rank = _check_group(global_num_experts, ep_size, ep_rank, strategy)
    if strategy == "linear":
        base, rem = divmod(num_global, num_ranks)
        start = rank * base + min(rank, rem)
        count = base + (1 if rank < rem else 0)
        return np.arange(start, start + count, dtype=np.int32)
    return np.arange(rank, num_global, num_ranks, dtype=np.int32)  # local id = g // R


def expert_map(
    global_num_experts: int, ep_size: int, ep_rank: int, strategy: str = "linear"
) -> tuple[int, np.ndarray | None]:
    """``(local_num_experts, map)``: ``map[g]`` is rank ``ep_rank``'s local id of ``g``, else -1.

    The map is int32 ``[G]``; with ``ep_size == 1`` there is nothing to map
    and the result is ``(G, None)``.

    >>> expert_map(10, 4, 1)
    (3, array([-1, -1, -1,  0,  1,  2, -1, -1, -1, -1], dtype=int32))
    """
    owned = owned_experts(global_num_experts, ep_size, ep_rank, strategy)
    num_global = int(global_num_experts)
    if int(ep_size) == 1:
        return num_global, None
    mapping = np.full(num_global, -1, dtype=np.int32)
    mapping[owned] = np.arange(owned.size, dtype=np.int32)
    return int(owned.size), mapping


def to_local_topk(
    topk_ids: np.ndarray, expert_map: np.ndarray | None, *, num_experts: int | None = None
) -> np.ndarray:
    """Global ``topk_ids`` as one rank's local ids; ``-1`` for routes the rank does not own.

    Each route ``g`` becomes ``expert_map[g]``, or ``-1`` when ``g`` is
    outside ``[0, G)`` (``G = len(expert_map)``) or foreign.  Without a map
    (``ep_size == 1``) valid ids stay as they are; ``num_experts``, when
    given, is ``G`` and ids ``>= G`` become ``-1`` too, as do negative ids.
    Shape and dtype (int32 or int64) of ``topk_ids`` are kept.

    >>> _, m = expert_map(10, 4, 1)
    >>> to_local_topk(np.array([[3, 9], [5, -1]], dtype=np.int32), m).tolist()
    [[0, -1], [2, -1]]
    """
    topk_ids = _validate.topk_ids_array(topk_ids)
    if expert_map is None:
        num_global = None
        if num_experts is not None:
            num_global = _validate.non_negative_integer("num_experts", num_experts)
        valid = topk_ids >= 0
        if num_global is not None:
            valid &= topk_ids < num_global
        return np.where(valid, topk_ids, -1).astype(topk_ids.dtype)

    mapping = _validate.integer_array("expert_map", expert_map, ndim=1)
    num_global = mapping.size
    if num_experts is not None and _validate.integer("num_experts", num_experts) != num_global:
        raise _validate.InvalidArgument(
            f"num_experts={num_experts}: must equal len(expert_map)={num_global}"
        )
    _validate.values_in(
        "expert_map", mapping, -1, max(num_global, 0), f"a local expert id or -1, G={num_global}"
    )
    local = np.full(topk_ids.shape, -1, dtype=topk_ids.dtype)
    valid = (topk_ids >= 0) & (topk_ids < num_global)
    local[valid] = mapping[topk_ids[valid]]
    return local


def remap(
    topk_ids: np.ndarray,
    global_num_experts: int,
    ep_size: int,
    ep_rank: int,
    strategy: str = "linear",
) -> np.ndarray:
    """The ``ep-remap`` reference: :func:`to_local_topk` with rank ``ep_rank``'s map.

    Unlike ``to_local_topk(topk_ids, None)``, ids ``>= G`` become ``-1`` also
    when ``ep_size == 1``.

    >>> remap(np.array([[3, 9], [5, 10]]), 10, 4, 1).tolist()
    [[0, -1], [2, -1]]
    """
    _, mapping = expert_map(global_num_experts, ep_size, ep_rank, strategy)
    return to_local_topk(topk_ids, mapping, num_experts=global_num_experts)


@dataclass(frozen=True)
class EvenSplit:
    """SGLang's even-split policy for per-expert adapter buffers (SPEC §6).

    Local ids are used only when ``ep_size > 1``, the MoE runner does not
    keep global ids, and ``num_experts % ep_size == 0``; then rank ``r`` owns
    the ``G // R`` experts from ``r * (G // R)``.  Otherwise buffers stay
    keyed by global id: ``num_local_experts == G`` and global→local is the
    identity on ``[0, G)``.

    >>> s = EvenSplit(8, 2, 1)
    >>> s.use_local_ids, s.num_local_experts, s.global_to_local(5), s.global_to_local(2)
    (True, 4, 1, None)
    """

    num_experts: int
    ep_size: int
    ep_rank: int
    runner_keeps_global_ids: bool = False

    def __post_init__(self) -> None:
        num_experts = _validate.positive_integer("num_experts", self.num_experts)
        ep_size = _validate.positive_integer("ep_size", self.ep_size)
        ep_rank = _validate.index_in("ep_rank", self.ep_rank, ep_size, "ep_size")
        object.__setattr__(self, "num_experts", num_experts)
        object.__setattr__(self, "ep_size", ep_size)
        object.__setattr__(self, "ep_rank", ep_rank)
        object.__setattr__(self, "runner_keeps_global_ids", bool(self.runner_keeps_global_ids))

    @property
    def use_local_ids(self) -> bool:
        return (
            self.ep_size > 1
            and not self.runner_keeps_global_ids
            and self.num_experts % self.ep_size == 0
        )

    @property
    def num_local_experts(self) -> int:
        if self.use_local_ids:
            return self.num_experts // self.ep_size
        return self.num_experts

    @property
    def _first_owned(self) -> int:
        """Global id of local expert 0."""
        return self.ep_rank * self.num_local_experts if self.use_local_ids else 0

    def global_to_local(self, gid: int) -> int | None:
        """Local id of global expert ``gid`` on this rank; ``None`` if not owned or out of range."""
        local = _validate.integer("gid", gid) - self._first_owned
        return local if 0 <= local < self.num_local_experts else None

    def iter_local_weights(self, weights: Any) -> Iterator[tuple[int, Any]]:
        """``(local_id, weight)`` for the experts this rank owns, by ascending local id.

        ``weights`` is either a ``{global_id: tensor}`` mapping (ids this rank
        does not own are skipped) or a 3-D array/tensor ``[experts, *, *]``
        indexed by global id (the owned slice, clipped to its length; any
        object with a 3-entry ``.shape`` qualifies).  Anything else is a
        ``TypeError``, raised by this call, not by the first ``next()``.
        """
        if isinstance(weights, Mapping):
            owned = []
            for gid, weight in weights.items():
                local = self.global_to_local(gid)
                if local is not None:
                    owned.append((local, weight))
            return iter(sorted(owned, key=lambda pair: pair[0]))
        shape = getattr(weights, "shape", None)
        if shape is not None and len(shape) == 3:
            start = self._first_owned
            stop = min(start + self.num_local_experts, int(shape[0]))
            return ((local, weights[start + local]) for local in range(max(stop - start, 0)))
        raise _validate.InvalidArgumentType(
            f"weights={type(weights).__name__}"
            f"{'' if shape is None else f' of shape {tuple(shape)}'}: must be a "
            "{global_id: tensor} mapping or a 3-D tensor [experts, *, *]"
        )


def _check_group(
    global_num_experts: object, ep_size: object, ep_rank: object, strategy: object
) -> tuple[int, int, int]:
    num_global = _validate.positive_integer("global_num_experts", global_num_experts)
    num_ranks = _validate.positive_integer("ep_size", ep_size)
    rank = _validate.index_in("ep_rank", ep_rank, num_ranks, "ep_size")
    _validate.one_of("strategy", strategy, PLACEMENTS)
    return num_global, num_ranks, rank
