"""Live sequence ids -> slots: small integers, reused after release, that index per-slot
arrays (no torch)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._checks import id_list, is_int, new_id, shown
from .errors import (
    ArgumentTypeError,
    DuplicateSequenceError,
    SequenceExistsError,
    UnknownSequenceError,
)

SeqIds = Sequence[int]
"""Sequence ids of a batch: a list (fastest), tuple, numpy array or torch tensor."""


class SlotMap:
    """The slot of every live sequence id.

    Args:
        where: what an unknown id is not, in messages ("allocated": the sequence table's;
            "in the head-wise cache").
        hint: added to the message of an unknown id in a batch lookup.

    Example:
        >>> slots = SlotMap()
        >>> slots.add(7), slots.add(3)
        (0, 1)
        >>> slots.slots([3, 7]).tolist()
        [1, 0]
        >>> slots.remove([7]).tolist(), slots.add(9)   # slot 0 is free again
        ([0], 0)
    """

    def __init__(self, where: str = "allocated", hint: str = "") -> None:
        self._where, self._hint = where, hint
        self._slot_of: dict[int, int] = {}
        self._free: list[int] = []
        self.used = 0  # slots handed out so far: every slot is below it
        # the last batch looked up, while no sequence started or ended since
        self._memo: tuple[list[int], np.ndarray] | None = None

    def __contains__(self, seq_id: object) -> bool:
        return is_int(seq_id) and seq_id in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def ids(self) -> list[int]:
        """Live ids, oldest first."""
        return list(self._slot_of)

    def live(self) -> np.ndarray:
        """The slots of every live id, int64."""
        return np.fromiter(self._slot_of.values(), dtype=np.int64, count=len(self._slot_of))

    def slot(self, seq_id: object) -> int:
        """The slot of one live id; raises UnknownSequenceError (ArgumentTypeError for an
        id that is not an integer: ``True`` is not sequence 1)."""
        if not is_int(seq_id):
            raise ArgumentTypeError(f"a sequence id must be an integer, got {shown(seq_id)}")
        try:
            return self._slot_of[seq_id]  # type: ignore[index]
        except KeyError:
            raise UnknownSequenceError(
                f"sequence id {seq_id!r} is not {self._where} (live: {self.some_ids()})"
            ) from None

    def slots(self, seq_ids: SeqIds) -> np.ndarray:
        """Slots of distinct live ids, ``[len(seq_ids)]`` int64 (read-only: the same
        array may be returned again: a steady decode batch costs one list compare)."""
        ids = id_list(seq_ids)
        memo = self._memo
        if memo is not None and ids == memo[0]:
            return memo[1]
        slot_of = self._slot_of
        try:
            slots = np.fromiter((slot_of[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError:
            missing = [i for i in ids if i not in slot_of][:8]
            raise UnknownSequenceError(
                f"sequence ids {missing} are not {self._where} (live: {self.some_ids()})"
                f"{self._hint}"
            ) from None
        check_distinct(ids)
        self._memo = (list(ids), slots)
        return slots

    def lookup(self, ids: list[int]) -> np.ndarray:
        """Slots of ``ids``, -1 for an id that is not live, int64."""
        slot_of = self._slot_of
        return np.fromiter((slot_of.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))

    def check_new(self, seq_id: object) -> None:
        """Raise unless ``seq_id`` can start a sequence: an int64 id that is not live."""
        new_id(seq_id)
        if seq_id in self._slot_of:
            raise SequenceExistsError(f"sequence id {seq_id} is live already")

    def add(self, seq_id: int) -> int:
        """A slot for a new (checked) id."""
        if self._free:
            slot = self._free.pop()
        else:
            slot, self.used = self.used, self.used + 1
        self._slot_of[seq_id] = slot
        self._memo = None
        return slot

    def remove(self, seq_ids: SeqIds) -> np.ndarray:
        """End distinct live ids; returns their slots."""
        ids = id_list(seq_ids)
        slots = self.slots(ids)
        for seq_id in ids:
            del self._slot_of[seq_id]
        self._free += slots.tolist()
        self._memo = None
        return slots

    def some_ids(self) -> str:
        ids = list(self._slot_of)
        return f"{ids[:8]}{' ...' if len(ids) > 8 else ''} ({len(ids)} in all)"


def check_distinct(ids: list[int]) -> None:
    """Raise DuplicateSequenceError if an id repeats."""
    if len(set(ids)) != len(ids):
        seen: set[int] = set()
        dups = [i for i in ids if i in seen or seen.add(i)][:8]  # type: ignore[func-returns-value]
        raise DuplicateSequenceError(
            f"sequence ids must be distinct within a call; repeated: {dups}"
        )
