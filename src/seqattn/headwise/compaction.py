"""Where each surviving token moves when heads drop tokens (numpy only, no torch).

Head ``h`` keeps the tokens at indices ``keep[h]`` (strictly increasing) of its page
list; survivor ``i`` moves to index ``i`` of the same list, so the survivors fill the
first ``ceil(len(keep[h]) / page_size)`` pages and the rest can be freed. Because
``keep[h][i] >= i``, a token never moves to a slot that a later survivor still has to
be read from, and one gather followed by one scatter moves all heads at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._checks import int_array
from ..errors import InvalidLengthError


def checked_keep(keep: object, held: int, head: int, what: str = "token indices") -> np.ndarray:
    """``keep`` as a strictly increasing int64 array of values in ``[0, held)``.

    None means keep every token. Raises InvalidLengthError naming the head, ``what`` was
    expected and what came.
    """
    if keep is None:
        return np.arange(held, dtype=np.int64)
    arr = int_array(keep, f"keep[{head}] ({what})", error=InvalidLengthError)
    if arr.size == 0:
        return arr
    if arr[0] < 0 or arr[-1] >= held or (arr.size > 1 and (np.diff(arr) <= 0).any()):
        raise InvalidLengthError(
            f"keep[{head}] must be strictly increasing {what} in [0, {held}) (what head "
            f"{head} holds), without repeats; got {arr[:8].tolist()}"
            f"{' ...' if arr.size > 8 else ''}"
        )
    return arr


def compaction_moves(
    pages: Sequence[np.ndarray], keep: Sequence[np.ndarray], page_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source and destination ``(page, slot)`` of every surviving token that moves.

    Args:
        pages: each head's page ids in token order, int.
        keep: each head's surviving token indices, strictly increasing, int64.
        page_size: tokens per page.

    Returns:
        ``(src_page, src_slot, dst_page, dst_slot)``, each ``[moves]`` int64; tokens
        already in place (``keep[h][i] == i``) are left out.
    """
    counts = np.array([k.size for k in keep], dtype=np.int64)
    if counts.sum() == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    src = np.concatenate(keep)
    dst = np.arange(src.size) - np.repeat(np.cumsum(counts) - counts, counts)
    moved = src != dst
    src, dst = src[moved], dst[moved]
    page_counts = np.array([p.size for p in pages], dtype=np.int64)
    first_page = np.repeat(np.cumsum(page_counts) - page_counts, counts)[moved]
    flat_pages = np.concatenate([np.asarray(p, dtype=np.int64) for p in pages])
    src_page = flat_pages[first_page + src // page_size]
    dst_page = flat_pages[first_page + dst // page_size]
    return src_page, src % page_size, dst_page, dst % page_size
