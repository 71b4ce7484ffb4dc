"""Attention over head-wise caches: a batch of single-KV-head sequences per layer.

Each (sequence, KV head) of a :class:`HeadwiseBatch` is one request of ``group =
num_qo_heads // num_kv_heads`` query heads over one KV head, run by
:class:`PagedAttention` (flashinfer on CUDA, torch elsewhere). Layers have different
page tables, so each layer gets its own ``PagedAttention`` and is planned once per step.

Causal masking needs no positions: flashinfer aligns the mask bottom-right, so query
``i`` of a request with ``qo_len`` queries over a head holding ``n`` tokens sees the
head's tokens ``0 .. n - qo_len + i``. The queries are the tokens just appended, which
every head holds last, and every token a compressed head kept precedes them; so the
visible tokens are exactly the kept tokens at positions up to the query's own. (A
sliding window, by contrast, counts tokens, not positions: it is not offered here.)
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from ..attention import PagedAttention
from ..errors import InvalidLengthError, SeqAttnError, TensorSpecError
from .batch import HeadwiseBatch, from_head_major, to_head_major
from .cache import HeadwiseKVCache


class HeadwiseAttention:
    """Plan once per layer per step, run per layer, on a :class:`HeadwiseKVCache`.

    Args:
        cache: the head-wise cache.
        num_qo_heads: query heads of the model, a multiple of ``cache.num_kv_heads``.
        backend: ``"flashinfer"``, ``"torch"`` or ``"auto"`` (see :class:`PagedAttention`).
        workspace_bytes: flashinfer's float workspace of each layer's ``PagedAttention``.

    See :class:`HeadwiseKVCache` for an example.
    """

    def __init__(
        self,
        cache: HeadwiseKVCache,
        num_qo_heads: int,
        *,
        backend: str = "auto",
        workspace_bytes: int = 128 * 1024 * 1024,
    ) -> None:
        heads = cache.num_kv_heads
        if num_qo_heads <= 0 or num_qo_heads % heads:
            raise TensorSpecError(
                f"num_qo_heads must be a positive multiple of the {heads} KV heads, "
                f"got {num_qo_heads}"
            )
        self.cache = cache
        self.num_qo_heads = int(num_qo_heads)
        self.group = self.num_qo_heads // heads
        self._options = dict(backend=backend, workspace_bytes=workspace_bytes)
        self._layers: dict[int, PagedAttention] = {}
        self._num_queries: dict[int, int] = {}  # per planned layer: query tokens (nnz)
        self._layer_attention(0)  # resolves the backend (and fails early if unusable)

    @property
    def backend(self) -> str:
        """``"flashinfer"`` or ``"torch"``."""
        return self._layers[0].backend

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
            qo_lens: query tokens per sequence, ``[batch_size]``, each at most the tokens
                appended (they are the newest); default: ``batch.append_lens``.
            causal, sm_scale, logits_soft_cap, q_dtype: as :meth:`PagedAttention.plan`.
        """
        per_head = None
        if qo_lens is not None:
            lens = np.asarray(qo_lens.tolist() if hasattr(qo_lens, "tolist") else qo_lens)
            if lens.shape != (batch.batch_size,) or not np.issubdtype(lens.dtype, np.integer):
                raise InvalidLengthError(
                    f"qo_lens must be {batch.batch_size} integers (one per sequence), "
                    f"got {lens.tolist()!r:.80}"
                )
            per_head = np.tile(lens, self.cache.num_kv_heads)
        attention = self._layer_attention(batch.layer)
        attention.plan(
            batch.packed, per_head,
            causal=causal, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, q_dtype=q_dtype,
        )  # fmt: skip
        assert attention.batch is not None
        self._num_queries[batch.layer] = attention.batch.num_query_tokens // batch.num_kv_heads

    def run(
        self,
        q: torch.Tensor,
        layer: int,
        *,
        return_lse: bool = False,
        out: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attention output of one planned layer.

        Args:
            q: ``shape: [nnz, num_qo_heads, head_dim]``, the planned dtype, on the cache's
                device; rows grouped by sequence in batch order (the model's layout).
            layer: a layer planned in this step.
            return_lse: also return the log-sum-exp of the logits in base 2,
                ``shape: [nnz, num_qo_heads], dtype: torch.float32``.
            out: optional output buffer shaped, typed and placed like ``q``.

        Returns:
            ``out`` (shape and dtype of ``q``), or ``(out, lse)``.
        """
        nnz = self._num_queries.get(layer)
        if nnz is None:
            raise SeqAttnError(f"plan layer {layer} (HeadwiseAttention.plan) before run()")
        expected = (nnz, self.num_qo_heads, self.cache.head_dim)
        for name, t in (("q", q), ("out", out)):
            if t is not None and tuple(t.shape) != expected:
                raise TensorSpecError(
                    f"{name} must have shape {list(expected)}, got {list(t.shape)}"
                )
        if out is not None and (out.dtype != q.dtype or out.device != q.device):
            raise TensorSpecError(f"out must match q's dtype {q.dtype} and device {q.device}")
        heads = self.cache.num_kv_heads
        result = self._layers[layer].run(to_head_major(q, heads), 0, return_lse=return_lse)
        if return_lse:
            o, lse = result
            return from_head_major(o, heads, out), from_head_major(lse, heads)
        return from_head_major(result, heads, out)  # type: ignore[arg-type]

    def _layer_attention(self, layer: int) -> PagedAttention:
        attention = self._layers.get(layer)
        if attention is None:
            # every layer reads the same single-head storage; its own plan picks its pages
            attention = PagedAttention(self.cache.storage, self.group, **self._options)  # type: ignore[arg-type]
            self._layers[layer] = attention
        return attention
