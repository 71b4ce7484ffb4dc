"""The attention function seqattn registers with transformers, and a step's context.

transformers (5.x) looks an attention function up by ``config._attn_implementation``
and calls it per layer with the layer's rotated queries and keys and the new values;
every keyword given to the model's forward reaches it. seqattn registers one such
function (``"seqattn"``): it hands the layer's tensors to the step's
:class:`PagedAttention`, which appends the keys and values to the paged cache and
attends over each sequence's pages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from ..attention import PagedAttention
from ..errors import SeqAttnError
from ..packed_data import FlashInferPackedData
from .compiled import compiled_attention

ATTENTION_NAME = "seqattn"


def register() -> None:
    """Make ``attn_implementation="seqattn"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)


def paged_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    sliding_window: Optional[int] = None,
    seqattn_step: Optional[StepContext] = None,
    seqattn_kv: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface, backed by the step's paged cache.

    Args:
        query: ``[1, num_qo_heads, num_new_tokens, head_dim]``, rotated.
        key, value: ``[1, num_kv_heads, num_new_tokens, head_dim]``, this step's tokens.
        seqattn_step: the step's context (passed as a model kwarg by PagedCausalLM).
        seqattn_kv: the cache's storage, passed instead in a compiled forward: the
            layer then calls the custom op ``seqattn::paged_attention`` (:mod:`.compiled`).

    Returns:
        ``([1, num_new_tokens, num_qo_heads, head_dim], None)``.
    """
    del attention_mask, dropout, kwargs  # masks come from the page tables; inference only
    if seqattn_kv is not None:  # compiled: an op the compiler does not trace into
        out = compiled_attention(module.layer_idx, query, key, value, seqattn_kv, scaling,
                                 sliding_window)  # fmt: skip
        return out, None
    if seqattn_step is None:
        raise SeqAttnError(
            "the 'seqattn' attention runs inside PagedCausalLM.forward (it needs the step's "
            "page tables); call the model through seqattn.integrations.hf.PagedCausalLM"
        )
    return seqattn_step.attend(module.layer_idx, query, key, value, scaling, sliding_window), None


class StepContext:
    """One forward's attention: each layer's (window, scale) variant, planned once for
    the step and then called per layer (append the new K/V, attend). ``planned``: one
    attention planned already for every layer (a CUDA-graph step)."""

    def __init__(
        self,
        step: Optional[FlashInferPackedData],
        attention_for: Optional[Callable[[int, Optional[float]], PagedAttention]] = None,
        *,
        planned: Optional[PagedAttention] = None,
    ) -> None:
        self.step = step
        self.attention_for = attention_for  # the attention object of a (window, scale)
        self._every_layer = planned
        self._planned: dict[tuple[int, Optional[float]], PagedAttention] = {}

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: Optional[float],
        sliding_window: Optional[int],
    ) -> torch.Tensor:
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
        return self.attend_rows(layer, q, k, v, scaling, sliding_window).unsqueeze(0)

    def attend_rows(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scaling: Optional[float],
        sliding_window: Optional[int],
    ) -> torch.Tensor:
        """Append and attend one layer: ``q [rows, num_qo_heads, head_dim]``, ``k``,
        ``v [rows, num_kv_heads, head_dim]`` -> ``[rows, num_qo_heads, head_dim]``."""
        # HF's window W: a query at p sees keys in (p - W, p]; flashinfer's window_left
        # counts the keys left of the query: W - 1
        window = -1 if sliding_window is None else int(sliding_window) - 1
        attention = self._every_layer or self._planned.get((window, scaling))
        if attention is None:
            assert self.step is not None and self.attention_for is not None, "an eager step"
            attention = self.attention_for(window, scaling)
            attention.plan(self.step, window_left=window, sm_scale=scaling, q_dtype=q.dtype)
            self._planned[(window, scaling)] = attention
        return attention.forward(q, k, v, layer)
