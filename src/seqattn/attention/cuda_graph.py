"""CUDA graphs as a way of running decode attention: fixed buffers per batch-size bucket.

A CUDA graph replays recorded kernels on recorded addresses, so everything a captured
decode step reads must live in buffers that never move and never change size.
:class:`GraphBuckets` keeps, per bucket of batch sizes, the page-table buffers the
decode and append kernels read (flashinfer's, or the Triton decode's, which appends in
its own launch); ``PagedAttention.plan(step, cuda_graph=True)`` fills them for a step
(padding the batch to its bucket with rows that point at a scratch page), with the very
options an eager plan uses. A step packed on the host (``pack_for_flashinfer`` without a
device) goes up whole in one pinned copy: table, page ids and the rows' query positions,
which a captured model may read as its position ids (``PagedAttention.graph_positions``).

Inside a captured region you may:
    - call ``PagedAttention.forward`` (or ``run``) for the bucket that was planned, on
      tensors with exactly ``bucket`` rows that stay allocated (the graph's static
      inputs);
    - run the rest of the model on those static tensors (matmuls, norms, RoPE, ...).
You may not, inside the region:
    - call ``plan``, ``CacheDescriptor`` methods or ``pack_for_flashinfer``: they do
      host work and host-to-device copies that must happen before every replay;
    - read values back to the host (``.item()``, ``.cpu()``, printing) or run ops whose
      output size depends on data (boolean masks, ``nonzero``, ``unique``);
    - change the batch size: capture one graph per bucket, and replay the graph of the
      bucket that ``plan`` returned for this step.

With ``cascade_groups > 0``, every step runs as cascade attention (pack the batch with
``shared_prefix=True``): rows that start with the same pages read them once per group
(up to ``cascade_groups`` groups), in fixed shapes that one graph per bucket replays
whatever the groups of a step are (a step without groups runs the same graph).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import torch

from .._checks import int_array
from ..errors import InvalidArgumentError, InvalidLengthError, SeqAttnError, TensorSpecError
from ..storage import PagedKVCacheManager
from .batch import AttentionBatch, host_tensor
from .cascade import CascadeSplit, pad_shared_level, split_for_cascade
from .flashinfer_backend import flashinfer_for, kv_scales
from .triton_decode import (
    LOG2E,
    DecodeTables,
    appendable,
    decode,
    multiprocessors,
    split_count,
)

# a bucket's table: indptr (one more), last page lengths, append positions, query positions
TABLE_ROWS = 4


class _Bucket:
    """The fixed buffers and decode of one padded batch size: flashinfer's wrapper, or
    the Triton kernel's split count (``splits > 0``, no wrapper)."""

    def __init__(self, fi: Any, size: int, max_pages: int, workspace: torch.Tensor,
                 cache: PagedKVCacheManager, use_tensor_cores: bool,
                 splits: int) -> None:  # fmt: skip
        device = cache.device
        self.splits = splits
        self.size = size
        # on gpu, fixed for the bucket's lifetime (graphs record these addresses): one
        # buffer whose consecutive views are indptr, last page lengths, append positions,
        # query positions and page ids, so that a step's values go up in one copy
        self.storage = torch.zeros(TABLE_ROWS * size + 1 + max_pages + size, dtype=torch.int32,
                                   device=device)  # fmt: skip
        self.table, self.indices = self.storage.split([TABLE_ROWS * size + 1, max_pages + size])
        self.indptr, self.last_page_len, self.positions, self.query_positions = self.table.split(
            [size + 1, size, size, size]
        )
        self.batch_indices = torch.arange(size, dtype=torch.int32, device=device)
        # the Triton decode's per-(request, KV head) counters: zeros between launches
        self.counters = torch.zeros(size * cache.num_heads if splits else 0,
                                    dtype=torch.int32, device=device)  # fmt: skip
        self.wrapper = None if splits else fi.BatchDecodeWithPagedKVCacheWrapper(
            workspace, cache.kv_layout,
            use_cuda_graph=True, use_tensor_cores=use_tensor_cores,
            paged_kv_indptr_buffer=self.indptr,
            paged_kv_indices_buffer=self.indices,
            paged_kv_last_page_len_buffer=self.last_page_len,
        )  # fmt: skip
        self.planned: Optional[torch.cuda.Event] = None
        self.shared: Optional[_SharedLevel] = None


class _SharedLevel:
    """A bucket's fixed buffers for the shared level of cascade decode."""

    def __init__(self, fi: Any, size: int, max_groups: int, max_pages: int,
                 workspace: torch.Tensor, cache: PagedKVCacheManager) -> None:  # fmt: skip
        device, requests = cache.device, max_groups + 1
        # on gpu, fixed for the bucket's lifetime
        self.qo_indptr = torch.zeros(requests + 1, dtype=torch.int32, device=device)
        self.kv_indptr = torch.zeros(requests + 1, dtype=torch.int32, device=device)
        self.indices = torch.zeros(max_pages + requests, dtype=torch.int32, device=device)
        self.last_page_len = torch.zeros(requests, dtype=torch.int32, device=device)
        self.q_rows = torch.zeros(size, dtype=torch.int64, device=device)
        self.out_rows = torch.zeros(size, dtype=torch.int64, device=device)
        self.wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(
            workspace, cache.kv_layout, use_cuda_graph=True,
            qo_indptr_buf=self.qo_indptr, paged_kv_indptr_buf=self.kv_indptr,
            paged_kv_indices_buf=self.indices, paged_kv_last_page_len_buf=self.last_page_len,
        )  # fmt: skip
        self.outputs: Optional[tuple[torch.Tensor, ...]] = None

    def buffers(self, size: int, heads: int, head_dim: int, dtype: torch.dtype) -> None:
        """Output buffers in ``dtype``: merged rows plus a dump row, and the level's own."""
        if self.outputs is None or self.outputs[0].dtype != dtype:
            device = self.q_rows.device
            self.outputs = (
                torch.zeros(size + 1, heads, head_dim, dtype=dtype, device=device),
                torch.zeros(size + 1, heads, dtype=torch.float32, device=device),
                torch.zeros(size, heads, head_dim, dtype=dtype, device=device),
                torch.zeros(size, heads, dtype=torch.float32, device=device),
            )


class GraphBuckets:
    """The buckets of a flashinfer or triton ``PagedAttention`` built with
    ``cuda_graph_batch_sizes``; a step of ``B`` sequences runs in the smallest bucket
    ``>= B``. Holds one page of the pool (the scratch page padded rows append into and
    read) until :meth:`close`. With ``triton``, each bucket's decode is the Triton
    kernel reading the bucket's page-table buffers (no cascade, window or soft cap)."""

    def __init__(
        self,
        cache: PagedKVCacheManager,
        num_qo_heads: int,
        batch_sizes: list[int],
        max_pages: int,
        workspace: torch.Tensor,
        use_tensor_cores: bool,
        cascade_groups: int,
        triton: bool = False,
    ) -> None:
        fi = flashinfer_for(cache)
        self.cache = cache
        self.num_qo_heads = num_qo_heads
        self._fi = fi
        self._scales = kv_scales(cache)
        self.batch_sizes = batch_sizes
        sm_count = multiprocessors(cache.device)
        self._buckets = {
            b: _Bucket(fi, b, max_pages, workspace, cache, use_tensor_cores,
                       split_count(b * cache.num_heads, 64, sm_count) if triton else 0)
            for b in batch_sizes
        }  # fmt: skip
        self._scale_log2 = 0.0  # the planned step's, for the Triton decode
        self.cascade_groups = cascade_groups
        if cascade_groups:
            for size, bucket in self._buckets.items():
                bucket.shared = _SharedLevel(fi, size, cascade_groups, max_pages, workspace, cache)
        self.cascade: Optional[CascadeSplit] = None  # the planned step's split
        self.scratch_page = int(cache.allocator.allocate(1)[0])
        self._scratch = torch.tensor([self.scratch_page], dtype=torch.int32, device=cache.device)
        self.bucket: Optional[_Bucket] = None

    def bucket_for(self, batch_size: int) -> int:
        """The padded batch size a step of ``batch_size`` sequences runs with."""
        return bucket_for(self.batch_sizes, batch_size)

    def plan(self, batch: AttentionBatch, options: dict[str, Any]) -> int:
        """Fill the step's bucket (outside any graph); returns the bucket size.

        ``batch`` is a decode batch (one query per row: its newest token).
        """
        if not batch.decode_only:
            raise InvalidLengthError(
                "a CUDA-graph step decodes: one query token per sequence, got query "
                f"lengths {np.diff(batch.qo_indptr)[:8].tolist()}"
            )
        cache, real = self.cache, batch.batch_size
        bucket = self._buckets[self.bucket_for(real)]
        if bucket.splits and (batch.window_left >= 0 or batch.logits_soft_cap):
            raise InvalidArgumentError(
                "the triton backend's CUDA graphs decode without a window or soft cap; got "
                f"window_left={batch.window_left}, logits_soft_cap={batch.logits_soft_cap}"
            )
        split = self._split(batch)
        table = batch if split is None else split.suffix  # the pages the decode kernel reads
        pages = table.packed.kv_page_indices
        if pages.shape[0] + bucket.size - real > bucket.indices.shape[0]:
            raise InvalidLengthError(
                f"the batch holds {pages.shape[0]} pages, more than max_pages allows"
            )
        if bucket.planned is not None:
            bucket.planned.synchronize()  # flashinfer's pinned plan buffer is free again
        staged = self._staged(bucket, batch, table)
        # one copy: the table, and the page ids when the step was packed on the host
        bucket.storage[: staged.shape[0]].copy_(staged, non_blocking=True)
        if pages.device.type != "cpu":  # packed for the device: its page ids are there
            bucket.indices[: pages.shape[0]].copy_(pages)
            if bucket.size > real:
                bucket.indices[pages.shape[0] : pages.shape[0] + bucket.size - real].fill_(
                    self.scratch_page
                )
        heads = (self.num_qo_heads, cache.num_heads, cache.head_dim, cache.page_size)
        if bucket.wrapper is None:  # the Triton kernel reads the buffers as they are
            self._scale_log2 = batch.sm_scale * LOG2E
        else:
            indptr, last = staged[: bucket.size + 1], staged[bucket.size + 1 : 2 * bucket.size + 1]
            # the page ids are in its buffer already (its copy of them onto themselves
            # changes nothing)
            indices = bucket.indices[: int(indptr[-1])]
            bucket.wrapper.plan(indptr, indices, last, *heads, **options)
        if bucket.shared is not None:
            self._plan_shared(bucket, bucket.shared, split, heads, options)
        if bucket.wrapper is not None:  # one event per bucket, recorded again at every plan
            if bucket.planned is None:
                bucket.planned = torch.cuda.Event()
            bucket.planned.record()
        self.bucket, self.cascade = bucket, split
        return bucket.size

    def _staged(
        self, bucket: _Bucket, batch: AttentionBatch, table: AttentionBatch
    ) -> torch.Tensor:
        """A step's bucket contents in pinned memory, padded rows pointing at the scratch
        page: ``[TABLE_ROWS * size + 1]`` int32 (indptr, last page lengths, append
        positions in ``table``'s pages, query positions in the sequences), then the page
        ids when they are on the host (``table.packed.kv_page_indices`` on the CPU)."""
        size, real = bucket.size, batch.batch_size
        packed = table.packed
        on_host = packed.kv_page_indices.device.type == "cpu"
        pages = packed.kv_page_indices.shape[0]
        head = TABLE_ROWS * size + 1
        staged = torch.empty(head + (pages + size - real if on_host else 0), dtype=torch.int32,
                             pin_memory=True)  # fmt: skip
        values = staged.numpy()
        indptr, last = values[: size + 1], values[size + 1 : 2 * size + 1]
        positions = values[2 * size + 1 : 3 * size + 1]
        query_positions = values[3 * size + 1 : head]
        indptr[: real + 1] = packed.kv_page_indptr.cpu().numpy()
        indptr[real + 1 :] = pages + np.arange(1, size - real + 1)  # a page each
        last[:real] = packed.kv_last_page_len.cpu().numpy()
        last[real:] = 1
        np.subtract(table.kv_lens, 1, out=positions[:real])
        np.subtract(batch.kv_lens, 1, out=query_positions[:real])
        positions[real:] = query_positions[real:] = 0
        if on_host:
            values[head : head + pages] = packed.kv_page_indices.numpy()
            values[head + pages :] = self.scratch_page
        return staged

    def _split(self, batch: AttentionBatch) -> Optional[CascadeSplit]:
        if not self.cascade_groups:
            return None
        if batch.window_left >= 0:
            raise SeqAttnError("cascade attention does not combine with window_left")
        prefix = batch.packed.shared_prefix
        if prefix is None:
            return None
        return split_for_cascade(batch, prefix, self.cache.page_size, 1, self.cascade_groups)

    def _plan_shared(
        self,
        bucket: _Bucket,
        level: _SharedLevel,
        split: Optional[CascadeSplit],
        heads: tuple[int, int, int, int],
        options: dict[str, Any],
    ) -> None:
        padded = pad_shared_level(split, bucket.size, self.cascade_groups, self.cache.page_size)
        indices = self._scratch.expand(padded.unused)
        if split is not None:
            indices = torch.cat([split.shared.packed.kv_page_indices, indices])
        rows = host_tensor(np.concatenate([padded.q_rows, padded.out_rows]), pin=True)
        rows = rows.to(self.cache.device, non_blocking=True)
        level.q_rows.copy_(rows[: bucket.size])
        level.out_rows.copy_(rows[bucket.size :])
        level.buffers(bucket.size, self.num_qo_heads, self.cache.head_dim, options["q_data_type"])
        shared = {**options, "window_left": -1}
        level.wrapper.plan(
            host_tensor(padded.qo_indptr, pin=True), host_tensor(padded.kv_indptr, pin=True),
            indices, host_tensor(padded.last_page_len, pin=True), *heads,
            causal=False, **shared,
        )  # fmt: skip

    def forward(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layer: int,
        out: Optional[torch.Tensor],
    ) -> torch.Tensor:  # fmt: skip
        """Write the step's new K/V (``[bucket, num_kv_heads, head_dim]``) of one layer
        and attend (``q [bucket, num_qo_heads, head_dim]`` -> same shape): the Triton
        decode writes them in its own launch."""
        bucket = self.planned(keys.shape[0], "keys")
        self.cache.check_kv(keys, values)
        if bucket.wrapper is None and appendable(keys, values):
            self.planned(q.shape[0], "q")
            return decode(self.cache, layer, q, self._tables(bucket), out=out,
                          new_kv=(keys, values))[0]  # fmt: skip
        self.cache.write_pages(
            layer, keys, values, bucket.batch_indices, bucket.positions, bucket.indices,
            bucket.indptr, bucket.last_page_len,
        )  # fmt: skip
        return self.run(q, layer, out)

    def _tables(self, bucket: _Bucket) -> DecodeTables:
        """The Triton decode's view of a bucket's page-table buffers."""
        return DecodeTables(bucket.indptr, bucket.indices, bucket.last_page_len, bucket.splits,
                            self._scale_log2, bucket.counters)  # fmt: skip

    def run(self, q: torch.Tensor, layer: int, out: Optional[torch.Tensor]) -> torch.Tensor:
        """Decode attention of one layer: ``q [bucket, num_qo_heads, head_dim]`` -> same shape."""
        bucket = self.planned(q.shape[0], "q")
        if bucket.wrapper is None:
            return decode(self.cache, layer, q, self._tables(bucket), out=out)[0]
        kv = self.cache.kv_pairs[layer]
        level = bucket.shared
        if level is None:
            return bucket.wrapper.run(q, kv, out=out, **self._scales)  # type: ignore[no-any-return]
        assert level.outputs is not None
        merged, merged_lse, shared, shared_lse = level.outputs
        size = bucket.size
        bucket.wrapper.run(q, kv, out=merged[:size], lse=merged_lse[:size], return_lse=True,
                           **self._scales)  # fmt: skip
        level.wrapper.run(q.index_select(0, level.q_rows), kv, out=shared, lse=shared_lse,
                          return_lse=True, **self._scales)  # fmt: skip
        # fold the shared level into its rows; padding lands in the dump row (index size)
        picked = merged.index_select(0, level.out_rows)
        picked_lse = merged_lse.index_select(0, level.out_rows)
        self._fi.merge_state_in_place(picked, picked_lse, shared, shared_lse)
        merged.index_copy_(0, level.out_rows, picked)
        return merged[:size] if out is None else out.copy_(merged[:size])

    def close(self) -> None:
        """Give the scratch page back to the pool."""
        if self.scratch_page >= 0:
            self.cache.allocator.unref([self.scratch_page])
            self.scratch_page = -1

    def planned(self, rows: int, name: str) -> _Bucket:
        """The planned bucket, after checking that ``rows`` fills it."""
        if self.bucket is None:
            raise SeqAttnError("call plan(..., cuda_graph=True) before forward() / run()")
        if rows != self.bucket.size:
            raise TensorSpecError(
                f"{name} must have {self.bucket.size} rows (the planned bucket), got {rows}"
            )
        return self.bucket


def bucket_sizes(sizes: object, what: str) -> list[int]:
    """CUDA-graph buckets: ``sizes`` sorted and distinct, each an integer in [1, 2**20].

    Raises:
        ArgumentTypeError: not integers. InvalidArgumentError: out of range, or none.
    """
    buckets = int_array(sizes, what, low=1, high=2**20)
    if buckets.size == 0:
        raise InvalidArgumentError(f"{what} must name at least one bucket")
    return sorted(set(buckets.tolist()))


def bucket_for(batch_sizes: list[int], batch_size: int) -> int:
    """The smallest of the ascending ``batch_sizes`` that holds ``batch_size`` rows
    (InvalidLengthError when none does)."""
    i = bisect.bisect_left(batch_sizes, batch_size)
    if i == len(batch_sizes):
        raise InvalidLengthError(
            f"a batch of {batch_size} exceeds the largest CUDA-graph bucket "
            f"{batch_sizes[-1]}; add a bucket or run eagerly"
        )
    return batch_sizes[i]


def capture(step: Callable[[], Any], *, warmup: int = 2) -> torch.cuda.CUDAGraph:
    """Capture ``step`` (forward/run calls on static tensors, after a CUDA-graph plan).

    ``step`` runs ``warmup`` times on a side stream first, as capture requires; it must
    be idempotent (re-appending the same K/V is).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
