"""Choosing each sequence's next token from its logits, on the logits' device."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from attrs import define, field

from .._transfer import upload
from ..errors import InvalidArgumentError


@define(frozen=True)
class SamplingParams:
    """How one request generates.

    Attributes:
        max_new_tokens: tokens to generate at most.
        temperature: 0 for greedy decoding (argmax); otherwise logits are divided by it.
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches p.
        stop_token_ids: generation ends after producing one of these (it is kept).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = field(default=(), converter=tuple)

    def __attrs_post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0: off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgumentError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generator: torch.Generator
) -> torch.Tensor:
    """Next token of each row.

    Args:
        logits: ``shape: [batch, vocab_size]``, float.
        params: one per row.
        generator: on the logits' device; the same seed and calls give the same tokens.

    Returns:
        ``shape: [batch], dtype: torch.int64``, on the logits' device.
    """
    tokens = logits.argmax(dim=-1)
    sampled = [(i, p) for i, p in enumerate(params) if not p.greedy]
    if sampled:
        # the rows and their settings go up in one asynchronous copy: a plain host tensor
        # would make the copy wait for the GPU to finish all queued work
        vocab = logits.shape[-1]
        table = np.array(
            [(i, p.temperature, p.top_k or vocab, p.top_p) for i, p in sampled], dtype=np.float64
        )
        on_device = upload(logits.device, [table.ravel()], dtype=torch.float64)[0][0].view(-1, 4)
        rows = on_device[:, 0].long()
        probs = _filtered_probs(logits[rows].float(), on_device[:, 1:].float())
        tokens[rows] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return tokens


def _filtered_probs(logits: torch.Tensor, settings: torch.Tensor) -> torch.Tensor:
    """Softmax of temperature-scaled logits, after top-k and top-p filtering, per row.

    Args:
        logits: ``shape: [rows, vocab_size], dtype: torch.float32``.
        settings: ``shape: [rows, 3], dtype: torch.float32``: temperature, top-k (the
            vocabulary size when off), top-p; on the logits' device.
    """
    temperature, top_k, top_p = settings[:, 0:1], settings[:, 1:2], settings[:, 2:3]
    ordered, order = (logits / temperature).sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = rank >= top_k
    probs = ordered.masked_fill(drop, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
    drop |= before >= top_p  # the best token always stays (before == 0)
    kept = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(kept).scatter_(-1, order, kept).softmax(dim=-1)
