"""Argument checks of the oracle: every caller error becomes one line.

A message names the argument, echoes its value and says what is allowed,
e.g. ``block_size=0: must be a positive integer``.  Arrays are never printed
whole: a message shows the offending ``shape``, ``dtype`` or first bad entry
(``expert_map[2]=5: must be in [-1, 4) (num_experts=4)``).

Every error raised here is an :class:`OracleError` and also a ``ValueError``
(a bad value) or a ``TypeError`` (a bad type), so callers may catch either.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import numpy as np

__all__ = [
    "InvalidArgument",
    "InvalidArgumentType",
    "OracleError",
    "exact_shape",
    "expert_map_array",
    "index_in",
    "integer",
    "integer_array",
    "non_negative_integer",
    "one_of",
    "positive_integer",
    "topk_ids_array",
    "values_in",
]


class OracleError(Exception):
    """Root of every exception the oracle raises on purpose."""


class InvalidArgument(OracleError, ValueError):
    """An argument has an allowed type but a value outside what is allowed."""


class InvalidArgumentType(OracleError, TypeError):
    """An argument has a type (or dtype) the oracle does not accept."""


def integer(name: str, value: object) -> int:
    """``value`` as a Python int; bools, floats and strings are a TypeError."""
    if isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentType(f"{name}={value!r}: must be an integer, not a bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgumentType(
            f"{name}={value!r}: must be an integer, not {type(value).__name__}"
        ) from None


def positive_integer(name: str, value: object) -> int:
    number = integer(name, value)
    if number <= 0:
        raise InvalidArgument(f"{name}={number}: must be a positive integer")
    return number


def non_negative_integer(name: str, value: object) -> int:
    number = integer(name, value)
    if number < 0:
        raise InvalidArgument(f"{name}={number}: must be a non-negative integer")
    return number


def index_in(name: str, value: object, size: int, size_name: str) -> int:
    """An integer in ``[0, size)``; ``size_name`` names the bound in the message."""
    number = integer(name, value)
    if not 0 <= number < size:
        raise InvalidArgument(f"{name}={number}: must be in [0, {size}) ({size_name}={size})")
    return number


def one_of(name: str, value: object, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise InvalidArgument(f"{name}={value!r}: must be one of {choices}")
    return value


_INT32_OR_INT64 = (np.dtype(np.int32), np.dtype(np.int64))


def integer_array(
    name: str,
    value: object,
    *,
    ndim: int,
    int32_or_int64: bool = False,
    allow_bool: bool = False,
) -> np.ndarray:
    """``value`` as a NumPy array of ``ndim`` dimensions with an integer dtype.

    The array is not copied and never written to.  A list that holds no
    element (``[]``) becomes int64, since NumPy would make it float64.
    ``int32_or_int64`` narrows the accepted dtypes to the two a kernel takes
    (``topk_ids``); ``allow_bool`` also accepts a bool array (flags).
    """
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    if not isinstance(value, np.ndarray) and array.size == 0 and array.dtype.kind == "f":
        array = array.astype(np.int64)
    if int32_or_int64:
        if array.dtype not in _INT32_OR_INT64:
            raise InvalidArgumentType(f"{name}.dtype={array.dtype}: must be int32 or int64")
    elif not (array.dtype.kind in "iu" or (allow_bool and array.dtype.kind == "b")):
        allowed = "an integer or bool dtype" if allow_bool else "an integer dtype"
        raise InvalidArgumentType(f"{name}.dtype={array.dtype}: must be {allowed}")
    if array.ndim != ndim:
        raise InvalidArgument(f"{name}.ndim={array.ndim}: must be {ndim} (got shape {array.shape})")
    return array


def exact_shape(name: str, array: np.ndarray, shape: tuple[int, ...], why: str) -> None:
    if array.shape != shape:
        raise InvalidArgument(f"{name}.shape={array.shape}: must be {shape}, {why}")


def values_in(name: str, array: np.ndarray, low: int, high: int, why: str = "") -> None:
    """Every entry in ``[low, high)``; the message shows the first one that is not."""
    bad = np.flatnonzero((array.reshape(-1) < low) | (array.reshape(-1) >= high))
    if bad.size:
        where = np.unravel_index(int(bad[0]), array.shape)
        index = ", ".join(str(int(i)) for i in where)
        suffix = f" ({why})" if why else ""
        raise InvalidArgument(
            f"{name}[{index}]={int(array[where])}: must be in [{low}, {high}){suffix}"
        )


def topk_ids_array(value: object) -> np.ndarray:
    """``topk_ids``: int32 or int64 ``[T, K]`` (SPEC §3)."""
    return integer_array("topk_ids", value, ndim=2, int32_or_int64=True)


def expert_map_array(value: object, num_experts: int) -> np.ndarray:
    """``expert_map``: integer ``[E]`` with entries in ``[-1, E)`` (docs/INTERNALS.md)."""
    expert_map = integer_array("expert_map", value, ndim=1)
    per_expert = f"one entry per global expert (num_experts={num_experts})"
    exact_shape("expert_map", expert_map, (num_experts,), per_expert)
    local_or_none = f"a local expert id or -1, num_experts={num_experts}"
    values_in("expert_map", expert_map, -1, num_experts, local_or_none)
    return expert_map
