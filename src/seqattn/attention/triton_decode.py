"""Paged decode attention in Triton: no host-side plan, so a step's host cost stays flat.

flashinfer's ``plan()`` splits each decode batch's work on the host (about 0.3 ms on an
H200 host). That is cheap once per step, but a head-wise cache has its own page lengths
in every layer, so every layer needs its own plan and the host, not the GPU, sets the
pace. This kernel reads the page table from the device as it is and splits each
request's pages evenly over up to a fixed number of programs ("split-K",
flash-decoding): a decode batch needs no planning at all.

``partial`` gives each (request, KV head, split) the softmax of its query group over
its share of the pages (online softmax, base 2); the splits of a row are then merged
per query head. A split reads at least ``MIN_BLOCKS`` loop iterations of pages, so a
short request uses fewer splits than the grid has, and only those are written and
merged. Where splits are few, one launch does it all (a row of one split writes its
answer, the last split of a row to finish merges it); otherwise ``merge`` is a second
launch (``TritonDecodeBackend.FUSED_MAX_SPLITS``). Given the step's new keys and values,
the program that reads a request's last page writes its token there first: the append
and the attention of a layer are one launch. Launches go through
:class:`~.triton_launch.DirectLaunch`. Decode only (one query per request); other
batches go to flashinfer (:class:`TritonDecodeBackend`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch
from attrs import define

from ..errors import InvalidArgumentError
from ..storage import PagedKVCacheManager
from .batch import AttentionBatch
from .triton_launch import DirectLaunch, next_power_of_2, programmatic

LOG2E = 1.4426950408889634
_kernels: Optional[tuple[DirectLaunch, DirectLaunch, Any]] = None
_sm_counts: dict[int, int] = {}


@functools.cache
def triton_or_none() -> Any:
    """The ``triton`` module, or None where it is not installed (looked up once: the
    fused layers ask per operation)."""
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


def decode_backend(backend: str, window_left: int, cache: PagedKVCacheManager) -> str:
    """The backend a runner's attention over ``cache`` takes, eager steps and CUDA graphs
    alike, under a runner ``backend`` other than ``"torch"`` where flashinfer imports:
    ``"triton"`` (decode steps by the Triton kernel: no host plan, it appends the step's
    tokens in its own launch, faster than flashinfer's on an H200, see
    :class:`TritonDecodeBackend`; other steps by flashinfer) where it serves the cache and
    there is no window, unless ``backend`` is ``"flashinfer"``; ``"flashinfer"`` otherwise."""
    if backend == "flashinfer" or window_left >= 0:
        return "flashinfer"
    try:
        check_triton(cache)
    except InvalidArgumentError:
        return "flashinfer"
    return "triton"


def kernels() -> tuple[DirectLaunch, DirectLaunch, Any]:
    """The kernels ``(partial, merge, append)``, the first two behind their
    :class:`~.triton_launch.DirectLaunch`; imported on first use."""
    global _kernels
    if _kernels is None:
        from . import triton_kernels

        _kernels = (DirectLaunch(triton_kernels.partial), DirectLaunch(triton_kernels.merge),
                    triton_kernels.append)  # fmt: skip
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
    # Where the splits are few (at least one (request, KV head) per multiprocessor), one
    # launch does it all: a row splits only where the batch's pages spread over
    # FUSED_WAVES programs per multiprocessor give it more than one share, a row of one
    # split writes its answer, and the last split of a row to finish merges the row
    # (tables with counters). On an H200 (CUDA graphs, bf16, head_dim 64), 64 requests x
    # 8 heads x 640 tokens took 0.0254 ms against 0.0303 in two launches, x 4,096 tokens
    # 0.131 against 0.137. Many splits merge faster in a launch of their own (4 x 8 heads
    # x 8,192 tokens: 0.025 ms in two launches, 0.028-0.036 in one), so they keep it.
    FUSED_MAX_SPLITS = 8
    FUSED_WAVES = 4

    def __init__(self, cache: PagedKVCacheManager, num_qo_heads: int, fallback: Any) -> None:
        self.cache = cache
        self.num_qo_heads = num_qo_heads
        self.group = num_qo_heads // cache.num_heads
        self.fallback = fallback
        self.workspace = getattr(fallback, "workspace", None)
        self.sm_count = multiprocessors(cache.device)
        self._decode: Optional[DecodeTables] = None
        self._counters = torch.zeros(0, dtype=torch.int32, device=cache.device)
        self._scratch = split_scratch(0, cache.head_dim, cache.device)

    @property
    def decodes(self) -> bool:
        """Whether the planned step runs on the Triton kernel (else on ``fallback``)."""
        return self._decode is not None

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
        rows = batch.batch_size * self.cache.num_heads
        if self._counters.numel() < rows:  # zeros, left zero by every launch
            self._counters = torch.zeros(rows, dtype=torch.int32, device=device)
        splits = self._splits(batch.batch_size, longest)
        parts = batch.batch_size * self.num_qo_heads * splits
        if self._scratch[1].numel() < parts:  # reused by every layer and later steps
            self._scratch = split_scratch(parts, self.cache.head_dim, device)
        self._decode = DecodeTables(indptr, indices, last, splits, batch.sm_scale * LOG2E,
                                    self._counters, self._scratch)  # fmt: skip

    def _splits(self, batch_size: int, longest: int) -> int:
        blocks = -(-longest // (self.PAGES_PER_BLOCK * self.cache.page_size))
        return split_count(batch_size * self.cache.num_heads, blocks, self.sm_count)

    def run(
        self, q: torch.Tensor, layer: int, return_lse: bool, out: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self._decode is None:
            return self.fallback.run(q, layer, return_lse, out)  # type: ignore[no-any-return]
        return decode(self.cache, layer, q, self._decode, out=out, return_lse=return_lse)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
        out: Optional[torch.Tensor],
    ) -> torch.Tensor:  # fmt: skip
        """Append each request's one new token (``k``, ``v``: ``[requests, num_kv_heads,
        head_dim]``, unit stride in ``head_dim``) and attend, in the same launch; for a
        planned decode step (:attr:`decodes`) whose tokens are the requests' newest."""
        assert self._decode is not None, "plan a decode step first"
        return decode(self.cache, layer, q, self._decode, out=out, new_kv=(k, v))[0]


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
        counters: int32 zeros, at least one per (request, KV head), that no other
            launch uses at the same time: with them a batch of few splits runs in one
            launch (see ``TritonDecodeBackend.FUSED_MAX_SPLITS``); without, a second
            launch merges the splits. The kernel leaves them zero.
        scratch: where the splits' results go (:func:`split_scratch` of at least
            requests x query heads x ``splits`` rows), reused by every layer; None: each
            call allocates its own.
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    last: torch.Tensor
    splits: int
    scale_log2: float
    counters: Optional[torch.Tensor] = None
    scratch: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def one_launch(self) -> bool:
        """Whether :func:`decode` merges the splits in the launch that computes them."""
        return self.counters is not None and self.splits <= TritonDecodeBackend.FUSED_MAX_SPLITS


def decode(
    cache: PagedKVCacheManager,
    layer: int,
    q: torch.Tensor,
    tables: DecodeTables,
    *,
    out: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    new_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Decode attention of one query per request over ``layer``'s pages: one or two
    launches, no host work beyond them (so it may be captured in a CUDA graph).

    Args:
        cache: the paged cache (as :func:`check_triton` accepts).
        layer: its layer to read.
        q: ``shape: [requests, num_qo_heads, head_dim]``, the cache's dtype, rows and
            heads with unit stride in ``head_dim``.
        tables: the requests' pages.
        out: optional ``q``-shaped output (``q``'s dtype; any row and head strides).
        return_lse: also return the log-sum-exp (base 2), ``[requests, num_qo_heads]``
            float32.
        new_kv: the step's new keys and values, ``[requests, num_kv_heads, head_dim]``
            each, the cache's dtype, unit stride in ``head_dim``: the launch writes each
            request's at its last position (its newest token, already counted in
            ``tables``) before it reads that page. None: the pages hold them already.

    Returns:
        ``(out, lse or None)``.
    """
    partial, merge, _ = kernels()
    n, qo_heads, d = q.shape
    heads, splits, fused = cache.num_heads, tables.splits, tables.one_launch
    group = qo_heads // heads
    pages = TritonDecodeBackend.PAGES_PER_BLOCK
    min_share = pages * TritonDecodeBackend.MIN_BLOCKS
    counters = tables.counters
    if counters is not None and counters.numel() < n * heads:
        raise InvalidArgumentError(
            f"the decode tables' counters hold {counters.numel()} entries; "
            f"{n} requests x {heads} KV heads need {n * heads}"
        )
    k, v = cache.kv_pairs[layer]
    parts, lse_parts = tables.scratch or split_scratch(n * qo_heads * splits, d, q.device)
    result = torch.empty_like(q) if out is None else out
    lse = torch.empty(n, qo_heads, dtype=torch.float32, device=q.device) if return_lse else parts
    new_k, new_v = (q, q) if new_kv is None else new_kv  # q: a placeholder APPEND never reads
    args = (
        q, k, v, new_k, new_v, tables.indptr, tables.indices, tables.last, parts, lse_parts,
        counters if fused else lse_parts, result, lse, tables.scale_log2, *q.stride()[:2],
        *token_strides(cache, k), *token_strides(cache, v), *result.stride()[:2],
        *new_k.stride()[:2], *new_v.stride()[:2],
    )  # fmt: skip
    programs = TritonDecodeBackend.FUSED_WAVES * multiprocessors(q.device)
    pdl = programmatic(q.device)
    constants = (group, max(16, next_power_of_2(group)), d, cache.page_size, pages,
                 splits, min_share, fused, programs, return_lse, new_kv is not None,
                 pdl)  # fmt: skip
    partial((n, heads, splits), args, constants, num_warps=TritonDecodeBackend.NUM_WARPS,
            num_stages=TritonDecodeBackend.NUM_STAGES, pdl=pdl)  # fmt: skip
    if not fused:
        merge(
            (n, qo_heads, 1),
            (parts, lse_parts, result, lse, tables.indptr, *result.stride()[:2]),
            (d, pages, splits, min_share, return_lse, pdl), num_warps=4, num_stages=3, pdl=pdl,
        )  # fmt: skip
    return result, (lse if return_lse else None)


def appendable(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`decode` can write ``k`` and ``v`` in its launch (``new_kv``): unit
    stride in head_dim; any row and head strides."""
    return k.stride(2) == 1 and v.stride(2) == 1


def split_scratch(
    rows: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Room for ``rows`` split results: ``([rows, head_dim], [rows])``, float32."""
    return (
        torch.empty(rows, head_dim, dtype=torch.float32, device=device),
        torch.empty(rows, dtype=torch.float32, device=device),
    )


def token_strides(cache: PagedKVCacheManager, kv: torch.Tensor) -> tuple[int, int, int]:
    """Strides of one layer's keys or values by (page, token, head) in either layout."""
    page, second, third, _ = kv.stride()
    return (page, second, third) if cache.kv_layout == "NHD" else (page, third, second)


def multiprocessors(device: torch.device) -> int:
    """The multiprocessors of a CUDA ``device`` (asked once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def split_count(programs: int, blocks: int, sm_count: int) -> int:
    """Splits per (request, KV head): enough for ``WAVES`` programs per multiprocessor
    over ``programs`` (request, KV head) pairs, no more than ``blocks`` (the longest
    request's loop iterations) nor 64; a power of two, so few kernel variants compile."""
    want = min(-(-TritonDecodeBackend.WAVES * sm_count // max(programs, 1)), blocks, 64)
    return 1 << max(0, math.ceil(math.log2(max(want, 1))))
