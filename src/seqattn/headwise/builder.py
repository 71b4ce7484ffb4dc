"""A step's pages in every layer: one allocation, one pack, one upload.

All layers' heads live in one page table, so a model step (the same new tokens in
every layer) allocates and packs all of them in one call each, and each layer's batch
is a slice of the packed whole. What depends only on the batch's shape (per-request
lengths, append rows, the row order of K/V) is computed once per step and, for a
repeating decode batch, kept from the last step. On a GPU everything goes up in one copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from attrs import define

from .._arrays import indptr_of
from .._transfer import upload
from ..descriptor import CacheDescriptor
from ..packed_data import BatchStamp, FlashInferPackedData, append_rows_positions
from .batch import HeadRows, HeadwiseBatch, HeadwiseStep, StepTables, head_rows, row_order


@define(slots=True)
class _BatchArrays:
    """What a step's batch shape alone decides (host; int32 unless said)."""

    lens: np.ndarray  # [batch_size] int64, tokens per sequence
    per_row: np.ndarray  # [layers * requests] int64, tokens per request of every layer
    append_indptr: np.ndarray  # [requests + 1], one layer's
    append_rows: np.ndarray  # [nnz * num_kv_heads], request of each new row, one layer's
    order: Optional[tuple[np.ndarray, np.ndarray]]  # row_order(lens), mixed lengths only
    rows: Optional[HeadRows]  # the row mapping, when it needs no index (order is None)
    decode: bool  # one token per sequence


class StepBuilder:
    """Allocates a step's tokens in some layers' rows of one page table and packs them.

    The page table's row (a "sequence" of the descriptor) of KV head ``h`` of sequence
    ``s`` in layer ``l`` has id ``(s * num_layers + l) * num_kv_heads + h``; a step's
    rows are ordered by layer, then sequence, then head, so that each layer's batch is
    a contiguous, sequence-major slice.

    Args:
        descriptor: the page table, over a single-head storage; the packed batches go to
            its storage's device (page indices and append metadata).
        num_layers: layers of the model.
        num_kv_heads: KV heads per sequence and layer.
    """

    def __init__(self, descriptor: CacheDescriptor, num_layers: int, num_kv_heads: int) -> None:
        self.descriptor = descriptor
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        device = descriptor.cache_manager.device
        # None: pack on the host (a CUDA device gets one upload per step)
        self.device: Optional[torch.device] = device if device.type == "cuda" else None
        self._decode: dict[tuple[int, int], _BatchArrays] = {}  # by (batch size, layers)
        self._ids: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}  # by layers

    def row_ids(self, layers: Sequence[int], seq_ids: list[int]) -> list[int]:
        """Page-table ids of ``layers`` x ``seq_ids`` x heads, in that order.

        The same list object while the batch repeats, so that the page table recognizes
        a steady batch by one list compare.
        """
        key = tuple(layers)
        cached = self._ids.get(key)
        if cached is not None and cached[0] == seq_ids:
            return cached[1]
        ids = self.fresh_row_ids(key, seq_ids)
        self._ids[key] = (list(seq_ids), ids)
        return ids

    def fresh_row_ids(self, layers: Sequence[int], seq_ids: list[int]) -> list[int]:
        """:meth:`row_ids` without its cache (for questions between steps, which must not
        evict the steady batch's list)."""
        # HeadIDGenerator(num_layers * num_kv_heads).get_head_id(s, layer * heads + h),
        # without a call per id
        heads, per_seq = self.num_kv_heads, self.num_layers * self.num_kv_heads
        return [
            s * per_seq + layer * heads + h
            for layer in layers
            for s in seq_ids
            for h in range(heads)
        ]

    def open(
        self,
        layers: Sequence[int],
        seq_ids: list[int],
        lens: Optional[np.ndarray],
        version: int,
        owner: object,
        on_device: bool = True,
    ) -> HeadwiseStep:
        """Allocate ``lens`` tokens per sequence (default one) in every head of ``layers``,
        all or nothing, and pack them (on the host only, unless ``on_device``); see
        :meth:`pack`.

        Raises:
            NoPageError: the pool lacks pages (nothing changed).
        """
        row_ids = self.row_ids(layers, seq_ids)
        arrays = self._arrays(len(seq_ids), len(layers), lens)
        if arrays.decode:
            self.descriptor.allocate_decoding(row_ids)  # the page table's O(batch) path
        else:
            self.descriptor.allocate(row_ids, arrays.per_row)  # type: ignore[arg-type]  # numpy is accepted
        try:
            return self._pack(layers, seq_ids, row_ids, arrays, version, owner, on_device)
        except BaseException:
            self.undo(layers, seq_ids, arrays.lens)
            raise

    def pack(
        self,
        layers: Sequence[int],
        seq_ids: list[int],
        lens: Optional[np.ndarray],
        version: int,
        owner: object,
    ) -> HeadwiseStep:
        """The batches of ``layers`` (``batches[i]`` of ``layers[i]``, made at ``version`` of
        the cache ``owner``) whose newest ``lens`` tokens per sequence (default one; held
        by every head) are the appended ones, the queries by default."""
        arrays = self._arrays(len(seq_ids), len(layers), lens)
        return self._pack(layers, seq_ids, self.row_ids(layers, seq_ids), arrays, version, owner)

    def undo(self, layers: Sequence[int], seq_ids: list[int], lens: np.ndarray) -> None:
        """Give back what an allocation of ``lens`` tokens per sequence in every head of
        ``layers`` took."""
        desc, row_ids = self.descriptor, self.row_ids(layers, seq_ids)
        per_row = np.tile(np.repeat(lens, self.num_kv_heads), len(layers))
        now = desc.seq_lens(row_ids)
        for i in np.flatnonzero(per_row).tolist():
            desc.truncate(row_ids[i], int(now[i] - per_row[i]))

    # ------------------------------------------------------------------ internals
    def _arrays(self, batch_size: int, num_layers: int, lens: Optional[np.ndarray]) -> _BatchArrays:
        if lens is None or (lens.size and lens.min() == 1 == lens.max()):
            cached = self._decode.get((batch_size, num_layers))
            if cached is None:
                ones = np.ones(batch_size, dtype=np.int64)
                cached = self._decode[batch_size, num_layers] = self._new(ones, num_layers, True)
            return cached
        return self._new(lens, num_layers, decode=False)

    def _new(self, lens: np.ndarray, num_layers: int, decode: bool) -> _BatchArrays:
        per_head = np.repeat(lens, self.num_kv_heads)
        append_indptr = indptr_of(per_head)
        # the rows do not depend on the lengths held: any lengths >= per_head give them
        append_rows = append_rows_positions(append_indptr, per_head)[0]
        order = row_order(lens, self.num_kv_heads)
        rows = head_rows(lens, self.num_kv_heads) if order is None else None
        lens.flags.writeable = False  # every batch of the step (and later steps) shows it
        per_row = np.tile(per_head, num_layers)
        return _BatchArrays(lens, per_row, append_indptr, append_rows, order, rows, decode)

    def _pack(
        self,
        layers: Sequence[int],
        seq_ids: list[int],
        row_ids: list[int],
        arrays: _BatchArrays,
        version: int,
        owner: object,
        on_device: bool = True,
    ) -> HeadwiseStep:
        # on the host: a repeating batch's indices are spliced from the last step's
        whole = self.descriptor.pack_for_flashinfer(row_ids)
        indices = whole.kv_page_indices.numpy()
        indptr = whole.kv_page_indptr.numpy()
        last = whole.kv_last_page_len.numpy()
        lengths = whole.kv_seq_lens.numpy()  # type: ignore[union-attr]
        if arrays.decode:  # each row's one new token is its last
            positions = lengths - 1
        else:
            positions = append_rows_positions(indptr_of(arrays.per_row), lengths)[1]
        layer_indptr, bounds = _per_layer(indptr, len(layers), arrays.append_indptr.size - 1)
        parts = _Parts(
            indices, layer_indptr, last, lengths, positions, bounds, arrays, self.num_kv_heads,
            whole.stamp,
        )  # fmt: skip
        if self.device is None or not on_device:
            rows, plan, write = parts.on_host()
        else:
            rows, plan, write = parts.on_device(self.device)
        ids, lens, heads = tuple(seq_ids), arrays.lens, self.num_kv_heads
        batches = tuple(
            HeadwiseBatch(layer, ids, lens, p, heads, rows, w, version, owner)
            for layer, p, w in zip(layers, plan, write, strict=True)
        )
        return HeadwiseStep(ids, lens, rows, batches, StepTables(indices, indptr, last))


def _per_layer(indptr: np.ndarray, layers: int, requests: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole step's indptr cut into layers of ``requests`` requests each.

    Returns:
        ``(layer_indptr, bounds)``: each layer's indptr from 0, ``[layers, requests + 1]``,
        and where each layer's page ids start in the whole, ``[layers + 1]``, int32.
    """
    bounds = indptr[::requests] if requests else np.zeros(layers + 1, np.int32)
    layer_indptr = np.empty((layers, requests + 1), dtype=np.int32)
    layer_indptr[:, :-1] = indptr[:-1].reshape(layers, requests) - bounds[:-1, None]
    layer_indptr[:, -1] = np.diff(bounds)
    return layer_indptr, bounds


@define(slots=True)
class _Parts:
    """A packed step, whole, and how to cut it into layers (host numpy, int32)."""

    indices: np.ndarray  # every layer's page ids, layer after layer
    layer_indptr: np.ndarray  # [layers, requests + 1], each from 0
    last: np.ndarray  # [layers * requests]
    lengths: np.ndarray  # [layers * requests]
    positions: np.ndarray  # [layers * nnz * num_kv_heads]
    bounds: np.ndarray  # [layers + 1], where each layer's page ids start in indices
    arrays: _BatchArrays
    num_kv_heads: int
    stamp: Optional[BatchStamp]  # of the whole step; each layer's batch carries its rows'

    def on_host(self) -> tuple[HeadRows, list[FlashInferPackedData], list[FlashInferPackedData]]:
        """Every tensor on the host; one batch serves plan() and the append."""
        arrays = self.arrays
        index = None
        if arrays.order is not None:
            index = (torch.from_numpy(arrays.order[0]), torch.from_numpy(arrays.order[1]))
        packed = self._cut(
            *(torch.from_numpy(a) for a in (self.indices, self.layer_indptr, self.last)),
            *(torch.from_numpy(a) for a in (self.lengths, self.positions)),
            *(torch.from_numpy(a) for a in (arrays.append_indptr, arrays.append_rows)),
        )
        return self._rows(index), packed, packed

    def on_device(
        self, device: torch.device
    ) -> tuple[HeadRows, list[FlashInferPackedData], list[FlashInferPackedData]]:
        """Device: page indices, indptr, last page lengths, append rows and positions
        (the append kernel reads them there). Pinned host: indptr, last page lengths and
        lengths again, for ``plan()``."""
        arrays, indptr = self.arrays, self.layer_indptr
        to_device = [self.indices, indptr.ravel(), self.last, self.positions, arrays.append_rows]
        to_host = [indptr.ravel(), self.last, self.lengths, arrays.append_indptr]
        on_device, on_host = upload(device, to_device + list(arrays.order or ()), to_host)
        indices, gpu_indptr, gpu_last, positions, append_rows = on_device[:5]
        cpu_indptr, cpu_last, lengths, append_indptr = on_host
        plan = self._cut(
            indices, cpu_indptr.view(indptr.shape), cpu_last, lengths, positions,
            append_indptr, append_rows,
        )  # fmt: skip
        write = self._cut(
            indices, gpu_indptr.view(indptr.shape), gpu_last, None, positions, None, append_rows
        )
        index = None if arrays.order is None else (on_device[5], on_device[6])
        return self._rows(index), plan, write

    def _rows(self, index: Optional[tuple[torch.Tensor, torch.Tensor]]) -> HeadRows:
        rows = self.arrays.rows
        return head_rows(self.arrays.lens, self.num_kv_heads, index) if rows is None else rows

    def _cut(
        self,
        indices: torch.Tensor,
        indptr: torch.Tensor,
        last: torch.Tensor,
        lengths: Optional[torch.Tensor],
        positions: torch.Tensor,
        append_indptr: Optional[torch.Tensor],
        append_rows: torch.Tensor,
    ) -> list[FlashInferPackedData]:
        """One batch per layer, of views of the whole step's tensors."""
        requests, new_rows = self.layer_indptr.shape[1] - 1, self.arrays.append_rows.size
        bounds = self.bounds.tolist()
        out = []
        for i in range(len(bounds) - 1):
            rows = slice(i * requests, (i + 1) * requests)
            stamp = None if self.stamp is None else self.stamp.rows(rows.start, rows.stop)
            out.append(
                FlashInferPackedData(
                    indices[bounds[i] : bounds[i + 1]],
                    indptr[i],
                    last[rows],
                    kv_seq_lens=None if lengths is None else lengths[rows],
                    append_indptr=append_indptr,
                    append_batch_indices=append_rows,
                    append_positions=positions[i * new_rows : (i + 1) * new_rows],
                    stamp=stamp,
                )
            )
        return out
