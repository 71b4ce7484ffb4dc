"""One step's attention batch: the packed page table plus query lengths and options."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from attrs import define

from .._checks import exact_int, real_number, shown
from ..errors import ArgumentTypeError, InvalidArgumentError, InvalidLengthError
from ..packed_data import FlashInferPackedData, checked_indptr, seq_lens_from_page_table
from ..storage import PagedKVCacheManager


@define(slots=True, frozen=True)
class AttentionBatch:
    """What both backends plan from, normalized once per step.

    Query rows of sequence ``b`` are ``q[qo_indptr[b]:qo_indptr[b + 1]]``: its newest
    ``qo_len`` tokens, at positions ``kv_len - qo_len .. kv_len - 1`` (their K/V are
    appended before each layer runs).

    Attributes:
        packed: the batch's page table (``kv_page_indices`` on the cache's device for
            the flashinfer backend; indptr and lengths on the host).
        qo_indptr: ``shape: [batch_size + 1], dtype: int32``, host.
        kv_lens: tokens per sequence, ``shape: [batch_size], dtype: int32``, host.
        causal: mask keys after each query's position.
        sm_scale: softmax scale applied to ``q . k``.
        window_left: keys at positions ``>= pos - window_left`` are visible; -1: all.
        logits_soft_cap: ``cap * tanh(x / cap)`` of the scaled logits; 0: off.
    """

    packed: FlashInferPackedData
    qo_indptr: np.ndarray
    kv_lens: np.ndarray
    causal: bool
    sm_scale: float
    window_left: int
    logits_soft_cap: float

    @property
    def batch_size(self) -> int:
        return int(self.kv_lens.size)

    @property
    def num_query_tokens(self) -> int:
        return int(self.qo_indptr[-1])

    @property
    def decode_only(self) -> bool:
        """Every sequence has exactly one query token."""
        return self.num_query_tokens == self.batch_size

    @classmethod
    def build(
        cls,
        packed: FlashInferPackedData,
        cache: PagedKVCacheManager,
        qo_lens: object = None,
        *,
        causal: bool = True,
        sm_scale: Optional[float] = None,
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
    ) -> AttentionBatch:
        """Validate and normalize; ``qo_lens`` defaults to the packed append lengths.

        Raises:
            StaleBatchError: ``packed`` is stale or another cache's. InvalidLengthError:
            bad query lengths. ArgumentTypeError, InvalidArgumentError: bad options.
            IndexOutOfRangeError: a hand-built batch names pages outside the pool.
        """
        if not isinstance(packed, FlashInferPackedData):
            raise ArgumentTypeError(f"expected a FlashInferPackedData, got {shown(packed)}")
        packed.check_current(cache.allocator, cache.num_pages, "plan")
        page_size = cache.page_size
        if not isinstance(causal, bool):
            raise ArgumentTypeError(f"causal must be a bool, got {shown(causal)}")
        window_left = exact_int(window_left, "window_left (-1: no window)", low=-1)
        cap = 0.0
        if logits_soft_cap is not None:
            cap = real_number(logits_soft_cap, "logits_soft_cap (None: off)", low=0.0)
        scale = 1.0 / math.sqrt(cache.head_dim)
        if sm_scale is not None:
            scale = real_number(sm_scale, "sm_scale", low=0.0, low_open=True)
        if packed.kv_seq_lens is not None:  # a packer's batch: computed once, when packing
            kv_lens = packed.kv_seq_lens.cpu().numpy().astype(np.int32, copy=False)
        else:  # a batch built by hand
            kv_lens = seq_lens_from_page_table(
                packed.kv_page_indptr.cpu().numpy(),
                packed.kv_last_page_len.cpu().numpy(),
                page_size,
            ).astype(np.int32)
        if qo_lens is None and packed.append_indptr is None:
            raise InvalidLengthError(
                "pass qo_lens, or pack the batch with append_lens (the query tokens)"
            )
        if qo_lens is None and packed.stamp is not None:  # packed: appends checked then
            qo_indptr = packed.append_indptr.cpu().numpy()  # type: ignore[union-attr]
            if (qo_indptr[1:] == qo_indptr[:-1]).any():
                raise InvalidLengthError(
                    f"every sequence needs a query token; the step appends "
                    f"{np.diff(qo_indptr)[:8].tolist()} (pass qo_lens)"
                )
        else:
            if qo_lens is None:  # a batch built by hand: its append lengths, checked here
                qo_lens = np.diff(packed.append_indptr.cpu().numpy())  # type: ignore[union-attr]
            qo_indptr = checked_indptr(
                qo_lens, "query lengths", kv_lens, 1, "allocate the query tokens first"
            )
        return cls(packed, qo_indptr, kv_lens, causal, scale, window_left, cap)


def checked_qo_heads(num_qo_heads: object, num_kv_heads: int) -> int:
    """Query heads: a positive multiple of the cache's KV heads (GQA, MQA, MHA)."""
    heads = exact_int(num_qo_heads, "num_qo_heads", low=1, error=InvalidArgumentError)
    if heads % num_kv_heads:
        raise InvalidArgumentError(
            f"num_qo_heads must be a positive multiple of the {num_kv_heads} KV heads, got {heads}"
        )
    return heads


def query_dtype(q_dtype: object, kv_dtype: torch.dtype) -> torch.dtype:
    """The dtype queries are planned for: ``q_dtype``, or by default the cache's dtype
    (float16 for a float8 cache). Raises ArgumentTypeError for a non-float dtype."""
    if q_dtype is None:
        return torch.float16 if kv_dtype.itemsize == 1 else kv_dtype
    if not isinstance(q_dtype, torch.dtype) or not q_dtype.is_floating_point:
        raise ArgumentTypeError(f"q_dtype must be a floating torch.dtype, got {shown(q_dtype)}")
    return q_dtype


def host_tensor(array: np.ndarray, pin: bool) -> torch.Tensor:
    """A CPU tensor of ``array``; pinned when it will be copied to a GPU asynchronously."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.pin_memory() if pin else tensor
