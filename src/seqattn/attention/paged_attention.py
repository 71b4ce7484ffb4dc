"""One object that turns a step into attention output, for every layer: eager or from
CUDA graphs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch

from .._checks import exact_bool, exact_int, one_of, shown
from .._flashinfer import flashinfer_or_none
from ..errors import ArgumentTypeError, InvalidArgumentError, SeqAttnError, TensorSpecError
from ..packed_data import FlashInferPackedData
from ..storage import PagedKVCacheManager
from .batch import AttentionBatch, checked_qo_heads, query_dtype
from .cascade import CascadeSplit, choose_split, run_cascade
from .cuda_graph import GraphBuckets, bucket_sizes, capture
from .flashinfer_backend import FlashInferAttentionBackend, decode_tensor_cores, plan_options
from .torch_backend import TorchAttentionBackend
from .triton_decode import TritonDecodeBackend, appendable, check_triton

BACKENDS = ("auto", "flashinfer", "torch", "triton")
Backend = Union[FlashInferAttentionBackend, TorchAttentionBackend, TritonDecodeBackend]


class PagedAttention:
    """Attention over a :class:`PagedKVCacheManager`: plan once per step, then per layer
    one call that appends the layer's new K/V and attends (:meth:`forward`).

    The same calls run on flashinfer (CUDA) and on plain torch (any device). Prefill,
    chunked prefill over an existing prefix, decode and mixed batches all go through
    one :meth:`plan`; the query tokens of each sequence are its newest tokens. With
    ``cuda_graph_batch_sizes``, a decode step can also be planned into fixed buffers
    (``plan(step, cuda_graph=True)``) and its per-layer calls captured in a CUDA graph
    (:meth:`capture`): the same object, options and append, run another way.

    Args:
        cache: the paged K/V storage (its ``num_heads`` are the KV heads).
        num_qo_heads: query heads; a multiple of the KV heads (GQA/MQA/MHA).
        backend: ``"flashinfer"``, ``"torch"``, or ``"auto"``: flashinfer for a CUDA cache
            when it imports, torch otherwise. ``"triton"``: decode steps by a kernel that
            needs no host-side plan (:mod:`.triton_decode`), the rest by flashinfer.
        workspace_bytes: flashinfer's float workspace (shared by its wrappers).
        workspace: a flashinfer float workspace to use instead of allocating one, e.g.
            another ``PagedAttention``'s (``attention.workspace``): runs on one stream
            never overlap, so many layers or variants can share one.
        decode_use_tensor_cores: force flashinfer's tensor-core decode on or off;
            default: on only for group sizes the CUDA-core kernel lacks.
        cascade_min_saved_tokens: with ``plan(cascade=None)``, cascade attention is used
            when reading shared prefixes once saves at least this many K/V tokens per
            layer (below it, the extra kernels cost more than they save).
        cuda_graph_batch_sizes: the CUDA-graph buckets (flashinfer, or triton without
            cascade groups, a window or a soft cap); a graph step
            of ``B`` sequences runs padded to the smallest bucket ``>= B``. Holds one
            page of the pool (padded rows write there) until :meth:`close`.
        max_pages: most pages one graph step may hold (default: the whole pool).
        cascade_groups: run every graph step as cascade attention with up to this many
            groups of rows sharing leading pages (0: plain decode).

    Example:
        >>> import torch
        >>> from seqattn import CacheDescriptor, PagedKVCacheManager, PagedAttention
        >>> cache = PagedKVCacheManager(16, 4, 2, 8, torch.float32, "cpu", num_layers=1)
        >>> desc, attn = CacheDescriptor(cache), PagedAttention(cache, num_qo_heads=4)
        >>> desc.allocate([0, 1], [5, 3])
        >>> step = desc.pack_for_flashinfer([0, 1], append_lens=[5, 3])
        >>> attn.plan(step)                        # queries: the 5 + 3 appended tokens
        8
        >>> k = v = torch.randn(8, 2, 8)
        >>> attn.forward(torch.randn(8, 4, 8), k, v, layer=0).shape
        torch.Size([8, 4, 8])
    """

    def __init__(
        self,
        cache: PagedKVCacheManager,
        num_qo_heads: int,
        *,
        backend: str = "auto",
        workspace_bytes: int = 128 * 1024 * 1024,
        decode_use_tensor_cores: Optional[bool] = None,
        cascade_min_saved_tokens: int = 8192,
        workspace: Optional[torch.Tensor] = None,
        cuda_graph_batch_sizes: Optional[Sequence[int]] = None,
        max_pages: Optional[int] = None,
        cascade_groups: int = 0,
    ) -> None:
        if not isinstance(cache, PagedKVCacheManager):
            raise ArgumentTypeError(f"cache must be a PagedKVCacheManager, got {shown(cache)}")
        num_qo_heads = checked_qo_heads(num_qo_heads, cache.num_heads)
        one_of(backend, "backend", BACKENDS)
        exact_int(workspace_bytes, "workspace_bytes", low=1)
        exact_bool(decode_use_tensor_cores, "decode_use_tensor_cores", optional=True)
        exact_int(cascade_min_saved_tokens, "cascade_min_saved_tokens", low=0)
        if workspace is not None and not isinstance(workspace, torch.Tensor):
            raise ArgumentTypeError(f"workspace must be None or a tensor, got {shown(workspace)}")
        if backend == "auto":
            usable = cache.device.type == "cuda" and flashinfer_or_none() is not None
            backend = "flashinfer" if usable else "torch"
        buckets = _checked_buckets(cuda_graph_batch_sizes, max_pages, cascade_groups, cache,
                                   backend)  # fmt: skip
        self.cache = cache
        self.num_qo_heads = num_qo_heads
        self.impl = made_backend(backend, cache, num_qo_heads, workspace_bytes,
                                 decode_use_tensor_cores, workspace)  # fmt: skip
        self.graphs: Optional[GraphBuckets] = None
        if buckets is not None:
            cores = decode_tensor_cores(num_qo_heads, cache.num_heads, decode_use_tensor_cores)
            workspace = self.workspace
            assert workspace is not None  # flashinfer's (triton falls back to it)
            self.graphs = GraphBuckets(cache, num_qo_heads, *buckets[:2], workspace, cores,
                                       buckets[2], backend == "triton")  # fmt: skip
        self._shared_impl: Optional[Backend] = None  # the shared level of cascade steps
        self.cascade_min_saved_tokens = cascade_min_saved_tokens
        self.batch: Optional[AttentionBatch] = None
        self.cascade: Optional[CascadeSplit] = None
        self._graph_step = False
        self._append: Optional[tuple[torch.Tensor, ...]] = None  # write_pages' metadata
        self._appending: Optional[TritonDecodeBackend] = None  # appends as it decodes
        self._q_dtype: Optional[torch.dtype] = None
        self._q_shape = torch.Size()

    @property
    def backend(self) -> str:
        """``"flashinfer"``, ``"torch"`` or ``"triton"``."""
        return self.impl.name

    @property
    def workspace(self) -> Optional[torch.Tensor]:
        """flashinfer's float workspace (None on the torch backend)."""
        return getattr(self.impl, "workspace", None)

    def plan(
        self,
        packed: FlashInferPackedData,
        qo_lens: object = None,
        *,
        causal: bool = True,
        sm_scale: Optional[float] = None,
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        q_dtype: Optional[torch.dtype] = None,
        cascade: Optional[bool] = None,
        cuda_graph: bool = False,
    ) -> int:
        """Prepare attention for one step; call once, then :meth:`forward` (or
        :meth:`run`) per layer. Returns the query rows each layer's call takes.

        Args:
            packed: the step, packed after allocating its tokens
                (``CacheDescriptor.pack_for_flashinfer(ids, append_lens, device=...)``).
            qo_lens: query tokens per sequence, ``[batch_size]``; default: the packed
                ``append_lens`` (queries are the tokens this step appends).
            causal: a query sees keys up to its own position.
            sm_scale: default ``1 / sqrt(head_dim)``.
            window_left: keys at most this far left of a query are visible; -1: all.
            logits_soft_cap: ``cap * tanh(logits / cap)`` on the scaled logits; None: off.
            q_dtype: dtype of ``q``; default: the cache's dtype (float16 for fp8).
            cascade: read the pages that rows share at their start once per group
                (cascade attention; same result up to rounding). None: when the batch
                was packed with ``shared_prefix=True`` and it saves at least
                ``cascade_min_saved_tokens``. True: whenever rows share a page (found
                from the page table if it was not packed so; needs it on the host then).
                Not combined with ``window_left``.
            cuda_graph: plan a decode step into its bucket's fixed buffers (needs
                ``cuda_graph_batch_sizes``); each layer's call then takes ``bucket``
                rows, the first ``batch_size`` of them real. Cascade as the
                constructor's ``cascade_groups`` says.
        """
        cache = self.cache
        exact_bool(cascade, "cascade", optional=True)
        cuda_graph = bool(exact_bool(cuda_graph, "cuda_graph"))
        if cuda_graph and self.graphs is None:
            raise InvalidArgumentError("cuda_graph=True needs cuda_graph_batch_sizes")
        q_dtype = query_dtype(q_dtype, cache.dtype)
        batch = AttentionBatch.build(
            packed, cache, qo_lens, causal=causal, sm_scale=sm_scale,
            window_left=window_left, logits_soft_cap=logits_soft_cap,
        )  # fmt: skip
        if self.graphs is not None and cuda_graph:
            rows = self.graphs.plan(batch, plan_options(batch, q_dtype, cache.dtype))
            split = self.graphs.cascade
        else:
            split = choose_split(batch, cascade, cache.page_size, self.cascade_min_saved_tokens)
            split = None if self.impl.name == "triton" else split  # it decodes rows whole
            rows = batch.num_query_tokens
            if split is None:
                self.impl.plan(batch, q_dtype)
            elif split.fused is not None:
                self.impl.plan(split.fused, q_dtype)
            else:
                self.impl.plan(split.suffix, q_dtype)
                self._shared_backend().plan(split.shared, q_dtype)
        # the last plan stayed in force until this one was checked: only now switch
        self.batch, self.cascade, self._q_dtype = batch, split, q_dtype
        nnz = -1 if packed.append_positions is None else packed.append_positions.shape[0]
        self._append = None if nnz < 0 or cuda_graph else cache.append_metadata(packed, None, nnz)
        self._graph_step = cuda_graph
        self._appending = None if cuda_graph else appending_decoder(self.impl, packed)
        self._q_shape = torch.Size((rows, self.num_qo_heads, cache.head_dim))
        return rows

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int = 0, *,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
        """Append one layer's new K/V for the planned step, then attend.

        Args:
            q: ``shape: [rows, num_qo_heads, head_dim]`` (``rows`` as :meth:`plan`
                returned), the planned dtype, on the cache's device.
            k, v: ``shape: [rows, num_kv_heads, head_dim]``, the cache's dtype (or a
                float dtype an fp8 cache quantizes); row ``i`` is the token of query ``i``.
            layer: which layer's pages to write and read.
            out: optional output buffer shaped like ``q``.
        """
        if self.batch is None:
            raise SeqAttnError("call plan() before forward()")
        cache = self.cache
        if type(layer) is not int or not 0 <= layer < cache.num_layers:
            cache.checked_layer(layer)
        self._check_current()
        check_queries(q, out, self._q_shape, self._q_dtype, cache.device)  # before any write
        if self._graph_step:
            assert self.graphs is not None
            return self.graphs.forward(q, k, v, layer, out)
        if self._append is None:
            raise SeqAttnError(
                "forward() appends the step's new tokens: plan a step packed with "
                "append_lens (or call append_kv, then run)"
            )
        cache.check_kv(k, v)  # then the step's append metadata, resolved at plan
        if k.shape[0] != self._append[0].shape[0]:
            raise TensorSpecError(
                f"k and v must hold the step's {self._append[0].shape[0]} new tokens, "
                f"got {k.shape[0]}"
            )
        if self._appending is not None and appendable(k, v):
            return self._appending.forward(q, k, v, layer, out)
        cache.write_pages(layer, k, v, *self._append)
        result = self._attend(q, layer, False, out)
        assert isinstance(result, torch.Tensor)
        return result

    def run(
        self,
        q: torch.Tensor,
        layer: int = 0,
        *,
        return_lse: bool = False,
        out: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attention output of one layer for the planned step (its K/V appended already).

        Args:
            q: ``shape: [rows, num_qo_heads, head_dim]``, the planned dtype, on the
                cache's device; rows grouped by sequence in batch order.
            layer: which layer's pages to read.
            return_lse: also return the log-sum-exp of the logits, in base 2 (as
                flashinfer), ``shape: [rows, num_qo_heads], dtype: float32`` (float64
                for float64 queries on the torch backend); not for CUDA-graph steps.
            out: optional output buffer with the shape, dtype and device of ``q``.

        Returns:
            ``out`` with the shape and dtype of ``q``, or ``(out, lse)``.
        """
        if self.batch is None:
            raise SeqAttnError("call plan() before run()")
        cache = self.cache
        self._check_current()
        if type(layer) is not int or not 0 <= layer < cache.num_layers:
            cache.checked_layer(layer)
        check_queries(q, out, self._q_shape, self._q_dtype, cache.device)
        if type(return_lse) is not bool or (return_lse and self._graph_step):
            exact_bool(return_lse, "return_lse")
            raise InvalidArgumentError("return_lse is not available for a CUDA-graph step")
        return self._attend(q, layer, return_lse, out)

    def _attend(
        self, q: torch.Tensor, layer: int, return_lse: bool, out: Optional[torch.Tensor]
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The planned attention of one layer, after the caller's checks."""
        if self._graph_step:
            assert self.graphs is not None
            return self.graphs.run(q, layer, out)
        if self.cascade is None:
            result, lse = self.impl.run(q, layer, return_lse, out)
        else:
            result, lse = run_cascade((self.impl, self._shared_impl), self.cascade, q, layer, out)
        return (result, lse) if return_lse else result  # type: ignore[return-value]

    def _check_current(self) -> None:
        """Raise StaleBatchError unless the planned step is current (one compare while
        its table did not change)."""
        packed = self.batch.packed  # type: ignore[union-attr]
        stamp = packed.stamp
        if stamp is None or stamp.checked_at != stamp.table.clock:
            packed.check_current(self.cache.allocator, self.cache.num_pages, "run")

    def graph_positions(self) -> torch.Tensor:
        """The planned CUDA-graph bucket's ``[bucket]`` int32 query positions (0 on padding
        rows), rewritten in place by each plan: a graph may read them as position ids."""
        if not self._graph_step or self.graphs is None or self.graphs.bucket is None:
            raise SeqAttnError("graph_positions() follows plan(..., cuda_graph=True)")
        return self.graphs.bucket.query_positions

    def capture(self, step: Callable[[], Any], *, warmup: int = 2) -> torch.cuda.CUDAGraph:
        """Capture ``step`` (this object's :meth:`forward` calls on static tensors, and
        any model code around them) for the planned CUDA-graph bucket; see
        :func:`~seqattn.attention.cuda_graph.capture`."""
        if not self._graph_step:
            raise SeqAttnError("capture() follows plan(..., cuda_graph=True)")
        return capture(step, warmup=warmup)

    def close(self) -> None:
        """Give the CUDA-graph scratch page back to the pool (graphs stop working)."""
        if self.graphs is not None:
            self.graphs.close()

    def _shared_backend(self) -> Backend:
        """The shared level's backend of cascade steps (its own wrappers, one workspace)."""
        impl, cache, heads = self.impl, self.cache, self.num_qo_heads
        if self._shared_impl is None and isinstance(impl, FlashInferAttentionBackend):
            self._shared_impl = FlashInferAttentionBackend(cache, heads, workspace=impl.workspace)
        if self._shared_impl is None:
            self._shared_impl = TorchAttentionBackend(cache, heads)
        return self._shared_impl


def check_queries(
    q: object, out: object, shape: torch.Size, dtype: Optional[torch.dtype], device: torch.device
) -> None:
    """Raise unless ``q`` (and ``out``, unless None) have the planned shape, dtype and
    device, saying how they differ."""
    try:  # the common case in a few attribute reads: this runs per layer per step
        fits = q.shape == shape and q.dtype == dtype and q.device == device  # type: ignore[attr-defined]
        if out is not None:
            fits = fits and out.shape == shape and out.dtype == dtype and out.device == device  # type: ignore[attr-defined]
    except AttributeError:
        fits = False
    if fits:
        return
    for name, t in (("q", q), ("out", out)):
        if t is None and name == "out":
            continue
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {shown(t)}")
        planned = [("shape", list(shape), list(t.shape)), ("dtype", dtype, t.dtype),
                   ("device", device, t.device)]  # fmt: skip
        for what, want, got in planned:
            if want != got:
                raise TensorSpecError(f"{name} must have the planned {what} {want}, got {got}")


def _checked_buckets(
    sizes: object,
    max_pages: object,
    cascade_groups: object,
    cache: PagedKVCacheManager,
    backend: str,
) -> Optional[tuple[list[int], int, int]]:
    """``(sorted distinct bucket sizes, max_pages, cascade_groups)``, or None without
    graphs; graphs need the flashinfer backend, or triton without cascade groups."""
    groups = exact_int(cascade_groups, "cascade_groups", low=0)
    pages = cache.num_pages if max_pages is None else exact_int(max_pages, "max_pages", low=1)
    if sizes is None:
        return None
    checked = bucket_sizes(sizes, "cuda_graph_batch_sizes")
    if backend not in ("flashinfer", "triton") or (backend == "triton" and groups > 0):
        raise InvalidArgumentError(
            "cuda_graph_batch_sizes needs the flashinfer backend, or triton without "
            f"cascade_groups; got backend {backend!r}, cascade_groups {groups}"
        )
    return checked, pages, groups


def made_backend(
    backend: str,
    cache: PagedKVCacheManager,
    num_qo_heads: int,
    workspace_bytes: int,
    decode_use_tensor_cores: Optional[bool],
    workspace: Optional[torch.Tensor],
) -> Backend:
    """The backend object of a resolved ``backend`` name ("auto" decided already)."""
    if backend == "torch":
        return TorchAttentionBackend(cache, num_qo_heads)
    if backend == "triton":
        check_triton(cache)
    impl = FlashInferAttentionBackend(
        cache, num_qo_heads, workspace_bytes=workspace_bytes,
        decode_use_tensor_cores=decode_use_tensor_cores, workspace=workspace,
    )  # fmt: skip
    # triton: decode steps by Triton, the rest by flashinfer
    return TritonDecodeBackend(cache, num_qo_heads, impl) if backend == "triton" else impl


def appending_decoder(impl: Backend, packed: FlashInferPackedData) -> Optional[TritonDecodeBackend]:
    """``impl`` where its planned step is a Triton decode of each sequence's one new token,
    which the kernel writes in the launch that attends; else None."""
    if isinstance(impl, TritonDecodeBackend) and impl.decodes and newest_token_each(packed):
        return impl
    return None


def newest_token_each(packed: FlashInferPackedData) -> bool:
    """Whether ``packed`` appends one token to each of its sequences (so at its end)."""
    indptr = packed.append_indptr
    if indptr is None or indptr.shape[0] != packed.kv_page_indptr.shape[0]:
        return False
    return bool(np.array_equal(indptr.numpy(), np.arange(indptr.shape[0])))
