"""Attention over the paged cache in plain torch: the reference, and the CPU default.

Pages are gathered into contiguous ``[keys, num_kv_heads, head_dim]`` blocks and
attended with explicit matmuls, in float64 for float64 queries and float32 otherwise:
exact up to float rounding. A decode batch (one query per sequence) is attended at
once, its sequences padded to the longest, and the padding masked; other batches
sequence by sequence (padding them would hold ``queries x keys`` logits per sequence).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

from ..storage import PagedKVCacheManager
from .batch import AttentionBatch

LN2 = math.log(2.0)


class TorchAttentionBackend:
    """Gathers pages and runs the same math as flashinfer's kernels."""

    name = "torch"

    def __init__(self, cache: PagedKVCacheManager, num_qo_heads: int) -> None:
        self.cache = cache
        self.num_qo_heads = num_qo_heads
        # (query rows, pages [n, max_pages], visible [n, qo_len, max_pages * page_size]):
        # n sequences attended at once; rows: a slice of q, or n row indices
        self._rows: list[tuple[Union[slice, torch.Tensor], torch.Tensor, torch.Tensor]] = []
        self._batch: Optional[AttentionBatch] = None

    def plan(self, batch: AttentionBatch, q_dtype: torch.dtype) -> None:
        del q_dtype  # any float dtype works here
        indices = batch.packed.kv_page_indices.to(self.cache.device).long()
        kv_indptr = batch.packed.kv_page_indptr.cpu().numpy().astype(np.int64)
        starts, counts = kv_indptr[:-1], np.diff(kv_indptr)
        keys_per_page = self.cache.page_size
        self._rows = []
        if batch.decode_only:  # one query per sequence: groups of them at once
            kv_lens = batch.kv_lens.astype(np.int64)
            for group in decode_groups(counts):
                pages = padded_pages(indices, starts[group], counts[group])
                lens = torch.from_numpy(kv_lens[group]).to(indices.device)[:, None, None]
                visible = visible_keys(lens - 1, lens, pages.shape[1] * keys_per_page, batch)
                whole = len(group) == batch.batch_size  # then in batch order: a slice
                rows = slice(None) if whole else torch.from_numpy(group).to(indices.device)
                self._rows.append((rows, pages, visible))
        else:
            qo_indptr, kv_lens = batch.qo_indptr.tolist(), batch.kv_lens.tolist()
            for b in range(batch.batch_size):
                qo_len, kv_len = qo_indptr[b + 1] - qo_indptr[b], kv_lens[b]
                pages = indices[None, starts[b] : starts[b] + counts[b]]
                positions = torch.arange(kv_len - qo_len, kv_len, device=indices.device)
                keys = pages.shape[1] * keys_per_page
                visible = visible_keys(positions[None, :, None], kv_len, keys, batch)
                self._rows.append((slice(qo_indptr[b], qo_indptr[b + 1]), pages, visible))
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
        for rows, pages, visible in self._rows:
            k, v = self._gather(kv_cache, pages, compute)
            queries = q[rows].to(compute).view(*visible.shape[:2], *q.shape[1:])
            o, row_lse = attend(queries, k, v, visible, batch)
            result[rows] = o.flatten(0, 1).to(result.dtype)
            if lse is not None:
                lse[rows] = row_lse.flatten(0, 1)
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
        self, kv_cache: torch.Tensor, pages: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V in ``pages [n, max_pages]``, each ``[n, max_pages * page_size,
        num_kv_heads, head_dim]``, dequantized to ``dtype``."""
        cache = self.cache
        kv = kv_cache[pages]  # [n, max_pages, 2, *inner, head_dim]
        if cache.kv_layout == "HND":
            kv = kv.transpose(3, 4)
        kv = kv.transpose(1, 2).reshape(pages.shape[0], 2, -1, cache.num_heads, cache.head_dim)
        k = kv[:, 0].to(dtype) * cache.k_scale
        v = kv[:, 1].to(dtype) * cache.v_scale
        return k, v


def decode_groups(counts: np.ndarray) -> list[np.ndarray]:
    """Sequences (their page counts ``counts``) in groups whose padding to the group's
    longest at most doubles the pages gathered: each group's indices, ascending.

    Longest first, a group takes the next longest while the bound holds. It holds for a
    prefix of the rest: a sequence with at least half the longest's pages adds more
    pages than padding, one with fewer adds less, and all after it are shorter still.
    One group when the lengths are alike.
    """
    order = np.argsort(-counts, kind="stable")
    groups, start = [], 0
    while start < order.size:
        rest = counts[order[start:]]
        padded = np.arange(1, rest.size + 1) * rest[0]
        size = int((padded <= 2 * np.cumsum(rest)).sum())
        groups.append(np.sort(order[start : start + size]))
        start += size
    return groups


def padded_pages(indices: torch.Tensor, starts: np.ndarray, counts: np.ndarray) -> torch.Tensor:
    """The pages of sequences whose pages are ``indices[starts[i]:starts[i] + counts[i]]``,
    ``[n, max(counts)]``, each padded with its first page (every index names a page of
    the pool; no query sees the padding's keys)."""
    column = np.arange(int(counts.max()))
    flat = np.where(column < counts[:, None], starts[:, None] + column, starts[:, None])
    return indices[torch.from_numpy(flat).to(indices.device)]


def visible_keys(
    positions: torch.Tensor, kv_lens: object, num_keys: int, batch: AttentionBatch
) -> torch.Tensor:
    """Which of ``num_keys`` gathered keys each query sees: its sequence's (below
    ``kv_lens``), within the causal mask and the window of its position.

    ``positions``: ``[n, qo_len, 1]`` int; ``kv_lens``: an int, or ``[n, 1, 1]`` int.
    Returns ``[n, qo_len, num_keys]`` bool.
    """
    keys = torch.arange(num_keys, device=positions.device)
    visible = keys < kv_lens
    if batch.causal:
        visible = visible & (keys <= positions)
    if batch.window_left >= 0:
        visible = visible & (keys >= positions - batch.window_left)
    return visible.expand(*positions.shape[:2], num_keys)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    batch: AttentionBatch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``n`` sequences' queries over their keys.

    Args:
        q: ``[n, qo_len, num_qo_heads, head_dim]``.
        k, v: ``[n, num_keys, num_kv_heads, head_dim]``.
        visible: ``[n, qo_len, num_keys]`` bool: the keys each query sees.

    Returns:
        ``(out [n, qo_len, num_qo_heads, head_dim], lse [n, qo_len, num_qo_heads])``,
        with the log-sum-exp in base 2 as flashinfer returns it.
    """
    n, qo_len, num_qo_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_qo_heads // num_kv_heads
    qg = q.view(n, qo_len, num_kv_heads, group, head_dim)
    logits = torch.einsum("bqhgd,bkhd->bhgqk", qg, k) * batch.sm_scale
    if batch.logits_soft_cap > 0:
        logits = batch.logits_soft_cap * torch.tanh(logits / batch.logits_soft_cap)
    logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [n, h, g, q]
    probs = torch.exp(logits - lse[..., None])
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(n, qo_len, num_qo_heads, head_dim)
    return out, (lse / LN2).permute(0, 3, 1, 2).reshape(n, qo_len, num_qo_heads)
