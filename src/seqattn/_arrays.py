"""Turning caller input (lists, numpy arrays, torch tensors) into numpy arrays."""

from __future__ import annotations

import numpy as np


def as_int_array(values: object, what: str, error: type[Exception]) -> np.ndarray:
    """A 1-D int64 numpy array from a list, a numpy array or a (CPU or GPU) torch tensor.

    Raises ``error`` naming ``what`` when the input is not a 1-D sequence of integers.
    """
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().numpy()  # type: ignore[attr-defined]
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise error(f"{what} must be a 1-D sequence of integers, got {arr.dtype} {arr.shape}")
    if arr.dtype == bool:
        raise error(f"{what} must be integers, got booleans")
    return arr.astype(np.int64, copy=False)


def indptr_of(counts: np.ndarray) -> np.ndarray:
    """CSR offsets ``[0, cumsum(counts)]``, shape ``[counts.size + 1]``, int32."""
    indptr = np.zeros(counts.size + 1, dtype=np.int32)
    np.cumsum(counts, out=indptr[1:])
    return indptr


def concat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concat(arange(s, s + c) for s, c in zip(starts, counts))`` without a loop, int64."""
    offsets = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return offsets + np.arange(int(counts.sum()))
