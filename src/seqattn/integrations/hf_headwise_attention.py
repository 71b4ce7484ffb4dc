"""The attention function of head-wise serving (``"seqattn_headwise"``) and a step's
context: per layer, write the new K/V into each head's pages, attend, record the
queries a press will read, and compress the sequences whose press runs in this step.

The function is registered apart from :mod:`.hf_attention`'s ``"seqattn"``, so the
paged runner's path stays as it is. A layer is compressed right after its own
attention: nothing reads its cache again in this step, and the pages it frees are
free while the later layers run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Union

import numpy as np
import torch

from .._arrays import concat_ranges
from .._transfer import upload
from ..errors import SeqAttnError
from ..headwise import HeadwiseAttention, HeadwiseKVCache, HeadwiseStep
from .hf_headwise_graphs import HeadwiseGraphContext
from .query_window import QueryWindows, WindowRows

HEADWISE_ATTENTION_NAME = "seqattn_headwise"


def register_headwise() -> None:
    """Make ``attn_implementation="seqattn_headwise"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(HEADWISE_ATTENTION_NAME, headwise_attention_forward)


def headwise_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    seqattn_step: Union[HeadwiseStepContext, HeadwiseGraphContext, None] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface, backed by a head-wise cache.

    Args:
        query: ``[1, num_qo_heads, num_new_tokens, head_dim]``, rotated.
        key, value: ``[1, num_kv_heads, num_new_tokens, head_dim]``, this step's tokens.
        seqattn_step: the step's context (passed as a model kwarg by HeadwiseCausalLM).

    Returns:
        ``([1, num_new_tokens, num_qo_heads, head_dim], None)``.
    """
    del attention_mask, dropout, scaling, kwargs  # the cache is the mask; planned scale
    if not isinstance(seqattn_step, (HeadwiseStepContext, HeadwiseGraphContext)):
        raise SeqAttnError(
            "the 'seqattn_headwise' attention runs inside HeadwiseCausalLM.forward/decode "
            "(it needs the step's head-wise page tables); call the model through "
            "seqattn.integrations.hf_headwise.HeadwiseCausalLM"
        )
    return seqattn_step.attend(module.layer_idx, query, key, value), None


class HeadwiseStepContext:
    """One forward's head-wise attention, planned for every layer before it runs.

    Args:
        cache: the head-wise cache.
        attention: planned for ``step`` (``plan_step``).
        step: from ``cache.begin_step``.
        windows: the query rings, and ``rows``: where this step's queries go in them.
        compress: called as ``compress(layer)`` after each layer's attention; it
            compresses the sequences whose press runs in this step (or does nothing).
    """

    def __init__(
        self,
        cache: HeadwiseKVCache,
        attention: HeadwiseAttention,
        step: HeadwiseStep,
        windows: QueryWindows,
        rows: WindowRows,
        compress: Callable[[int], None],
    ) -> None:
        self.cache, self.attention, self.step = cache, attention, step
        self.windows, self.rows, self.compress = windows, rows, compress
        self.written: set[int] = set()  # layers whose K/V this step has written

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """Write, attend, record, compress one layer; ``[1, nnz, num_qo_heads, head_dim]``."""
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
        self.cache.write(self.step, layer, k, v)
        self.written.add(layer)
        out = self.attention.run(q, layer)
        if self.rows.per_window:
            self.windows.record(self.rows, layer, q)
        self.compress(layer)  # after run: this layer's cache is not read again this step
        return out.unsqueeze(0)  # type: ignore[union-attr]

    def abandon(self) -> None:
        """After an error mid-step: write zeros as the K/V of every layer not written
        yet, so that the cache takes other steps again (the step's own sequences hold
        garbage now and should be released)."""
        step, cache = self.step, self.cache
        shape = (step.num_tokens, cache.num_kv_heads, cache.head_dim)
        try:
            zeros = torch.zeros(shape, dtype=cache.dtype, device=cache.device)
            for layer in range(cache.num_layers):
                if layer not in self.written:
                    cache.write(step, layer, zeros, zeros)
        except Exception:  # the step's own error says more; the cache then refuses other
            pass  # steps until the step's sequences are released, which it allows


def eager_forward(
    model: Any,
    context: HeadwiseStepContext,
    tokens: Union[np.ndarray, torch.Tensor],
    starts: np.ndarray,
    lens: np.ndarray,
    sm_scale: float,
) -> torch.Tensor:
    """Plan ``context``'s step and run the model's forward over it.

    Args:
        model: on the ``"seqattn_headwise"`` attention.
        context: the step, not planned yet.
        tokens: the step's ``[sum(lens)]`` int64 tokens, a host array or on the device.
        starts: each sequence's logical length before the step, ``[batch]`` int64 host.
        lens: its new tokens, ``[batch]`` int64 host.
        sm_scale: the model's softmax scale.

    Returns:
        the logits of each sequence's last new token, ``[batch, vocab]``.
    """
    cache = context.cache
    context.attention.plan_step(context.step, sm_scale=sm_scale, q_dtype=cache.dtype)
    on_host = not isinstance(tokens, torch.Tensor)
    host = [tokens] if on_host else []
    arrays = [*host, concat_ranges(starts, lens), np.cumsum(lens) - 1]
    inputs = upload(cache.device, arrays, dtype=torch.int64)[0]
    input_ids = inputs[0] if on_host else tokens
    output = model(
        input_ids=input_ids[None], position_ids=inputs[-2][None], use_cache=False,  # type: ignore[index]
        logits_to_keep=inputs[-1], seqattn_step=context,
    )  # fmt: skip
    return output.logits[0]  # type: ignore[no-any-return]
