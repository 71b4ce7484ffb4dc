"""The rotated queries of each sequence's newest ``window`` tokens, per layer: what a
press with a query window (SnapKV, AdaKV, PyramidKV) reads when it compresses.

The model only hands the attention function the queries of the tokens of the current
step. A prompt prefilled in chunks whose last chunk is shorter than the window, or a
compression in a decode step, needs queries of earlier steps: so every step records
the newest ``window`` queries of each tracked sequence into a ring, slot ``p % window``
holding position ``p``. The rings of every sequence with the same window live in one
tensor, so a step records each layer's queries in one indexed copy, whatever its batch.

Example:
    >>> import torch, numpy as np
    >>> windows = QueryWindows(num_layers=1, num_qo_heads=2, head_dim=4,
    ...                        dtype=torch.float32, device=torch.device("cpu"))
    >>> windows.track(7, window=3)
    >>> q = torch.arange(5.0)[:, None, None].expand(5, 2, 4)   # 5 tokens' queries
    >>> rows = windows.step_rows([7], np.array([0]), np.array([5]))
    >>> windows.record(rows, 0, q)
    >>> windows.read(7, layer=0, seq_len=5)[:, 0, 0].tolist()   # positions 2, 3, 4
    [2.0, 3.0, 4.0]
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from attrs import define

from .._arrays import concat_ranges


@define(slots=True, frozen=True)
class WindowRows:
    """Where one step's queries go, per ring pool: model rows -> (slot, ring index).

    Attributes:
        per_window: ``{window: (rows, slots, ring)}``, each ``[k]`` int64 on the device:
            query row ``rows[i]`` of the step (token-major, as the model lays them out)
            goes to ring slot ``slots[i]`` at index ``ring[i]``.
    """

    per_window: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class _Pool:
    """The rings of every tracked sequence with one window length:
    ``[capacity, num_layers, window, num_qo_heads, head_dim]``, the model's dtype, on
    its device; a free list of slots."""

    def __init__(self, window: int, shape: tuple[int, int, int], dtype: torch.dtype,
                 device: torch.device) -> None:  # fmt: skip
        self.window, self.shape, self.dtype, self.device = window, shape, dtype, device
        layers, heads, dim = shape
        self.rings = torch.zeros(0, layers, window, heads, dim, dtype=dtype, device=device)
        self.free: list[int] = []

    def take(self) -> int:
        if not self.free:  # grow by doubling: rings move only when the pool grows
            old = self.rings.shape[0]
            more = self.rings.new_zeros(max(old, 1), *self.rings.shape[1:])
            self.rings = torch.cat([self.rings, more])
            self.free = list(range(self.rings.shape[0] - 1, old - 1, -1))
        return self.free.pop()


class QueryWindows:
    """Rings of recent rotated queries for the sequences whose press reads them.

    Args:
        num_layers, num_qo_heads, head_dim: of the model.
        dtype, device: of the model's queries.
    """

    def __init__(self, num_layers: int, num_qo_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
        self._shape = (num_layers, num_qo_heads, head_dim)
        self._dtype, self._device = dtype, device
        self._pools: dict[int, _Pool] = {}
        self._where: dict[int, tuple[int, int]] = {}  # sequence -> (window, slot)

    def track(self, seq_id: int, window: int) -> None:
        """Keep the newest ``window`` (>= 1) queries of a new sequence from now on."""
        pool = self._pools.get(window)
        if pool is None:
            pool = self._pools[window] = _Pool(window, self._shape, self._dtype, self._device)
        self._where[seq_id] = (window, pool.take())

    def forget(self, seq_id: int) -> None:
        """Stop tracking a sequence (a no-op for one never tracked)."""
        where = self._where.pop(seq_id, None)
        if where is not None:
            self._pools[where[0]].free.append(where[1])

    def step_rows(self, seq_ids: list[int], starts: np.ndarray, lens: np.ndarray) -> WindowRows:
        """Where a step's queries go.

        Args:
            seq_ids: the step's sequences, in batch order.
            starts: each one's logical length before the step, ``[batch]`` int64 (host).
            lens: its new tokens in the step, ``[batch]`` int64 (host).
        """
        first_row = np.cumsum(lens) - lens
        groups: dict[int, list[int]] = {}
        for b, seq_id in enumerate(seq_ids):
            where = self._where.get(seq_id)
            if where is not None:
                groups.setdefault(where[0], []).append(b)
        per_window = {}
        for window, batch_rows in groups.items():
            b = np.asarray(batch_rows)
            kept = np.minimum(lens[b], window)  # only the newest `window` can matter
            skip = lens[b] - kept
            rows = concat_ranges(first_row[b] + skip, kept)
            ring = concat_ranges(starts[b] + skip, kept) % window
            slots = np.repeat([self._where[seq_ids[i]][1] for i in batch_rows], kept)
            tensors = (torch.from_numpy(a.astype(np.int64)) for a in (rows, slots, ring))
            per_window[window] = tuple(t.to(self._device, non_blocking=True) for t in tensors)
        return WindowRows(per_window)  # type: ignore[arg-type]

    def record(self, rows: WindowRows, layer: int, q: torch.Tensor) -> None:
        """Copy one layer's step queries ``q`` (``[nnz, num_qo_heads, head_dim]``) into
        the rings: one indexed copy per window length."""
        for window, (src, slots, ring) in rows.per_window.items():
            rings = self._pools[window].rings
            rings[slots, layer, ring] = q.index_select(0, src).to(rings.dtype)

    def record_layers(self, rows: WindowRows, queries: torch.Tensor) -> None:
        """Copy every layer's step queries at once, ``queries`` ``[num_layers, rows,
        num_qo_heads, head_dim]`` (rows beyond the step's are ignored): one indexed
        copy per window length."""
        for window, (src, slots, ring) in rows.per_window.items():
            rings = self._pools[window].rings
            rings[slots, :, ring] = queries.index_select(1, src).transpose(0, 1).to(rings.dtype)

    def read(self, seq_id: int, layer: int, seq_len: int) -> Optional[torch.Tensor]:
        """The queries of positions ``max(0, seq_len - window) .. seq_len - 1``, oldest
        first, ``[min(window, seq_len), num_qo_heads, head_dim]``; None if untracked."""
        where = self._where.get(seq_id)
        if where is None:
            return None
        window, slot = where
        start = max(0, seq_len - window)
        index = torch.arange(start, seq_len, device=self._device) % window
        return self._pools[window].rings[slot, layer].index_select(0, index)
