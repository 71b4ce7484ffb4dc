"""One object that turns a packed batch into attention output, for every layer."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .._checks import exact_bool, exact_int, one_of, shown
from .._flashinfer import flashinfer_or_none
from ..errors import ArgumentTypeError, SeqAttnError, TensorSpecError
from ..packed_data import FlashInferPackedData
from ..shared_prefix import SharedPrefix, find_shared_prefixes
from ..storage import PagedKVCacheManager
from .batch import AttentionBatch, checked_qo_heads, query_dtype
from .cascade import CascadeSplit, QueryRows, split_for_cascade
from .flashinfer_backend import FlashInferAttentionBackend
from .torch_backend import TorchAttentionBackend

BACKENDS = ("auto", "flashinfer", "torch")
Backend = Union[FlashInferAttentionBackend, TorchAttentionBackend]


class PagedAttention:
    """Attention over a :class:`PagedKVCacheManager`: plan once per step, run per layer.

    The same calls run on flashinfer (CUDA) and on plain torch (any device). Prefill,
    chunked prefill over an existing prefix, decode and mixed batches all go through
    one :meth:`plan`; the query tokens of each sequence are its newest tokens.

    Args:
        cache: the paged K/V storage (its ``num_heads`` are the KV heads).
        num_qo_heads: query heads; a multiple of the KV heads (GQA/MQA/MHA).
        backend: ``"flashinfer"``, ``"torch"``, or ``"auto"``: flashinfer for a CUDA cache
            when it imports, torch otherwise.
        workspace_bytes: flashinfer's float workspace (shared by its wrappers).
        workspace: a flashinfer float workspace to use instead of allocating one, e.g.
            another ``PagedAttention``'s (``attention.workspace``): runs on one stream
            never overlap, so many layers or variants can share one.
        decode_use_tensor_cores: force flashinfer's tensor-core decode on or off;
            default: on only for group sizes the CUDA-core kernel lacks.
        cascade_min_saved_tokens: with ``plan(cascade=None)``, cascade attention is used
            when reading shared prefixes once saves at least this many K/V tokens per
            layer (below it, the extra kernels cost more than they save).

    Example:
        >>> import torch
        >>> from seqattn import CacheDescriptor, PagedKVCacheManager, PagedAttention
        >>> cache = PagedKVCacheManager(16, 4, 2, 8, torch.float32, "cpu", num_layers=1)
        >>> desc, attn = CacheDescriptor(cache), PagedAttention(cache, num_qo_heads=4)
        >>> desc.allocate([0, 1], [5, 3])
        >>> packed = desc.pack_for_flashinfer([0, 1], append_lens=[5, 3])
        >>> k = v = torch.randn(8, 2, 8)
        >>> cache.append_kv(k, v, packed)
        >>> attn.plan(packed)                      # queries: the 5 + 3 appended tokens
        >>> attn.run(torch.randn(8, 4, 8), layer=0).shape
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
        self.cache = cache
        self.num_qo_heads = num_qo_heads
        if backend == "auto":
            usable = cache.device.type == "cuda" and flashinfer_or_none() is not None
            backend = "flashinfer" if usable else "torch"
        self.impl: Backend
        if backend == "flashinfer":
            self.impl = FlashInferAttentionBackend(
                cache, num_qo_heads,
                workspace_bytes=workspace_bytes,
                decode_use_tensor_cores=decode_use_tensor_cores,
                workspace=workspace,
            )  # fmt: skip
        else:
            self.impl = TorchAttentionBackend(cache, num_qo_heads)
        self._shared_impl: Optional[Backend] = None  # the shared level of cascade steps
        self.cascade_min_saved_tokens = cascade_min_saved_tokens
        self.batch: Optional[AttentionBatch] = None
        self.cascade: Optional[CascadeSplit] = None
        self._q_dtype: Optional[torch.dtype] = None
        self._q_shape = torch.Size()

    @property
    def backend(self) -> str:
        """``"flashinfer"`` or ``"torch"``."""
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
    ) -> None:
        """Prepare attention for one step's batch; call once, then :meth:`run` per layer.

        Args:
            packed: the batch's page table, packed after allocating this step's tokens
                (``CacheDescriptor.pack_for_flashinfer(ids, append_lens, device=...)``).
            qo_lens: query tokens per sequence, ``[batch_size]``; default: the packed
                ``append_lens`` (queries are the tokens this step appends).
            causal: a query sees keys up to its own position.
            sm_scale: default ``1 / sqrt(head_dim)``.
            window_left: keys at most this far left of a query are visible; -1: all.
            logits_soft_cap: ``cap * tanh(logits / cap)`` on the scaled logits; None: off.
            q_dtype: dtype of ``q`` in :meth:`run`; default: the cache's dtype (for an
                fp8 cache, float16).
            cascade: read the pages that rows share at their start once per group
                (cascade attention; same result up to rounding). None: when the batch
                was packed with ``shared_prefix=True`` and it saves at least
                ``cascade_min_saved_tokens``. True: whenever rows share a page (found
                from the page table if it was not packed so; needs it on the host then).
                Not combined with ``window_left``.
        """
        cache = self.cache
        exact_bool(cascade, "cascade", optional=True)
        q_dtype = query_dtype(q_dtype, cache.dtype)
        batch = AttentionBatch.build(
            packed, cache, qo_lens, causal=causal, sm_scale=sm_scale,
            window_left=window_left, logits_soft_cap=logits_soft_cap,
        )  # fmt: skip
        split = self._split(batch, cascade)
        # the last plan stays in force until this one is checked: only now switch
        self.batch, self.cascade, self._q_dtype = batch, split, q_dtype
        self._q_shape = torch.Size((batch.num_query_tokens, self.num_qo_heads, cache.head_dim))
        if split is None:
            self.impl.plan(batch, q_dtype)
        elif split.fused is not None:
            self.impl.plan(split.fused, q_dtype)
        else:
            self.impl.plan(split.suffix, q_dtype)
            self._shared_backend().plan(split.shared, q_dtype)

    def run(
        self,
        q: torch.Tensor,
        layer: int = 0,
        *,
        return_lse: bool = False,
        out: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attention output of one layer for the planned batch.

        Args:
            q: ``shape: [num_query_tokens, num_qo_heads, head_dim]``, the planned dtype,
                on the cache's device; rows grouped by sequence in batch order.
            layer: which layer's pages to read (append its K/V first).
            return_lse: also return the log-sum-exp of the logits, in base 2 (as
                flashinfer), ``shape: [num_query_tokens, num_qo_heads], dtype: float32``
                (float64 for float64 queries on the torch backend).
            out: optional output buffer with the shape, dtype and device of ``q``.

        Returns:
            ``out`` with the shape and dtype of ``q``, or ``(out, lse)``.
        """
        if self.batch is None:
            raise SeqAttnError("call plan() before run()")
        cache = self.cache
        stamp = self.batch.packed.stamp  # current unless the table changed since (one compare)
        if stamp is None or stamp.checked_at != stamp.table.clock:
            self.batch.packed.check_current(cache.allocator, cache.num_pages, "run")
        if type(layer) is not int or not 0 <= layer < cache.num_layers:
            cache.checked_layer(layer)
        try:  # the common case in a few attribute reads: this runs per layer per step
            shape, dtype, device = self._q_shape, self._q_dtype, cache.device
            fits = q.shape == shape and q.dtype == dtype and q.device == device
            if out is not None:
                fits = fits and out.shape == shape and out.dtype == dtype and out.device == device
        except AttributeError:
            fits = False
        if not fits:
            self._explain("q", q)
            self._explain("out", out)
        if type(return_lse) is not bool:
            exact_bool(return_lse, "return_lse")
        if self.cascade is None:
            result, lse = self.impl.run(q, layer, return_lse, out)
        else:
            result, lse = self._run_cascade(q, layer, out)
        return (result, lse) if return_lse else result  # type: ignore[return-value]

    def _run_cascade(
        self, q: torch.Tensor, layer: int, out: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        split = self.cascade
        assert split is not None
        rows = split.query_rows
        shared_q = q[rows] if isinstance(rows, slice) else q.index_select(0, rows)
        if split.fused is not None:  # one batch: the rows' suffixes, then the groups
            both, both_lse = self.impl.run(torch.cat([q, shared_q]), layer, True, None)
            assert both_lse is not None
            n = q.shape[0]
            result, lse = both[:n], both_lse[:n]
            shared, shared_lse = both[n:], both_lse[n:]
        else:
            assert self._shared_impl is not None
            result, lse = self.impl.run(q, layer, True, out)  # type: ignore[assignment]
            shared, shared_lse = self._shared_impl.run(shared_q, layer, True, None)  # type: ignore[assignment]
        self._merge_rows(result, lse, shared, shared_lse, rows)
        if out is not None and out.data_ptr() != result.data_ptr():
            result = out.copy_(result)
        return result, lse

    def _merge_rows(
        self,
        result: torch.Tensor,
        lse: torch.Tensor,
        shared: torch.Tensor,
        shared_lse: torch.Tensor,
        rows: QueryRows,
    ) -> None:
        """Fold the shared level's output into the query rows it covers, in place."""
        if isinstance(rows, slice):
            self.impl.merge(result[rows], lse[rows], shared, shared_lse)
        else:
            picked, picked_lse = result.index_select(0, rows), lse.index_select(0, rows)
            self.impl.merge(picked, picked_lse, shared, shared_lse)
            result.index_copy_(0, rows, picked)
            lse.index_copy_(0, rows, picked_lse)

    def _split(self, batch: AttentionBatch, cascade: Optional[bool]) -> Optional[CascadeSplit]:
        if cascade is False or (cascade is None and batch.packed.shared_prefix is None):
            return None
        if batch.window_left >= 0:
            if cascade:
                raise SeqAttnError("cascade attention does not combine with window_left")
            return None
        prefix = batch.packed.shared_prefix or self._find_shared_prefix(batch)
        least = 1 if cascade else self.cascade_min_saved_tokens
        return split_for_cascade(batch, prefix, self.cache.page_size, least)

    def _find_shared_prefix(self, batch: AttentionBatch) -> SharedPrefix:
        packed = batch.packed
        if packed.kv_page_indices.device.type != "cpu":
            raise SeqAttnError(
                "cascade=True needs the batch packed with shared_prefix=True "
                "(or its kv_page_indices on the host)"
            )
        indptr = packed.kv_page_indptr.cpu().numpy()
        full = batch.kv_lens // self.cache.page_size
        return find_shared_prefixes(packed.kv_page_indices.numpy(), indptr[:-1], full)

    def _shared_backend(self) -> Backend:
        if self._shared_impl is None:
            impl = self.impl
            if isinstance(impl, FlashInferAttentionBackend):
                self._shared_impl = FlashInferAttentionBackend(
                    self.cache, self.num_qo_heads, workspace=impl.workspace
                )
            else:
                self._shared_impl = TorchAttentionBackend(self.cache, self.num_qo_heads)
        return self._shared_impl

    def _explain(self, name: str, t: Optional[torch.Tensor]) -> None:
        """Raise saying how ``t`` differs from what was planned (nothing for a fitting
        tensor, or no ``out``)."""
        if t is None and name == "out":
            return
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {shown(t)}")
        if t.shape != self._q_shape:
            raise TensorSpecError(
                f"{name} must have shape {list(self._q_shape)}, got {list(t.shape)}"
            )
        if t.dtype != self._q_dtype:
            raise TensorSpecError(
                f"{name} must have the planned dtype {self._q_dtype}, got {t.dtype}"
            )
        if t.device != self.cache.device:
            raise TensorSpecError(f"{name} must be on {self.cache.device}, got {t.device}")
