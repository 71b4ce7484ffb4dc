"""The reference a head-wise run is checked against: the model's own forward over the
whole sequence (transformers' SDPA attention, no seqattn), each layer masked per KV
head so that every query after a compression misses what that head dropped there.

A compression is reported as ``(length, held)``: the sequence's logical length when it
ran and the positions each head held right after (``held[layer][head]``, as
:meth:`~.hf_headwise.HeadwiseCausalLM.held_positions` gives them). Position ``p``
sees position ``j`` when ``j <= p`` and, for every compression with ``length <= p``,
``j >= length`` or ``j`` was kept. Given the kept positions a run reports, its logits
must equal these; so this checks the cache's mechanics, not the press's choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

REFERENCE_NAME = "seqattn_masked_reference"
Compression = tuple[int, Sequence[Sequence[np.ndarray]]]


def visibility(num_layers: int, num_kv_heads: int, length: int,
               compressions: Sequence[Compression]) -> torch.Tensor:  # fmt: skip
    """Which key each query sees, ``[num_layers, num_kv_heads, length, length]`` bool."""
    seen = torch.ones(num_layers, num_kv_heads, length, length, dtype=torch.bool).tril()
    for at, held in compressions:
        for layer, heads in enumerate(held):
            for head, kept in enumerate(heads):
                dropped = np.setdiff1d(np.arange(at), np.asarray(kept))
                seen[layer, head, at:, torch.from_numpy(dropped)] = False
    return seen


def masked_reference_logits(
    model: Any, tokens: Sequence[int], compressions: Sequence[Compression]
) -> torch.Tensor:
    """The logits of every position of one sequence under the masks of its compressions.

    Args:
        model: the ``*ForCausalLM`` (its attention implementation is restored after).
        tokens: the whole sequence, ``[length]`` token ids.
        compressions: its compressions, oldest first.

    Returns:
        ``shape: [length, vocab_size]``, the model's dtype, on its device.
    """
    from transformers import AttentionInterface

    config = model.config
    heads, group = (
        config.num_key_value_heads,
        config.num_attention_heads // config.num_key_value_heads,
    )
    seen = visibility(config.num_hidden_layers, heads, len(tokens), compressions)
    device = next(model.parameters()).device
    masks = seen.repeat_interleave(group, dim=1)[:, None].to(device)  # [L, 1, Hq, T, T]
    AttentionInterface.register(REFERENCE_NAME, _masked_sdpa)
    previous = config._attn_implementation
    model.set_attn_implementation(REFERENCE_NAME)
    try:
        with torch.inference_mode():
            ids = torch.tensor([list(tokens)], device=device)
            out = model(input_ids=ids, use_cache=False, seqattn_reference_masks=masks)
    finally:
        model.set_attn_implementation(previous)
    return out.logits[0]


def _masked_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Any, scaling: Any = None, dropout: float = 0.0,
                 seqattn_reference_masks: Any = None, **kwargs: Any) -> Any:  # fmt: skip
    """transformers' SDPA attention with this layer's mask in place of the causal one."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    del attention_mask, kwargs
    mask = seqattn_reference_masks[module.layer_idx]
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout,
                                  scaling=scaling)  # fmt: skip
