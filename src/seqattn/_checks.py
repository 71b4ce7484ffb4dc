"""Checking what callers pass, before anything changes (numpy only, no torch import).

Every public call of seqattn validates its arguments here first, so that a bad one is
refused with a :class:`~seqattn.errors.SeqAttnError` that is also the matching builtin,
and nothing has changed yet. The rules:

- An integer is a Python ``int`` or a numpy integer; never a ``bool`` (``True`` is not
  sequence 1), a float (not even ``2.0``), a string or a 0-d tensor.
- A sequence of integers is a list, tuple, range, generator, 1-D numpy array or 1-D
  torch tensor of integers; a ``str``, ``bytes``, set or dict is refused (a string
  is not a list of ids, and a set has no order to pair with lengths). A generator is
  consumed once and used.
- Every integer must fit in int64: ``2**63`` is refused, never wrapped to ``-2**63``.
- Messages say what was expected and show the value that came, as the caller wrote it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from typing import Optional

import numpy as np

from .errors import ArgumentTypeError, IndexOutOfRangeError, InvalidArgumentError, SeqAttnError

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_UNORDERED = (set, frozenset, Mapping)


def is_int(value: object) -> bool:
    """Whether ``value`` is an exact integer: ``int`` or a numpy integer, not a bool."""
    if type(value) is int:
        return True
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def shown(value: object, limit: int = 60) -> str:
    """``value`` for an error message: its repr (cut to ``limit``) and type."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{text} ({type(value).__name__})"


def exact_int(
    value: object,
    what: str,
    *,
    low: Optional[int] = None,
    high: Optional[int] = None,
    error: type[SeqAttnError] = InvalidArgumentError,
) -> int:
    """``value`` as an ``int``, checked to be an integer in ``[low, high]`` (inclusive).

    Raises:
        ArgumentTypeError: not an integer (a bool, float, str, None, ...).
        ``error``: outside the range (default InvalidArgumentError).
    """
    if not is_int(value):
        raise ArgumentTypeError(f"{what} must be an integer, got {shown(value)}")
    number = int(value)  # type: ignore[call-overload]
    if (low is not None and number < low) or (high is not None and number > high):
        raise error(f"{what} must be an integer in {_range(low, high)}, got {number}")
    return number


def exact_bool(value: object, what: str, *, optional: bool = False) -> Optional[bool]:
    """``value`` checked to be a ``bool`` (or None when ``optional``); not 0/1 or a str."""
    if isinstance(value, (bool, np.bool_)) or (optional and value is None):
        return None if value is None else bool(value)
    expected = "None or a bool" if optional else "a bool"
    raise ArgumentTypeError(f"{what} must be {expected}, got {shown(value)}")


def one_of(value: object, what: str, choices: tuple[str, ...]) -> str:
    """``value`` checked to be one of the strings ``choices``."""
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{what} must be one of {choices}, got {shown(value)}")
    if value not in choices:
        raise InvalidArgumentError(f"{what} must be one of {choices}, got {value!r}")
    return value


def checked_index(value: object, what: str, size: int) -> int:
    """``value`` as an index in ``[0, size)``: ArgumentTypeError for a non-integer (a
    bool is no index), IndexOutOfRangeError outside the range. A plain in-range int, the
    common case, costs one type test and one compare."""
    if type(value) is int and 0 <= value < size:
        return value
    return exact_int(value, what, low=0, high=size - 1, error=IndexOutOfRangeError)


def real_number(
    value: object,
    what: str,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    error: type[SeqAttnError] = InvalidArgumentError,
) -> float:
    """``value`` as a finite ``float`` in ``[low, high]`` (``(low, high]`` with ``low_open``).

    Ints and floats (Python or numpy) are accepted; bools, strings, NaN and infinities
    are not.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise ArgumentTypeError(f"{what} must be a real number, got {shown(value)}")
    number = float(value)
    below = low is not None and (number <= low if low_open else number < low)
    if not math.isfinite(number) or below or (high is not None and number > high):
        bounds = f"{'(' if low_open else '['}{'-inf' if low is None else low}, "
        bounds += f"{'inf' if high is None else high}]"
        raise error(f"{what} must be a finite number in {bounds}, got {value!r}")
    return number


def int_array(
    values: object,
    what: str,
    *,
    low: int = INT64_MIN,
    high: int = INT64_MAX,
    error: type[SeqAttnError] = InvalidArgumentError,
) -> np.ndarray:
    """A 1-D int64 numpy array of ``values``, each an integer in ``[low, high]``.

    Takes a list, tuple, range, generator, numpy array or (CPU or GPU) torch tensor.

    Raises:
        ArgumentTypeError: not a sequence of integers (see the module's rules).
        ``error``: a value outside ``[low, high]``.
    """
    arr = _as_numpy(values, what, error)
    if arr.size and _outside(arr, low, high):
        bad = arr[(arr < low) | (arr > high)][:8].tolist()
        raise error(f"{what} must be integers in {_range(low, high)}, got {bad}")
    return arr


def _outside(arr: np.ndarray, low: int, high: int) -> bool:
    """Whether some of ``arr`` (int64, not empty) lies outside ``[low, high]``; a bound
    at the end of int64 needs no pass (a prompt's ids are checked against 0 alone)."""
    return (low > INT64_MIN and int(arr.min()) < low) or (
        high < INT64_MAX and int(arr.max()) > high
    )


def id_list(values: object, what: str = "sequence ids") -> list[int]:
    """Ids as a list of Python ints, for lookups (no range check: an id that cannot exist
    is simply unknown). A list of ints is returned as it is, checked in one pass."""
    if type(values) is list and set(map(type, values)) <= {int}:
        return values
    return int_array(values, what).tolist()


def new_id(value: object, what: str = "sequence id") -> int:
    """An id about to be created: an integer that fits in int64."""
    return exact_int(value, what, low=INT64_MIN, high=INT64_MAX)


def _as_numpy(values: object, what: str, error: type[SeqAttnError]) -> np.ndarray:
    """1-D int64 array; raises ArgumentTypeError for anything but integers, or ``error``
    for integers that do not fit in int64."""
    if type(values) is list:  # the common cases first, past the ABC checks below
        return _from_items(values, what, error)
    if isinstance(values, np.ndarray):
        return _from_numpy(values, what, error)
    if isinstance(values, (str, bytes, bytearray, *_UNORDERED)) or not _iterable(values):
        raise ArgumentTypeError(
            f"{what} must be a list, tuple, numpy array or tensor of integers, got {shown(values)}"
        )
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        return _from_numpy(values.detach().cpu().numpy(), what, error)  # type: ignore[attr-defined]
    return _from_items(list(values), what, error)  # type: ignore[call-overload]


def _from_items(items: list, what: str, error: type[SeqAttnError]) -> np.ndarray:
    """``items`` (a list, read as it is; a generator was consumed into it) as int64."""
    packed = _pack_plain_ints(items)
    if packed is not None:
        return packed
    wrong = [v for v in items if not is_int(v)]
    if wrong:
        raise ArgumentTypeError(f"{what} must be integers, got {shown(wrong[0])}")
    try:  # numpy integers (and int subclasses) among them: fromiter reads each
        return np.fromiter(items, dtype=np.int64, count=len(items))
    except OverflowError:
        bad = [int(v) for v in items if not INT64_MIN <= int(v) <= INT64_MAX][:8]
        raise error(f"{what} must fit in int64 (|value| < 2**63), got {bad}") from None


def _pack_plain_ints(items: list) -> Optional[np.ndarray]:
    """``items`` as int64 when every one is a plain ``int`` that fits, else None (the
    caller then finds the culprit). The common case, at C speed: one pass counts the
    exact-``int`` types (a bool, float, numpy scalar or tensor is not ``int``), one
    packs the values; ``struct`` refuses an int past int64 rather than wrapping it."""
    count = len(items)
    if list(map(type, items)).count(int) != count:
        return None
    arr = np.empty(count, dtype=np.int64)
    try:
        struct.pack_into(f"{count}q", arr, 0, *items)  # native int64, into arr's memory
    except struct.error:
        return None
    return arr


def _from_numpy(arr: np.ndarray, what: str, error: type[SeqAttnError]) -> np.ndarray:
    if arr.ndim != 1 and arr.size:
        raise ArgumentTypeError(f"{what} must be 1-D, got an array of shape {list(arr.shape)}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    kind = arr.dtype.kind  # "i" or "u": an integer dtype in one compare; issubdtype for
    # the rest (bool is kind "b" and no integer; numpy counts timedelta64 as one)
    if kind not in "iu" and not np.issubdtype(arr.dtype, np.integer):
        raise ArgumentTypeError(f"{what} must be integers, got an array of {arr.dtype}")
    if kind == "u" and arr.dtype.itemsize == 8 and int(arr.max()) > INT64_MAX:
        bad = arr[arr > INT64_MAX][:8].tolist()
        raise error(f"{what} must fit in int64 (|value| < 2**63), got {bad}")
    return arr.astype(np.int64, copy=False)


def _iterable(values: object) -> bool:
    return isinstance(values, (Iterable, np.ndarray)) or hasattr(values, "__getitem__")


def _range(low: Optional[int], high: Optional[int]) -> str:
    start = "(-inf" if low is None else "[-2**63" if low == INT64_MIN else f"[{low}"
    end = "inf)" if high is None else "2**63)" if high == INT64_MAX else f"{high}]"
    return f"{start}, {end}"
