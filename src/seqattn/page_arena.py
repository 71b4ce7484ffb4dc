"""Where each slot's page ids live: one flat int32 array, a region per slot (numpy)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ._arrays import concat_ranges


class PageArena:
    """The page ids of every slot in token order, each slot in its own region of :attr:`ids`.

    A region has spare room, so a decode step writes one page id in place; a slot that
    outgrows its room moves to the top with twice the room (amortized O(1) per page),
    and the array is compacted, and grown, when the top reaches its end. Per-step work
    is therefore O(batch), never O(pages held).

    Example:
        >>> import numpy as np
        >>> arena = PageArena()
        >>> arena.reserve(np.array([0]), np.array([3]))   # slot 0 gets a region
        >>> arena.write(arena.start[[0, 0, 0]] + np.arange(3), np.array([7, 8, 9]))
        >>> arena.pages(np.array([0]), np.array([2])).tolist()
        [7, 8]
    """

    def __init__(self) -> None:
        self.ids = np.zeros(1024, dtype=np.int32)  # on cpu
        # on cpu, per slot: where its region starts and how many page ids it has room for
        self.start = np.zeros(16, dtype=np.int64)
        self.room = np.zeros(16, dtype=np.int64)
        self.top = 0  # regions end below it
        self._live_room = 0

    def add_slots(self, capacity: int) -> None:
        """Room for slots ``< capacity`` (new ones own no region)."""
        grow = capacity - self.start.size
        if grow > 0:
            self.start = np.concatenate([self.start, np.zeros(grow, np.int64)])
            self.room = np.concatenate([self.room, np.zeros(grow, np.int64)])

    def pages(self, slots: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The first ``counts[i]`` page ids of each of ``slots``, concatenated, int32."""
        return self.ids[concat_ranges(self.start[slots], counts)]

    def write(self, positions: np.ndarray, pages: np.ndarray) -> None:
        self.ids[positions] = pages

    def reserve(
        self, slots: np.ndarray, needed: np.ndarray, held: Optional[np.ndarray] = None
    ) -> None:
        """Room for ``needed[i]`` page ids in each of ``slots``, whose first ``held[i]``
        ids (default: none) move along (a region that moves, or the whole array when it
        is compacted, changes :attr:`start`)."""
        short = self.room[slots] < needed
        if not short.any():
            return
        moving = slots[short]
        held = np.zeros(moving.size, np.int64) if held is None else held[short]
        rooms = np.maximum(2 * needed[short], 4)
        total = int(rooms.sum())
        if self.top + total > self.ids.size:
            self._compact(extra=total)
        starts = self.top + np.cumsum(rooms) - rooms
        if held.any():
            self.ids[concat_ranges(starts, held)] = self.pages(moving, held)
        self._live_room += total - int(self.room[moving].sum())
        self.start[moving], self.room[moving] = starts, rooms
        self.top += total

    def free(self, slots: np.ndarray) -> None:
        """The regions of ``slots`` are unused from now on."""
        self._live_room -= int(self.room[slots].sum())
        self.room[slots] = 0

    def check(self, slots: np.ndarray, counts: np.ndarray) -> None:
        """Assert that each of ``slots`` holds its ``counts`` ids in its own region."""
        assert (counts <= self.room[slots]).all(), "a sequence outgrew its arena room"
        placed = slots[self.room[slots] > 0]
        starts = np.sort(self.start[placed])
        ends = np.sort(self.start[placed] + self.room[placed])
        assert (ends[:-1] <= starts[1:]).all(), "arena regions overlap"
        assert ends.size == 0 or ends[-1] <= self.top <= self.ids.size, "region past the top"

    def _compact(self, extra: int) -> None:
        """Pack live regions to the front, growing the array so ``extra`` more ids fit."""
        size = self.ids.size
        while self._live_room + extra > size // 2:
            size *= 2
        live = np.flatnonzero(self.room)
        live = live[np.argsort(self.start[live], kind="stable")]
        rooms = self.room[live]
        starts = np.cumsum(rooms) - rooms
        ids = np.zeros(size, dtype=np.int32)
        ids[concat_ranges(starts, rooms)] = self.ids[concat_ranges(self.start[live], rooms)]
        self.ids, self.start[live], self.top = ids, starts, int(rooms.sum())
