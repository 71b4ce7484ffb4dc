"""Small numpy building blocks of CSR page tables (callers' input is checked in _checks.py)."""

from __future__ import annotations

import numpy as np


def indptr_of(counts: np.ndarray) -> np.ndarray:
    """CSR offsets ``[0, cumsum(counts)]``, shape ``[counts.size + 1]``, int32."""
    indptr = np.zeros(counts.size + 1, dtype=np.int32)
    np.cumsum(counts, out=indptr[1:])
    return indptr


def concat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concat(arange(s, s + c) for s, c in zip(starts, counts))`` without a loop, int64."""
    offsets = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return offsets + np.arange(int(counts.sum()))
