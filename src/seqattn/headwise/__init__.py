"""Head-wise paged KV caches: a page list per (layer, sequence, KV head).

For per-head KV compression (SnapKV, PyramidKV, AdaKV, HeadKV): each KV head of each
layer keeps its own tokens in its own pages from one shared pool, so dropped tokens
free memory, and attention runs as a batch of single-KV-head sequences.

- :class:`HeadwiseKVCache`: sequences, per-step bookkeeping for every layer
  (``begin_step``, then ``write`` per layer) or per-layer ``append``, per-head
  compression, memory accounting.
- :class:`HeadwiseAttention`: plan every layer once per step (``plan_step``), run per layer.
- :func:`snapkv_scores`, :func:`adakv_select`: choose what each head keeps.
"""

from .attention import HeadwiseAttention
from .batch import HeadwiseBatch, HeadwiseStep
from .cache import HeadwiseKVCache
from .positions import HeadPositions
from .selection import adakv_select, snapkv_scores

__all__ = [
    "HeadPositions",
    "HeadwiseAttention",
    "HeadwiseBatch",
    "HeadwiseKVCache",
    "HeadwiseStep",
    "adakv_select",
    "snapkv_scores",
]
