"""Sequence id -> pages and length, in preallocated numpy arrays (no torch).

Each live sequence owns a *slot*: its length, and a region of one flat page arena
that holds its page ids in token order. A region has spare room, so a decode step
writes one page id in place; a sequence that outgrows its room moves to the arena's
end with twice the room (amortized O(1) per page), and the arena is compacted when
it fills. Per-step work is therefore O(batch), never O(pages held).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from ._arrays import concat_ranges
from ._checks import exact_int, id_list, int_array, is_int, new_id, shown
from .allocator import PageAllocator
from .errors import (
    ArgumentTypeError,
    DuplicateSequenceError,
    InvalidLengthError,
    SequenceExistsError,
    UnknownSequenceError,
)
from .packed_data import BatchStamp

MAX_LENGTH = int(np.iinfo(np.int32).max)  # lengths are int32, as flashinfer's
SeqIds = Sequence[int]
"""Sequence ids of a batch: a list (fastest), tuple, numpy array or torch tensor."""


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
    page ids moved in the arena, were cut or swapped, or the slot was reused). That is
    the one way to ask what changed since a stamp: a batch packed earlier can tell
    whether its own rows changed (:meth:`stamp`), and a packer or device copy which
    rows it must read again, whatever happened to other sequences.
    """

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        self.allocator = allocator
        self.page_size = int(page_size)
        self._slot_of: dict[int, int] = {}
        self._free_slots: list[int] = []
        self._num_slots = 0
        # on cpu, one entry per slot
        self._length = np.zeros(16, dtype=np.int32)
        self._start = np.zeros(16, dtype=np.int64)
        self._room = np.zeros(16, dtype=np.int64)
        self.row_versions = np.zeros(16, dtype=np.int64)  # clock of each slot's last change
        self.row_layouts = np.zeros(16, dtype=np.int64)  # ... last change but growth at the end
        self.clock = 0  # moves on at every change to any sequence
        # on cpu: page ids of every sequence, each in its own region
        self.arena = np.zeros(1024, dtype=np.int32)
        self._top = 0
        self._live_room = 0
        self._members = 0  # moves on when a sequence starts or ends
        self._cached_ids: list[int] | None = None
        self._cached_slots = np.zeros(0, dtype=np.int64)
        self._cached_version = -1

    # ----------------------------------------------------------------- lookups
    def __contains__(self, seq_id: object) -> bool:
        return is_int(seq_id) and seq_id in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def seq_ids(self) -> list[int]:
        """Ids of the live sequences, in creation order."""
        return list(self._slot_of)

    @property
    def slot_capacity(self) -> int:
        """Slots the per-slot arrays have room for (every slot id is below it)."""
        return int(self._length.size)

    def slot(self, seq_id: int) -> int:
        """The slot of one live sequence; raises UnknownSequenceError (ArgumentTypeError
        for an id that is not an integer: ``True`` is not sequence 1)."""
        if not is_int(seq_id):
            raise ArgumentTypeError(f"a sequence id must be an integer, got {shown(seq_id)}")
        try:
            return self._slot_of[seq_id]
        except KeyError:
            raise UnknownSequenceError(
                f"sequence id {seq_id!r} is not allocated (live: {self._some_ids()})"
            ) from None

    def slots(self, seq_ids: SeqIds) -> np.ndarray:
        """Slots of distinct live sequences, shape ``[len(seq_ids)]``, int64 (read-only:
        the same array may be returned again).

        The answer for the previous batch is reused when the ids and the set of
        live sequences are unchanged, so a steady decode batch costs one list compare.
        """
        ids = id_list(seq_ids)
        if self._cached_version == self._members and ids == self._cached_ids:
            return self._cached_slots
        slot_of = self._slot_of
        try:
            slots = np.fromiter((slot_of[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError:
            missing = [i for i in ids if i not in slot_of][:8]
            raise UnknownSequenceError(
                f"sequence ids {missing} are not allocated (live: {self._some_ids()})"
            ) from None
        check_distinct(ids)
        self._cached_ids, self._cached_slots = list(ids), slots
        self._cached_version = self._members
        return slots

    def lengths(self, slots: np.ndarray) -> np.ndarray:
        """Token counts of the given slots, int32 (a copy)."""
        return self._length[slots]

    def length(self, slot: int) -> int:
        """Token count of one slot."""
        return int(self._length[slot])

    def starts(self, slots: np.ndarray) -> np.ndarray:
        """Where each slot's page ids begin in :attr:`arena`, int64."""
        return self._start[slots]

    def page_ids(self, slot: int) -> np.ndarray:
        """The page ids of one slot in token order, int32 (a copy)."""
        n = int(pages_for(self._length[slot], self.page_size))
        start = int(self._start[slot])
        return self.arena[start : start + n].copy()

    def pages_of_slots(self, slots: np.ndarray) -> np.ndarray:
        """Page ids of several slots, concatenated in order, int32."""
        counts = pages_for(self._length[slots], self.page_size)
        return self.arena[concat_ranges(self._start[slots], counts)]

    # ---------------------------------------------------------------- mutation
    def extend(self, seq_ids: SeqIds, add_lens: object) -> np.ndarray:
        """Grow known sequences and start unknown ones, all or nothing.

        Returns the slots of ``seq_ids``. Raises NoPageError (nothing changed) when the
        pool lacks pages, InvalidLengthError for negative or mismatched lengths.
        """
        ids = id_list(seq_ids)
        add = int_array(add_lens, "seq_new_lens", low=0, high=MAX_LENGTH, error=InvalidLengthError)
        if add.size != len(ids):
            raise InvalidLengthError(
                f"got {len(ids)} sequence ids but {add.size} lengths; pass one length per id"
            )
        check_distinct(ids)
        slot_of = self._slot_of
        slots = np.fromiter((slot_of.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
        known = slots >= 0
        if not known.all():
            for i in np.flatnonzero(~known).tolist():
                new_id(ids[i])  # a new id must fit in int64
        old_len = np.where(known, self._length[np.maximum(slots, 0)], 0)
        if add.size and (old_len + add).max() > MAX_LENGTH:
            too_long = ids[int(np.argmax(old_len + add))]
            raise InvalidLengthError(
                f"sequence {too_long} would hold more than {MAX_LENGTH} tokens (int32 "
                f"lengths, as flashinfer's)"
            )
        pages = self.allocator.take(self.pages_needed(old_len, old_len + add))
        if not known.all():
            for i in np.flatnonzero(~known).tolist():
                slots[i] = self._new_slot(ids[i])
        self._add_pages(slots, old_len, old_len + add, pages)
        self._touch(slots)
        return slots

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
            self._write(self._start[rows] + first, pages)
        old_len += 1
        self._length[slots] = old_len
        self._touch(slots)

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
            self._write(np.array([self._start[slot] + keep - 1]), np.array([fresh]))
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
        self._write(self._start[slot] + np.arange(pages.size), pages)
        self._length[slot] = length
        self._touch(slot)
        return slot

    def share_page(self, slot: int, index: int, page: int) -> None:
        """Replace page ``index`` of ``slot`` by ``page``, which holds the same KV (a
        prefix cache's copy): the slot takes a reference to ``page`` and drops the old."""
        position = int(self._start[slot]) + index
        old = self.arena[position : position + 1].copy()
        assert index < pages_for(int(self._length[slot]), self.page_size), "index past the end"
        self.allocator.share(np.array([page]))
        self._write(np.array([position]), np.array([page], dtype=np.int32))
        self.allocator.drop(old)
        self._touch(slot, layout=True)

    def release(self, seq_ids: SeqIds) -> None:
        """End sequences and drop their page references, all or nothing."""
        ids = id_list(seq_ids)
        slots = self.slots(ids)
        self.allocator.drop(self.pages_of_slots(slots))
        for seq_id in ids:
            del self._slot_of[seq_id]
        self._free_slots += slots.tolist()
        self._live_room -= int(self._room[slots].sum())
        self._length[slots] = 0
        self._room[slots] = 0
        self._members += 1
        self._touch(slots, layout=True)

    # ------------------------------------------------------------------ stamps
    def stamp(self, slots: np.ndarray) -> BatchStamp:
        """What a batch of ``slots`` is packed from: this table and its rows' versions."""
        return BatchStamp(self, slots.copy(), self.row_versions[slots], self.clock)

    # --------------------------------------------------------------- integrity
    def check_integrity(self) -> None:
        """Raise AssertionError unless every invariant of the table and its pool holds.

        Checks the pool (:meth:`PageAllocator.check_integrity`); that each sequence
        holds exactly ceil(length / page_size) pages inside its own arena region; that
        each page's reference count covers the sequences listing it and no listed page
        is free; and that no partially filled last page is listed by two sequences.
        """
        self.allocator.check_integrity()
        slots = np.array(list(self._slot_of.values()), dtype=np.int64)
        if slots.size == 0:
            return
        assert (self._length[slots] >= 0).all(), "negative sequence length"
        counts = pages_for(self._length[slots], self.page_size)
        assert (counts <= self._room[slots]).all(), "a sequence outgrew its arena room"
        placed = slots[self._room[slots] > 0]
        starts = np.sort(self._start[placed])
        ends = np.sort(self._start[placed] + self._room[placed])
        assert (ends[:-1] <= starts[1:]).all(), "arena regions overlap"
        assert ends.size == 0 or ends[-1] <= self._top <= self.arena.size, "region past the top"
        holders = self.holders()
        refcount = self.allocator.refcount
        assert (refcount >= holders).all(), "a page has fewer references than holders"
        partial = self._length[slots] % self.page_size != 0
        last = self.arena[self._start[slots] + counts - 1][partial]
        assert (holders[last] == 1).all(), "two sequences share a partially filled page"

    def holders(self) -> np.ndarray:
        """How many live sequences list each page, ``[num_pages]`` int64."""
        slots = np.fromiter(self._slot_of.values(), dtype=np.int64, count=len(self._slot_of))
        listed = self.pages_of_slots(slots)
        return np.bincount(listed, minlength=self.allocator.num_pages)

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
            self._write(concat_ranges(self._start[rows] + first, count), pages)
        self._length[slots] = new_len

    def check_new(self, seq_id: int) -> None:
        new_id(seq_id)
        if seq_id in self._slot_of:
            raise SequenceExistsError(f"sequence id {seq_id} is live already")

    def _new_slot(self, seq_id: int) -> int:
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = self._num_slots
            self._num_slots += 1
            if slot == self._length.size:
                for name in ("_length", "_start", "_room", "row_versions", "row_layouts"):
                    old = getattr(self, name)
                    setattr(self, name, np.concatenate([old, np.zeros_like(old)]))
        self._slot_of[seq_id] = slot
        self._length[slot] = 0
        self._start[slot] = 0
        self._room[slot] = 0
        self._members += 1
        self._touch(slot, layout=True)
        return slot

    def _touch(self, slots: np.ndarray | int, layout: bool = False) -> None:
        """Mark ``slots`` changed: batches packed with them before are stale now;
        ``layout``: their page ids changed other than by growth at the end."""
        self.clock += 1
        self.row_versions[slots] = self.clock
        if layout:
            self.row_layouts[slots] = self.clock

    def _ensure_room(self, slots: np.ndarray, pages_needed: np.ndarray) -> None:
        short = self._room[slots] < pages_needed
        if short.any():
            self._move(slots[short], np.maximum(2 * pages_needed[short], 4))

    def _move(self, slots: np.ndarray, rooms: np.ndarray) -> None:
        """Give each of ``slots`` a fresh region of ``rooms`` pages at the arena top,
        carrying its page ids over (one vectorized copy for all of them)."""
        total = int(rooms.sum())
        if self._top + total > self.arena.size:
            self._compact(extra=total)
        held = pages_for(self._length[slots], self.page_size)
        starts = self._top + np.cumsum(rooms) - rooms
        if held.any():
            to = concat_ranges(starts, held)
            self.arena[to] = self.arena[concat_ranges(self._start[slots], held)]
        self._live_room += total - int(self._room[slots].sum())
        self._start[slots], self._room[slots] = starts, rooms
        self._top += total
        self._touch(slots, layout=True)

    def _compact(self, extra: int) -> None:
        """Pack live regions to the arena front, growing it so ``extra`` more pages fit."""
        size = self.arena.size
        while self._live_room + extra > size // 2:
            size *= 2
        slots = np.array(sorted(self._slot_of.values(), key=lambda s: self._start[s]), np.int64)
        arena = np.zeros(size, dtype=np.int32)
        top = 0
        for slot in slots.tolist():
            start, room = int(self._start[slot]), int(self._room[slot])
            arena[top : top + room] = self.arena[start : start + room]
            self._start[slot] = top
            top += room
        self.arena, self._top = arena, top
        self._touch(slots, layout=True)

    def _write(self, positions: np.ndarray, pages: np.ndarray) -> None:
        self.arena[positions] = pages

    def _some_ids(self) -> str:
        ids = list(self._slot_of)
        return f"{ids[:8]}{' ...' if len(ids) > 8 else ''} ({len(ids)} in all)"


def check_distinct(ids: list[int]) -> None:
    if len(set(ids)) != len(ids):
        seen: set[int] = set()
        dups = [i for i in ids if i in seen or seen.add(i)][:8]  # type: ignore[func-returns-value]
        raise DuplicateSequenceError(
            f"sequence ids must be distinct within a call; repeated: {dups}"
        )
