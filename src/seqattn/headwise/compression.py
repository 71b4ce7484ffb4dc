"""Per-head compression of a :class:`HeadwiseKVCache`: check what each head keeps, move it.

Head ``h`` keeps the tokens at indices ``keep[h]`` (strictly increasing) of its page
list; survivor ``i`` moves to index ``i`` of the same list, so the survivors fill the
first ``ceil(len(keep[h]) / page_size)`` pages and the rest go back to the pool.
Because ``keep[h][i] >= i``, a token never moves to a slot that a later survivor still
has to be read from, so one gather then one scatter moves every head at once. Which
tokens to keep is the policies' job (:mod:`seqattn.headwise.selection`).

Example:
    >>> import torch
    >>> from seqattn.headwise import HeadwiseKVCache
    >>> cache = HeadwiseKVCache(16, 2, 1, 2, 4, torch.float32, "cpu")
    >>> cache.add_sequences([0])
    >>> k = torch.arange(5.0)[:, None, None].expand(5, 2, 4).contiguous()
    >>> _ = cache.append(0, [0], k, k, append_lens=[5])
    >>> compress(cache, 0, 0, [[1, 4], None], by_position=False)  # as cache.compress
    0
    >>> cache.head_positions(0, 0, 0).tolist(), cache.read_head(0, 0, 0)[0][:, 0].tolist()
    ([1, 4], [1.0, 4.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .._checks import exact_bool, exact_int, int_array
from ..errors import InvalidLengthError
from .positions import HeadPositions

if TYPE_CHECKING:
    from ..descriptor import CacheDescriptor
    from .cache import HeadwiseKVCache


def compress(
    cache: HeadwiseKVCache, layer: int, seq_id: int, keep: Sequence[object], by_position: bool
) -> int:
    """Keep, in each KV head of one sequence in one layer, only the chosen tokens.

    The work of :meth:`HeadwiseKVCache.compress` (see there for the arguments and
    errors), which then marks the layer changed. Everything is checked before anything
    moves.

    Returns:
        the layer, as an ``int``.
    """
    layer = cache.checked_layer(layer)
    slot = cache.positions.slot(seq_id)
    exact_bool(by_position, "by_position")
    row_ids = cache.head_row_ids(layer, seq_id)
    held = cache.descriptor.seq_lens(row_ids)
    check_keep_count(keep, cache.num_kv_heads)
    if by_position:
        keeps = indices_of_positions(cache.positions, layer, slot, keep)
    else:
        keeps = [checked_keep(keep[h], int(held[h]), h) for h in range(cache.num_kv_heads)]
    cache.check_written(layer)
    compact(cache.kv_pages, cache.descriptor, row_ids, held, keeps)
    positions = cache.positions
    kept = [positions.positions(layer, slot, h)[kh] for h, kh in enumerate(keeps)]
    positions.replace(layer, slot, kept)
    return layer


def truncate_head(cache: HeadwiseKVCache, layer: int, seq_id: int, head: int, new_len: int) -> None:
    """Keep only the first ``new_len`` tokens one head holds, through ``cache.compress``.

    Raises:
        InvalidLengthError: ``new_len`` outside ``[0, held]``. IndexOutOfRangeError,
        ArgumentTypeError: a bad ``head``. Nothing changed.
    """
    held = cache.head_lens(layer, seq_id)
    head = cache.checked_head(head)
    what = f"new_len of head {head} (at most the {held[head]} tokens it holds)"
    new_len = exact_int(new_len, what, low=0, high=int(held[head]), error=InvalidLengthError)
    keep: list[object] = [None] * cache.num_kv_heads
    keep[head] = np.arange(new_len)
    cache.compress(layer, seq_id, keep)


# ---------------------------------------------------------------------- checks
def check_keep_count(keep: Sequence[object], num_kv_heads: int) -> None:
    """Raise InvalidLengthError unless ``keep`` has one entry per KV head."""
    try:
        count = len(keep)
    except TypeError:
        count = -1
    if count != num_kv_heads:
        raise InvalidLengthError(
            f"keep must have one entry per KV head ({num_kv_heads}), got "
            f"{count if count >= 0 else type(keep).__name__}"
        )


def checked_keep(keep: object, held: int, head: int, what: str = "token indices") -> np.ndarray:
    """``keep`` as a strictly increasing int64 array of values in ``[0, held)``.

    None means keep every token. Raises InvalidLengthError naming the head, ``what`` was
    expected and what came (ArgumentTypeError for values that are not integers).
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


def indices_of_positions(
    positions: HeadPositions, layer: int, slot: int, keep: Sequence[object]
) -> list[np.ndarray]:
    """Each head's kept true positions (None: all) as indices among the tokens it holds,
    ``[kept]`` int64 each; InvalidLengthError for a position the head does not hold."""
    out = []
    for head, entry in enumerate(keep):
        held = positions.positions(layer, slot, head)
        if entry is None:
            out.append(np.arange(held.size))
            continue
        end = int(held[-1]) + 1 if held.size else 0
        wanted = checked_keep(entry, end, head, "token positions")
        index = np.searchsorted(held, wanted)
        if wanted.size and not np.array_equal(held[index], wanted):
            missing = wanted[held[index] != wanted][:8].tolist()
            raise InvalidLengthError(
                f"keep[{head}]: head {head} does not hold positions {missing} (see head_positions)"
            )
        out.append(index)
    return out


# ---------------------------------------------------------------------- moves
def compact(
    tokens: torch.Tensor,
    descriptor: CacheDescriptor,
    row_ids: list[int],
    held: np.ndarray,
    keeps: list[np.ndarray],
) -> None:
    """Move every head's survivors to the front of its page list, then free the rest.

    Args:
        tokens: every page, ``[num_pages, 2 (K, V), page_size, head_dim]``, on device.
        descriptor: the page table holding one row (page list) per head.
        row_ids: the heads' page-table ids.
        held: tokens each head holds now, ``[heads]`` int.
        keeps: each head's surviving token indices, checked by :func:`checked_keep`.
    """
    pages = [np.asarray(descriptor.page_indices(r), dtype=np.int64) for r in row_ids]
    moves = compaction_moves(pages, keeps, tokens.shape[2])
    if moves[0].size:
        index = torch.from_numpy(np.stack(moves)).to(tokens.device)
        src_page, src_slot, dst_page, dst_slot = index.unbind(0)
        # the gather finishes before the scatter starts (see the module's docstring)
        tokens[dst_page, :, dst_slot] = tokens[src_page, :, src_slot]
    for row_id, kept, before in zip(row_ids, keeps, held.tolist(), strict=True):
        if kept.size < before:
            descriptor.truncate(row_id, kept.size)


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

    Example:
        >>> moves = compaction_moves([np.array([7, 2])], [np.array([0, 3])], page_size=2)
        >>> [m.tolist() for m in moves]  # index 3 (page 2, slot 1) -> 1 (page 7, slot 1)
        [[2], [1], [7], [1]]
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
