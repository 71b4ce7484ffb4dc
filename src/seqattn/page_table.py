"""Sequence id -> pages and length, in preallocated numpy arrays (no torch).

Each live sequence owns a *slot*: its length, its change stamps, and a region of one
flat page arena (:class:`~seqattn.page_arena.PageArena`) that holds its page ids in
token order. Per-step work is O(batch), never O(pages held).
"""

from __future__ import annotations

from typing import Optional, TypeVar

import numpy as np

from ._arrays import concat_ranges
from ._checks import exact_int, id_list, int_array, new_id
from .allocator import PageAllocator
from .errors import (
    InvalidLengthError,
)
from .packed_data import BatchStamp
from .page_arena import PageArena
from .slot_map import SeqIds, SlotMap, check_distinct

MAX_LENGTH = int(np.iinfo(np.int32).max)  # lengths are int32, as flashinfer's
_NONE = np.zeros(0, dtype=np.int64)


Lengths = TypeVar("Lengths", int, np.ndarray)


def pages_for(lengths: Lengths, page_size: int) -> Lengths:
    """Pages needed to hold ``lengths`` tokens: ``ceil(lengths / page_size)``."""
    return (lengths + (page_size - 1)) // page_size


class SequencePageTable:
    """The page list and length of every live sequence.

    Args:
        allocator: the pool pages come from; every page a sequence lists holds one
            reference of that pool.
        page_size: tokens per page.

    Every change to a sequence stamps its slot with the table's next :attr:`clock`
    value: :attr:`row_versions` for any change (tokens added, pages cut or swapped,
    its end), :attr:`row_layouts` for changes other than pages added at its end (its
    pages were cut or swapped, or the slot was reused; where its page ids sit in the
    arena, :meth:`starts`, is not a change of the sequence). That is
    the one way to ask what changed since a stamp: a batch packed earlier can tell
    whether its own rows changed (:meth:`stamp`), and a packer or device copy which
    rows it must read again, whatever happened to other sequences (:attr:`clock` and
    :attr:`layout_clock` answer "nothing" in one compare).
    """

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        self.allocator = allocator
        self.page_size = int(page_size)
        self._ids = SlotMap()
        # on cpu, one entry per slot
        self._length = np.zeros(16, dtype=np.int32)
        self.row_versions = np.zeros(16, dtype=np.int64)  # clock of each slot's last change
        self.row_layouts = np.zeros(16, dtype=np.int64)  # ... last change but growth at the end
        self.clock = 0  # moves on at every change to any sequence
        self.layout_clock = 0  # the clock of the latest change but growth at the end
        # the latest change when it was a decode step: (clock after it, its slots, the
        # rows that gained a page, those pages), so a packer splices without searching
        self.last_growth: tuple[int, np.ndarray, np.ndarray, np.ndarray] = (-1, *[_NONE] * 3)
        self._pages = PageArena()  # where each slot's page ids live

    # ----------------------------------------------------------------- lookups
    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def seq_ids(self) -> list[int]:
        """Ids of the live sequences, in creation order."""
        return self._ids.ids

    @property
    def arena(self) -> np.ndarray:
        """The page ids of every slot, slot ``s``'s from ``starts([s])`` on, int32."""
        return self._pages.ids

    @property
    def slot_capacity(self) -> int:
        """Slots the per-slot arrays have room for (every slot id is below it)."""
        return int(self._length.size)

    def slot(self, seq_id: int) -> int:
        """The slot of one live sequence (:meth:`SlotMap.slot`)."""
        return self._ids.slot(seq_id)

    def slots(self, seq_ids: SeqIds) -> np.ndarray:
        """Slots of distinct live sequences (:meth:`SlotMap.slots`; read-only)."""
        return self._ids.slots(seq_ids)

    def check_new(self, seq_id: int) -> None:
        """Raise unless ``seq_id`` can start a sequence (an int64 id, not live)."""
        self._ids.check_new(seq_id)

    def lengths(self, slots: np.ndarray) -> np.ndarray:
        """Token counts of the given slots, int32 (a copy)."""
        return self._length[slots]

    def length(self, slot: int) -> int:
        """Token count of one slot."""
        return int(self._length[slot])

    def starts(self, slots: np.ndarray) -> np.ndarray:
        """Where each slot's page ids begin in :attr:`arena`, int64."""
        return self._pages.start[slots]

    def page_ids(self, slot: int) -> np.ndarray:
        """The page ids of one slot in token order, int32 (a copy): one slice of the arena."""
        start = int(self._pages.start[slot])
        return self.arena[start : start + pages_for(int(self._length[slot]), self.page_size)].copy()

    def pages_of_slots(self, slots: np.ndarray) -> np.ndarray:
        """Page ids of several slots, concatenated in order, int32."""
        return self._pages.pages(slots, pages_for(self._length[slots], self.page_size))

    # ---------------------------------------------------------------- mutation
    def extend(self, seq_ids: SeqIds, add_lens: object) -> np.ndarray:
        """Grow known sequences and start unknown ones, all or nothing.

        Returns the slots of ``seq_ids``. Raises NoPageError (nothing changed) when the
        pool lacks pages, InvalidLengthError for negative or mismatched lengths.
        """
        ids, slots, old_len, new_len = self._growth(seq_ids, add_lens)
        pages = self.allocator.take(self.pages_needed(old_len, new_len))
        for i in np.flatnonzero(slots < 0).tolist():
            slots[i] = self._new_slot(ids[i])
        self._add_pages(slots, old_len, new_len, pages)
        self._touch(slots)
        return slots

    def pages_to_extend(self, seq_ids: SeqIds, add_lens: object) -> int:
        """Free pages that ``extend(seq_ids, add_lens)`` would take (changes nothing)."""
        _, _, old_len, new_len = self._growth(seq_ids, add_lens)
        return self.pages_needed(old_len, new_len)

    def _growth(
        self, seq_ids: SeqIds, add_lens: object
    ) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, slots (-1: new), old lengths, new lengths)`` of an extend, checked."""
        ids = id_list(seq_ids)
        add = int_array(add_lens, "seq_new_lens", low=0, high=MAX_LENGTH, error=InvalidLengthError)
        if add.size != len(ids):
            raise InvalidLengthError(
                f"got {len(ids)} sequence ids but {add.size} lengths; pass one length per id"
            )
        check_distinct(ids)
        slots = self._ids.lookup(ids)
        for i in np.flatnonzero(slots < 0).tolist():
            new_id(ids[i])  # a new id must fit in int64
        old_len = np.where(slots >= 0, self._length[np.maximum(slots, 0)], 0)
        if add.size and (old_len + add).max() > MAX_LENGTH:
            too_long = ids[int(np.argmax(old_len + add))]
            raise InvalidLengthError(
                f"sequence {too_long} would hold more than {MAX_LENGTH} tokens (int32 "
                f"lengths, as flashinfer's)"
            )
        return ids, slots, old_len, old_len + add

    def pages_to_grow_by_one(self, slots: np.ndarray) -> int:
        """Free pages that :meth:`grow_by_one` of ``slots`` would take (changes nothing)."""
        return int(np.count_nonzero(self._length[slots] % self.page_size == 0))

    def grow_by_one(self, slots: np.ndarray) -> None:
        """One more token for each of the (distinct, live) slots, all or nothing."""
        old_len = self._length[slots]
        if old_len.size and old_len.max() >= MAX_LENGTH:
            raise InvalidLengthError(f"a sequence would hold more than {MAX_LENGTH} tokens")
        full = (old_len % self.page_size == 0).nonzero()[0]  # next token starts a page
        pages = self.allocator.take(full.size)
        if full.size:
            rows = slots[full]
            first = old_len[full] // self.page_size
            self._ensure_room(rows, first + 1)
            self._pages.write(self.starts(rows) + first, pages)
        old_len += 1
        self._length[slots] = old_len
        self._touch(slots)
        self.last_growth = (self.clock, slots, full, pages)

    def truncate(self, slot: int, new_len: int) -> tuple[int, int] | None:
        """Cut a sequence to ``new_len`` tokens and free the pages past it.

        When the new last page is partial and shared, it is replaced by a fresh page
        (copy on write). Returns ``(shared_page, fresh_page)`` whose KV the caller
        must copy, or None.
        """
        length = self.length(slot)
        new_len = exact_int(new_len, "new_len", low=0, high=length, error=InvalidLengthError)
        keep = pages_for(new_len, self.page_size)
        pages = self.page_ids(slot)
        copy, drop = None, pages[keep:]
        partial = new_len % self.page_size != 0
        if partial and self.allocator.refcount[pages[keep - 1]] > 1:
            fresh = int(self.allocator.take(1)[0])
            copy, drop = (int(pages[keep - 1]), fresh), pages[keep - 1 :]
            self._pages.write(self.starts(np.array([slot])) + keep - 1, np.array([fresh]))
        # in one call: a prefix cache sees a child page and its parent go together
        self.allocator.drop(drop)
        self._length[slot] = new_len
        self._touch(slot, layout=True)
        return copy

    def fork(self, src_slot: int, dst_id: int) -> tuple[int, tuple[int, int] | None]:
        """Start ``dst_id`` with the tokens of ``src_slot``, sharing its full pages.

        A partial last page is not shared: ``dst_id`` gets a fresh page, returned as
        ``(src_page, fresh_page)`` for the caller to copy. Returns ``(dst_slot, copy)``.

        The source counts as changed too: a batch packed before the fork would write
        tokens into pages the fork now shares, or copied before they were written.
        """
        self.check_new(dst_id)
        length = int(self._length[src_slot])
        pages = self.page_ids(src_slot)
        full = length // self.page_size
        fresh = self.allocator.take(pages.size - full)  # 0 or 1 page
        self.allocator.share(pages[:full])
        dst = self.adopt(dst_id, np.concatenate([pages[:full], fresh]), length)
        copy = (int(pages[-1]), int(fresh[0])) if fresh.size else None
        self._touch(src_slot)
        return dst, copy

    def adopt(self, seq_id: int, pages: np.ndarray, length: int) -> int:
        """Start ``seq_id`` holding ``pages`` (one reference each, already taken by the
        caller) and ``length`` tokens; returns its slot."""
        self.check_new(seq_id)
        assert pages.size == pages_for(length, self.page_size), "pages do not match the length"
        slot = self._new_slot(seq_id)
        self._ensure_room(np.array([slot]), np.array([pages.size]))
        self._pages.write(self.starts(np.array([slot])) + np.arange(pages.size), pages)
        self._length[slot] = length
        self._touch(slot)
        return slot

    def share_page(self, slot: int, index: int, page: int) -> None:
        """Replace page ``index`` of ``slot`` by ``page``, which holds the same KV (a
        prefix cache's copy): the slot takes a reference to ``page`` and drops the old."""
        position = int(self._pages.start[slot]) + index
        old = self.arena[position : position + 1].copy()
        assert index < pages_for(int(self._length[slot]), self.page_size), "index past the end"
        self.allocator.share_one(page)
        self._pages.write(np.array([position]), np.array([page], dtype=np.int32))
        self.allocator.drop(old)
        self._touch(slot, layout=True)

    def release(self, seq_ids: SeqIds) -> None:
        """End sequences and drop their page references, all or nothing."""
        slots = self.slots(seq_ids)
        self.allocator.drop(self.pages_of_slots(slots))
        self._ids.remove(seq_ids)
        self._pages.free(slots)
        self._length[slots] = 0
        self._touch(slots, layout=True)

    # ------------------------------------------------------------------ stamps
    def stamp(self, slots: np.ndarray) -> BatchStamp:
        """What a batch of ``slots`` is packed from: this table and its rows' versions."""
        return BatchStamp(self, slots.copy(), self.row_versions[slots], self.clock)

    # --------------------------------------------------------------- integrity
    def check_integrity(self, other_holders: Optional[np.ndarray] = None) -> None:
        """Raise AssertionError unless every invariant of the table and its pool holds.

        Checks the pool (:meth:`PageAllocator.check_integrity`); that each sequence
        holds exactly ceil(length / page_size) pages inside its own arena region; that
        each page's reference count covers the sequences listing it (plus
        ``other_holders[page]``: a prefix cache, the caller's own references); and that
        no partially filled last page is listed by two sequences.
        """
        self.allocator.check_integrity()
        slots = self._ids.live()
        counts = pages_for(self._length[slots], self.page_size)
        self._pages.check(slots, counts)
        holders = np.bincount(self.pages_of_slots(slots), minlength=self.allocator.num_pages)
        total = holders if other_holders is None else holders + other_holders
        assert (self.allocator.refcount >= total).all(), "a page has fewer references than holders"
        last = self.arena[self.starts(slots) + counts - 1][
            self._length[slots] % self.page_size != 0
        ]
        assert (holders[last] == 1).all(), "two sequences share a partially filled page"

    # ---------------------------------------------------------------- internals
    def pages_needed(self, old_len: np.ndarray, new_len: np.ndarray) -> int:
        """Pages that growing sequences from ``old_len`` to ``new_len`` tokens takes."""
        return int((pages_for(new_len, self.page_size) - pages_for(old_len, self.page_size)).sum())

    def _add_pages(
        self, slots: np.ndarray, old_len: np.ndarray, new_len: np.ndarray, pages: np.ndarray
    ) -> None:
        first = pages_for(old_len, self.page_size)
        end = pages_for(new_len, self.page_size)
        grow = end > first
        if grow.any():
            rows, first, count = slots[grow], first[grow], (end - first)[grow]
            self._ensure_room(rows, first + count)
            self._pages.write(concat_ranges(self.starts(rows) + first, count), pages)
        self._length[slots] = new_len

    def _new_slot(self, seq_id: int) -> int:
        slot = self._ids.add(seq_id)
        if slot == self._length.size:
            for name in ("_length", "row_versions", "row_layouts"):
                old = getattr(self, name)
                setattr(self, name, np.concatenate([old, np.zeros_like(old)]))
            self._pages.add_slots(self._length.size)
        self._length[slot] = 0
        self._touch(slot, layout=True)
        return slot

    def _touch(self, slots: np.ndarray | int, layout: bool = False) -> None:
        """Mark ``slots`` changed: batches packed with them before are stale now;
        ``layout``: their page ids changed other than by growth at the end."""
        self.clock += 1
        self.row_versions[slots] = self.clock
        if layout:
            self.row_layouts[slots] = self.layout_clock = self.clock

    def _ensure_room(self, slots: np.ndarray, pages_needed: np.ndarray) -> None:
        if (self._pages.room[slots] >= pages_needed).all():  # the common case: room enough
            return
        self._pages.reserve(slots, pages_needed, pages_for(self._length[slots], self.page_size))
