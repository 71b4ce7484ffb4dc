"""Attention over the paged cache in plain torch: the reference, and the CPU default.

Pages are gathered into contiguous ``[keys, num_kv_heads, head_dim]`` blocks and
attended with explicit matmuls, in float64 for float64 queries and float32 otherwise:
exact up to float rounding. Sequences are attended in groups, each padded to its longest
query run and its most pages, the padding masked: a group grows while the padding at
most doubles its logits and they stay within :data:`LOGITS_PER_GROUP`. A decode batch of
alike lengths is one group.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch
from attrs import define

from ..storage import PagedKVCacheManager
from .batch import AttentionBatch

LN2 = math.log(2.0)
# a group's padded logits, at most (256 MiB in float32); a lone sequence may hold more
LOGITS_PER_GROUP = 1 << 26

Rows = Union[slice, torch.Tensor]


@define(slots=True, frozen=True)
class _Group:
    """Sequences attended at once: their query rows padded to ``[n, width]`` (each with
    copies of its last row), pages padded to ``[n, max_pages]`` (with its first page)."""

    queries: Rows  # rows of q: a slice (in order, no padding) or ``[n, width]`` int64
    written: Rows  # the rows the group's outputs go to: a slice or ``[rows]`` int64
    real: Optional[torch.Tensor]  # ``[n, width]`` bool: not padding (None: all are)
    pages: torch.Tensor  # ``[n, max_pages]`` int64
    visible: torch.Tensor  # ``[n, width, max_pages * page_size]`` bool
    # ``[n, max_pages * page_size, 1, 1]`` bool: slots past each sequence's length, whose
    # stale values (a NaN left by an earlier sequence) must not reach 0 * v
    past_end: torch.Tensor


class TorchAttentionBackend:
    """Gathers pages and runs the same math as flashinfer's kernels."""

    name = "torch"

    def __init__(self, cache: PagedKVCacheManager, num_qo_heads: int) -> None:
        self.cache = cache
        self.num_qo_heads = num_qo_heads
        self._groups: list[_Group] = []
        self._batch: Optional[AttentionBatch] = None

    def plan(self, batch: AttentionBatch, q_dtype: torch.dtype) -> None:
        del q_dtype  # any float dtype works here
        indices = batch.packed.kv_page_indices.to(self.cache.device).long()
        kv_indptr = batch.packed.kv_page_indptr.cpu().numpy().astype(np.int64)
        qo_lens = np.diff(batch.qo_indptr.astype(np.int64))
        counts = np.diff(kv_indptr)
        logits_per_pair = self.num_qo_heads * self.cache.page_size  # per query and page
        limit = LOGITS_PER_GROUP // logits_per_pair
        querying = np.flatnonzero(qo_lens)  # a sequence without queries attends nothing
        self._groups = [
            self._group(batch, indices, kv_indptr, querying[group])
            for group in attention_groups(qo_lens[querying], counts[querying], limit)
        ]
        self._batch = batch

    def _group(
        self, batch: AttentionBatch, indices: torch.Tensor, kv_indptr: np.ndarray,
        group: np.ndarray,
    ) -> _Group:  # fmt: skip
        """The padded rows, pages and mask of the sequences ``group`` (batch indices)."""
        device = indices.device
        qo_start = batch.qo_indptr[group].astype(np.int64)
        qo_lens = batch.qo_indptr[group + 1].astype(np.int64) - qo_start
        kv_lens = batch.kv_lens[group].astype(np.int64)
        column = np.arange(int(qo_lens.max()))
        last = np.minimum(column, qo_lens[:, None] - 1)  # padding repeats the last query
        rows = qo_start[:, None] + last  # [n, width]
        pages = padded_pages(indices, kv_indptr[group], kv_indptr[group + 1] - kv_indptr[group])
        positions = torch.from_numpy((kv_lens - qo_lens)[:, None] + last).to(device)
        lens = torch.from_numpy(kv_lens).to(device)[:, None, None]
        num_keys = pages.shape[1] * self.cache.page_size
        visible = visible_keys(positions[..., None], lens, num_keys, batch)
        past_end = (torch.arange(num_keys, device=device) >= lens[:, 0])[..., None, None]
        real = column < qo_lens[:, None]
        if real.all() and (np.diff(rows.ravel()) == 1).all():  # consecutive rows, in order
            span = slice(int(rows[0, 0]), int(rows[-1, -1]) + 1)
            return _Group(span, span, None, pages, visible, past_end)
        written = torch.from_numpy(rows[real]).to(device)
        return _Group(torch.from_numpy(rows).to(device), written,
                      torch.from_numpy(real).to(device), pages, visible, past_end)  # fmt: skip

    def run(
        self, q: torch.Tensor, layer: int, return_lse: bool, out: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        kv_cache = self.cache.get_kv_cache(layer)
        batch = self._batch
        assert batch is not None
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        result = torch.empty_like(q) if out is None else out
        lse = torch.empty(q.shape[:2], dtype=compute, device=q.device) if return_lse else None
        for group in self._groups:
            k, v = self._gather(kv_cache, group.pages, compute)
            v.masked_fill_(group.past_end, 0.0)  # k needs none: its logits are masked
            shape = (*group.visible.shape[:2], *q.shape[1:])  # [n, width, heads, head_dim]
            queries = q[group.queries].to(compute).reshape(shape)
            o, o_lse = attend(queries, k, v, group.visible, batch, lse is not None)
            result[group.written] = _unpadded(o, group.real).to(result.dtype)
            if lse is not None:
                assert o_lse is not None
                lse[group.written] = _unpadded(o_lse, group.real)
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
        k = _dequantized(cache, kv_cache[:, 0][pages], dtype, cache.k_scale)
        v = _dequantized(cache, kv_cache[:, 1][pages], dtype, cache.v_scale)
        return k, v


def _dequantized(
    cache: PagedKVCacheManager, blocks: torch.Tensor, dtype: torch.dtype, scale: float
) -> torch.Tensor:
    """``blocks [n, max_pages, *inner, head_dim]`` of ``cache`` (inner: page slot and
    head, in the cache's layout) as ``[n, keys, num_kv_heads, head_dim]`` of ``dtype``,
    times ``scale``; in NHD, with no scale and no dtype to change, the blocks themselves."""
    if cache.kv_layout == "HND":
        blocks = blocks.transpose(2, 3)
    keys = blocks.reshape(blocks.shape[0], -1, cache.num_heads, cache.head_dim)
    keys = keys.to(dtype)
    return keys * scale if scale != 1.0 else keys


def attention_groups(
    qo_lens: np.ndarray, page_counts: np.ndarray, max_query_pages: int
) -> list[np.ndarray]:
    """Sequences (``qo_lens`` queries over ``page_counts`` pages each) in groups to
    attend at once, each group's batch indices ascending.

    Padded to its longest query run and its most pages, a group's ``n * width *
    max_pages`` query-page pairs are at most twice those of its sequences, and at most
    ``max_query_pages`` unless the group is one sequence. Largest first, a group takes
    the next largest sequences while both bounds hold: one group when the sequences
    are alike (a decode batch of similar lengths).
    """
    cost = qo_lens * page_counts
    order = np.argsort(-cost, kind="stable")
    groups, start = [], 0
    while start < order.size:
        rest = order[start:]
        padded = (np.arange(1, rest.size + 1) * np.maximum.accumulate(qo_lens[rest])
                  * np.maximum.accumulate(page_counts[rest]))  # fmt: skip
        fits = (padded <= 2 * np.cumsum(cost[rest])) & (padded <= max_query_pages)
        fits[0] = True
        size = rest.size if fits.all() else int(np.argmin(fits))
        groups.append(np.sort(rest[:size]))
        start += size
    return groups


def _unpadded(values: torch.Tensor, real: Optional[torch.Tensor]) -> torch.Tensor:
    """``values [n, width, ...]`` of a group's real query rows, in row order."""
    return values.flatten(0, 1) if real is None else values[real]


def padded_pages(indices: torch.Tensor, starts: np.ndarray, counts: np.ndarray) -> torch.Tensor:
    """The pages of sequences whose pages are ``indices[starts[i]:starts[i] + counts[i]]``,
    ``[n, max(counts)]``, each padded with its first page (every index names a page of
    the pool; no query sees the padding's keys)."""
    column = np.arange(int(counts.max()))
    flat = np.where(column < counts[:, None], starts[:, None] + column, starts[:, None])
    return indices[torch.from_numpy(flat).to(indices.device)]


def visible_keys(
    positions: torch.Tensor, kv_lens: torch.Tensor, num_keys: int, batch: AttentionBatch
) -> torch.Tensor:
    """Which of ``num_keys`` gathered keys each query sees: its sequence's (below
    ``kv_lens``), within the causal mask and the window of its position.

    ``positions``: ``[n, qo_len, 1]`` int; ``kv_lens``: ``[n, 1, 1]`` int.
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
    with_lse: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention of ``n`` sequences' queries over their keys.

    Args:
        q: ``[n, qo_len, num_qo_heads, head_dim]``.
        k, v: ``[n, num_keys, num_kv_heads, head_dim]``.
        visible: ``[n, qo_len, num_keys]`` bool: the keys each query sees.
        with_lse: also return the log-sum-exp (else None).

    Returns:
        ``(out [n, qo_len, num_qo_heads, head_dim], lse [n, qo_len, num_qo_heads])``,
        with the log-sum-exp in base 2 as flashinfer returns it.
    """
    n, qo_len, num_qo_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_qo_heads // num_kv_heads
    qg = q.view(n, qo_len, num_kv_heads, group, head_dim) * batch.sm_scale  # q is the small one
    logits = torch.einsum("bqhgd,bkhd->bhgqk", qg, k)
    if batch.logits_soft_cap > 0:
        logits = batch.logits_soft_cap * torch.tanh(logits / batch.logits_soft_cap)
    logits.masked_fill_(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(n, qo_len, num_qo_heads, head_dim)
    if not with_lse:
        return out, None
    lse = torch.logsumexp(logits, dim=-1)  # [n, h, g, q]
    return out, (lse / LN2).permute(0, 3, 1, 2).reshape(n, qo_len, num_qo_heads)
