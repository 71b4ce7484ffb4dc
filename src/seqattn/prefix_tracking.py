"""The token ids of sequences that use the prefix cache, and when their pages enter it.

A sequence started from its token ids shares the longest cached prefix of full pages.
Its own pages enter the cache on :meth:`PrefixTracker.commit`, which the caller calls
once the KV of every token the sequence holds has been appended (for all layers): a
page is never published before its KV is written, and a cached page is full, so no
later append writes into it. A page whose prefix is cached already under another page
is swapped for that page and returns to the pool.
"""

from __future__ import annotations

from array import array
from typing import Optional

import numpy as np

from .errors import InvalidArgumentError, InvalidLengthError, SeqAttnError, SequenceExistsError
from .page_table import SequencePageTable, pages_for
from .prefix_cache import CachedPage, PrefixCache, Salt, as_salt, split_pages, token_array

_NEVER = np.iinfo(np.int64).max


class _Track:
    """What the tracker knows of one sequence."""

    __slots__ = ("collided", "committed", "salt", "tip", "tokens", "unknown_from")

    def __init__(self, tokens: array, salt: Salt) -> None:
        # token ids known so far (may run ahead of the length), int64: made from the
        # checked prompt's bytes (no work per token), and a decode step appends in place
        self.tokens = tokens
        self.salt = salt
        self.tip: Optional[CachedPage] = None  # the cache entry of page committed - 1
        self.committed = 0  # leading pages that are cached (inserted or matched)
        # the first position whose token nobody told us (pages from there cannot be
        # keyed), or None; a truncate back to before it lets caching resume
        self.unknown_from: Optional[int] = None
        self.collided = False  # a hash collision or an evicted tip: cache no more

    @property
    def stopped(self) -> bool:
        return self.collided or self.unknown_from is not None

    def copy(self) -> _Track:
        twin = _Track(self.tokens[:], self.salt)
        twin.tip, twin.committed = self.tip, self.committed
        twin.unknown_from, twin.collided = self.unknown_from, self.collided
        return twin


class PrefixTracker:
    """Token ids per sequence, matched against and committed into a :class:`PrefixCache`."""

    def __init__(self, table: SequencePageTable, cache: PrefixCache) -> None:
        self.table = table
        self.cache = cache
        self._tracks: dict[int, _Track] = {}  # by slot
        # on cpu, per slot: the length at which the next page can be committed
        self._ready_at = np.full(16, _NEVER, dtype=np.int64)

    def start(self, seq_id: int, token_ids: object, salt: Salt) -> int:
        """Start ``seq_id`` from its tokens, sharing the cached prefix; returns its length.

        At most ``len(token_ids) - 1`` tokens come from the cache, so the caller always
        computes the last one (and gets its logits).
        """
        token_ids = token_array(token_ids)  # checked once
        salt_bytes = as_salt(salt)  # checks its type before anything changes
        table, ps = self.table, self.table.page_size
        if seq_id in table:
            raise SequenceExistsError(f"cannot start sequence id {seq_id}: it is live")
        table.check_new(seq_id)
        limit = max(token_ids.size - 1, 0) // ps  # the last prompt token is always computed
        chain = self.cache.match_checked(token_ids, salt_bytes, limit)
        pages = np.array([entry.page for entry in chain], dtype=np.int32)
        table.allocator.share(pages, distinct=True)  # a chain holds each page once
        slot = table.adopt(seq_id, pages, pages.size * ps)
        track = _Track(array("q", token_ids.tobytes()), salt)  # int64 both: a memcpy
        track.committed = len(chain)
        track.tip = chain[-1] if chain else None
        self._set(slot, track)
        return pages.size * ps

    def pages_to_start(self, token_ids: object, salt: Salt) -> int:
        """Pool pages that starting ``token_ids`` and allocating all of it would take
        now: its pages less the cached ones it would share, where a cached page that no
        one else holds counts too (sharing it takes it off the evictable list).
        Changes nothing, not even the lookup counters."""
        tokens = token_array(token_ids)
        ps = self.table.page_size
        limit = max(tokens.size - 1, 0) // ps
        chain = self.cache.match_checked(tokens, as_salt(salt), limit, record=False)
        hits = np.array([entry.page for entry in chain], dtype=np.int64)
        sole = int((self.table.allocator.refcount[hits] == 1).sum()) if hits.size else 0
        return pages_for(tokens.size, ps) - hits.size + sole

    def recorded(self, slot: int) -> Optional[tuple[np.ndarray, Salt]]:
        """The token ids of every token ``slot`` holds (int64, a copy) and its salt, or
        None when some are unknown (the sequence was allocated without them)."""
        track, length = self._tracks.get(slot), self.table.length(slot)
        if track is None or len(track.tokens) < length:
            return None
        if track.unknown_from is not None and track.unknown_from < length:
            return None
        return np.array(track.tokens[:length], dtype=np.int64), track.salt

    def record_decode(self, slots: np.ndarray, tokens: list[int]) -> None:
        """Note the token each of ``slots`` just grew by (after ``grow_by_one``)."""
        tracks = self._tracks
        lengths = self.table.lengths(slots).tolist()
        for slot, token, length in zip(slots.tolist(), tokens, lengths, strict=True):
            track = tracks.get(slot)
            if track is not None and len(track.tokens) == length - 1:
                track.tokens.append(token)
                if track.unknown_from is not None:  # told late: every token is known again
                    track.unknown_from = None
                    self._set(slot, track)

    def commit(self, slots: np.ndarray) -> None:
        """Cache the full pages of ``slots`` whose tokens are known (their KV is written)."""
        lengths = self.table.lengths(slots)
        if self._ready_at.size < self.table.slot_capacity:
            self._grow(self.table.slot_capacity)
        ready = lengths >= self._ready_at[slots]
        for i in np.flatnonzero(ready).tolist():
            self._commit_slot(int(slots[i]), int(lengths[i]))

    def release(self, slots: np.ndarray) -> None:
        for slot in slots.tolist():
            if self._tracks.pop(slot, None) is not None:
                self._ready_at[slot] = _NEVER

    def truncate(self, slot: int, new_len: int) -> None:
        track = self._tracks.get(slot)
        if track is None:
            return
        del track.tokens[new_len:]
        if track.unknown_from is not None and new_len <= track.unknown_from:
            track.unknown_from = None  # the tokens nobody told us are cut off
        keep = min(track.committed, new_len // self.table.page_size)
        if keep < track.committed:
            track.committed = keep
            tip = self.table.page_ids(slot)[keep - 1] if keep else None
            track.tip = None if tip is None else self.cache.entry_of(int(tip))
            track.collided |= keep > 0 and track.tip is None
        self._set(slot, track)

    def fork(self, src_slot: int, dst_slot: int) -> None:
        track = self._tracks.get(src_slot)
        if track is not None:
            self._set(dst_slot, track.copy())

    def pin(self, slot: int) -> CachedPage:
        track = self._tracks.get(slot)
        if track is None or track.tip is None:
            raise SeqAttnError("the sequence has no cached pages to pin: commit() it first")
        self.cache.pin([track.tip])
        return track.tip

    def check_integrity(self) -> None:
        """Each tracked sequence's committed pages are the cached chain of its tokens."""
        ps = self.table.page_size
        for slot, track in self._tracks.items():
            pages = self.table.page_ids(slot)
            node = track.tip
            for i in range(track.committed - 1, -1, -1):
                assert node is not None and node.alive, "a committed page is not cached"
                assert node.page == pages[i], "a committed page is not the sequence's page"
                assert node.tokens.tolist() == track.tokens[i * ps : (i + 1) * ps].tolist(), (
                    "a cached page holds other tokens than the sequence"
                )
                node = node.parent
            assert node is None, "the committed chain is longer than committed"

    def _commit_slot(self, slot: int, length: int) -> None:
        track, ps, table = self._tracks[slot], self.table.page_size, self.table
        known = len(track.tokens)
        full = min(length, known) // ps
        if track.committed < full:
            pages = table.page_ids(slot).tolist()
            fresh = np.array(track.tokens[track.committed * ps : full * ps], dtype=np.int64)
            salt = as_salt(track.salt)
            for i, page_data in enumerate(split_pages(fresh, ps), track.committed):
                entry = self.cache.insert_checked(track.tip, page_data, pages[i], salt)
                if entry is None:  # a hash collision: this prefix stays uncached
                    track.collided = True
                    break
                if entry.page != pages[i]:  # cached already: share that page, free ours
                    table.share_page(slot, i, entry.page)
                track.tip, track.committed = entry, i + 1
        if length > known and track.unknown_from is None:
            track.unknown_from = known  # tokens nobody told us: pages past here have no key
        self._set(slot, track)

    def _set(self, slot: int, track: _Track) -> None:
        self._tracks[slot] = track
        if slot >= self._ready_at.size:
            self._grow(2 * slot + 2)
        ps = self.table.page_size
        self._ready_at[slot] = _NEVER if track.stopped else (track.committed + 1) * ps

    def _grow(self, size: int) -> None:
        grown = np.full(size, _NEVER, dtype=np.int64)
        grown[: self._ready_at.size] = self._ready_at
        self._ready_at = grown


class NoPrefixCaching:
    """The tracker of a descriptor without prefix caching: a sequence starts empty,
    nothing is cached, and the prefix calls are no-ops (or say caching is off)."""

    cache = None

    def __init__(self, table: SequencePageTable) -> None:
        self.table = table

    def start(self, seq_id: int, token_ids: object, salt: Salt) -> int:
        token_list(token_ids)
        as_salt(salt)
        self.table.adopt(seq_id, np.zeros(0, np.int32), 0)
        return 0

    def pages_to_start(self, token_ids: object, salt: Salt) -> int:
        as_salt(salt)
        return pages_for(len(token_list(token_ids)), self.table.page_size)

    def record_decode(self, *args: object) -> None:
        """Nothing is cached: nothing to note (commit, release, truncate, fork alike)."""

    commit = release = check_integrity = truncate = fork = record_decode  # type: ignore[assignment]

    def recorded(self, slot: int) -> None:
        """No tokens are kept without prefix caching."""
        return None

    def pin(self, slot: int) -> CachedPage:
        raise InvalidArgumentError(
            "prefix caching is off: CacheDescriptor(..., prefix_caching=True)"
        )


def token_list(token_ids: object, expected: Optional[int] = None) -> list[int]:
    """Token ids as a list of ints (from a list, numpy array or torch tensor), checked."""
    tokens = token_array(token_ids).tolist()
    if expected is not None and len(tokens) != expected:
        raise InvalidLengthError(
            f"got {len(tokens)} token ids for {expected} sequences; pass one per sequence"
        )
    return tokens
