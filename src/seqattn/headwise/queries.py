"""Read-only queries of a :class:`HeadwiseKVCache`: lengths, positions, contents, memory.

None of them changes the cache. Ids of the page table: the row (page list) of KV head
``h`` of sequence ``s`` in layer ``l`` is ``HeadIDGenerator(num_layers * num_kv_heads)``'s
head id ``l * num_kv_heads + h`` of ``s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from .._checks import checked_index, id_list
from ..descriptor import CacheDescriptor
from ..head_ids import HeadIDGenerator
from ..page_table import pages_for
from ..storage import PagedKVCacheManager
from .builder import StepBuilder
from .checks import checked_lens, pages_to_append
from .positions import HeadPositions


class HeadwiseQueries:
    """Lookups and memory accounting, mixed into :class:`HeadwiseKVCache`.

    See :class:`HeadwiseKVCache` for an example.
    """

    num_layers: int
    num_kv_heads: int
    page_size: int
    head_dim: int
    device: torch.device
    storage: PagedKVCacheManager
    descriptor: CacheDescriptor
    positions: HeadPositions
    kv_pages: torch.Tensor
    _row_ids: HeadIDGenerator
    _builder: StepBuilder
    _all_layers: tuple[int, ...]

    # ---------------------------------------------------------------- sequences
    @property
    def seq_ids(self) -> list[int]:
        """Live sequence ids, oldest first."""
        return self.positions.seq_ids

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self.positions

    def __len__(self) -> int:
        return len(self.positions.seq_ids)

    def seq_len(self, seq_id: int, layer: Optional[int] = None) -> int:
        """The sequence's logical length: tokens appended to ``layer``, kept or not.

        Default: the largest over layers (mid-step, the layers already appended to).
        """
        lengths = self.positions.lengths(self.positions.slot(seq_id))
        if layer is None:
            return int(lengths.max())
        return int(lengths[self.checked_layer(layer)])

    # -------------------------------------------------------------------- heads
    def head_lens(self, layer: int, seq_id: int) -> np.ndarray:
        """Tokens each KV head of the sequence holds in ``layer``, ``[num_kv_heads]`` int64."""
        return self.descriptor.seq_lens(self.head_row_ids(layer, seq_id)).astype(np.int64)

    def head_positions(self, layer: int, seq_id: int, head: int) -> np.ndarray:
        """True positions of the tokens one head holds, increasing, ``[held]`` int64."""
        self.checked_layer(layer)
        self.checked_head(head)
        return self.positions.positions(layer, self.positions.slot(seq_id), head)

    def read_head(self, layer: int, seq_id: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the tokens one head holds, each ``[held, head_dim]``, storage dtype,
        on the cache's device (a copy; float8 values as stored, i.e. divided by no scale)."""
        pages = torch.as_tensor(self.head_page_ids(layer, seq_id, head), device=self.device)
        held = self.descriptor.seq_len(self.head_row_ids(layer, seq_id)[head])
        kv = self.kv_pages[pages.long()].transpose(0, 1).reshape(2, -1, self.head_dim)[:, :held]
        return kv[0].clone(), kv[1].clone()

    def head_page_ids(self, layer: int, seq_id: int, head: int) -> np.ndarray:
        """The pages one head's tokens lie in, in token order, ``[pages]`` int32."""
        self.checked_layer(layer)
        self.checked_head(head)
        pages = self.descriptor.page_indices(self.head_row_ids(layer, seq_id)[head])
        return np.asarray(pages, dtype=np.int32)

    def head_row_ids(self, layer: int, seq_id: int) -> list[int]:
        """Page-table ids of one live sequence's KV heads in ``layer``, in head order."""
        self.checked_layer(layer)
        self.positions.slot(seq_id)  # live, or UnknownSequenceError
        first = self._row_ids.get_head_id(seq_id, layer * self.num_kv_heads)
        return list(range(first, first + self.num_kv_heads))

    def checked_layer(self, layer: object) -> int:
        """``layer`` as an int in ``[0, num_layers)`` (ArgumentTypeError for a bool, float
        or str; IndexOutOfRangeError outside the range)."""
        return checked_index(layer, "layer", self.num_layers)

    def checked_head(self, head: object) -> int:
        """``head`` as an int in ``[0, num_kv_heads)`` (errors as :meth:`checked_layer`)."""
        return checked_index(head, "head", self.num_kv_heads)

    # ------------------------------------------------------------------- memory
    @property
    def page_bytes(self) -> int:
        """Bytes of one page: K and V of ``page_size`` tokens of one head."""
        return 2 * self.page_size * self.head_dim * self.storage.kv_data.element_size()

    @property
    def available_pages_count(self) -> int:
        """Free pages in the shared pool."""
        return self.storage.available_pages_count

    def pages_needed(self, seq_ids: Sequence[int], lens: Sequence[int]) -> int:
        """Free pages that appending ``lens[b]`` tokens to sequence ``seq_ids[b]`` in every
        layer and KV head would take (what :meth:`begin_step` allocates): a scheduler
        asks before a step so that it admits only what fits.

        Args:
            seq_ids: live sequences, each once, ``[batch]`` integers.
            lens: new tokens per sequence, ``[batch]`` integers >= 0.

        Raises:
            UnknownSequenceError, DuplicateSequenceError: an id not live, or twice.
            InvalidLengthError: a length < 0, or not one per sequence.
        """
        ids = id_list(seq_ids)
        self.positions.slots(ids)  # live, each once
        counts = checked_lens(lens, len(ids))
        rows = self._builder.fresh_row_ids(self._all_layers, ids)
        return pages_to_append(self._builder, rows, counts, self.num_layers)

    def head_pages(self, layer: int, seq_id: int) -> np.ndarray:
        """Pages each KV head of the sequence holds in ``layer``, ``[num_kv_heads]`` int64."""
        return pages_for(self.head_lens(layer, seq_id), self.page_size)

    def pages_held(self) -> np.ndarray:
        """Pages held by each layer and KV head over all live sequences,
        ``[num_layers, num_kv_heads]`` int64."""
        lens = self.descriptor.seq_lens(self._all_row_ids(self.seq_ids)).astype(np.int64)
        pages = pages_for(lens, self.page_size)
        return pages.reshape(-1, self.num_layers, self.num_kv_heads).sum(axis=0)

    def memory_bytes(self) -> int:
        """Bytes of the pages the live sequences hold."""
        return int(self.pages_held().sum()) * self.page_bytes

    def full_cache_bytes(self) -> int:
        """Bytes a full paged cache (every token of every head kept, same page size)
        would hold for the live sequences at their logical lengths."""
        lengths = self.positions.all_lengths()  # [live sequences, num_layers]
        pages = int(pages_for(lengths, self.page_size).sum())
        return pages * self.num_kv_heads * self.page_bytes

    def bytes_saved(self) -> int:
        """:meth:`full_cache_bytes` minus :meth:`memory_bytes`."""
        return self.full_cache_bytes() - self.memory_bytes()

    # ---------------------------------------------------------------- integrity
    def check_integrity(self) -> None:
        """Raise AssertionError unless pool, page tables and positions are consistent.

        Checks the pool and the page table; that the heads' pages are distinct and are
        all the pool holds; that each head holds ``ceil(held / page_size)`` pages; and
        that each head's positions are increasing, as many as the tokens it holds, and
        below the sequence's logical length.
        """
        self.storage.check_integrity()
        self.descriptor.check_integrity()
        assert sorted(self.descriptor.seq_ids) == sorted(self._all_row_ids(self.seq_ids)), (
            "page-table ids differ from the live sequences' heads"
        )
        listed: list[int] = []
        for layer in range(self.num_layers):
            for seq_id in self.seq_ids:
                listed += self._check_heads(layer, seq_id)
        assert len(set(listed)) == len(listed), "a page is held twice"
        held = self.storage.num_pages - self.available_pages_count
        assert len(listed) == held, f"{len(listed)} pages listed but {held} held in the pool"

    def _check_heads(self, layer: int, seq_id: int) -> list[int]:
        """Check one sequence's heads in one layer; return the pages they hold."""
        slot = self.positions.slot(seq_id)
        self.positions.check(layer, slot)
        row_ids = self.head_row_ids(layer, seq_id)
        lens = self.descriptor.seq_lens(row_ids)
        assert (lens == self.positions.held(layer, slot)).all(), "head length != positions held"
        pages = []
        for row_id, n in zip(row_ids, lens.tolist(), strict=True):
            own = self.descriptor.page_indices(row_id)
            assert len(own) == pages_for(n, self.page_size), "pages != ceil(held / page_size)"
            pages += own
        return pages

    def _all_row_ids(self, ids: list[int]) -> list[int]:
        """Page-table ids of every layer and KV head of the sequences."""
        return [r for s in ids for r in self._row_ids.get_head_ids(s)]
