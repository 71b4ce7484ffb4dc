"""Attention over the paged cache: flashinfer on CUDA, plain torch anywhere."""

from .batch import AttentionBatch
from .paged_attention import PagedAttention

__all__ = ["AttentionBatch", "PagedAttention"]
