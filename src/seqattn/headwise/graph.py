"""CUDA graphs of a head-wise decode step: every layer's append and attention, one replay.

A head-wise cache has its own page lengths in every layer, so an eager step plans
and launches per layer and the host sets the pace. Here a decode step's page tables
of *all* layers go up to fixed device buffers in one copy (:meth:`HeadwiseGraphs.prepare`),
and per layer only kernels run that read them there: one Triton kernel appends the new
K/V, and the Triton decode kernel (:mod:`seqattn.attention.triton_decode`, which needs
no host plan) attends. Those calls may be captured once per bucket of batch sizes and
replayed every step.

Buffers per bucket of ``B`` sequences (``R = B * num_kv_heads`` requests per layer,
``N = num_layers * R`` in all), on the cache's device, never moved:
    - ``meta``, int64: ``[indptr (N + 1) | last (N) | key rows (N) | value rows (N)]``:
      each request's pages in ``indices``, tokens on its last page, and the rows of
      ``kv_pages.view(-1, head_dim)`` its new key and value go to;
    - ``indices``, int32: every layer's page ids, layer after layer.
A step of ``b < B`` sequences pads each layer with requests of one token on a scratch
page that the graphs hold, which padded rows write and read.

Inside a captured region call only :meth:`HeadwiseGraphs.write` and
:meth:`HeadwiseGraphs.run` (and the model's own kernels) on tensors of exactly
``B`` rows that stay allocated; :meth:`HeadwiseGraphs.prepare` runs before each replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from .._checks import shown
from ..attention.batch import checked_qo_heads
from ..attention.cuda_graph import bucket_for, bucket_sizes
from ..attention.triton_decode import (
    LOG2E,
    DecodeTables,
    append_rows,
    check_triton,
    decode,
    multiprocessors,
    split_count,
)
from ..errors import ArgumentTypeError, InvalidLengthError, SeqAttnError, TensorSpecError
from .batch import HeadwiseStep, StepTables
from .cache import HeadwiseKVCache


def padded_tables(
    tables: StepTables,
    num_layers: int,
    bucket_requests: int,
    scratch_page: int,
    page_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """A decode step's tables with each layer padded to ``bucket_requests`` requests.

    Args:
        tables: the step's page tables, every request holding its new token last.
        num_layers: layers in ``tables`` (each with the same number of requests).
        bucket_requests: requests per layer after padding (>= those in ``tables``).
        scratch_page: the page padded requests hold their one token on.
        page_size: tokens per page.

    Returns:
        ``(indices, meta)``: int32 page ids of every layer, padded; int64 ``[indptr |
        last | key rows | value rows]`` as the buffers of :class:`HeadwiseGraphs` hold.
    """
    real = (tables.indptr.size - 1) // num_layers
    pad = bucket_requests - real
    counts = np.ones((num_layers, bucket_requests), dtype=np.int64)
    counts[:, :real] = np.diff(tables.indptr).reshape(num_layers, real)
    last = np.ones((num_layers, bucket_requests), dtype=np.int64)
    last[:, :real] = tables.last.reshape(num_layers, real)
    indices = tables.indices[: int(tables.indptr[-1])]
    if pad:  # each layer's padding follows its own requests' pages
        ends = np.repeat(tables.indptr[real::real], pad)
        indices = np.insert(indices, ends, np.int32(scratch_page))
    indptr = np.zeros(num_layers * bucket_requests + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    last = last.ravel()
    # the new token is the last on its request's last page: row (page, K or V, slot)
    pages = indices[indptr[1:] - 1].astype(np.int64)
    key_rows = pages * (2 * page_size) + (last - 1)
    meta = np.concatenate([indptr, last, key_rows, key_rows + page_size])
    return np.ascontiguousarray(indices, dtype=np.int32), meta


class _Bucket:
    """The fixed device buffers of one padded batch size."""

    def __init__(self, size: int, requests: int, layers: int, splits: int,
                 indices: torch.Tensor) -> None:  # fmt: skip
        self.size = size
        self.requests = requests  # per layer
        self.splits = splits  # of the decode kernel, fixed: it is a compile-time constant
        total = layers * requests
        self.meta = torch.zeros(4 * total + 1, dtype=torch.int64, device=indices.device)
        # one for all buckets: every replay is preceded by its own prepare()
        self.indices = indices
        indptr, last, key_rows, value_rows = self.meta.split([total + 1, total, total, total])
        self.indptr, self.last = indptr, last
        self.key_rows = key_rows.view(layers, requests)
        self.value_rows = value_rows.view(layers, requests)


class HeadwiseGraphs:
    """Fixed buffers for capturing head-wise decode steps, per bucket of batch sizes.

    Holds one page of the cache's pool (the scratch page of padded requests) until
    :meth:`close`.

    Args:
        cache: a CUDA head-wise cache, float16 or bfloat16, ``head_dim`` a power of two.
        num_qo_heads: query heads of the model (a multiple of the KV heads).
        batch_sizes: the buckets; a step of ``b`` sequences runs in the smallest ``>= b``.
        sm_scale: softmax scale (default ``1 / sqrt(head_dim)``).

    Example (on a GPU with triton; ``q``, ``k``, ``v`` static ``[bucket, heads, D]``)::

        graphs = HeadwiseGraphs(cache, num_qo_heads=32, batch_sizes=[8, 16])
        step = cache.begin_step(seq_ids)          # a decode step, every layer
        bucket = graphs.prepare(step)             # one upload; the layers count as written
        if bucket not in captured:
            captured[bucket] = capture(lambda: [graphs.run(q, l) for l in layers if
                                                graphs.write(l, k, v) is None])
        captured[bucket].replay()
    """

    def __init__(
        self,
        cache: HeadwiseKVCache,
        num_qo_heads: int,
        batch_sizes: Sequence[int],
        *,
        sm_scale: Optional[float] = None,
    ) -> None:
        if not isinstance(cache, HeadwiseKVCache):
            raise ArgumentTypeError(f"cache must be a HeadwiseKVCache, got {shown(cache)}")
        self.num_qo_heads = checked_qo_heads(num_qo_heads, cache.num_kv_heads)
        self.batch_sizes = bucket_sizes(batch_sizes, "batch_sizes")
        check_triton(cache.storage)  # the arguments first, on any device
        self.cache = cache
        scale = cache.head_dim**-0.5 if sm_scale is None else float(sm_scale)
        self.scale_log2 = scale * LOG2E
        device = cache.device
        sm_count = multiprocessors(device)
        padding = cache.num_layers * self.batch_sizes[-1] * cache.num_kv_heads
        indices = torch.zeros(cache.storage.num_pages + padding, dtype=torch.int32, device=device)
        self._buckets = {}
        for size in self.batch_sizes:
            requests = size * cache.num_kv_heads
            splits = split_count(requests, 64, sm_count)
            self._buckets[size] = _Bucket(size, requests, cache.num_layers, splits, indices)
        self.scratch_page = int(cache.storage.allocator.allocate(1)[0])
        self._planned: Optional[_Bucket] = None
        largest = self._buckets[self.batch_sizes[-1]].meta.numel()
        self._staging: list[tuple[torch.Tensor, torch.Tensor, Optional[torch.cuda.Event]]] = [
            (torch.empty(largest, dtype=torch.int64, pin_memory=True),
             torch.empty(indices.numel(), dtype=torch.int32, pin_memory=True), None)
            for _ in range(2)
        ]  # fmt: skip
        self._turn = 0

    def bucket_for(self, batch_size: int) -> int:
        """The padded batch size a step of ``batch_size`` sequences runs with."""
        return bucket_for(self.batch_sizes, batch_size)

    def prepare(self, step: HeadwiseStep) -> int:
        """Upload a decode step of every layer into its bucket (outside any graph).

        The step's layers then count as written: replay the bucket's graph (which
        writes them) before anything else reads or changes the cache.

        Returns:
            the bucket size: the rows the graph's ``q``, ``k`` and ``v`` have.

        Raises:
            SeqAttnError: a step of another cache, a stale one, one of some layers, or
                the graphs are closed. InvalidLengthError: not one token per sequence,
                or more sequences than the largest bucket. Nothing changed.
        """
        cache = self.cache
        tables = self._check_step(step)
        bucket = self._buckets[self.bucket_for(len(step.seq_ids))]
        indices, meta = padded_tables(
            tables, cache.num_layers, bucket.requests, self.scratch_page, cache.page_size
        )
        # two pinned buffers in turn: the copy two steps ago has landed before reuse
        turn, self._turn = self._turn, self._turn ^ 1
        host_meta, host_indices, copied = self._staging[turn]
        if copied is not None:
            copied.synchronize()
        np.copyto(host_meta.numpy()[: meta.size], meta)
        np.copyto(host_indices.numpy()[: indices.size], indices)
        bucket.meta.copy_(host_meta[: meta.size], non_blocking=True)
        bucket.indices[: indices.size].copy_(host_indices[: indices.size], non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self._staging[turn] = (host_meta, host_indices, copied)
        for layer in range(cache.num_layers):
            cache.versions.written(layer)
        self._planned = bucket
        return bucket.size

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append one layer's new K/V, ``[bucket, num_kv_heads, head_dim]`` each (the
        cache's dtype and device), at the rows :meth:`prepare` uploaded."""
        bucket = self._bucket(k, "k")
        if v.shape != k.shape or k.dtype != self.cache.dtype:
            raise TensorSpecError(
                f"k and v must be [{bucket.size}, {self.cache.num_kv_heads}, "
                f"{self.cache.head_dim}] {self.cache.dtype}; got {list(k.shape)} {k.dtype}, "
                f"{list(v.shape)} {v.dtype}"
            )
        dim = self.cache.head_dim
        rows = self.cache.kv_pages.view(-1, dim)
        keys, values = k.reshape(-1, dim).contiguous(), v.reshape(-1, dim).contiguous()
        append_rows(rows, bucket.key_rows[layer], bucket.value_rows[layer], keys, values)

    def run(self, q: torch.Tensor, layer: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decode attention of one layer: ``q [bucket, num_qo_heads, head_dim]`` (the
        cache's dtype) to an output of the same shape (``out`` when given)."""
        bucket = self._bucket(q, "q")
        group = self.num_qo_heads // self.cache.num_kv_heads
        rows = q.reshape(bucket.requests, group, q.shape[-1])
        start = layer * bucket.requests  # the layer's requests in the whole step's tables
        tables = DecodeTables(
            bucket.indptr[start : start + bucket.requests + 1], bucket.indices,
            bucket.last[start : start + bucket.requests], bucket.splits, self.scale_log2,
        )  # fmt: skip
        kernel_out = None if out is None else out.view(rows.shape)
        result, _ = decode(self.cache.storage, 0, rows, tables, out=kernel_out)
        return result.view(q.shape) if out is None else out

    def close(self) -> None:
        """Give the scratch page back to the pool (the graphs must not replay after)."""
        if self.scratch_page >= 0:
            self.cache.storage.allocator.unref([self.scratch_page])
            self.scratch_page = -1
            self._planned = None

    # ------------------------------------------------------------------ internals
    def _check_step(self, step: HeadwiseStep) -> StepTables:
        cache = self.cache
        if self.scratch_page < 0:
            raise SeqAttnError("these CUDA graphs are closed")
        if not isinstance(step, HeadwiseStep) or step.tables is None:
            raise SeqAttnError(f"prepare takes a HeadwiseStep from begin_step, got {step!r:.60}")
        if len(step.batches) != cache.num_layers or step.batches[0].owner is not cache:
            raise SeqAttnError("prepare takes a step of every layer, from this graphs' cache")
        if any(b.version != cache.versions[b.layer] for b in step.batches):
            raise SeqAttnError("the step is stale: a layer changed after begin_step")
        lens = step.append_lens
        if lens.size == 0 or lens.min() != 1 or lens.max() != 1:
            raise InvalidLengthError(
                f"a CUDA-graph step decodes one token per sequence, got {lens.tolist()[:8]}"
            )
        return step.tables

    def _bucket(self, t: torch.Tensor, name: str) -> _Bucket:
        bucket = self._planned
        if bucket is None:
            raise SeqAttnError("call prepare(step) before write() / run()")
        if not isinstance(t, torch.Tensor) or t.shape[0] != bucket.size:
            raise TensorSpecError(
                f"{name} must have {bucket.size} rows (the prepared bucket), got "
                f"{getattr(t, 'shape', type(t).__name__)}"
            )
        return bucket
