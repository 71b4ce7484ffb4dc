"""Head-wise paged KV caches: a page list per (layer, sequence, KV head).

For per-head KV compression (SnapKV, PyramidKV, AdaKV, HeadKV): each KV head of each
layer keeps its own tokens in its own pages from one shared pool, so dropped tokens
free memory, and attention runs as a batch of single-KV-head sequences.

- :class:`HeadwiseKVCache` (``cache.py``): sequences and the one write path: a step
  takes pages in every layer (``begin_step``), then ``write`` per layer; ``append`` is
  a step of one layer. Per-head compression (``compression.py``), lookups and memory
  accounting (``queries.py``), argument checks (``checks.py``), batch versions
  (``versions.py``), packing (``builder.py``, ``batch.py``), positions (``positions.py``).
- :class:`HeadwiseAttention`: plan every layer once per step (``plan_step``), run per layer.
- :func:`snapkv_scores`, :func:`adakv_select`: choose what each head keeps.
- Presses (``press.py``, ``presses.py``): a policy per (sequence, layer) behind one
  interface (:class:`Press`, :class:`PressInput`): :class:`StreamingLLMPress`,
  :class:`SnapKVPress`, :class:`PyramidKVPress`, :class:`AdaKVPress`.
"""

from .attention import HeadwiseAttention
from .batch import HeadwiseBatch, HeadwiseStep
from .cache import HeadwiseKVCache
from .positions import HeadPositions
from .press import Press, PressInput, StreamingLLMPress, tokens_per_head
from .presses import AdaKVPress, PyramidKVPress, ScorerPress, SnapKVPress
from .selection import adakv_select, snapkv_scores

__all__ = [
    "AdaKVPress",
    "HeadPositions",
    "HeadwiseAttention",
    "HeadwiseBatch",
    "HeadwiseKVCache",
    "HeadwiseStep",
    "Press",
    "PressInput",
    "PyramidKVPress",
    "ScorerPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "adakv_select",
    "snapkv_scores",
    "tokens_per_head",
]
