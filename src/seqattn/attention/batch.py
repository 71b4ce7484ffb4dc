"""One step's attention batch: the packed page table plus query lengths and options."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from attrs import define

from ..errors import InvalidLengthError
from ..packed_data import FlashInferPackedData, checked_indptr, seq_lens_from_page_table


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
        page_size: int,
        head_dim: int,
        qo_lens: object = None,
        *,
        causal: bool = True,
        sm_scale: Optional[float] = None,
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
    ) -> AttentionBatch:
        """Validate and normalize; ``qo_lens`` defaults to the packed append lengths."""
        if packed.kv_seq_lens is not None:  # a packer's batch: computed once, when packing
            kv_lens = packed.kv_seq_lens.cpu().numpy().astype(np.int32, copy=False)
        else:  # a batch built by hand
            kv_lens = seq_lens_from_page_table(
                packed.kv_page_indptr.cpu().numpy(),
                packed.kv_last_page_len.cpu().numpy(),
                page_size,
            ).astype(np.int32)
        if qo_lens is None:
            if packed.append_indptr is None:
                raise InvalidLengthError(
                    "pass qo_lens, or pack the batch with append_lens (the query tokens)"
                )
            qo_lens = np.diff(packed.append_indptr.cpu().numpy())
        qo_indptr = checked_indptr(
            qo_lens, "query lengths", kv_lens, 1, "allocate the query tokens first"
        )
        if window_left < -1:
            raise InvalidLengthError(f"window_left must be -1 (off) or >= 0, got {window_left}")
        cap = float(logits_soft_cap or 0.0)
        if cap < 0:
            raise InvalidLengthError(f"logits_soft_cap must be >= 0, got {cap}")
        scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
        return cls(packed, qo_indptr, kv_lens, bool(causal), scale, int(window_left), cap)


def host_tensor(array: np.ndarray, pin: bool) -> torch.Tensor:
    """A CPU tensor of ``array``; pinned when it will be copied to a GPU asynchronously."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.pin_memory() if pin else tensor
