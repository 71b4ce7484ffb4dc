"""Attention over head-wise caches: a batch of single-KV-head sequences per layer.

Each (sequence, KV head) of a :class:`HeadwiseBatch` is one request of ``group =
num_qo_heads // num_kv_heads`` query heads over one KV head, run by
:class:`PagedAttention` (flashinfer on CUDA, torch elsewhere). Each layer's heads hold
their own pages, so each layer gets its own ``PagedAttention``; ``plan_step`` plans
them all once per step, before the forward pass, which then only runs kernels.

Causal masking needs no positions: flashinfer aligns the mask bottom-right, so query
``i`` of a request with ``qo_len`` queries over a head holding ``n`` tokens sees the
head's tokens ``0 .. n - qo_len + i``. The queries are the tokens just appended, which
every head holds last, and every token a compressed head kept precedes them; so the
visible tokens are exactly the kept tokens at positions up to the query's own. (A
sliding window, by contrast, counts tokens, not positions: it is not offered here.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch

from .._checks import int_array, shown
from .._transfer import upload
from ..attention import PagedAttention
from ..attention.batch import checked_qo_heads
from ..errors import ArgumentTypeError, InvalidLengthError, SeqAttnError, TensorSpecError
from .batch import HeadRows, HeadwiseBatch, HeadwiseStep, head_rows, row_order
from .cache import HeadwiseKVCache


class HeadwiseAttention:
    """Plan every layer once per step, run per layer, on a :class:`HeadwiseKVCache`.

    Args:
        cache: the head-wise cache.
        num_qo_heads: query heads of the model, a multiple of ``cache.num_kv_heads``.
        backend: ``"flashinfer"``, ``"torch"`` or ``"auto"`` (see :class:`PagedAttention`).
        workspace_bytes: flashinfer's float workspace, one for all layers.
        decode_use_tensor_cores: force flashinfer's tensor-core decode kernel on or off
            for decode steps (default: as :class:`PagedAttention` decides for the group
            size ``num_qo_heads // num_kv_heads``).

    Example (a decode step over every layer; :class:`HeadwiseKVCache` has more):
        >>> import torch
        >>> cache = HeadwiseKVCache(32, 4, num_layers=2, num_kv_heads=2, head_dim=8,
        ...                         dtype=torch.float32, device="cpu")
        >>> attn = HeadwiseAttention(cache, num_qo_heads=4, backend="torch")
        >>> cache.add_sequences([0, 1])
        >>> step = cache.begin_step([0, 1])       # one token each, in every layer
        >>> attn.plan_step(step)
        >>> for layer in range(2):
        ...     cache.write(step, layer, torch.randn(2, 2, 8), torch.randn(2, 2, 8))
        ...     out, lse = attn.run(torch.randn(2, 4, 8), layer, return_lse=True)
        >>> out.shape, lse.shape  # [nnz, num_qo_heads, head_dim], [nnz, num_qo_heads]
        (torch.Size([2, 4, 8]), torch.Size([2, 4]))
    """

    def __init__(
        self,
        cache: HeadwiseKVCache,
        num_qo_heads: int,
        *,
        backend: str = "auto",
        workspace_bytes: int = 128 * 1024 * 1024,
        decode_use_tensor_cores: Optional[bool] = None,
    ) -> None:
        if not isinstance(cache, HeadwiseKVCache):
            raise ArgumentTypeError(f"cache must be a HeadwiseKVCache, got {shown(cache)}")
        heads = cache.num_kv_heads
        self.cache = cache
        self.num_qo_heads = checked_qo_heads(num_qo_heads, heads)
        self.group = self.num_qo_heads // heads
        self._options: dict[str, Any] = dict(
            backend=backend,
            workspace_bytes=workspace_bytes,
            decode_use_tensor_cores=decode_use_tensor_cores,
        )
        self._layers: dict[int, PagedAttention] = {}
        # per planned layer: the query rows, the cache version planned at, q's shape
        self._planned: dict[int, tuple[HeadRows, int, torch.Size]] = {}
        self.layer_attention(0)  # resolves the backend (and fails early if unusable)

    @property
    def backend(self) -> str:
        """``"flashinfer"`` or ``"torch"``."""
        return self._layers[0].backend

    def layer_attention(self, layer: int) -> PagedAttention:
        """The :class:`PagedAttention` that serves one layer (made on first use)."""
        layer = self.cache.checked_layer(layer)
        attention = self._layers.get(layer)
        if attention is None:
            # every layer reads the same single-head storage; its own plan picks its pages.
            # Layers run one after another, so they share one flashinfer workspace.
            first = next(iter(self._layers.values()), None)
            workspace = None if first is None else first.workspace
            attention = PagedAttention(
                self.cache.storage, self.group, workspace=workspace, **self._options
            )
            self._layers[int(layer)] = attention
        return attention

    def plan(
        self,
        batch: HeadwiseBatch,
        qo_lens: Optional[object] = None,
        *,
        causal: bool = True,
        sm_scale: Optional[float] = None,
        logits_soft_cap: Optional[float] = None,
        q_dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Prepare ``batch.layer``'s attention for this step (after its append).

        Args:
            batch: from :meth:`HeadwiseKVCache.append` (or ``pack``) for this layer.
            qo_lens: query tokens per sequence, ``[batch_size]``, each in ``[1, appended]``
                (queries are the newest tokens, which every head holds); default:
                ``batch.append_lens``.
            causal, sm_scale, logits_soft_cap, q_dtype: as :meth:`PagedAttention.plan`.

        Raises:
            InvalidLengthError: bad ``qo_lens`` (or a sequence without query tokens).
            SeqAttnError: a stale batch (its layer changed since) or another cache's.
        """
        if not isinstance(batch, HeadwiseBatch):
            raise TensorSpecError(f"batch must be a HeadwiseBatch, got {type(batch).__name__}")
        options = dict(
            causal=causal, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, q_dtype=q_dtype
        )
        self._plan((batch,), qo_lens, options)

    def plan_step(
        self,
        step: HeadwiseStep,
        qo_lens: Optional[object] = None,
        *,
        causal: bool = True,
        sm_scale: Optional[float] = None,
        logits_soft_cap: Optional[float] = None,
        q_dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Prepare every layer's attention for a step from :meth:`HeadwiseKVCache.begin_step`.

        Call it once per step, before the forward pass; then :meth:`run` each layer
        after its :meth:`HeadwiseKVCache.write`. Arguments as :meth:`plan`.
        """
        if not isinstance(step, HeadwiseStep):
            raise TensorSpecError(f"step must be a HeadwiseStep, got {type(step).__name__}")
        options = dict(
            causal=causal, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, q_dtype=q_dtype
        )
        self._plan(step.batches, qo_lens, options)

    def run(
        self,
        q: torch.Tensor,
        layer: int,
        *,
        return_lse: bool = False,
        out: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attention output of one planned layer.

        In a decode step queries and output map to the kernel's rows as views: nothing
        is copied, and with ``out`` the kernel writes straight into it.

        Args:
            q: ``shape: [nnz, num_qo_heads, head_dim]``, the planned dtype, on the cache's
                device; rows grouped by sequence in batch order (the model's layout).
            layer: a layer planned in this step.
            return_lse: also return the log-sum-exp of the logits in base 2,
                ``shape: [nnz, num_qo_heads], dtype: torch.float32``.
            out: optional contiguous output buffer shaped, typed and placed like ``q``.

        Returns:
            ``out`` (shape and dtype of ``q``), or ``(out, lse)``.

        Raises:
            SeqAttnError: the layer was not planned, changed since it was planned, or
                its step's K/V are not written yet.
            TensorSpecError: a bad ``q`` or ``out``.
        """
        layer = self.cache.checked_layer(layer)
        rows = self._current_rows(layer)
        self._check_q_out(q, out, self._planned[layer][2])
        direct = out is not None and rows.is_view  # the kernel writes into out itself
        kernel_out = rows.to_rows(out) if direct else None  # type: ignore[arg-type]
        result = self._layers[layer].run(rows.to_rows(q), 0, return_lse=return_lse, out=kernel_out)
        o, lse = result if return_lse else (result, None)
        o = out if direct else rows.from_rows(o, out)  # type: ignore[arg-type]
        if lse is None:
            return o  # type: ignore[return-value]
        return o, rows.from_rows(lse)  # type: ignore[return-value]

    def _current_rows(self, layer: int) -> HeadRows:
        """The query rows ``layer`` was planned with, if the plan is current (SeqAttnError)."""
        planned = self._planned.get(layer)
        if planned is None:
            raise SeqAttnError(
                f"plan layer {layer} (HeadwiseAttention.plan or plan_step) before run()"
            )
        rows, version, _ = planned
        self.cache.check_written(layer)
        if version != self.cache.versions[layer]:
            raise SeqAttnError(
                f"layer {layer} changed after it was planned (append, compress, "
                "truncate_head or release): plan it again"
            )
        return rows

    @staticmethod
    def _check_q_out(q: torch.Tensor, out: Optional[torch.Tensor], shape: torch.Size) -> None:
        """Raise ArgumentTypeError or TensorSpecError unless ``q`` has the planned ``shape``
        and ``out`` (if given) is contiguous and shaped, typed and placed like ``q``."""
        if not isinstance(q, torch.Tensor):
            raise ArgumentTypeError(f"q must be a torch.Tensor, got {shown(q)}")
        if q.shape != shape:
            raise TensorSpecError(f"q must have shape {list(shape)}, got {list(q.shape)}")
        if out is not None and not (
            out.shape == shape
            and out.dtype == q.dtype
            and out.device == q.device
            and out.is_contiguous()
        ):
            raise TensorSpecError(
                f"out must be contiguous, shaped {list(shape)} and match q's dtype {q.dtype} "
                f"and device {q.device}; got {list(out.shape)}, {out.dtype}, {out.device}"
            )

    def _plan(
        self, batches: Sequence[HeadwiseBatch], qo_lens: Optional[object], options: dict
    ) -> None:
        cache = self.cache
        for batch in batches:
            if batch.owner is not cache:
                raise SeqAttnError("this batch was packed by another HeadwiseKVCache")
            if batch.version != cache.versions[batch.layer]:
                raise SeqAttnError(
                    f"the batch of layer {batch.layer} is stale: the layer changed after it "
                    "was packed (append, compress, truncate_head or release)"
                )
        rows, per_head = self._queries(batches[0], qo_lens)
        shape = torch.Size((rows.num_tokens, self.num_qo_heads, cache.head_dim))
        for batch in batches:
            self.layer_attention(batch.layer).plan(batch.packed, per_head, **options)
            self._planned[batch.layer] = (rows, batch.version, shape)

    def _queries(
        self, batch: HeadwiseBatch, qo_lens: Optional[object]
    ) -> tuple[HeadRows, Optional[np.ndarray]]:
        """The query rows, and the query tokens per request (None: the appended ones)."""
        if qo_lens is not None:
            lens = self._query_lens(qo_lens, batch.append_lens)
            return self._query_rows(lens), np.repeat(lens, self.cache.num_kv_heads)
        if batch.append_lens.size and batch.append_lens.min() == 0:
            appended = batch.append_lens.tolist()
            missing = [s for s, n in zip(batch.seq_ids, appended, strict=True) if n == 0]
            raise InvalidLengthError(
                f"sequences {missing[:8]} append no token in this step, so have no query: "
                "leave them out of the batch to attend"
            )
        return batch.rows, None

    def _query_lens(self, qo_lens: object, append_lens: np.ndarray) -> np.ndarray:
        lens = int_array(qo_lens, "qo_lens", error=InvalidLengthError)
        if lens.shape != append_lens.shape or (
            lens.size and (lens.min() < 1 or (lens > append_lens).any())
        ):
            raise InvalidLengthError(
                f"qo_lens must be {append_lens.size} integers (one per sequence), each in "
                f"[1, tokens appended] = [1, {append_lens.tolist()[:8]}]: the queries are "
                f"the newest tokens, which every head holds; got {lens.tolist()!r:.80}"
            )
        return lens.astype(np.int64)

    def _query_rows(self, lens: np.ndarray) -> HeadRows:
        heads = self.cache.num_kv_heads
        order = row_order(lens, heads)
        if order is None:
            return head_rows(lens, heads)
        device = self.cache.device
        if device.type == "cuda":
            gather, scatter = upload(device, list(order), [])[0]
        else:
            gather, scatter = torch.from_numpy(order[0]), torch.from_numpy(order[1])
        return head_rows(lens, heads, (gather, scatter))
