"""Attention through flashinfer's paged wrappers, planned once per step.

Pitfalls this module handles for its callers:

- ``plan()`` reads ``indptr`` and lengths on the host: they are handed over from
  (pinned) host memory and the page indices from the GPU, so planning never syncs.
- ``plan()`` writes its schedule into a pinned buffer and copies it to the GPU
  asynchronously; planning the same wrapper again before that copy ran would corrupt
  the schedule of the step still in flight. Each kind (decode, prefill) therefore
  alternates between two wrappers and waits (an event, normally long done) before
  re-planning one.
- Decode batches use the decode kernel (CUDA cores for GQA group sizes it supports,
  tensor cores otherwise); prefill and mixed batches use the prefill kernel, mixed ones
  (rows of one query beside longer rows, as an engine's decode rows beside prompt
  chunks) in its FA2 version: flashinfer's default on Hopper (FA3) gives each
  one-query row a whole query tile. On an H200 (bf16, 32/8 heads, head_dim 64, page
  16), 16 rows of 512 prompt tokens with 48 decode rows over 520 tokens took 233.5 us
  in FA3 and 155.6 us in FA2; the 16 prompt rows alone 116.6 us in FA3 and 122.6 us in
  FA2, so batches without one-query rows keep the default.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from .._flashinfer import import_flashinfer
from ..errors import SeqAttnError
from ..storage import PagedKVCacheManager
from .batch import AttentionBatch, host_tensor

CUDA_CORE_DECODE_GROUP_SIZES = (1, 2, 3, 4, 8)


def flashinfer_for(cache: PagedKVCacheManager) -> Any:
    """flashinfer, after checking that ``cache`` lives on a CUDA device."""
    fi = import_flashinfer()
    if cache.device.type != "cuda":
        raise SeqAttnError(f"flashinfer attention needs a CUDA cache, got {cache.device}")
    return fi


def decode_tensor_cores(num_qo_heads: int, num_kv_heads: int, choice: Optional[bool]) -> bool:
    """``choice`` if given; else tensor cores only where the CUDA-core decode kernel lacks
    the GQA group size."""
    if choice is not None:
        return choice
    return num_qo_heads // num_kv_heads not in CUDA_CORE_DECODE_GROUP_SIZES


class _WrapperPair:
    """Two wrappers of one kind used in turn, each re-planned only after its last plan landed.

    A wrapper is made on first use: each holds 16 MiB of index workspace (half of it
    pinned host memory), so a backend that only decodes never pays for prefill's.
    """

    def __init__(self, make: Any) -> None:
        self.make = make
        self.wrappers: list[Any] = [None, None]
        self.events: list[Optional[torch.cuda.Event]] = [None, None]
        self.turn = 0

    def next(self) -> Any:
        self.turn ^= 1
        event = self.events[self.turn]
        if event is not None:
            event.synchronize()  # the copy from two plans ago; finished unless far behind
        if self.wrappers[self.turn] is None:
            self.wrappers[self.turn] = self.make()
        return self.wrappers[self.turn]

    def planned(self) -> None:
        event = self.events[self.turn]
        if event is None:  # one event per wrapper, recorded again at each plan
            event = self.events[self.turn] = torch.cuda.Event()
        event.record()


class FlashInferAttentionBackend:
    """Batch decode / prefill with flashinfer over a :class:`PagedKVCacheManager`."""

    name = "flashinfer"

    def __init__(
        self,
        cache: PagedKVCacheManager,
        num_qo_heads: int,
        *,
        workspace_bytes: int = 128 * 1024 * 1024,
        decode_use_tensor_cores: Optional[bool] = None,
        workspace: Optional[torch.Tensor] = None,
    ) -> None:
        fi = flashinfer_for(cache)
        self.fi = fi
        self.cache = cache
        self.num_qo_heads = num_qo_heads
        tensor_cores = decode_tensor_cores(num_qo_heads, cache.num_heads, decode_use_tensor_cores)
        # one float workspace serves every wrapper (also another backend's, when passed):
        # their kernels run one at a time on one stream
        if workspace is None:
            workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=cache.device)
        self.workspace = workspace
        layout = cache.kv_layout
        self._decode = _WrapperPair(
            lambda: fi.BatchDecodeWithPagedKVCacheWrapper(
                workspace, layout, use_tensor_cores=tensor_cores
            )
        )
        self._prefill = _WrapperPair(
            lambda: fi.BatchPrefillWithPagedKVCacheWrapper(workspace, layout)
        )
        self._mixed = _WrapperPair(
            lambda: fi.BatchPrefillWithPagedKVCacheWrapper(workspace, layout, backend="fa2")
        )
        self._active: Any = None
        self._scales = kv_scales(cache)

    def plan(self, batch: AttentionBatch, q_dtype: torch.dtype) -> None:
        cache = self.cache
        packed = batch.packed
        indices = packed.kv_page_indices.to(cache.device, non_blocking=True)
        indptr = _host(packed.kv_page_indptr)
        last = _host(packed.kv_last_page_len)
        options = plan_options(batch, q_dtype, cache.dtype)
        heads = (self.num_qo_heads, cache.num_heads, cache.head_dim, cache.page_size)
        if batch.decode_only:
            pair = self._decode
            wrapper = pair.next()
            # seq_lens: saves plan() deriving them from indptr and last on the host
            lens = host_tensor(batch.kv_lens, pin=False)
            wrapper.plan(indptr, indices, last, *heads, seq_lens=lens, **options)
        else:
            pair = self._mixed if has_one_query_rows(batch) else self._prefill
            wrapper = pair.next()
            qo_indptr = host_tensor(batch.qo_indptr, pin=True)
            wrapper.plan(
                qo_indptr, indptr, indices, last, *heads,
                causal=batch.causal,
                # saves plan() deriving them; not max_sequence_kv: 0.6 then skips kv_lens
                seq_lens=host_tensor(batch.kv_lens, pin=True),
                max_token_per_sequence=int(np.diff(batch.qo_indptr).max(initial=1)),
                **options,
            )  # fmt: skip
        pair.planned()
        self._active = wrapper

    def run(
        self, q: torch.Tensor, layer: int, return_lse: bool, out: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        # the (K, V) views, not the combined tensor: spares flashinfer an unbind per call
        kv = self.cache.kv_pairs[layer]
        result = self._active.run(q, kv, out=out, return_lse=return_lse, **self._scales)
        if return_lse:
            return result[0], result[1]
        return result, None

    def merge(
        self, out: torch.Tensor, lse: torch.Tensor, other: torch.Tensor, other_lse: torch.Tensor
    ) -> None:
        """Fold attention over other keys (``other``, ``other_lse``) into ``out``, ``lse``."""
        self.fi.merge_state_in_place(out, lse, other, other_lse)


def has_one_query_rows(batch: AttentionBatch) -> bool:
    """Whether some of ``batch``'s sequences have one query token."""
    return bool((np.diff(batch.qo_indptr) == 1).any())


def plan_options(batch: AttentionBatch, q_dtype: torch.dtype, kv_dtype: torch.dtype) -> dict:
    """The keyword options of every wrapper's ``plan()`` for ``batch`` (eager or graph)."""
    return dict(
        window_left=batch.window_left,
        logits_soft_cap=batch.logits_soft_cap or None,
        q_data_type=q_dtype,
        kv_data_type=kv_dtype,
        o_data_type=q_dtype,
        sm_scale=batch.sm_scale,
    )


def kv_scales(cache: PagedKVCacheManager) -> dict[str, float]:
    """flashinfer's ``k_scale``/``v_scale`` arguments; omitted at 1.0 (saves a kernel)."""
    scales = {}
    if cache.k_scale != 1.0:
        scales["k_scale"] = cache.k_scale
    if cache.v_scale != 1.0:
        scales["v_scale"] = cache.v_scale
    return scales


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor on the host, as plan() wants it (a copy only if it was on the GPU)."""
    return tensor if tensor.device.type == "cpu" else tensor.cpu()
