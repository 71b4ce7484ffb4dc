"""Decode attention for CUDA graphs: fixed-capacity buffers, one wrapper per batch-size bucket.

A CUDA graph replays recorded kernels on recorded addresses, so everything a captured
decode step reads must live in buffers that never move and never change size. This
module keeps, per bucket of batch sizes, the page-table buffers flashinfer's decode
kernel and append kernel read; :meth:`CUDAGraphDecodeAttention.plan` fills them for a
step (padding the batch to its bucket with rows that point at a scratch page).

Inside a captured region you may:
    - call :meth:`~CUDAGraphDecodeAttention.append_kv` and
      :meth:`~CUDAGraphDecodeAttention.run` for the bucket that was planned, on tensors
      with exactly ``bucket`` rows that stay allocated (the graph's static inputs);
    - run the rest of the model on those static tensors (matmuls, norms, RoPE, ...).
You may not, inside the region:
    - call :meth:`plan`, ``CacheDescriptor`` methods or ``pack_for_flashinfer``: they
      do host work and host-to-device copies that must happen before every replay;
    - read values back to the host (``.item()``, ``.cpu()``, printing) or run ops whose
      output size depends on data (boolean masks, ``nonzero``, ``unique``);
    - change the batch size: capture one graph per bucket, and replay the graph of the
      bucket that :meth:`plan` returned for this step.
Each step: ``bucket = dec.plan(packed)``, copy the step's inputs into that bucket's
static tensors, ``graphs[bucket].replay()``, read the first ``batch_size`` output rows.

With ``cascade_groups > 0``, every step runs as cascade attention (pack the batch with
``shared_prefix=True``): rows that start with the same pages read them once per group
(up to ``cascade_groups`` groups), in fixed shapes that one graph per bucket replays
whatever the groups of a step are (a step without groups runs the same graph).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
import torch

from .._checks import exact_bool, exact_int, int_array, shown
from ..errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    InvalidLengthError,
    SeqAttnError,
    TensorSpecError,
)
from ..packed_data import FlashInferPackedData
from ..storage import PagedKVCacheManager
from .batch import AttentionBatch, checked_qo_heads, host_tensor, query_dtype
from .cascade import CascadeSplit, pad_shared_level, split_for_cascade
from .flashinfer_backend import decode_tensor_cores, flashinfer_for, kv_scales

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Bucket:
    """The fixed buffers and wrapper of one padded batch size."""

    def __init__(self, fi: Any, size: int, max_pages: int, workspace: torch.Tensor,
                 cache: PagedKVCacheManager, use_tensor_cores: bool) -> None:  # fmt: skip
        device = cache.device
        self.size = size
        # on gpu, fixed for the bucket's lifetime (graphs record these addresses)
        self.indptr = torch.zeros(size + 1, dtype=torch.int32, device=device)
        self.indices = torch.zeros(max_pages + size, dtype=torch.int32, device=device)
        self.last_page_len = torch.zeros(size, dtype=torch.int32, device=device)
        self.batch_indices = torch.arange(size, dtype=torch.int32, device=device)
        self.positions = torch.zeros(size, dtype=torch.int32, device=device)
        self.wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
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


class CUDAGraphDecodeAttention:
    """Decode attention (one query token per sequence) whose per-layer work can be captured.

    Args:
        cache: a CUDA :class:`PagedKVCacheManager`.
        num_qo_heads: query heads.
        batch_sizes: the buckets; a step of ``B`` sequences runs in the smallest bucket
            ``>= B``.
        max_pages: most pages one step's batch may hold (capacity of the index buffers);
            default: the whole pool.
        workspace_bytes: flashinfer's float workspace, shared by the buckets.
        cascade_groups: run every step as cascade attention with up to this many
            groups of rows sharing leading pages (0: plain decode).

    Holds one page of the pool (the scratch page padded rows append into and read)
    until :meth:`close`.
    """

    def __init__(
        self,
        cache: PagedKVCacheManager,
        num_qo_heads: int,
        *,
        batch_sizes: Sequence[int] = DEFAULT_BUCKETS,
        max_pages: Optional[int] = None,
        workspace_bytes: int = 128 * 1024 * 1024,
        decode_use_tensor_cores: Optional[bool] = None,
        cascade_groups: int = 0,
    ) -> None:
        if not isinstance(cache, PagedKVCacheManager):
            raise ArgumentTypeError(f"cache must be a PagedKVCacheManager, got {shown(cache)}")
        num_qo_heads = checked_qo_heads(num_qo_heads, cache.num_heads)
        sizes = int_array(batch_sizes, "batch_sizes", low=1, high=2**20)
        if sizes.size == 0:
            raise InvalidArgumentError("batch_sizes must name at least one bucket")
        pages = cache.num_pages if max_pages is None else exact_int(max_pages, "max_pages", low=1)
        exact_int(workspace_bytes, "workspace_bytes", low=1)
        exact_bool(decode_use_tensor_cores, "decode_use_tensor_cores", optional=True)
        cascade_groups = exact_int(cascade_groups, "cascade_groups", low=0)
        fi = flashinfer_for(cache)
        self.cache = cache
        self.num_qo_heads = num_qo_heads
        self._fi = fi
        self._scales = kv_scales(cache)
        self.batch_sizes = sorted(set(sizes.tolist()))
        tensor_cores = decode_tensor_cores(num_qo_heads, cache.num_heads, decode_use_tensor_cores)
        workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=cache.device)
        self._buckets = {
            b: _Bucket(fi, b, pages, workspace, cache, tensor_cores) for b in self.batch_sizes
        }
        self.cascade_groups = cascade_groups
        if self.cascade_groups:
            for size, bucket in self._buckets.items():
                bucket.shared = _SharedLevel(fi, size, self.cascade_groups, pages, workspace, cache)
        self.cascade: Optional[CascadeSplit] = None  # the planned step's split
        self.scratch_page = int(cache.allocator.allocate(1)[0])
        self._scratch = torch.tensor([self.scratch_page], dtype=torch.int32, device=cache.device)
        self.bucket: Optional[_Bucket] = None
        self.batch_size = 0

    def bucket_for(self, batch_size: int) -> int:
        """The padded batch size a step of ``batch_size`` sequences runs with."""
        i = bisect.bisect_left(self.batch_sizes, batch_size)
        if i == len(self.batch_sizes):
            raise InvalidLengthError(
                f"batch of {batch_size} exceeds the largest CUDA-graph bucket "
                f"{self.batch_sizes[-1]}; add a bucket or run eagerly"
            )
        return self.batch_sizes[i]

    def plan(
        self,
        packed: FlashInferPackedData,
        *,
        sm_scale: Optional[float] = None,
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        q_dtype: Optional[torch.dtype] = None,
    ) -> int:
        """Fill the step's bucket (outside any graph); returns the bucket size.

        ``packed`` is the decode batch after ``allocate_decoding``: each sequence's
        query is its newest token, whose K/V :meth:`append_kv` writes.
        """
        cache = self.cache
        if not isinstance(packed, FlashInferPackedData):
            raise ArgumentTypeError(f"expected a FlashInferPackedData, got {shown(packed)}")
        dtype = query_dtype(q_dtype, cache.dtype)
        batch = AttentionBatch.build(
            packed, cache, np.ones(packed.batch_size, np.int64),
            sm_scale=sm_scale, window_left=window_left, logits_soft_cap=logits_soft_cap,
        )  # fmt: skip
        real = batch.batch_size
        bucket = self._buckets[self.bucket_for(real)]
        split = self._split(batch, packed)
        table = batch if split is None else split.suffix  # the pages the decode kernel reads
        pad = bucket.size - real
        kv_indptr = table.packed.kv_page_indptr.cpu().numpy()
        if int(kv_indptr[-1]) + pad > bucket.indices.shape[0]:
            raise InvalidLengthError(
                f"the batch holds {int(kv_indptr[-1])} pages, more than max_pages allows"
            )
        # padded rows: one token, on the scratch page
        indptr = np.concatenate([kv_indptr, kv_indptr[-1] + np.arange(1, pad + 1)])
        last = np.concatenate([table.packed.kv_last_page_len.cpu().numpy(), np.ones(pad)])
        positions = np.concatenate([table.kv_lens - 1, np.zeros(pad)]).astype(np.int32)
        indices = table.packed.kv_page_indices.to(cache.device, non_blocking=True)
        if pad:
            indices = torch.cat([indices, self._scratch.expand(pad)])
        if bucket.planned is not None:
            bucket.planned.synchronize()  # its last schedule copy must land before a new one
        bucket.positions.copy_(host_tensor(positions, pin=True), non_blocking=True)
        options = dict(
            logits_soft_cap=batch.logits_soft_cap or None, q_data_type=dtype,
            kv_data_type=cache.dtype, o_data_type=dtype, sm_scale=batch.sm_scale,
        )  # fmt: skip
        heads = (self.num_qo_heads, cache.num_heads, cache.head_dim, cache.page_size)
        bucket.wrapper.plan(
            host_tensor(indptr.astype(np.int32), pin=True), indices,
            host_tensor(last.astype(np.int32), pin=True), *heads,
            window_left=batch.window_left, **options,
        )  # fmt: skip
        if bucket.shared is not None:
            self._plan_shared(bucket, bucket.shared, split, heads, options)
        bucket.planned = torch.cuda.Event()
        bucket.planned.record()
        self.bucket, self.batch_size, self.cascade = bucket, real, split
        return bucket.size

    def _split(self, batch: AttentionBatch, packed: FlashInferPackedData) -> Optional[CascadeSplit]:
        if not self.cascade_groups:
            return None
        if batch.window_left >= 0:
            raise SeqAttnError("cascade attention does not combine with window_left")
        if packed.shared_prefix is None:
            return None
        page_size = self.cache.page_size
        return split_for_cascade(batch, packed.shared_prefix, page_size, 1, self.cascade_groups)

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
        level.wrapper.plan(
            host_tensor(padded.qo_indptr, pin=True), host_tensor(padded.kv_indptr, pin=True),
            indices, host_tensor(padded.last_page_len, pin=True), *heads,
            causal=False, **options,
        )  # fmt: skip

    def append_kv(self, keys: torch.Tensor, values: torch.Tensor, layer: int = 0) -> None:
        """Write the step's new K/V (``[bucket, num_kv_heads, head_dim]``) of one layer."""
        bucket = self._planned(keys.shape[0], "keys")
        cache = self.cache
        cache.check_kv(keys, values)
        self._fi.page.append_paged_kv_cache(
            cache.to_storage_dtype(keys, cache.k_scale),
            cache.to_storage_dtype(values, cache.v_scale),
            bucket.batch_indices, bucket.positions, cache.get_memory_tensors(layer),
            bucket.indices, bucket.indptr, bucket.last_page_len,
            kv_layout=cache.kv_layout,
        )  # fmt: skip

    def run(
        self, q: torch.Tensor, layer: int = 0, *, out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Decode attention of one layer: ``q [bucket, num_qo_heads, head_dim]`` -> same shape."""
        bucket = self._planned(q.shape[0], "q")
        kv = self.cache.get_memory_tensors(layer)
        level = bucket.shared
        if level is None:
            return bucket.wrapper.run(q, kv, out=out, **self._scales)
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

    def capture(self, step: Callable[[], Any], *, warmup: int = 2) -> torch.cuda.CUDAGraph:
        """Capture ``step`` (append_kv/run on static tensors) for the planned bucket.

        ``step`` runs ``warmup`` times on a side stream first, as capture requires;
        it must be idempotent (re-appending the same K/V is).
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

    def close(self) -> None:
        """Give the scratch page back to the pool."""
        if self.scratch_page >= 0:
            self.cache.allocator.unref([self.scratch_page])
            self.scratch_page = -1

    def _planned(self, rows: int, name: str) -> _Bucket:
        if self.bucket is None:
            raise SeqAttnError("call plan() before append_kv() / run()")
        if rows != self.bucket.size:
            raise TensorSpecError(
                f"{name} must have {self.bucket.size} rows (the planned bucket), got {rows}"
            )
        return self.bucket
