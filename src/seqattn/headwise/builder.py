"""A step's pages in several layers' page tables: allocate, pack, one upload.

Every layer of a model appends the same tokens in a step, so everything that depends
only on the batch (per-request lengths, append offsets and rows, the row order of
K/V) is computed once per step and, for a repeating decode batch, kept from the last
step; only what differs per layer (page lists, lengths, append positions) is built per
layer. On a GPU all of it goes up in one copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from attrs import define

from .._arrays import indptr_of
from ..descriptor import CacheDescriptor
from ..packed_data import FlashInferPackedData, append_rows_positions
from .batch import HeadRows, HeadwiseBatch, head_rows, row_order
from .transfer import upload


@define(slots=True)
class _BatchArrays:
    """What a step's batch shape alone decides (host, int32 unless said)."""

    lens: np.ndarray  # [batch_size] int64, tokens per sequence
    per_head: np.ndarray  # [batch_size * num_kv_heads] int64, tokens per request
    append_indptr: np.ndarray  # [batch_size * num_kv_heads + 1]
    append_rows: np.ndarray  # [nnz * num_kv_heads], request of each new row
    order: Optional[tuple[np.ndarray, np.ndarray]]  # row_order(lens), mixed lengths only
    rows: Optional[HeadRows]  # the row mapping, when it needs no index (order is None)
    decode: bool  # one token per sequence


class StepBuilder:
    """Allocates a step's tokens in the page tables of some layers and packs them.

    Args:
        descriptors: one page table per layer, over one single-head storage.
        num_kv_heads: KV heads per sequence.
        device: where the packed batches go (page indices and append metadata).
    """

    def __init__(
        self, descriptors: list[CacheDescriptor], num_kv_heads: int, device: torch.device
    ) -> None:
        self.descriptors = descriptors
        self.num_kv_heads = num_kv_heads
        self.device: Optional[torch.device] = device if device.type == "cuda" else None
        self._decode: dict[int, _BatchArrays] = {}  # by batch size

    def open(
        self,
        layers: Sequence[int],
        seq_ids: tuple[int, ...],
        head_ids: list[int],
        lens: Optional[np.ndarray],
        version: int,
        owner: object,
    ) -> tuple[HeadRows, list[HeadwiseBatch]]:
        """Allocate ``lens`` tokens per sequence (default one) in every head of ``layers``,
        all or nothing, and pack them; see :meth:`pack`.

        Raises:
            NoPageError: the pool lacks pages (every layer unchanged).
        """
        arrays = self._arrays(len(seq_ids), lens)
        done: list[int] = []
        try:
            for layer in layers:
                desc = self.descriptors[layer]
                if arrays.decode:
                    desc.allocate_decoding(head_ids)  # the page table's O(batch) path
                else:
                    desc.allocate(head_ids, arrays.per_head)  # type: ignore[arg-type]  # numpy is accepted
                done.append(layer)
            return self._pack(layers, seq_ids, head_ids, arrays, version, owner)
        except BaseException:
            self.undo(done, head_ids, arrays.per_head)
            raise

    def pack(
        self,
        layers: Sequence[int],
        seq_ids: tuple[int, ...],
        head_ids: list[int],
        lens: Optional[np.ndarray],
        version: int,
        owner: object,
    ) -> tuple[HeadRows, list[HeadwiseBatch]]:
        """Each layer's batch, whose newest ``lens`` tokens per sequence (held by every
        head) are the appended ones, and the row mapping the layers share."""
        arrays = self._arrays(len(seq_ids), lens)
        return self._pack(layers, seq_ids, head_ids, arrays, version, owner)

    def undo(self, layers: Sequence[int], head_ids: list[int], per_head: np.ndarray) -> None:
        """Give back what an allocation of ``per_head`` tokens per request took."""
        for layer in layers:
            desc = self.descriptors[layer]
            now = desc.seq_lens(head_ids)
            for i in np.flatnonzero(per_head).tolist():
                desc.truncate(head_ids[i], int(now[i] - per_head[i]))

    # ------------------------------------------------------------------ internals
    def _arrays(self, batch_size: int, lens: Optional[np.ndarray]) -> _BatchArrays:
        if lens is None or (lens.size and lens.min() == 1 == lens.max()):
            cached = self._decode.get(batch_size)
            if cached is None:
                cached = self._decode[batch_size] = self._new_arrays(
                    np.ones(batch_size, dtype=np.int64), decode=True
                )
            return cached
        return self._new_arrays(lens, decode=False)

    def _new_arrays(self, lens: np.ndarray, decode: bool) -> _BatchArrays:
        per_head = np.repeat(lens, self.num_kv_heads)
        append_indptr = indptr_of(per_head)
        # the rows do not depend on the layer's lengths: any lengths >= per_head do
        append_rows = append_rows_positions(append_indptr, per_head)[0]
        order = row_order(lens, self.num_kv_heads)
        rows = head_rows(lens, self.num_kv_heads) if order is None else None
        arrays = _BatchArrays(lens, per_head, append_indptr, append_rows, order, rows, decode)
        lens.flags.writeable = False  # every batch of the step (and later steps) shows it
        return arrays

    def _pack(
        self,
        layers: Sequence[int],
        seq_ids: tuple[int, ...],
        head_ids: list[int],
        arrays: _BatchArrays,
        version: int,
        owner: object,
    ) -> tuple[HeadRows, list[HeadwiseBatch]]:
        # on the host: the indices of a repeating batch are spliced from the last step's
        host = [self.descriptors[layer].pack_for_flashinfer(head_ids) for layer in layers]
        lengths = [p.kv_seq_lens.numpy() for p in host]  # type: ignore[union-attr]
        if arrays.decode:  # each request's one new token is its last
            positions = [n - 1 for n in lengths]
        else:
            positions = [append_rows_positions(arrays.append_indptr, n)[1] for n in lengths]
        if self.device is None:
            rows, plan, write = self._on_host(arrays, host, positions)
        else:
            rows, plan, write = self._on_device(self.device, arrays, host, lengths, positions)
        batches = [
            HeadwiseBatch(
                layer,
                seq_ids,
                arrays.lens,
                plan[i],
                self.num_kv_heads,
                rows,
                write[i],
                version,
                owner,
            )
            for i, layer in enumerate(layers)
        ]
        return rows, batches

    def _on_host(
        self,
        arrays: _BatchArrays,
        host: list[FlashInferPackedData],
        positions: list[np.ndarray],
    ) -> tuple[HeadRows, list[FlashInferPackedData], list[FlashInferPackedData]]:
        rows = arrays.rows
        if rows is None:
            assert arrays.order is not None
            index = (torch.from_numpy(arrays.order[0]), torch.from_numpy(arrays.order[1]))
            rows = head_rows(arrays.lens, self.num_kv_heads, index)
        append_indptr = torch.from_numpy(arrays.append_indptr)
        append_rows = torch.from_numpy(arrays.append_rows)
        packed = [
            FlashInferPackedData(
                p.kv_page_indices,
                p.kv_page_indptr,
                p.kv_last_page_len,
                kv_seq_lens=p.kv_seq_lens,
                append_indptr=append_indptr,
                append_batch_indices=append_rows,
                append_positions=torch.from_numpy(pos),
            )
            for p, pos in zip(host, positions, strict=True)
        ]
        return rows, packed, packed

    def _on_device(
        self,
        device: torch.device,
        arrays: _BatchArrays,
        host: list[FlashInferPackedData],
        lengths: list[np.ndarray],
        positions: list[np.ndarray],
    ) -> tuple[HeadRows, list[FlashInferPackedData], list[FlashInferPackedData]]:
        """Device: page indices, indptr, last page lengths, append rows and positions
        (the append kernel reads them there). Pinned host: indptr, last page lengths and
        lengths again, for ``plan()``."""
        shared = [arrays.append_rows, *(arrays.order or ())]
        per_layer = [
            (p.kv_page_indices.numpy(), p.kv_page_indptr.numpy(), p.kv_last_page_len.numpy())
            for p in host
        ]
        to_device = [*shared]
        to_host = [arrays.append_indptr]
        for (indices, indptr, last), pos, n in zip(per_layer, positions, lengths, strict=True):
            to_device += [indices, indptr, last, pos]
            to_host += [indptr, last, n]
        on_device, on_host = upload(device, to_device, to_host)
        append_rows, index = on_device[0], on_device[1 : len(shared)]
        append_indptr = on_host[0]
        plan, write = [], []
        for i in range(len(host)):
            indices, indptr, last, pos = on_device[len(shared) + 4 * i : len(shared) + 4 * i + 4]
            host_indptr, host_last, host_lens = on_host[1 + 3 * i : 4 + 3 * i]
            plan.append(
                FlashInferPackedData(
                    indices,
                    host_indptr,
                    host_last,
                    kv_seq_lens=host_lens,
                    append_indptr=append_indptr,
                    append_batch_indices=append_rows,
                    append_positions=pos,
                )
            )
            write.append(
                FlashInferPackedData(
                    indices, indptr, last, append_batch_indices=append_rows, append_positions=pos
                )
            )
        rows = arrays.rows or head_rows(arrays.lens, self.num_kv_heads, (index[0], index[1]))
        return rows, plan, write
