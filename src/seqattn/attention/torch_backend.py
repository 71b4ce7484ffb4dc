"""Attention over the paged cache in plain torch: the reference, and the CPU default.

Each sequence's pages are gathered into a contiguous ``[kv_len, num_kv_heads,
head_dim]`` block and attended with explicit matmuls, in float64 for float64 queries
and float32 otherwise. Exact up to float rounding; slow on purpose-free code paths.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..storage import PagedKVCacheManager
from .batch import AttentionBatch

LN2 = math.log(2.0)


class TorchAttentionBackend:
    """Gathers pages per sequence and runs the same math as flashinfer's kernels."""

    name = "torch"

    def __init__(self, cache: PagedKVCacheManager, num_qo_heads: int) -> None:
        self.cache = cache
        self.num_qo_heads = num_qo_heads
        self._rows: list[tuple[int, int, int, torch.Tensor]] = []
        self._batch: Optional[AttentionBatch] = None

    def plan(self, batch: AttentionBatch, q_dtype: torch.dtype) -> None:
        del q_dtype  # any float dtype works here
        indices = batch.packed.kv_page_indices.to(self.cache.device).long()
        kv_indptr = batch.packed.kv_page_indptr.tolist()
        qo_indptr = batch.qo_indptr.tolist()
        kv_lens = batch.kv_lens.tolist()
        self._rows = [
            (qo_indptr[b], qo_indptr[b + 1], kv_lens[b], indices[kv_indptr[b] : kv_indptr[b + 1]])
            for b in range(batch.batch_size)
        ]
        self._batch = batch

    def run(
        self, q: torch.Tensor, layer: int, return_lse: bool, out: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        kv_cache = self.cache.get_kv_cache(layer)
        batch = self._batch
        assert batch is not None
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        result = torch.empty_like(q) if out is None else out
        lse = torch.empty(q.shape[:2], dtype=compute, device=q.device) if return_lse else None
        for q_start, q_end, kv_len, pages in self._rows:
            k, v = self._gather(kv_cache, pages, kv_len, compute)
            o, row_lse = attend(q[q_start:q_end].to(compute), k, v, kv_len, batch)
            result[q_start:q_end] = o.to(result.dtype)
            if lse is not None:
                lse[q_start:q_end] = row_lse
        return result, lse

    def merge(
        self, out: torch.Tensor, lse: torch.Tensor, other: torch.Tensor, other_lse: torch.Tensor
    ) -> None:
        """Fold attention over other keys (``other``, ``other_lse``) into ``out``, ``lse``.

        ``out``: ``[n, num_qo_heads, head_dim]``; ``lse``: ``[n, num_qo_heads]``, base 2.
        """
        compute = torch.float64 if out.dtype == torch.float64 else torch.float32
        top = torch.maximum(lse, other_lse)
        mine, theirs = torch.exp2(lse - top), torch.exp2(other_lse - top)
        total = mine + theirs
        merged = out.to(compute) * (mine / total)[..., None].to(compute)
        merged += other.to(compute) * (theirs / total)[..., None].to(compute)
        out.copy_(merged)
        lse.copy_(top + torch.log2(total))

    def _gather(
        self, kv_cache: torch.Tensor, pages: torch.Tensor, kv_len: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one sequence, ``[kv_len, num_kv_heads, head_dim]``, dequantized."""
        cache = self.cache
        kv = kv_cache[pages]  # [n, 2, *inner, head_dim]
        if cache.kv_layout == "HND":
            kv = kv.transpose(2, 3)
        kv = kv.transpose(0, 1).reshape(2, -1, cache.num_heads, cache.head_dim)[:, :kv_len]
        k = kv[0].to(dtype) * cache.k_scale
        v = kv[1].to(dtype) * cache.v_scale
        return k, v


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int, batch: AttentionBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one sequence's queries over its keys.

    Args:
        q: ``[qo_len, num_qo_heads, head_dim]``, the newest ``qo_len`` positions.
        k, v: ``[kv_len, num_kv_heads, head_dim]``.

    Returns:
        ``(out [qo_len, num_qo_heads, head_dim], lse [qo_len, num_qo_heads])``, with the
        log-sum-exp in base 2 as flashinfer returns it.
    """
    qo_len, num_qo_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_qo_heads // num_kv_heads
    qg = q.view(qo_len, num_kv_heads, group, head_dim)
    logits = torch.einsum("qhgd,khd->hgqk", qg, k) * batch.sm_scale
    if batch.logits_soft_cap > 0:
        logits = batch.logits_soft_cap * torch.tanh(logits / batch.logits_soft_cap)
    positions = torch.arange(kv_len - qo_len, kv_len, device=q.device)[:, None]
    keys = torch.arange(kv_len, device=q.device)[None, :]
    visible = torch.ones(qo_len, kv_len, dtype=torch.bool, device=q.device)
    if batch.causal:
        visible &= keys <= positions
    if batch.window_left >= 0:
        visible &= keys >= positions - batch.window_left
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [h, g, q]
    probs = torch.exp(logits - lse[..., None])
    out = torch.einsum("hgqk,khd->qhgd", probs, v).reshape(qo_len, num_qo_heads, head_dim)
    return out, (lse / LN2).permute(2, 0, 1).reshape(qo_len, num_qo_heads)
