"""Which true token positions each (layer, sequence, KV head) still holds (numpy only).

A sequence has a *logical length* per layer: every token appended to it, kept or not.
A head holds a subset of those positions, in increasing order. The subset is stored
as ``pinned`` (the positions that survived the last compression of that head, any
sorted set) followed by the *tail*: every position from ``tail_from`` to the logical
length, i.e. the tokens appended since. An append therefore only moves the logical
length (one vectorized add for a whole batch); only a compression touches ``pinned``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._checks import id_list, new_id
from ..errors import SequenceExistsError
from ..slot_map import SlotMap, check_distinct


class HeadPositions:
    """The logical length of each live sequence per layer, and the positions of each head.

    Args:
        num_layers: layers of the model.
        num_kv_heads: KV heads per layer.

    Example:
        >>> pos = HeadPositions(num_layers=1, num_kv_heads=2)
        >>> pos.add([5]); slots = pos.slots([5])
        >>> pos.advance([0], slots, np.array([4]))
        >>> pos.replace(0, int(slots[0]), [np.array([0, 3]), np.arange(4)])
        >>> pos.advance([0], slots, np.array([1]))
        >>> pos.positions(0, int(slots[0]), 0).tolist(), pos.held(0, int(slots[0])).tolist()
        ([0, 3, 4], [3, 5])
    """

    def __init__(self, num_layers: int, num_kv_heads: int) -> None:
        self.num_layers = int(num_layers)
        self.num_kv_heads = int(num_kv_heads)
        self._ids = SlotMap("in the head-wise cache", "; add_sequences first")
        # on cpu, one row per slot: logical length per layer, tail start per (layer, head)
        self._length = np.zeros((8, self.num_layers), dtype=np.int64)
        self._tail_from = np.zeros((8, self.num_layers, self.num_kv_heads), dtype=np.int64)
        # on cpu: _pinned[slot][layer][head], sorted positions below that head's tail_from
        self._pinned: list[list[list[np.ndarray]]] = []

    # ----------------------------------------------------------------- lookups
    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._ids

    @property
    def seq_ids(self) -> list[int]:
        """Live sequence ids, oldest first."""
        return self._ids.ids

    def slot(self, seq_id: int) -> int:
        """The slot of one live sequence (:meth:`SlotMap.slot`)."""
        return self._ids.slot(seq_id)

    def slots(self, seq_ids: Sequence[int]) -> np.ndarray:
        """Slots of distinct live sequences (:meth:`SlotMap.slots`; read-only)."""
        return self._ids.slots(seq_ids)

    def length(self, layer: int, slot: int) -> int:
        """Logical length of a sequence in one layer: every token appended there."""
        return int(self._length[slot, layer])

    def lengths(self, slot: int) -> np.ndarray:
        """Logical length of a sequence in each layer, ``[num_layers]`` int64 (a copy)."""
        return self._length[slot].copy()

    def longest(self, slots: np.ndarray) -> np.ndarray:
        """Each slot's logical length in its longest layer, ``[len(slots)]`` int64."""
        return self._length[slots].max(axis=1)

    def all_lengths(self) -> np.ndarray:
        """Logical lengths of every live sequence, ``[live, num_layers]`` int64."""
        return self._length[self._ids.live()]

    def held(self, layer: int, slot: int) -> np.ndarray:
        """Tokens each head holds, ``[num_kv_heads]`` int64."""
        pinned = np.array([p.size for p in self._pinned[slot][layer]], dtype=np.int64)
        return pinned + self._length[slot, layer] - self._tail_from[slot, layer]

    def hold_newest(self, layer: int, slots: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Whether each head of ``slots[i]`` holds its layer's newest ``counts[i]``
        positions, ``[len(slots), num_kv_heads]`` bool."""
        first = self._length[slots, layer] - counts  # the oldest position asked for
        tail_from = self._tail_from[slots, layer]
        held = tail_from <= first[:, None]
        for i, head in np.argwhere(~held).tolist():  # the rest must end the pinned ones
            pinned = self._pinned[slots[i]][layer][head]
            need = int(tail_from[i, head] - first[i])
            held[i, head] = first[i] >= 0 and pinned.size >= need and pinned[-need] == first[i]
        return held

    def positions(self, layer: int, slot: int, head: int) -> np.ndarray:
        """Positions one head holds, increasing, ``[held]`` int64 (a copy)."""
        tail = np.arange(self._tail_from[slot, layer, head], self._length[slot, layer])
        return np.concatenate([self._pinned[slot][layer][head], tail])

    # ---------------------------------------------------------------- mutation
    def add(self, seq_ids: Sequence[int]) -> None:
        """Start sequences (length 0 everywhere); checks all ids first."""
        seq_ids = [new_id(i) for i in id_list(seq_ids)]
        check_distinct(seq_ids)
        live = [i for i in seq_ids if i in self._ids]
        if live:
            raise SequenceExistsError(f"sequence ids {live[:8]} are already in the cache")
        for seq_id in seq_ids:
            self._new_slot(self._ids.add(seq_id))

    def remove(self, seq_ids: Sequence[int]) -> None:
        """End sequences (their ids must be live and distinct)."""
        self._ids.remove(seq_ids)

    def advance(self, layers: Sequence[int], slots: np.ndarray, counts: np.ndarray) -> None:
        """``counts[i]`` new tokens for ``slots[i]`` in each of ``layers`` (appended to
        every head); slots distinct, layers distinct."""
        if len(layers) == self.num_layers:  # a whole step: no index to build
            self._length[slots] += counts[:, None]
        else:
            self._length[slots[:, None], np.asarray(layers)] += counts[:, None]

    def replace(self, layer: int, slot: int, positions: list[np.ndarray]) -> None:
        """Set the positions each head holds (all earlier than the logical length)."""
        self._pinned[slot][layer] = [np.asarray(p, dtype=np.int64) for p in positions]
        self._tail_from[slot, layer] = self._length[slot, layer]

    def check(self, layer: int, slot: int) -> None:
        """Raise AssertionError unless the head's pinned positions are sorted and below the tail."""
        for head, pinned in enumerate(self._pinned[slot][layer]):
            tail_from = self._tail_from[slot, layer, head]
            assert tail_from <= self._length[slot, layer], "a tail starts past the length"
            assert (np.diff(pinned) > 0).all(), "pinned positions not strictly increasing"
            assert pinned.size == 0 or (pinned[0] >= 0 and pinned[-1] < tail_from), (
                "pinned positions outside [0, tail_from)"
            )

    # ---------------------------------------------------------------- internals
    def _new_slot(self, slot: int) -> None:
        """Empty rows for ``slot`` (new, or reused after a release)."""
        if slot == len(self._pinned):
            self._pinned.append([])
            if slot == self._length.shape[0]:  # double the rows, amortized O(1)
                self._length = np.concatenate([self._length, np.zeros_like(self._length)])
                self._tail_from = np.concatenate([self._tail_from, np.zeros_like(self._tail_from)])
        empty = np.zeros(0, dtype=np.int64)
        self._pinned[slot] = [[empty] * self.num_kv_heads for _ in range(self.num_layers)]
        self._length[slot] = 0
        self._tail_from[slot] = 0
