"""Choosing which tokens each KV head keeps: SnapKV scores and AdaKV budget allocation.

SnapKV (Li et al., 2024) scores each prompt token by the attention it receives from the
last ``w`` prompt tokens (the observation window), pooled over neighbouring tokens so
that kept tokens come with their context. AdaKV (Feng et al., 2024) spends a layer's
budget across its heads adaptively: the top scores over *all* heads of the layer win,
so concentrated heads keep few tokens and diffuse heads many, with a floor per head so
that no head starves. The result feeds :meth:`HeadwiseKVCache.compress`.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidLengthError, TensorSpecError


def snapkv_scores(
    q_window: torch.Tensor,
    keys: torch.Tensor,
    *,
    sm_scale: Optional[float] = None,
    pool_kernel: int = 7,
) -> torch.Tensor:
    """Attention each key receives from the observation window, per KV head.

    Args:
        q_window: queries of the last ``w`` tokens of the prompt (positions
            ``n - w .. n - 1``), ``shape: [w, num_qo_heads, head_dim]``, any float dtype.
        keys: the keys of the whole prompt (positions ``0 .. n - 1``, already rotated),
            ``shape: [n, num_kv_heads, head_dim]``, ``n >= w``.
        sm_scale: softmax scale; default ``1 / sqrt(head_dim)``.
        pool_kernel: odd width of the max-pooling over neighbouring keys; 1: none.

    Returns:
        ``shape: [num_kv_heads, n], dtype: torch.float32``: causal softmax weights
        averaged over the window's queries and the head's query group, then pooled.
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
    group = num_qo_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    q = q_window.float().view(w, num_kv_heads, group, head_dim)
    logits = torch.einsum("whgd,nhd->hgwn", q, keys.float()) * scale
    query_pos = torch.arange(n - w, n, device=keys.device)[:, None]
    future = torch.arange(n, device=keys.device)[None, :] > query_pos  # [w, n]
    probs = logits.masked_fill(future, float("-inf")).softmax(dim=-1)
    scores = probs.mean(dim=(1, 2))  # [num_kv_heads, n]
    if pool_kernel > 1:
        scores = F.max_pool1d(scores[:, None], pool_kernel, stride=1, padding=pool_kernel // 2)
        scores = scores[:, 0]
    return scores


def adakv_select(
    scores: torch.Tensor,
    budget: int,
    *,
    window: int = 0,
    min_per_head: int = 0,
) -> list[np.ndarray]:
    """Which tokens each head keeps under a total budget for the layer (AdaKV-style).

    Every head keeps its last ``window`` tokens (the observation window) and its own
    ``min_per_head`` best-scoring tokens; the rest of the budget goes to the highest
    scores over all heads together.

    Args:
        scores: ``shape: [num_kv_heads, n]``, e.g. from :func:`snapkv_scores`.
        budget: tokens kept over all heads of the layer (average per head times heads);
            at least the forced tokens, at most ``num_kv_heads * n`` (more keeps all).
        window: newest tokens every head keeps.
        min_per_head: best tokens every head keeps whatever the other heads score.

    Returns:
        one int64 numpy array per head: the kept token indices, increasing (the
        ``keep`` argument of :meth:`HeadwiseKVCache.compress`).

    Example:
        >>> s = torch.tensor([[0.9, 0.1, 0.1, 0.1], [0.3, 0.25, 0.2, 0.2]])
        >>> [k.tolist() for k in adakv_select(s, budget=5, window=1)]  # a diffuse head 1
        [[0, 3], [0, 1, 3]]
    """
    if scores.dim() != 2:
        raise TensorSpecError(f"scores must be [num_kv_heads, n], got {list(scores.shape)}")
    if budget < 0 or window < 0 or min_per_head < 0:
        raise InvalidLengthError(
            f"budget, window and min_per_head must be >= 0, got {budget}, {window}, {min_per_head}"
        )
    heads, n = scores.shape
    ranked = scores.detach().float().clone()
    forced = torch.zeros_like(ranked, dtype=torch.bool)
    forced[:, max(n - window, 0) :] = True
    floor = min(min_per_head, n)
    if floor:
        forced.scatter_(1, ranked.topk(floor, dim=1).indices, True)
    num_forced = int(forced.sum())
    if num_forced > budget:
        raise InvalidLengthError(
            f"budget {budget} is below the {num_forced} tokens the window ({window}) and "
            f"min_per_head ({min_per_head}) force over {heads} heads"
        )
    ranked.masked_fill_(forced, float("inf"))  # forced tokens rank first
    chosen = ranked.flatten().topk(min(budget, heads * n)).indices
    mask = torch.zeros(heads * n, dtype=torch.bool, device=scores.device)
    mask[chosen] = True
    return [np.flatnonzero(row) for row in mask.view(heads, n).cpu().numpy()]
