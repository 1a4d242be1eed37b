"""Expert ids of a case: the routed ids, a forced duplicate, invalid ids, a direct
``expert_map`` — every value from the case's :class:`~._base.Values`."""

from __future__ import annotations

import numpy as np

from ._base import ELEMENTWISE_MAX_ROUTES, Values

#: How expert ids are spread: all experts, the first three, all but one, one.
ROUTINGS = ("uniform", "low", "missing", "hot")


def _routed_ids(values: Values, num_tokens: int, topk: int, num_experts: int, dtype: type,
                routing: str) -> np.ndarray:
    """``topk_ids [num_tokens, topk]`` routed as ``routing`` (:data:`ROUTINGS`)."""
    n = num_tokens * topk
    if routing == "hot":
        flat = np.full(n, values.one(0, num_experts - 1), dtype=np.int64)
    elif routing == "missing":
        missing = values.one(0, num_experts - 1)
        flat = values.ints(n, 0, num_experts - 2)
        flat += flat >= missing
    else:
        high = min(num_experts, 3) - 1 if routing == "low" else num_experts - 1
        flat = values.ints(n, 0, high)
    return flat.astype(dtype).reshape(num_tokens, topk)


def _force_duplicate(values: Values, ids: np.ndarray) -> np.ndarray:
    """Make one token route twice to one expert; returns the two routes as a mask."""
    num_tokens, topk = ids.shape
    token, first = values.one(0, num_tokens - 1), values.one(0, topk - 1)
    second = values.one(0, topk - 2)
    second += second >= first
    ids[token, second] = ids[token, first]
    mask = np.zeros(ids.size, dtype=bool)
    mask[[token * topk + first, token * topk + second]] = True
    return mask


def _invalid_ids(num_experts: int, dtype: type, sentinel_ok: bool = False) -> tuple[int, ...]:
    """Ids outside ``[0, E)``; -1 first (left out with ``sentinel_ok``: a dialect whose
    contract routes ``-1``).  int64 adds ids that truncate to valid int32."""
    i32 = np.iinfo(np.int32)
    values = (-1, num_experts, -2, num_experts + 1, num_experts + 1000, int(i32.max),
              int(i32.min))
    if np.dtype(dtype) == np.int64:
        values += (2**32, 2**32 + 1, 2**31, -(2**32))
    return values[1:] if sentinel_ok else values


def _inject_invalid_ids(values: Values, ids: np.ndarray, protected: np.ndarray,
                        num_experts: int, invalid: tuple[int, ...] | None = None) -> None:
    """1..3 unprotected routes (1..16 in a large case) get an id of ``invalid``
    (default: :func:`_invalid_ids`)."""
    free = np.flatnonzero(~protected)
    if free.size == 0:
        return  # contract check falls back to loose padding
    if invalid is None:
        invalid = _invalid_ids(num_experts, ids.dtype.type)
    most = 3 if ids.size <= ELEMENTWISE_MAX_ROUTES else 16
    where = values.subset(free, 1, most)
    ids.reshape(-1)[where] = values.pick(invalid, where.size)


def _direct_map(values: Values, num_experts: int) -> np.ndarray:
    """A case-level ``expert_map``: some experts dropped (-1), the rest numbered in order."""
    kept = values.ints(num_experts, 0, 1).astype(bool)
    kept[values.one(0, num_experts - 1)] = False  # at least one -1 entry
    local = np.cumsum(kept) - 1
    return np.where(kept, local, -1).astype(np.int32)
