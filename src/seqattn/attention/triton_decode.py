"""Paged decode attention in Triton: no host-side plan, so a step's host cost stays flat.

flashinfer's ``plan()`` splits each decode batch's work on the host (about 0.3 ms on an
H200 host). That is cheap once per step, but a head-wise cache has its own page lengths
in every layer, so every layer needs its own plan and the host, not the GPU, sets the
pace. This kernel reads the page table from the device as it is and splits each
request's pages evenly over up to a fixed number of programs ("split-K",
flash-decoding): a decode batch needs no planning at all.

Two launches per layer: ``_partial`` gives each (request, KV head, split) the softmax
of its query group over its share of the pages (online softmax, base 2), then
``_merge`` combines the splits per query head. A split reads at least ``MIN_BLOCKS``
loop iterations of pages, so a short request uses fewer splits than the grid has, and
only those are written and merged. Decode only (one query per request); other batches
go to flashinfer (:class:`TritonDecodeBackend`).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from attrs import define

from ..errors import InvalidArgumentError
from ..storage import PagedKVCacheManager
from .batch import AttentionBatch

LOG2E = 1.4426950408889634
_kernels: Optional[tuple[Any, Any, Any]] = None


def triton_or_none() -> Any:
    """The ``triton`` module, or None where it is not installed."""
    try:
        import triton
    except ImportError:
        return None
    return triton


def check_triton(cache: PagedKVCacheManager) -> None:
    """Raise InvalidArgumentError unless the Triton decode backend can serve ``cache``."""
    head_dim = cache.head_dim
    if triton_or_none() is None or cache.device.type != "cuda":
        raise InvalidArgumentError(
            f"the triton backend needs triton and a CUDA cache; the cache is on {cache.device}"
            + ("" if triton_or_none() is not None else " and triton is not installed")
        )
    if (
        cache.dtype not in (torch.float16, torch.bfloat16)
        or head_dim < 16
        or head_dim & (head_dim - 1)
    ):
        raise InvalidArgumentError(
            f"the triton backend takes float16/bfloat16 caches with a power-of-two head_dim "
            f">= 16; got {cache.dtype}, head_dim {head_dim}"
        )


def graph_decode_backend(backend: str, window_left: int, cache: PagedKVCacheManager) -> str:
    """The decode kernel CUDA graphs of ``cache`` replay under a runner's ``backend``:
    ``"triton"`` (no host plan; faster than flashinfer's in graphs on an H200, see
    :class:`TritonDecodeBackend`) where it serves the cache and there is no window, unless
    ``backend`` is ``"flashinfer"``; ``"flashinfer"`` otherwise."""
    if backend == "flashinfer" or window_left >= 0:
        return "flashinfer"
    try:
        check_triton(cache)
    except InvalidArgumentError:
        return "flashinfer"
    return "triton"


def _build() -> tuple[Any, Any, Any]:
    """Compile-on-first-use kernels (triton imported here only: the CPU needs none)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _partial(q_ptr, k_ptr, v_ptr, indptr_ptr, indices_ptr, last_ptr, o_ptr, lse_ptr,
                 scale_log2, sq_b, sq_h, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h,
                 GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                 PS: tl.constexpr, PAGES: tl.constexpr, SPLITS: tl.constexpr,
                 MIN_SHARE: tl.constexpr):  # fmt: skip
        b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        heads = tl.num_programs(1) * GROUP
        p0 = tl.load(indptr_ptr + b)
        n_pages = tl.load(indptr_ptr + b + 1) - p0
        kv_len = (n_pages - 1) * PS + tl.load(last_ptr + b)
        # pages per split: whole loop iterations, at least MIN_SHARE, at most SPLITS
        # splits (a short row uses few, and only those are written); _merge agrees
        share = tl.maximum(tl.cdiv(tl.cdiv(n_pages, SPLITS), PAGES) * PAGES, MIN_SHARE)
        first = s * share
        end = tl.minimum(first + share, n_pages)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        t = tl.arange(0, PAGES * PS)
        q_rows = q_ptr + b * sq_b + (h * GROUP + g)[:, None] * sq_h + d[None, :]
        q = tl.load(q_rows, mask=(g < GROUP)[:, None], other=0.0)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        total = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for start in range(first, end, PAGES):
            slot = start + t // PS
            token = slot * PS + t % PS
            valid = (slot < end) & (token < kv_len)
            page = tl.load(indices_ptr + p0 + slot, mask=slot < end, other=0).to(tl.int64)
            k = tl.load(k_ptr + page[:, None] * sk_p + (t % PS)[:, None] * sk_t + h * sk_h
                        + d[None, :], mask=valid[:, None], other=0.0)  # fmt: skip
            scores = tl.dot(q, tl.trans(k)) * scale_log2
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(scores - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + page[:, None] * sv_p + (t % PS)[:, None] * sv_t + h * sv_h
                        + d[None, :], mask=valid[:, None], other=0.0)  # fmt: skip
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        seen = total > 0  # an empty split (more splits than pages) adds nothing
        out = tl.where(seen[:, None], acc / tl.where(seen, total, 1.0)[:, None], 0.0)
        lse = tl.where(seen, m + tl.log2(tl.where(seen, total, 1.0)), float("-inf"))
        row = (b * heads + h * GROUP + g) * SPLITS + s
        keep = (g < GROUP) & (first < n_pages)  # splits past the row's pages write nothing
        tl.store(o_ptr + row[:, None] * D + d[None, :], out, mask=keep[:, None])
        tl.store(lse_ptr + row, lse, mask=keep)

    @triton.jit
    def _merge(o_ptr, lse_ptr, out_ptr, lse_out_ptr, indptr_ptr, so_b, so_h,
               D: tl.constexpr, PAGES: tl.constexpr, SPLITS: tl.constexpr,
               MIN_SHARE: tl.constexpr, WITH_LSE: tl.constexpr):  # fmt: skip
        b, h = tl.program_id(0), tl.program_id(1)
        row = b * tl.num_programs(1) + h
        n_pages = tl.load(indptr_ptr + b + 1) - tl.load(indptr_ptr + b)
        share = tl.maximum(tl.cdiv(tl.cdiv(n_pages, SPLITS), PAGES) * PAGES, MIN_SHARE)
        used = tl.cdiv(n_pages, share)  # the splits _partial wrote
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, D)
        lse = tl.load(lse_ptr + row * SPLITS + s, mask=s < used, other=float("-inf"))
        top = tl.max(lse, 0)
        w = tl.exp2(lse - top)
        parts = tl.load(o_ptr + (row * SPLITS + s)[:, None] * D + d[None, :],
                        mask=(s < used)[:, None], other=0.0)  # fmt: skip
        total = tl.sum(w, 0)
        out = tl.sum(parts * w[:, None], 0) / total
        tl.store(out_ptr + b * so_b + h * so_h + d, out.to(out_ptr.dtype.element_ty))
        if WITH_LSE:
            tl.store(lse_out_ptr + row, top + tl.log2(total))

    @triton.jit
    def _append(rows_ptr, key_rows_ptr, value_rows_ptr, k_ptr, v_ptr, D: tl.constexpr):
        r = tl.program_id(0)
        d = tl.arange(0, D)
        key_row = tl.load(key_rows_ptr + r).to(tl.int64)
        value_row = tl.load(value_rows_ptr + r).to(tl.int64)
        tl.store(rows_ptr + key_row * D + d, tl.load(k_ptr + r * D + d))
        tl.store(rows_ptr + value_row * D + d, tl.load(v_ptr + r * D + d))

    return _partial, _merge, _append


def kernels() -> tuple[Any, Any, Any]:
    """The compiled kernels ``(partial, merge, append)``, built on first use."""
    global _kernels
    if _kernels is None:
        _kernels = _build()
    return _kernels


def append_rows(
    rows: torch.Tensor,
    key_rows: torch.Tensor,
    value_rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Write ``k[i]`` to ``rows[key_rows[i]]`` and ``v[i]`` to ``rows[value_rows[i]]``:
    one launch, no host work (a CUDA graph may capture it).

    Args:
        rows: the cache's storage as rows of one head, ``[n_rows, head_dim]``, contiguous.
        key_rows, value_rows: ``[n]`` integer row indices, on the device.
        k, v: ``[n, head_dim]``, contiguous, ``rows``' dtype.
    """
    _append = kernels()[2]
    _append[(k.shape[0],)](rows, key_rows, value_rows, k, v, D=rows.shape[1])


class TritonDecodeBackend:
    """Decode batches by the Triton kernels above; any other batch by ``fallback``.

    Args:
        cache: the paged cache (fp16 or bf16, ``head_dim`` a power of two >= 16).
        num_qo_heads: query heads.
        fallback: the backend for batches that are not decode-only (flashinfer).
        sm_count: the device's multiprocessors (sets how many splits fill it).
    """

    name = "triton"
    # launch settings (benchmarks/tune_triton_decode.py times others in CUDA graphs):
    # pages each loop iteration reads (128 tokens at page 16), programs per
    # multiprocessor the splits aim for, the fewest loop iterations a split runs (shorter
    # rows use fewer splits), Triton's warps and pipeline stages. On an H200 these were
    # within 2-3% of the best of 72 settings on both tuned shapes: 128 single-head rows
    # of lognormal lengths (median 4,096, sigma 1, fp16, head_dim 128): 0.133 ms against
    # flashinfer's 0.15 (10 runs back to back); 64 requests x 8 heads x 640 tokens (bf16,
    # head_dim 64): 0.030 ms against 0.047 (both in CUDA graphs)
    PAGES_PER_BLOCK = 8
    WAVES = 8
    MIN_BLOCKS = 2
    NUM_WARPS = 4
    NUM_STAGES = 2

    def __init__(self, cache: PagedKVCacheManager, num_qo_heads: int, fallback: Any) -> None:
        self.cache = cache
        self.num_qo_heads = num_qo_heads
        self.group = num_qo_heads // cache.num_heads
        self.fallback = fallback
        self.workspace = getattr(fallback, "workspace", None)
        self.sm_count = torch.cuda.get_device_properties(cache.device).multi_processor_count
        self._decode: Optional[tuple[Any, ...]] = None  # indptr, indices, last, splits, scale

    def plan(self, batch: AttentionBatch, q_dtype: torch.dtype) -> None:
        if not batch.decode_only or batch.window_left >= 0 or batch.logits_soft_cap:
            self._decode = None
            self.fallback.plan(batch, q_dtype)
            return
        packed, device = batch.packed, self.cache.device
        indptr = packed.device_indptr
        if indptr is None:
            indptr = packed.kv_page_indptr.to(device, non_blocking=True)
        last = packed.device_last_page_len
        if last is None:
            last = packed.kv_last_page_len.to(device, non_blocking=True)
        indices = packed.kv_page_indices.to(device, non_blocking=True)
        longest = int(batch.kv_lens.max()) if batch.batch_size else 1
        self._decode = (indptr, indices, last, self._splits(batch.batch_size, longest),
                        batch.sm_scale * LOG2E)  # fmt: skip

    def _splits(self, batch_size: int, longest: int) -> int:
        blocks = -(-longest // (self.PAGES_PER_BLOCK * self.cache.page_size))
        return split_count(batch_size * self.cache.num_heads, blocks, self.sm_count)

    def run(
        self, q: torch.Tensor, layer: int, return_lse: bool, out: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self._decode is None:
            return self.fallback.run(q, layer, return_lse, out)  # type: ignore[no-any-return]
        indptr, indices, last, splits, scale = self._decode
        tables = DecodeTables(indptr, indices, last, splits, scale)
        return decode(self.cache, layer, q, tables, out=out, return_lse=return_lse)


@define(slots=True, frozen=True)
class DecodeTables:
    """What the decode kernels read, all on the cache's device.

    Attributes:
        indptr: ``[requests + 1]`` int32 or int64, each request's first entry in ``indices``.
        indices: page ids, int32 or int64 (may run past the requests' last entry).
        last: tokens on each request's last page, ``[requests]``, int32 or int64.
        splits: at most this many programs per (request, KV head), a power of two
            (shorter requests use fewer).
        scale_log2: the softmax scale times log2(e).
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    last: torch.Tensor
    splits: int
    scale_log2: float


def decode(
    cache: PagedKVCacheManager,
    layer: int,
    q: torch.Tensor,
    tables: DecodeTables,
    *,
    out: Optional[torch.Tensor] = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Decode attention of one query per request over ``layer``'s pages: two launches,
    no host work beyond them (so it may be captured in a CUDA graph).

    Args:
        cache: the paged cache (as :func:`check_triton` accepts).
        layer: its layer to read.
        q: ``shape: [requests, num_qo_heads, head_dim]``, the cache's dtype, rows and
            heads with unit stride in ``head_dim``.
        tables: the requests' pages.
        out: optional ``q``-shaped output (``q``'s dtype; any row and head strides).
        return_lse: also return the log-sum-exp (base 2), ``[requests, num_qo_heads]``
            float32.

    Returns:
        ``(out, lse or None)``.
    """
    partial, merge, _ = kernels()
    n, qo_heads, d = q.shape
    heads, splits = cache.num_heads, tables.splits
    group = qo_heads // heads
    pages = TritonDecodeBackend.PAGES_PER_BLOCK
    min_share = pages * TritonDecodeBackend.MIN_BLOCKS
    k, v = cache.kv_pairs[layer]  # [pages, page_size, heads, D] (NHD) or its HND view
    if cache.kv_layout == "HND":  # index by (page, token, head) either way
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    parts = torch.empty(n * qo_heads * splits, d, dtype=torch.float32, device=q.device)
    lse_parts = torch.empty(n * qo_heads * splits, dtype=torch.float32, device=q.device)
    partial[(n, heads, splits)](
        q, k, v, tables.indptr, tables.indices, tables.last, parts, lse_parts,
        tables.scale_log2, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), GROUP=group,
        G_PAD=max(16, 1 << (group - 1).bit_length()), D=d, PS=cache.page_size,
        PAGES=pages, SPLITS=splits, MIN_SHARE=min_share,
        num_warps=TritonDecodeBackend.NUM_WARPS, num_stages=TritonDecodeBackend.NUM_STAGES,
    )  # fmt: skip
    result = torch.empty_like(q) if out is None else out
    lse = torch.empty(n, qo_heads, dtype=torch.float32, device=q.device) if return_lse else parts
    merge[(n, qo_heads)](
        parts, lse_parts, result, lse, tables.indptr, result.stride(0), result.stride(1),
        D=d, PAGES=pages, SPLITS=splits, MIN_SHARE=min_share, WITH_LSE=return_lse,
    )  # fmt: skip
    return result, (lse if return_lse else None)


def split_count(programs: int, blocks: int, sm_count: int) -> int:
    """Splits per (request, KV head): enough for ``WAVES`` programs per multiprocessor
    over ``programs`` (request, KV head) pairs, no more than ``blocks`` (the longest
    request's loop iterations) nor 64; a power of two, so few kernel variants compile."""
    want = min(-(-TritonDecodeBackend.WAVES * sm_count // max(programs, 1)), blocks, 64)
    return 1 << max(0, math.ceil(math.log2(max(want, 1))))
