"""Head-wise paged KV caches: each (layer, sequence, KV head) keeps its own page list.

Per-head KV compression (SnapKV, PyramidKV, AdaKV, HeadKV) keeps a different number of
tokens for each KV head and layer. Here every page holds the tokens of one KV head, all
layers draw pages from one pool, and one :class:`CacheDescriptor` holds a page list per
(sequence, layer, KV head), named by :class:`HeadIDGenerator` as if each sequence had
``num_layers * num_kv_heads`` heads. A head that drops tokens gives its pages back to
the pool, so memory follows the budgets; a model step (the same new tokens in every
layer) allocates and packs all layers in one call each.

Why one single-layer storage rather than ``num_layers=L``: a page id of a multi-layer
``PagedKVCacheManager`` names a page in *every* layer, so layers with different page
tables drawing from its one pool would leave L - 1 copies of each page unused. A
single-layer storage whose pool all layers share holds exactly the pages in use, and
lets budgets move between layers (PyramidKV).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

import numpy as np
import torch

from .._checks import checked_index, exact_bool, exact_int, id_list, int_array, shown
from ..descriptor import CacheDescriptor
from ..errors import (
    ArgumentTypeError,
    InvalidLengthError,
    NoPageError,
    SeqAttnError,
    TensorSpecError,
)
from ..head_ids import HeadIDGenerator
from ..packed_data import Device
from ..page_table import MAX_LENGTH
from ..storage import PagedKVCacheManager
from .batch import HeadwiseBatch, HeadwiseStep
from .builder import StepBuilder
from .compaction import checked_keep, compaction_moves
from .positions import HeadPositions

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
QUANTIZABLE = (torch.float16, torch.bfloat16, torch.float32)


class HeadwiseKVCache:
    """Paged K/V where each (layer, sequence, KV head) holds its own set of tokens.

    A sequence's *logical length* counts every token appended to it; each head holds a
    subset of those positions (all of them until it is compressed). Tokens keep their
    original positions (keys are stored already rotated) and new tokens always take the
    sequence's next position. Every mutating call is all or nothing.

    A model step appends the same tokens to every layer: :meth:`begin_step` does the
    page bookkeeping of all layers at once, then the forward pass calls :meth:`write`
    (the append kernel alone) and ``HeadwiseAttention.run`` per layer. :meth:`append`
    does one layer at a time.

    Args:
        num_pages: pages in the pool shared by all layers and heads; a page holds
            ``page_size`` tokens of one KV head (``2 * page_size * head_dim`` values).
        page_size: tokens per page.
        num_layers: layers of the model.
        num_kv_heads: KV heads per layer.
        head_dim: size of each head.
        dtype: storage dtype.
        device: a ``torch.device``, a string, or a CUDA ordinal.
        kv_layout: ``"NHD"`` or ``"HND"`` (identical in memory for one head per page).
        check_invariants: run :meth:`check_integrity` after every mutating call (slow).

    Example:
        >>> import torch
        >>> from seqattn.headwise import HeadwiseAttention, HeadwiseKVCache
        >>> cache = HeadwiseKVCache(64, page_size=4, num_layers=2, num_kv_heads=2,
        ...                         head_dim=8, dtype=torch.float32, device="cpu")
        >>> attn = HeadwiseAttention(cache, num_qo_heads=4)  # GQA, 2 query heads per KV head
        >>> cache.add_sequences([7])
        >>> k = v = torch.randn(10, 2, 8)                    # a 10-token prompt
        >>> batch = cache.append(0, [7], k, v, append_lens=[10])
        >>> attn.plan(batch)
        >>> attn.run(torch.randn(10, 4, 8), layer=0).shape
        torch.Size([10, 4, 8])
        >>> cache.compress(0, 7, keep=[[0, 1, 9], [2, 3, 4, 5, 6, 7, 8, 9]])
        >>> cache.head_lens(0, 7).tolist(), cache.head_pages(0, 7).tolist()
        ([3, 8], [1, 2])
        >>> batch = cache.append(0, [7], k[:1], v[:1])       # decode: one token, position 10
        >>> cache.head_positions(0, 7, head=0).tolist(), cache.seq_len(7)
        ([0, 1, 9, 10], 11)
        >>> cache.add_sequences([8])                          # a whole step, both layers:
        >>> step = cache.begin_step([8], append_lens=[5])     # bookkeeping of every layer
        >>> attn.plan_step(step)
        >>> for layer in range(2):                            # the model's forward pass
        ...     cache.write(step, layer, k[:5], v[:5])
        ...     out = attn.run(torch.randn(5, 4, 8), layer)
        >>> cache.seq_len(8, layer=1), out.shape
        (5, torch.Size([5, 4, 8]))
        >>> cache.release([7, 8]); cache.available_pages_count
        64
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: Device,
        *,
        kv_layout: str = "NHD",
        check_invariants: bool = False,
    ) -> None:
        self.num_layers = exact_int(num_layers, "num_layers", low=1, high=2**16)
        self.num_kv_heads = exact_int(num_kv_heads, "num_kv_heads", low=1, high=2**16)
        exact_bool(check_invariants, "check_invariants")
        self.storage = PagedKVCacheManager(
            num_pages, page_size, 1, head_dim, dtype, device, kv_layout, num_layers=1
        )
        self.page_size = self.storage.page_size
        self.head_dim = self.storage.head_dim
        self.dtype = dtype
        self.device = self.storage.device
        self.check_invariants = check_invariants
        # one page list per (sequence, layer, KV head), over the storage's one pool
        self._row_ids = HeadIDGenerator(self.num_layers * self.num_kv_heads)
        self.descriptor = CacheDescriptor(self.storage)
        self.positions = HeadPositions(self.num_layers, self.num_kv_heads)
        self._builder = StepBuilder(
            self.descriptor, self.num_layers, self.num_kv_heads, self.device
        )
        # on device: every page as [num_pages, 2 (K, V), page_size, head_dim]; with one
        # head per page the NHD and HND layouts are the same memory
        self._tokens = self.storage.get_kv_cache(0).view(num_pages, 2, page_size, head_dim)
        self._accepted = (dtype, *QUANTIZABLE) if dtype in FP8_DTYPES else (dtype,)
        self._all_layers = tuple(range(self.num_layers))
        # per layer, the version its batches were packed at; a change to the layer's
        # pages (append, compress, release) moves it on, which makes them stale
        self._versions = [0] * self.num_layers
        self._clock = 0
        # the open step: its sequences with new tokens, and the layers whose tokens are
        # allocated but not yet written (their pages hold stale data until then)
        self._step_ids: frozenset[int] = frozenset()
        self._unwritten: set[int] = set()

    # ------------------------------------------------------------------ sequences
    def add_sequences(self, seq_ids: Iterable[int]) -> None:
        """Start new, empty sequences in every layer.

        Raises:
            SequenceExistsError: an id is already live. DuplicateSequenceError: an id twice.
        """
        ids = id_list(seq_ids)
        for seq_id in ids:  # its rows (one per layer and head) have int64 page-table ids
            self._row_ids.first_id(seq_id)
        self.positions.add(ids)  # checks every id before adding any
        rows = self._all_rows(ids)
        self.descriptor.allocate(rows, [0] * len(rows))  # pages come with tokens
        self._after_change()

    def release(self, seq_ids: Iterable[int]) -> None:
        """End sequences and return all their pages, in every layer, to the pool.

        Raises:
            UnknownSequenceError: an id is not live (e.g. released twice); nothing changed.
        """
        ids = id_list(seq_ids)
        self.positions.slots(ids)  # checks every id before releasing any
        if self._unwritten and not self._step_ids <= set(ids):
            raise SeqAttnError(
                f"layers {sorted(self._unwritten)} of the open step are not written: "
                f"write them, or release all of that step's sequences "
                f"{sorted(self._step_ids)[:8]} together"
            )
        self.descriptor.release(self._all_rows(ids))
        self.positions.remove(ids)
        self._unwritten.clear()
        self._changed(self._all_layers)

    # ---------------------------------------------------------------------- steps
    def begin_step(
        self, seq_ids: Sequence[int], append_lens: Optional[Sequence[int]] = None
    ) -> HeadwiseStep:
        """Take the pages of one model step's new tokens in every layer, and pack them.

        Allocates ``append_lens[b]`` tokens in every KV head of every layer for each
        sequence, at the sequence's next positions, and packs each layer's batch (on a
        GPU, all layers' index arrays go up in one copy). The forward pass then calls
        :meth:`write` per layer with that layer's K/V, and ``HeadwiseAttention.plan_step``
        / ``run`` attend. The step stays valid for a layer until the layer changes
        again (an append, a compression or a release).

        Until a layer is written, its new tokens hold no K/V: calls that would change
        or read that layer (``append``, ``compress``, ``truncate_head``, ``pack``,
        ``run``, another ``begin_step``) are refused, and so is ``release`` unless it
        ends every sequence of the step.

        Args:
            seq_ids: live sequences, in batch order.
            append_lens: new tokens per sequence, ``[batch_size]`` ints >= 0; default one
                each (a decode step).

        Returns:
            the :class:`HeadwiseStep`, whose ``batches[layer]`` is the layer's batch.

        Raises:
            NoPageError: the pool lacks pages for all layers (every layer unchanged).
            UnknownSequenceError, DuplicateSequenceError, InvalidLengthError: bad ids or
            lengths. SeqAttnError: the last step has layers not written yet. Nothing
            changed.
        """
        ids = id_list(seq_ids)
        slots = self.positions.slots(ids)
        lens = None if append_lens is None else self._append_lens(append_lens, len(ids), None)
        if lens is not None:
            self._check_lengths(self._all_layers, ids, slots, lens)
        if self._unwritten:
            raise SeqAttnError(
                f"layers {sorted(self._unwritten)} of the last step are not written yet: "
                "write them before beginning another step"
            )
        version = self._clock + 1
        builder = self._builder
        row_ids = builder.row_ids(self._all_layers, ids)
        rows, batches = builder.open(self._all_layers, tuple(ids), row_ids, lens, version, self)
        new = batches[0].append_lens
        self.positions.advance(self._all_layers, slots, new)
        self._changed(self._all_layers, version)
        self._step_ids = frozenset(s for s, n in zip(ids, new.tolist(), strict=True) if n)
        self._unwritten = set(self._all_layers) if self._step_ids else set()
        return HeadwiseStep(batches[0].seq_ids, batches[0].append_lens, rows, tuple(batches))

    def write(self, step: HeadwiseStep, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one layer's K/V of the step's new tokens into the pages taken for them.

        Only the append kernel runs (the bookkeeping was :meth:`begin_step`'s). Token
        ``j`` of sequence ``b`` lands at its position in every KV head of the layer.

        Args:
            step: from :meth:`begin_step` of this cache, not stale for ``layer``.
            layer: the layer.
            k: ``shape: [nnz, num_kv_heads, head_dim]``, the cache's dtype (or, for a
                float8 cache, float16/bfloat16/float32 to quantize) and device; rows
                grouped by sequence in batch order (the model's layout).
            v: same shape, dtype and device as ``k``.

        Raises:
            TensorSpecError: a bad layer or tensor. SeqAttnError: a stale step or one
            of another cache. Nothing written.
        """
        batch = self._step_batch(step, layer)
        nnz = batch.rows.num_tokens
        try:  # the common case in a few attribute reads: this runs per layer per step
            fits = (
                k.shape == v.shape == (nnz, self.num_kv_heads, self.head_dim)
                and k.dtype == v.dtype
                and k.dtype in self._accepted
                and k.device == v.device == self.device
            )
        except AttributeError:
            fits = False
        if not fits:
            self._check_kv(k, v, nnz)  # raises, saying what was expected
        self._write(batch, k, v)
        self._unwritten.discard(layer)

    def append(
        self,
        layer: int,
        seq_ids: Sequence[int],
        k: torch.Tensor,
        v: torch.Tensor,
        append_lens: Optional[Sequence[int]] = None,
    ) -> HeadwiseBatch:
        """Append one model step's new K/V of one layer to every head of each sequence.

        Token ``j`` of sequence ``b`` takes position ``seq_len(b, layer) + j`` and lands
        right after the tokens each head still holds (whatever their number), in one
        scatter for all heads; nothing already cached is copied. (For every layer of a
        step, :meth:`begin_step` + :meth:`write` do the bookkeeping once.)

        Args:
            layer: the layer whose caches receive the tokens.
            seq_ids: live sequences, in batch order.
            k: ``shape: [nnz, num_kv_heads, head_dim]``, the cache's dtype (or, for a
                float8 cache, float16/bfloat16/float32 to quantize) and device; rows
                grouped by sequence in batch order.
            v: same shape, dtype and device as ``k``.
            append_lens: new tokens per sequence, ``[batch_size]`` ints summing to ``nnz``;
                default one each (a decode step).

        Returns:
            the layer's :class:`HeadwiseBatch`, to plan attention with (the queries are
            the appended tokens).

        Raises:
            NoPageError: the pool lacks pages. UnknownSequenceError, DuplicateSequenceError,
            InvalidLengthError, TensorSpecError: bad ids, lengths or tensors. Nothing changed.
        """
        layer = self.checked_layer(layer)
        ids = id_list(seq_ids)
        slots = self.positions.slots(ids)
        lens = self._append_lens(append_lens, len(ids), k)
        self._check_kv(k, v, int(lens.sum()))
        self.check_written(layer)
        self._check_lengths((layer,), ids, slots, lens)  # arguments first, then the pool
        row_ids = self._builder.row_ids((layer,), ids)
        version = self._clock + 1
        _, (batch,) = self._builder.open((layer,), tuple(ids), row_ids, lens, version, self)
        try:
            self._write(batch, k, v)
        except BaseException:
            self._builder.undo(row_ids, np.repeat(lens, self.num_kv_heads))
            raise
        self.positions.advance((layer,), slots, lens)
        self._changed((layer,), version)
        return batch

    def pack(
        self, layer: int, seq_ids: Sequence[int], query_lens: Optional[Sequence[int]] = None
    ) -> HeadwiseBatch:
        """The layer's head-wise batch without appending (to attend again with the newest
        ``query_lens`` tokens of each sequence as queries; default one each).

        Raises:
            InvalidLengthError: a head no longer holds all of its sequence's query
                positions (the newest ``query_lens[b]``), so the causal mask, which
                counts tokens, would be wrong. UnknownSequenceError,
                DuplicateSequenceError. SeqAttnError: the layer is not written yet.
        """
        layer = self.checked_layer(layer)
        ids = id_list(seq_ids)
        slots = self.positions.slots(ids)
        lens = None if query_lens is None else self._append_lens(query_lens, len(ids), None)
        self.check_written(layer)
        counts = np.ones(len(ids), dtype=np.int64) if lens is None else lens
        held = self.positions.hold_newest(layer, slots, counts)
        if not held.all():
            b, h = (int(i) for i in np.argwhere(~held)[0])
            raise InvalidLengthError(
                f"head {h} of sequence {ids[b]} in layer {layer} does not hold all of the "
                f"newest {counts[b]} positions, the queries' own (see head_positions): "
                "attend with fewer query tokens"
            )
        row_ids = self._builder.row_ids((layer,), ids)
        version = self._versions[layer]
        _, (batch,) = self._builder.pack((layer,), tuple(ids), row_ids, lens, version, self)
        return batch

    # ---------------------------------------------------------------- compression
    def compress(
        self, layer: int, seq_id: int, keep: Sequence[object], *, by_position: bool = False
    ) -> None:
        """Keep, in each KV head of one sequence in one layer, only the chosen tokens.

        Survivors keep their positions and order and are compacted into the fewest pages
        of their head with one device gather/scatter for all heads; freed pages return
        to the pool. The sequence's logical length does not change.

        Args:
            layer: the layer.
            seq_id: a live sequence.
            keep: one entry per KV head: the indices, strictly increasing, of the tokens
                to keep among those the head holds now (``0 .. head_lens[h] - 1``; see
                :meth:`head_positions` for their positions), as a list, numpy array or
                1-D integer tensor; None keeps the head as it is.
            by_position: ``keep`` lists true token positions (each held by its head)
                instead of indices.

        Raises:
            InvalidLengthError: not one entry per head, or indices out of range, unsorted
                or repeated (or positions not held). UnknownSequenceError.
            SeqAttnError: the layer's step tokens are not written yet. Nothing changed.
        """
        layer = self.checked_layer(layer)
        slot = self.positions.slot(seq_id)
        exact_bool(by_position, "by_position")
        row_ids = self._head_rows(layer, seq_id)
        held = self.descriptor.seq_lens(row_ids)
        self._check_keep_count(keep)
        if by_position:
            keeps = self._indices_of_positions(layer, slot, keep)
        else:
            keeps = [checked_keep(keep[h], int(held[h]), h) for h in range(self.num_kv_heads)]
        self.check_written(layer)
        self._compact(row_ids, held, keeps)
        positions = self.positions
        kept = [positions.positions(layer, slot, h)[kh] for h, kh in enumerate(keeps)]
        positions.replace(layer, slot, kept)
        self._changed((layer,))

    def truncate_head(self, layer: int, seq_id: int, head: int, new_len: int) -> None:
        """Keep only the first ``new_len`` tokens one head holds (its oldest ones).

        Raises:
            InvalidLengthError: ``head`` or ``new_len`` out of range; nothing changed.
        """
        held = self.head_lens(layer, seq_id)
        head = self._check_head(head)
        what = f"new_len of head {head} (at most the {held[head]} tokens it holds)"
        new_len = exact_int(new_len, what, low=0, high=int(held[head]), error=InvalidLengthError)
        keep: list[object] = [None] * self.num_kv_heads
        keep[head] = np.arange(new_len)
        self.compress(layer, seq_id, keep)

    # -------------------------------------------------------------------- lookups
    def check_written(self, layer: int) -> None:
        """Raise SeqAttnError if ``layer`` holds tokens of a step not written yet."""
        if layer in self._unwritten:
            raise SeqAttnError(
                f"layer {layer} holds the open step's tokens, whose K/V are not written "
                f"yet: call write(step, {layer}, k, v) first"
            )

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
        self.checked_layer(layer)
        return int(lengths[layer])

    def head_lens(self, layer: int, seq_id: int) -> np.ndarray:
        """Tokens each KV head of the sequence holds in ``layer``, ``[num_kv_heads]`` int64."""
        self.checked_layer(layer)
        self.positions.slot(seq_id)
        return self.descriptor.seq_lens(self._head_rows(layer, seq_id)).astype(np.int64)

    def head_positions(self, layer: int, seq_id: int, head: int) -> np.ndarray:
        """True positions of the tokens one head holds, increasing, ``[held]`` int64."""
        self.checked_layer(layer)
        self._check_head(head)
        return self.positions.positions(layer, self.positions.slot(seq_id), head)

    def read_head(self, layer: int, seq_id: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the tokens one head holds, each ``[held, head_dim]``, storage dtype,
        on the cache's device (a copy; float8 values as stored, i.e. divided by no scale)."""
        pages = torch.as_tensor(self.head_page_ids(layer, seq_id, head), device=self.device)
        held = self.descriptor.seq_len(self._head_rows(layer, seq_id)[head])
        kv = self._tokens[pages.long()].transpose(0, 1).reshape(2, -1, self.head_dim)[:, :held]
        return kv[0].clone(), kv[1].clone()

    def head_page_ids(self, layer: int, seq_id: int, head: int) -> np.ndarray:
        """The pages one head's tokens lie in, in token order, ``[pages]`` int32."""
        self.checked_layer(layer)
        self._check_head(head)
        self.positions.slot(seq_id)
        pages = self.descriptor.page_indices(self._head_rows(layer, seq_id)[head])
        return np.asarray(pages, dtype=np.int32)

    # --------------------------------------------------------------------- memory
    @property
    def page_bytes(self) -> int:
        """Bytes of one page: K and V of ``page_size`` tokens of one head."""
        return 2 * self.page_size * self.head_dim * self.storage.kv_data.element_size()

    @property
    def available_pages_count(self) -> int:
        """Free pages in the shared pool."""
        return self.storage.available_pages_count

    def head_pages(self, layer: int, seq_id: int) -> np.ndarray:
        """Pages each KV head of the sequence holds in ``layer``, ``[num_kv_heads]`` int64."""
        return -(-self.head_lens(layer, seq_id) // self.page_size)

    def pages_held(self) -> np.ndarray:
        """Pages held by each layer and KV head over all live sequences,
        ``[num_layers, num_kv_heads]`` int64."""
        lens = self.descriptor.seq_lens(self._all_rows(self.positions.seq_ids)).astype(np.int64)
        pages = -(-lens // self.page_size)
        return pages.reshape(-1, self.num_layers, self.num_kv_heads).sum(axis=0)

    def memory_bytes(self) -> int:
        """Bytes of the pages the live sequences hold."""
        return int(self.pages_held().sum()) * self.page_bytes

    def full_cache_bytes(self) -> int:
        """Bytes a full paged cache (every token of every head kept, same page size)
        would hold for the live sequences at their logical lengths."""
        lengths = self.positions.all_lengths()  # [live sequences, num_layers]
        pages = int((-(-lengths // self.page_size)).sum())
        return pages * self.num_kv_heads * self.page_bytes

    def bytes_saved(self) -> int:
        """:meth:`full_cache_bytes` minus :meth:`memory_bytes`."""
        return self.full_cache_bytes() - self.memory_bytes()

    def check_integrity(self) -> None:
        """Raise AssertionError unless pool, page tables and positions are consistent.

        Checks the pool and the page table; that the heads' pages are distinct and are
        all the pool holds; that each head holds
        ``ceil(held / page_size)`` pages; and that each head's positions are increasing,
        as many as the tokens it holds, and below the sequence's logical length.
        """
        self.storage.check_integrity()
        self.descriptor.check_integrity()
        assert sorted(self.descriptor.seq_ids) == sorted(self._all_rows(self.seq_ids)), (
            "page-table ids differ from the live sequences' heads"
        )
        listed = []
        for layer in range(self.num_layers):
            for seq_id in self.seq_ids:
                listed += self._check_sequence(layer, seq_id)
        assert len(set(listed)) == len(listed), "a page is held twice"
        held = self.storage.num_pages - self.available_pages_count
        assert len(listed) == held, f"{len(listed)} pages listed but {held} held in the pool"

    # ------------------------------------------------------------------ internals
    def _check_sequence(self, layer: int, seq_id: int) -> list[int]:
        slot = self.positions.slot(seq_id)
        self.positions.check(layer, slot)
        row_ids = self._head_rows(layer, seq_id)
        lens = self.descriptor.seq_lens(row_ids)
        assert (lens == self.positions.held(layer, slot)).all(), "head length != positions held"
        pages = []
        for row_id, n in zip(row_ids, lens.tolist(), strict=True):
            own = self.descriptor.page_indices(row_id)
            assert len(own) == -(-n // self.page_size), "pages != ceil(held / page_size)"
            pages += own
        return pages

    def checked_layer(self, layer: object) -> int:
        """``layer`` as an int in ``[0, num_layers)`` (ArgumentTypeError for a bool, float
        or str; IndexOutOfRangeError outside the range)."""
        return checked_index(layer, "layer", self.num_layers)

    def _check_head(self, head: object) -> int:
        return checked_index(head, "head", self.num_kv_heads)

    def _check_lengths(
        self, layers: Sequence[int], ids: list[int], slots: np.ndarray, lens: np.ndarray
    ) -> None:
        """Refuse a step whose tokens overflow a length or the pool, before any array of
        its size is made (InvalidLengthError, NoPageError)."""
        longest = self.positions.longest(slots) + lens
        if longest.size and longest.max() > MAX_LENGTH:
            raise InvalidLengthError(
                f"append_lens {lens.tolist()[:8]} would take a sequence past {MAX_LENGTH} tokens"
            )
        table = self.descriptor.table
        held = table.lengths(table.slots(self._builder.row_ids(layers, ids)))
        added = np.tile(np.repeat(lens, self.num_kv_heads), len(layers))
        need = table.pages_needed(held, held + added)
        if need > self.available_pages_count:
            raise NoPageError(
                f"append_lens {lens.tolist()[:8]} need {need} pages in {len(layers)} layers, "
                f"but {self.available_pages_count} are available"
            )

    def _head_rows(self, layer: int, seq_id: int) -> list[int]:
        """Page-table ids of one sequence's KV heads in one layer, in head order."""
        first = self._row_ids.get_head_id(seq_id, layer * self.num_kv_heads)
        return list(range(first, first + self.num_kv_heads))

    def _all_rows(self, ids: list[int]) -> list[int]:
        """Page-table ids of every layer and KV head of the sequences."""
        return [r for s in ids for r in self._row_ids.get_head_ids(s)]

    def _step_batch(self, step: HeadwiseStep, layer: int) -> HeadwiseBatch:
        """The step's batch of ``layer``, after checking that it is this cache's and current."""
        if not isinstance(step, HeadwiseStep):
            raise ArgumentTypeError(f"step must be a HeadwiseStep, got {shown(step)}")
        if step.batches[0].owner is not self:
            raise SeqAttnError("this step was begun on another HeadwiseKVCache")
        self.checked_layer(layer)
        batch = step.batches[layer]
        if batch.version != self._versions[layer]:
            raise SeqAttnError(
                f"the step is stale for layer {layer}: the layer changed after begin_step "
                "(append, compress, truncate_head or release); begin a new step"
            )
        return batch

    def _write(self, batch: HeadwiseBatch, k: torch.Tensor, v: torch.Tensor) -> None:
        rows = batch.rows
        if rows.num_tokens:
            self.storage.append_kv(rows.to_rows(k), rows.to_rows(v), batch.append_packed)

    def _append_lens(
        self, lens: Optional[Sequence[int]], batch_size: int, k: Optional[torch.Tensor]
    ) -> np.ndarray:
        if lens is None:
            out = np.ones(batch_size, dtype=np.int64)
        else:
            out = int_array(lens, "append_lens", low=0, high=MAX_LENGTH, error=InvalidLengthError)
        if out.size != batch_size:
            raise InvalidLengthError(
                f"expected {batch_size} append lengths >= 0 (one per sequence), "
                f"got {out.tolist()[:8]}"
            )
        if k is not None and isinstance(k, torch.Tensor) and k.dim() and k.shape[0] != out.sum():
            raise TensorSpecError(
                f"k holds {k.shape[0]} tokens but append_lens sum to {int(out.sum())}"
            )
        return out

    def _check_kv(self, k: torch.Tensor, v: torch.Tensor, nnz: int) -> None:
        expected = [nnz, self.num_kv_heads, self.head_dim]
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {shown(t)}")
            if list(t.shape) != expected:
                raise TensorSpecError(
                    f"{name} must have shape [nnz, num_kv_heads, head_dim] = {expected}, "
                    f"got {list(t.shape)}"
                )
            if t.dtype not in self._accepted:
                raise TensorSpecError(f"{name} must have dtype {self.dtype}, got {t.dtype}")
            if t.device != self.device:
                raise TensorSpecError(f"{name} must be on {self.device}, got {t.device}")
        if k.dtype != v.dtype:
            raise TensorSpecError(f"k and v differ in dtype: {k.dtype}, {v.dtype}")

    def _check_keep_count(self, keep: Sequence[object]) -> None:
        try:
            count = len(keep)
        except TypeError:
            count = -1
        if count != self.num_kv_heads:
            raise InvalidLengthError(
                f"keep must have one entry per KV head ({self.num_kv_heads}), got "
                f"{count if count >= 0 else type(keep).__name__}"
            )

    def _indices_of_positions(
        self, layer: int, slot: int, keep: Sequence[object]
    ) -> list[np.ndarray]:
        """Each head's kept positions as indices among the tokens it holds."""
        out = []
        for head, entry in enumerate(keep):
            held = self.positions.positions(layer, slot, head)
            if entry is None:
                out.append(np.arange(held.size))
                continue
            end = int(held[-1]) + 1 if held.size else 0
            wanted = checked_keep(entry, end, head, "token positions")
            index = np.searchsorted(held, wanted)
            if wanted.size and not np.array_equal(held[index], wanted):
                missing = wanted[held[index] != wanted][:8].tolist()
                raise InvalidLengthError(
                    f"keep[{head}]: head {head} does not hold positions {missing} "
                    f"(see head_positions)"
                )
            out.append(index)
        return out

    def _compact(self, row_ids: list[int], held: np.ndarray, keeps: list[np.ndarray]) -> None:
        """Move every head's survivors to the front of its page list, then free the rest."""
        desc = self.descriptor
        pages = [np.asarray(desc.page_indices(r), dtype=np.int64) for r in row_ids]
        moves = compaction_moves(pages, keeps, self.page_size)
        if moves[0].size:
            index = torch.from_numpy(np.stack(moves)).to(self.device)
            src_page, src_slot, dst_page, dst_slot = index.unbind(0)
            # the gather finishes before the scatter starts, and a survivor only moves
            # left within its head, so no source is overwritten before it is read
            self._tokens[dst_page, :, dst_slot] = self._tokens[src_page, :, src_slot]
        for row_id, kept, before in zip(row_ids, keeps, held.tolist(), strict=True):
            if kept.size < before:
                desc.truncate(row_id, kept.size)

    def _changed(self, layers: Sequence[int], version: Optional[int] = None) -> None:
        """Record that ``layers`` changed (at ``version``, that of batches packed for the
        change itself), which makes earlier batches of them stale."""
        self._clock = self._clock + 1 if version is None else version
        for layer in layers:
            self._versions[layer] = self._clock
        self._after_change()

    def _after_change(self) -> None:
        if self.check_invariants:
            self.check_integrity()
