"""Attention over the paged cache: flashinfer on CUDA, plain torch anywhere."""

from .batch import AttentionBatch
from .cuda_graph import CUDAGraphDecodeAttention
from .paged_attention import PagedAttention

__all__ = ["AttentionBatch", "CUDAGraphDecodeAttention", "PagedAttention"]
