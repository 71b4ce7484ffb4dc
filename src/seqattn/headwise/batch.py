"""Head-wise batches: each (sequence, KV head) is one request of a single-KV-head batch.

Requests are *sequence-major*: request ``b * num_kv_heads + h`` is KV head ``h`` of
sequence ``b`` (the order of ``HeadIDGenerator``'s ids ``seq * H + h``), and its rows
are that head's new tokens in order. In a decode step (one token per sequence) the
model's ``[batch, num_kv_heads * group, head_dim]`` tensors are then already in that
order, so K/V, queries and outputs map to the batch by a view, with no copy.
:class:`HeadRows` does the mapping for any lengths.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from attrs import define, field

from .._arrays import concat_ranges
from ..packed_data import FlashInferPackedData


@define(slots=True, frozen=True)
class HeadRows:
    """Where the rows of a head-wise batch sit in the model's token-major layout.

    Model tensors are ``[nnz, num_kv_heads * group, *rest]`` with the tokens of each
    sequence together, in batch order; head-wise tensors are ``[nnz * num_kv_heads,
    group, *rest]`` with the rows of each (sequence, KV head) together. Equal lengths
    map by a reshape (a view for one token each or one KV head, else one transpose
    copy); mixed lengths by one gather.

    Attributes:
        num_kv_heads: KV heads per sequence.
        num_tokens: tokens over all sequences (``nnz``).
        lens: tokens per sequence, ``shape: [batch_size], dtype: int64``, host.
        uniform: the tokens of every sequence when all are equal, else -1.
        gather: with mixed lengths, the model row (``token * num_kv_heads + head``) of
            each head-wise row, ``shape: [nnz * num_kv_heads], dtype: torch.int32``, on
            the tensors' device; None otherwise.
        scatter: its inverse permutation, same shape, dtype and device; None otherwise.
    """

    num_kv_heads: int
    num_tokens: int
    lens: np.ndarray = field(repr=False)
    uniform: int
    gather: Optional[torch.Tensor] = field(default=None, repr=False)
    scatter: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def is_view(self) -> bool:
        """Whether both directions are views (no copy): one token each, or one KV head."""
        return self.uniform in (0, 1) or self.num_kv_heads == 1

    def to_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Model layout to head-wise rows.

        Args:
            t: ``shape: [nnz, num_kv_heads * group, *rest]`` (K/V: ``group == 1``).

        Returns:
            ``shape: [nnz * num_kv_heads, group, *rest]``, same dtype and device; a view
            when :attr:`is_view`.
        """
        heads, nnz = self.num_kv_heads, self.num_tokens
        group = t.shape[1] // heads
        rest = t.shape[2:]
        if self.is_view:
            return t.reshape(nnz * heads, group, *rest)
        if self.gather is None:  # n tokens each: a batched transpose
            per_seq = t.reshape(self.lens.size, self.uniform, heads, group, *rest)
            return per_seq.transpose(1, 2).reshape(nnz * heads, group, *rest)
        return t.reshape(nnz * heads, group, *rest).index_select(0, self.gather)

    def from_rows(self, r: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Head-wise rows back to the model layout (into ``out`` when given).

        Args:
            r: ``shape: [nnz * num_kv_heads, group, *rest]``, e.g. an attention output
                (``rest = [head_dim]``) or a log-sum-exp (``rest = []``).
            out: optional contiguous ``shape: [nnz, num_kv_heads * group, *rest]``,
                ``r``'s dtype and device.

        Returns:
            ``shape: [nnz, num_kv_heads * group, *rest]``: ``out``, or a view of ``r``
            when :attr:`is_view`, else a new tensor.
        """
        heads, nnz = self.num_kv_heads, self.num_tokens
        group = r.shape[1]
        rest = r.shape[2:]
        if self.is_view:
            model = r.reshape(nnz, heads * group, *rest)
            return model if out is None else out.copy_(model)
        if self.gather is None:
            per_head = r.reshape(self.lens.size, heads, self.uniform, group, *rest)
            per_token = per_head.transpose(1, 2)
            if out is None:
                return per_token.reshape(nnz, heads * group, *rest)
            out.view(per_token.shape).copy_(per_token)
            return out
        assert self.scatter is not None
        flat = r.reshape(nnz * heads, group, *rest)
        if out is None:
            return flat.index_select(0, self.scatter).view(nnz, heads * group, *rest)
        torch.index_select(flat, 0, self.scatter, out=out.view(flat.shape))
        return out


def row_order(lens: np.ndarray, num_kv_heads: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The gather index of :class:`HeadRows` and its inverse, or None for equal lengths.

    Args:
        lens: tokens per sequence, ``[batch_size]`` int64.
        num_kv_heads: KV heads per sequence.

    Returns:
        ``(gather, scatter)``, each ``[nnz * num_kv_heads]`` int32: head-wise row ``i``
        is model row ``gather[i]`` (of the model tensor flattened to one row per token
        and KV head), and model row ``j`` is head-wise row ``scatter[j]``.
    """
    if lens.size == 0 or lens.min() == lens.max() or num_kv_heads == 1:
        return None
    starts = np.cumsum(lens) - lens
    per_row = np.repeat(lens, num_kv_heads)  # request (b, h) has lens[b] rows
    token = concat_ranges(np.repeat(starts, num_kv_heads), per_row)
    head = np.repeat(np.tile(np.arange(num_kv_heads), lens.size), per_row)
    gather = (token * num_kv_heads + head).astype(np.int32)
    scatter = np.empty_like(gather)
    scatter[gather] = np.arange(gather.size, dtype=np.int32)
    return gather, scatter


def head_rows(
    lens: np.ndarray,
    num_kv_heads: int,
    index: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> HeadRows:
    """:class:`HeadRows` for ``lens``; ``index`` is :func:`row_order`'s pair on the device
    (needed exactly when it returns one)."""
    nnz = int(lens.sum())
    if index is not None:
        return HeadRows(num_kv_heads, nnz, lens, -1, index[0], index[1])
    if lens.size == 0:
        return HeadRows(num_kv_heads, nnz, lens, 0)
    uniform = int(lens[0]) if lens.min() == lens.max() else -1  # mixed: one KV head
    return HeadRows(num_kv_heads, nnz, lens, uniform)


@define(slots=True, frozen=True)
class HeadwiseBatch:
    """One layer's page table for a batch of sequences, one request per (sequence, KV head).

    Attributes:
        layer: the layer whose page tables were packed.
        seq_ids: the sequences, in batch order.
        append_lens: tokens each sequence received in this step (its query tokens by
            default), ``shape: [batch_size], dtype: int64``, host.
        packed: the sequence-major batch for ``PagedAttention.plan`` over the single-head
            storage: ``batch_size * num_kv_heads`` requests, page indices on the cache's
            device, indptr and lengths on the host, with append metadata.
        num_kv_heads: KV heads per sequence.
        rows: maps the model's K/V (and, by default, queries) to the requests' rows.
        append_packed: the same page table with every tensor on the cache's device, for
            the append kernel (``packed`` itself on the CPU).
        version: the cache's version of ``layer`` this batch belongs to; any later change
            to the layer (append, compress, release) makes it stale.
    """

    layer: int
    seq_ids: tuple[int, ...]
    append_lens: np.ndarray
    packed: FlashInferPackedData
    num_kv_heads: int
    rows: HeadRows = field(repr=False)
    append_packed: FlashInferPackedData = field(repr=False)
    version: int = field(repr=False)
    owner: object = field(repr=False, eq=False)

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens appended in this step over all sequences (``nnz``)."""
        return self.rows.num_tokens


@define(slots=True, frozen=True)
class StepTables:
    """A whole step's page table on the host: every layer's requests, layer after layer
    (request ``layer * batch_size * num_kv_heads + b * num_kv_heads + h``); int32 numpy,
    valid until the cache packs its next step.

    Attributes:
        indices: page ids, request after request.
        indptr: ``[requests + 1]``, each request's first entry in ``indices``.
        last: tokens on each request's last page, ``[requests]``.
    """

    indices: np.ndarray
    indptr: np.ndarray
    last: np.ndarray


@define(slots=True, frozen=True)
class HeadwiseStep:
    """One model step's pages in every layer, from :meth:`HeadwiseKVCache.begin_step`.

    (``HeadwiseKVCache.append`` makes and writes a step of its one layer internally.)

    Attributes:
        seq_ids: the sequences, in batch order.
        append_lens: tokens each sequence appends, ``shape: [batch_size], dtype: int64``.
        rows: maps the model's ``[nnz, num_kv_heads, head_dim]`` K/V to the requests'
            rows (the same in every layer).
        batches: one :class:`HeadwiseBatch` per layer, in layer order (``batches[layer]``).
        tables: the page table of every layer at once, on the host (what a CUDA-graph
            step uploads); None for a step made elsewhere.
    """

    seq_ids: tuple[int, ...]
    append_lens: np.ndarray
    rows: HeadRows = field(repr=False)
    batches: tuple[HeadwiseBatch, ...] = field(repr=False)
    tables: Optional[StepTables] = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        """Tokens appended to each layer in this step (``nnz``)."""
        return self.rows.num_tokens
