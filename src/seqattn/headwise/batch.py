"""A head-wise batch: each (sequence, KV head) is one row of a single-KV-head batch.

Rows are *head-major*: row ``h * batch_size + b`` is KV head ``h`` of sequence ``b``.
With that order the per-head tokens of a ``[nnz, num_kv_heads, head_dim]`` tensor are
``t.transpose(0, 1)`` flattened, so mapping K/V, queries and outputs between the model's
layout and the head-wise batch is a single transpose copy each, with no index tensor.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from attrs import define

from ..packed_data import FlashInferPackedData


@define(slots=True, frozen=True)
class HeadwiseBatch:
    """One layer's page table for a batch of sequences, one row per (KV head, sequence).

    Attributes:
        layer: the layer whose page tables were packed.
        seq_ids: the sequences, in batch order.
        append_lens: tokens each sequence received in this step (its query tokens by
            default), ``shape: [batch_size], dtype: int64``, host.
        packed: the head-major batch for ``PagedAttention`` over the single-head
            storage: ``batch_size * num_kv_heads`` rows, with append metadata.
        num_kv_heads: KV heads per sequence.
    """

    layer: int
    seq_ids: tuple[int, ...]
    append_lens: np.ndarray
    packed: FlashInferPackedData
    num_kv_heads: int

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens appended in this step over all sequences (``nnz``)."""
        return int(self.append_lens.sum())


def to_head_major(t: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Model layout to head-wise rows.

    Args:
        t: ``shape: [nnz, num_kv_heads * group, head_dim]`` (K/V: ``group == 1``).

    Returns:
        ``shape: [num_kv_heads * nnz, group, head_dim]``, same dtype and device, contiguous;
        rows ``h * nnz .. (h + 1) * nnz - 1`` are head ``h`` of every token.
    """
    nnz, heads, dim = t.shape
    group = heads // num_kv_heads
    return t.view(nnz, num_kv_heads, group, dim).transpose(0, 1).reshape(-1, group, dim)


def from_head_major(
    t: torch.Tensor, num_kv_heads: int, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The inverse of :func:`to_head_major` (into ``out`` when given).

    Args:
        t: ``shape: [num_kv_heads * nnz, group, *rest]``, e.g. an attention output
            (``rest = [head_dim]``) or a log-sum-exp (``rest = []``).
        out: optional ``shape: [nnz, num_kv_heads * group, *rest]``, ``t``'s dtype.

    Returns:
        ``shape: [nnz, num_kv_heads * group, *rest]``.
    """
    rows, group, *rest = t.shape
    nnz = rows // num_kv_heads
    per_token = t.view(num_kv_heads, nnz, group, *rest).transpose(0, 1)
    if out is None:
        return per_token.reshape(nnz, num_kv_heads * group, *rest)
    out.view(nnz, num_kv_heads, group, *rest).copy_(per_token)
    return out
