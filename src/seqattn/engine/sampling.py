"""Choosing each sequence's next token from its logits, on the logits' device."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from attrs import define, field

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
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        probs = _filtered_probs(logits[rows].float(), [params[i] for i in sampled])
        tokens[rows] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return tokens


def _filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Softmax of temperature-scaled logits, after top-k and top-p filtering, per row."""
    temperature = logits.new_tensor([p.temperature for p in params])[:, None]
    scaled = logits / temperature
    ordered, order = scaled.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    top_k = logits.new_tensor([p.top_k or vocab for p in params])[:, None]
    drop = rank >= top_k
    probs = ordered.masked_fill(drop, float("-inf")).softmax(dim=-1)
    top_p = logits.new_tensor([p.top_p for p in params])[:, None]
    before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
    drop |= before >= top_p  # the best token always stays (before == 0)
    kept = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(kept).scatter_(-1, order, kept).softmax(dim=-1)
