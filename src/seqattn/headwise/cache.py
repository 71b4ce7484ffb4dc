"""Head-wise paged KV caches: each (layer, sequence, KV head) keeps its own page list.

Per-head KV compression (SnapKV, PyramidKV, AdaKV, HeadKV) keeps a different number of
tokens for each KV head and layer. Here every page holds the tokens of one KV head, all
layers draw pages from one pool, and one :class:`CacheDescriptor` holds a page list per
(sequence, layer, KV head), named by :class:`HeadIDGenerator` as if each sequence had
``num_layers * num_kv_heads`` heads. A head that drops tokens gives its pages back to
the pool, so memory follows the budgets.

Why one single-layer storage rather than ``num_layers=L``: a page id of a multi-layer
``PagedKVCacheManager`` names a page in *every* layer, so layers with different page
tables drawing from its one pool would leave L - 1 copies of each page unused. A
single-layer storage whose pool all layers share holds exactly the pages in use, and
lets budgets move between layers (PyramidKV).

One write path: a *step* takes the pages of the same new tokens in some layers (all of
them for :meth:`HeadwiseKVCache.begin_step`, one for :meth:`HeadwiseKVCache.append`)
and packs them; :meth:`HeadwiseKVCache.write` then writes one layer's K/V.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

import numpy as np
import torch

from .._checks import exact_bool, exact_int, id_list
from ..descriptor import CacheDescriptor
from ..head_ids import HeadIDGenerator
from ..packed_data import Device
from ..storage import PagedKVCacheManager
from . import compression
from .batch import HeadwiseBatch, HeadwiseStep
from .builder import StepBuilder
from .checks import KVSpec, check_queries_held, check_room, checked_lens, step_batch
from .positions import HeadPositions
from .queries import HeadwiseQueries
from .versions import LayerVersions


class HeadwiseKVCache(HeadwiseQueries):
    """Paged K/V where each (layer, sequence, KV head) holds its own set of tokens.

    A sequence's *logical length* counts every token appended to it; each head holds a
    subset of those positions (all of them until it is compressed). Tokens keep their
    original positions (keys are stored already rotated) and new tokens always take the
    sequence's next position. Every mutating call checks everything first and is all or
    nothing. Lookups and memory accounting: :class:`~seqattn.headwise.queries.HeadwiseQueries`.

    A model step appends the same tokens to every layer: :meth:`begin_step` does the
    page bookkeeping of all layers at once, then the forward pass calls :meth:`write`
    (the append kernel alone) and ``HeadwiseAttention.run`` per layer. :meth:`append`
    is a step of one layer, written at once.

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

    Attributes:
        kv_pages: every page, ``[num_pages, 2 (K, V), page_size, head_dim]``, storage
            dtype, on ``device`` (a view of ``storage``).

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
        self.page_size, self.head_dim = self.storage.page_size, self.storage.head_dim
        self.dtype, self.device = dtype, self.storage.device
        self.check_invariants = check_invariants
        # one page list per (sequence, layer, KV head), over the storage's one pool
        self._row_ids = HeadIDGenerator(self.num_layers * self.num_kv_heads)
        self.descriptor = CacheDescriptor(self.storage)
        self.positions = HeadPositions(self.num_layers, self.num_kv_heads)
        self._builder = StepBuilder(self.descriptor, self.num_layers, self.num_kv_heads)
        # with one head per page the NHD and HND layouts are the same memory
        self.kv_pages = self.storage.get_kv_cache(0).view(num_pages, 2, page_size, head_dim)
        self._kv = KVSpec(self.num_kv_heads, self.head_dim, dtype, self.device)
        self._all_layers = tuple(range(self.num_layers))
        self.versions = LayerVersions(self.num_layers)

    # ------------------------------------------------------------------ sequences
    def add_sequences(self, seq_ids: Iterable[int]) -> None:
        """Start new, empty sequences in every layer.

        Raises:
            SequenceExistsError: an id is already live. DuplicateSequenceError: an id
            twice. ValueError: an id whose rows' page-table ids overflow int64.
        """
        ids = id_list(seq_ids)
        for seq_id in ids:  # its rows (one per layer and head) have int64 page-table ids
            self._row_ids.first_id(seq_id)
        self.positions.add(ids)  # checks every id before adding any
        rows = self._all_row_ids(ids)
        self.descriptor.allocate(rows, [0] * len(rows))  # pages come with tokens
        self._after_change()

    def release(self, seq_ids: Iterable[int]) -> None:
        """End sequences and return all their pages, in every layer, to the pool.

        Raises:
            UnknownSequenceError: an id is not live (e.g. released twice). SeqAttnError:
            a step has unwritten layers and not all of its sequences are released.
        """
        ids = id_list(seq_ids)
        self.positions.slots(ids)  # checks every id before releasing any
        self.versions.check_release(ids)
        self.descriptor.release(self._all_row_ids(ids))
        self.positions.remove(ids)
        self.versions.released()
        self._after_change()

    # ---------------------------------------------------------------------- steps
    def begin_step(self, seq_ids: Sequence[int], append_lens: Optional[Sequence[int]] = None,
                   *, on_device: bool = True) -> HeadwiseStep:  # fmt: skip
        """Take the pages of one model step's new tokens in every layer, and pack them.

        Allocates ``append_lens[b]`` tokens (default one: a decode step) in every KV head
        of every layer for sequence ``seq_ids[b]`` and packs each layer's batch (on a GPU
        in one copy). Then per layer :meth:`write` its K/V, and ``HeadwiseAttention``
        attends. The step is valid for a layer until the layer changes again. Until a
        layer is written, calls that would change or read it (``append``, ``compress``,
        ``truncate_head``, ``pack``, ``run``, another ``begin_step``) are refused, and so
        is ``release`` unless it ends every sequence of the step.

        ``on_device=False`` leaves the batches on the host: for a CUDA-graph step,
        whose tables go up by :meth:`~seqattn.headwise.graph.HeadwiseGraphs.prepare`.

        Returns:
            the :class:`HeadwiseStep`, whose ``batches[layer]`` is the layer's batch.

        Raises:
            NoPageError: the pool lacks pages for all layers. UnknownSequenceError,
            DuplicateSequenceError, InvalidLengthError: bad ids or lengths. SeqAttnError:
            the last step has layers not written yet. Nothing changed.
        """
        upload = bool(exact_bool(on_device, "on_device"))
        ids = id_list(seq_ids)
        slots = self.positions.slots(ids)
        lens = None if append_lens is None else checked_lens(append_lens, len(ids))
        if lens is not None:  # a decode step's room is checked by the allocation itself
            check_room(self.positions, self._builder, self._all_layers, ids, slots, lens)
        self.versions.check_all_written()
        return self._open(self._all_layers, ids, slots, lens, upload)

    def write(self, step: HeadwiseStep, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one layer's K/V of the step's new tokens into the pages taken for them.

        Only the append kernel runs: token ``j`` of sequence ``b`` lands at its position.

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
        batch = step_batch(self, step, layer)
        self._kv.check(k, v, batch.rows.num_tokens)
        if batch.rows.num_tokens:
            rows = batch.rows
            self.storage.append_kv(rows.to_rows(k), rows.to_rows(v), batch.append_packed)
        self.versions.written(batch.layer)

    def append(
        self,
        layer: int,
        seq_ids: Sequence[int],
        k: torch.Tensor,
        v: torch.Tensor,
        append_lens: Optional[Sequence[int]] = None,
    ) -> HeadwiseBatch:
        """Append one layer's new K/V to every head of each sequence: a step of one layer.

        Token ``j`` of sequence ``b`` takes position ``seq_len(b, layer) + j`` and lands
        right after the tokens each head still holds, in one scatter for all heads.

        Args:
            layer: the layer whose caches receive the tokens.
            seq_ids: live sequences, in batch order.
            k, v: as :meth:`write`.
            append_lens: new tokens per sequence, ``[batch_size]`` ints >= 0 summing to
                ``nnz``; default one each (a decode step).

        Returns:
            the layer's :class:`HeadwiseBatch`, for ``HeadwiseAttention.plan``.

        Raises:
            NoPageError: the pool lacks pages. UnknownSequenceError, DuplicateSequenceError,
            InvalidLengthError, TensorSpecError: bad ids, lengths or tensors.
            SeqAttnError: the layer's step tokens are not written yet. Nothing changed.
        """
        layer = self.checked_layer(layer)
        ids = id_list(seq_ids)
        slots = self.positions.slots(ids)
        lens = checked_lens(append_lens, len(ids), k)
        self._kv.check(k, v, int(lens.sum()))
        self.check_written(layer)
        check_room(self.positions, self._builder, (layer,), ids, slots, lens)
        before = self.versions[layer]
        step = self._open((layer,), ids, slots, lens)
        try:
            self.write(step, layer, k, v)
        except BaseException:  # give back what the step took
            self._builder.undo((layer,), ids, lens)
            self.positions.advance((layer,), slots, -lens)
            self.versions.restore(layer, before)
            raise
        return step.batches[0]

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
        lens = None if query_lens is None else checked_lens(query_lens, len(ids))
        self.check_written(layer)
        counts = np.ones(len(ids), dtype=np.int64) if lens is None else lens
        check_queries_held(self.positions, layer, ids, slots, counts)
        return self._builder.pack((layer,), ids, lens, self.versions[layer], self).batches[0]

    # ---------------------------------------------------------------- compression
    def compress(
        self, layer: int, seq_id: int, keep: Sequence[object], *, by_position: bool = False
    ) -> None:
        """Keep, in each KV head of one sequence in one layer, only the chosen tokens.

        Survivors keep their positions and order and move to the fewest pages of their
        head (one device gather/scatter for all heads); freed pages return to the pool.
        The logical length does not change. See :mod:`seqattn.headwise.compression`.

        Args:
            layer: the layer.
            seq_id: a live sequence.
            keep: one entry per KV head: the indices, strictly increasing, of the tokens
                to keep among those the head holds now (``0 .. head_lens[h] - 1``; see
                :meth:`head_positions` for their positions), as a list, numpy array or
                1-D integer tensor; None keeps the head as it is.
            by_position: ``keep`` lists true positions (each held by its head) instead.

        Raises:
            InvalidLengthError: not one entry per head, or indices out of range, unsorted
            or repeated (or positions not held). UnknownSequenceError. SeqAttnError: the
            layer's step tokens are not written yet. Nothing changed.
        """
        self.versions.changed((compression.compress(self, layer, seq_id, keep, by_position),))
        self._after_change()

    def truncate_head(self, layer: int, seq_id: int, head: int, new_len: int) -> None:
        """Keep only the first ``new_len`` tokens one head holds (its oldest ones); errors
        as :meth:`compress` (InvalidLengthError for ``new_len`` out of range)."""
        compression.truncate_head(self, layer, seq_id, head, new_len)

    def check_written(self, layer: int) -> None:
        """Raise SeqAttnError if ``layer`` holds tokens of a step not written yet."""
        self.versions.check_written(layer)

    # ------------------------------------------------------------------ internals
    def _open(self, layers: tuple[int, ...], ids: list[int], slots: np.ndarray,
              lens: Optional[np.ndarray], on_device: bool = True) -> HeadwiseStep:  # fmt: skip
        """Allocate and pack ``lens`` tokens (default one) per sequence in every head of
        ``layers`` (NoPageError: nothing changed); they stay unwritten until :meth:`write`."""
        step = self._builder.open(layers, ids, lens, self.versions.next, self, on_device)
        self.positions.advance(layers, slots, step.append_lens)
        self.versions.changed(layers)
        took = [s for s, n in zip(ids, step.append_lens.tolist(), strict=True) if n]
        self.versions.opened(layers, took)
        self._after_change()
        return step

    def _after_change(self) -> None:
        if self.check_invariants:
            self.check_integrity()
