"""Choosing which tokens each KV head keeps: SnapKV scores and AdaKV budget allocation.

SnapKV (Li et al., 2024) scores each prompt token by the attention it receives from the
last ``w`` prompt tokens (the observation window), pooled over neighbouring tokens so
that kept tokens come with their context. AdaKV (Feng et al., 2024) spends a layer's
budget across its heads adaptively: the top scores over *all* heads of the layer win,
so concentrated heads keep few tokens and diffuse heads many, with a floor per head so
that no head starves. The result feeds :meth:`HeadwiseKVCache.compress`.

Heads may hold different tokens (after an earlier compression): the per-head functions
take keys padded to ``[num_kv_heads, L, head_dim]`` with ``lens`` (head ``h`` holds
``keys[h, :lens[h]]``) and the true position of every held key, and the padding never
enters a softmax, a pooling or a choice. Ties between equal scores go to the newer token
(then, across heads, to the later head). The presses built on these live in
:mod:`seqattn.headwise.presses`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .._checks import int_array
from ..errors import InvalidLengthError, TensorSpecError

POOLINGS = ("avg", "max")


def snapkv_scores(
    q_window: torch.Tensor,
    keys: torch.Tensor,
    *,
    sm_scale: Optional[float] = None,
    pool_kernel: int = 7,
) -> torch.Tensor:
    """Attention each key receives from the observation window, per KV head, when every
    head holds the whole prompt (see :func:`snapkv_head_scores` for per-head holdings).

    Args:
        q_window: queries of the last ``w`` tokens of the prompt (positions
            ``n - w .. n - 1``), ``shape: [w, num_qo_heads, head_dim]``, any float dtype.
        keys: the keys of the whole prompt (positions ``0 .. n - 1``, already rotated),
            ``shape: [n, num_kv_heads, head_dim]``, ``n >= w``.
        sm_scale: softmax scale; default ``1 / sqrt(head_dim)``.
        pool_kernel: odd width of the max-pooling over neighbouring keys; 1: none.

    Returns:
        ``shape: [num_kv_heads, n], dtype: torch.float32``: causal softmax weights
        averaged over the window's queries and the head's query group, then max-pooled
        over all ``n`` keys (the window's too).
    """
    w, num_qo_heads, head_dim = q_window.shape
    n, num_kv_heads, key_dim = keys.shape
    if key_dim != head_dim or num_qo_heads % num_kv_heads or not 1 <= w <= n:
        raise TensorSpecError(
            f"expected q_window [w, num_qo_heads, head_dim] and keys [n, num_kv_heads, "
            f"head_dim] with 1 <= w <= n and num_kv_heads dividing num_qo_heads, got "
            f"{list(q_window.shape)} and {list(keys.shape)}"
        )
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise InvalidLengthError(f"pool_kernel must be odd and >= 1, got {pool_kernel}")
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    device = keys.device
    lens = torch.full((num_kv_heads,), n, device=device)
    key_positions = torch.arange(n, device=device).expand(num_kv_heads, n)
    query_positions = torch.arange(n - w, n, device=device)
    probs = window_attention(
        q_window, keys.transpose(0, 1), lens, key_positions, query_positions, scale
    )
    return pool_held(probs.mean(dim=1), lens, pool_kernel, "max")


def snapkv_head_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    lens: torch.Tensor,
    key_positions: torch.Tensor,
    query_positions: torch.Tensor,
    *,
    window: int,
    kernel: int,
    pooling: str,
    sm_scale: float,
) -> torch.Tensor:
    """SnapKV scores of the tokens each KV head holds (as kvpress's ``SnapKVPress.score``).

    Each query head's causal softmax over the keys its KV head holds, averaged over the
    window's queries, is pooled over the head's older tokens (all but its newest
    ``window``, zero-padded at both ends), then averaged over the query group.

    Args:
        queries: ``[w, num_qo_heads, head_dim]``, any float dtype: the queries at
            ``query_positions``.
        keys: ``[num_kv_heads, L, head_dim]``, any float dtype; head ``h`` holds
            ``keys[h, :lens[h]]``, the rest is padding.
        lens: ``[num_kv_heads]`` int64, on ``keys``' device, each ``<= L``.
        key_positions: ``[num_kv_heads, L]`` int64, on ``keys``' device: the position of
            every held key (anything in the padding).
        query_positions: ``[w]`` int64, on ``keys``' device: a query sees the held keys
            at positions up to its own.
        window: each head's newest held tokens, outside the pooling, always kept.
        kernel: odd width of the pooling; 1: none.
        pooling: ``"avg"`` (kvpress, SnapKV's default) or ``"max"``.
        sm_scale: the softmax scale.

    Returns:
        ``[num_kv_heads, L]`` float32: the pooled scores; ``+inf`` on each head's newest
        ``window`` held tokens, ``-inf`` on the padding.
    """
    probs = window_attention(queries, keys, lens, key_positions, query_positions, sm_scale)
    older = (lens - window).clamp(min=0)
    scores = pool_held(probs, older, kernel, pooling).mean(dim=1)
    columns = torch.arange(keys.shape[1], device=keys.device)
    scores = scores.masked_fill(columns >= older[:, None], math.inf)
    return scores.masked_fill(columns >= lens[:, None], -math.inf)


def window_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    lens: torch.Tensor,
    key_positions: torch.Tensor,
    query_positions: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Attention each held key receives, per query head, averaged over the queries.

    Args: as :func:`snapkv_head_scores` (``num_kv_heads`` divides ``num_qo_heads``).

    Returns:
        ``[num_kv_heads, group, L]`` float32, ``group = num_qo_heads // num_kv_heads``:
        for query head ``h * group + g``, its causal softmax weights over the keys head
        ``h`` holds, averaged over the ``w`` queries; 0 on the padding. A query that sees
        no held key adds nothing.
    """
    w, num_qo_heads, head_dim = queries.shape
    num_kv_heads, length, _ = keys.shape
    q = queries.float().view(w, num_kv_heads, num_qo_heads // num_kv_heads, head_dim)
    logits = torch.einsum("whgd,hnd->hgwn", q, keys.float()) * sm_scale
    held = torch.arange(length, device=keys.device) < lens[:, None]  # [heads, L]
    seen = key_positions[:, None, :] <= query_positions[None, :, None]  # [heads, w, L]
    hidden = ~(held[:, None, :] & seen)[:, None]  # [heads, 1, w, L]
    probs = logits.masked_fill(hidden, -math.inf).softmax(dim=-1)
    return probs.masked_fill(hidden, 0.0).mean(dim=2)  # rows seeing nothing were NaN


def pool_held(scores: torch.Tensor, lens: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """Pool each head's first ``lens[h]`` scores along the last dimension.

    Args:
        scores: ``[num_kv_heads, ..., L]`` float, ``>= 0``.
        lens: ``[num_kv_heads]`` int64, on ``scores``' device.
        kernel: odd pooling width (1: none).
        pooling: ``"avg"`` (zero padding counted, as ``F.avg_pool1d``) or ``"max"``.

    Returns:
        like ``scores``: as if each head's ``lens[h]`` scores were pooled alone with
        ``padding=kernel // 2``; 0 from ``lens[h]`` on.
    """
    columns = torch.arange(scores.shape[-1], device=scores.device)
    outside = (columns >= lens[:, None]).view(lens.shape[0], *[1] * (scores.dim() - 2), -1)
    scores = scores.masked_fill(outside, 0.0)  # zeros: neutral to a max of values >= 0
    if kernel == 1:
        return scores
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pooled = pool(flat, kernel, stride=1, padding=kernel // 2).view_as(scores)
    return pooled.masked_fill(outside, 0.0)


def top_per_head(scores: torch.Tensor, counts: Sequence[int]) -> list[np.ndarray]:
    """Each head's ``counts[h]`` highest-scoring tokens (ties: the newer first).

    Args:
        scores: ``[num_kv_heads, L]`` float.
        counts: per head, how many to keep.

    Returns:
        one int64 numpy array per head, increasing.
    """
    order = ranked_order(scores).cpu().numpy()
    return [np.sort(order[h, : int(c)]) for h, c in enumerate(counts)]


def ranked_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices that sort ``scores`` ``[..., L]`` along ``L`` from the highest score down,
    equal scores newest (highest index) first; int64, on ``scores``' device."""
    order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices
    return scores.shape[-1] - 1 - order


def adakv_select(
    scores: torch.Tensor,
    budget: int,
    *,
    window: int = 0,
    min_per_head: int = 0,
    lens: Optional[object] = None,
) -> list[np.ndarray]:
    """Which tokens each head keeps under a total budget for the layer (AdaKV-style).

    Every head keeps its last ``window`` held tokens (the observation window) and its
    own ``min_per_head`` best-scoring ones; the rest of the budget goes to the highest
    scores over all heads together (ties: the newer token, then the later head).

    Args:
        scores: ``shape: [num_kv_heads, n]``, e.g. from :func:`snapkv_scores`.
        budget: tokens kept over all heads of the layer (average per head times heads);
            at least the forced tokens, at most the tokens held (more keeps all).
        window: newest tokens every head keeps.
        min_per_head: best tokens every head keeps whatever the other heads score.
        lens: tokens each head holds, ``[num_kv_heads]`` integers (head ``h``'s scores
            are ``scores[h, :lens[h]]``, the rest padding, never kept); default ``n``.

    Returns:
        one int64 numpy array per head: the kept token indices, increasing (the
        ``keep`` argument of :meth:`HeadwiseKVCache.compress`).

    Example:
        >>> s = torch.tensor([[0.9, 0.1, 0.1, 0.1], [0.3, 0.25, 0.2, 0.2]])
        >>> [k.tolist() for k in adakv_select(s, budget=5, window=1)]  # a diffuse head 1
        [[0, 3], [0, 1, 3]]
        >>> [k.tolist() for k in adakv_select(s, budget=4, window=1, lens=[4, 2])]  # head 1 holds 2
        [[0, 3], [0, 1]]
    """
    if scores.dim() != 2:
        raise TensorSpecError(f"scores must be [num_kv_heads, n], got {list(scores.shape)}")
    if budget < 0 or window < 0 or min_per_head < 0:
        raise InvalidLengthError(
            f"budget, window and min_per_head must be >= 0, got {budget}, {window}, {min_per_head}"
        )
    heads, n = scores.shape
    held_lens = _checked_lens(lens, heads, n).to(scores.device)
    columns = torch.arange(n, device=scores.device)
    held = columns < held_lens[:, None]
    ranked = scores.detach().float().masked_fill(~held, -math.inf)
    forced = held & (columns >= held_lens[:, None] - window)
    floor = min(min_per_head, n)
    if floor:  # each head's best, padding (-inf) last: cleared again where a head holds less
        forced.scatter_(1, ranked_order(ranked)[:, :floor], True)
        forced &= held
    num_forced = int(forced.sum())
    if num_forced > budget:
        raise InvalidLengthError(
            f"budget {budget} is below the {num_forced} tokens the window ({window}) and "
            f"min_per_head ({min_per_head}) force over {heads} heads"
        )
    # forced tokens rank first, above scores of +inf too (a press's unforced window tokens)
    ranked = ranked.clamp(max=torch.finfo(torch.float32).max).masked_fill(forced, math.inf)
    chosen = top_per_head(ranked.view(1, -1), [min(budget, int(held_lens.sum()))])[0]
    mask = np.zeros(heads * n, dtype=bool)
    mask[chosen] = True
    return [np.flatnonzero(row) for row in mask.reshape(heads, n)]


def _checked_lens(lens: Optional[object], heads: int, n: int) -> torch.Tensor:
    """``lens`` as an int64 tensor of ``heads`` values in ``[0, n]`` (default all ``n``)."""
    if lens is None:
        return torch.full((heads,), n, dtype=torch.int64)
    arr = int_array(lens, "lens (tokens each head holds)", low=0, high=n, error=InvalidLengthError)
    if arr.size != heads:
        raise InvalidLengthError(f"lens must have one entry per head ({heads}), got {arr.size}")
    return torch.from_numpy(arr)
