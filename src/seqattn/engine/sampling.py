"""Choosing each sequence's next token from its logits, on the logits' device."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from attrs import define, field

from .._checks import INT64_MAX, exact_bool, exact_int, int_array, real_number
from .._transfer import upload


def _max_new_tokens(value: object) -> int:
    return exact_int(value, "max_new_tokens", low=1, high=INT64_MAX)


def _temperature(value: object) -> float:
    return real_number(value, "temperature", low=0.0)


def _top_k(value: object) -> int:
    return exact_int(value, "top_k", low=0, high=INT64_MAX)


def _top_p(value: object) -> float:
    return real_number(value, "top_p", low=0.0, high=1.0, low_open=True)


def _stop_token_ids(value: object) -> tuple[int, ...]:
    # a set of stop ids is natural (their order does not matter); int_array refuses
    # unordered collections because elsewhere ids pair with lengths
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(int_array(list(value), "stop_token_ids", low=0).tolist()))
    return tuple(int_array(value, "stop_token_ids", low=0).tolist())


def _ignore_eos(value: object) -> bool:
    return bool(exact_bool(value, "ignore_eos"))


@define(frozen=True)
class SamplingParams:
    """How one request generates; every setting is checked here, when it is made.

    Attributes:
        max_new_tokens: tokens to generate at most, an integer >= 1.
        temperature: 0 for greedy decoding (argmax); otherwise logits are divided by it
            (a finite number >= 0).
        top_k: keep the k most likely tokens (an integer >= 0; 0: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches p,
            in (0, 1] (1: all).
        stop_token_ids: generation ends after producing one of these (it is kept); any
            iterable of integers >= 0 but a str or bytes, stored as a tuple of ints.
        ignore_eos: keep generating past the model's end-of-sequence token(s)
            (``generation_config.eos_token_id``), which otherwise end a request as a stop
            token does; e.g. for random weights, or to always get ``max_new_tokens``.

    Raises:
        ArgumentTypeError: a setting of the wrong type (``max_new_tokens=2.5``,
            ``stop_token_ids="ab"`` or None, ``ignore_eos=1``); also a TypeError.
        InvalidArgumentError: a setting outside its range (``temperature=-1``, NaN,
            ``top_p=0``); also a ValueError.

    Example:
        >>> SamplingParams(max_new_tokens=8, stop_token_ids=[2, 7]).stop_token_ids
        (2, 7)
        >>> SamplingParams(max_new_tokens=2.5)
        Traceback (most recent call last):
        ...
        seqattn.errors.ArgumentTypeError: max_new_tokens must be an integer, got 2.5 (float)
    """

    max_new_tokens: int = field(default=64, converter=_max_new_tokens)
    temperature: float = field(default=0.0, converter=_temperature)
    top_k: int = field(default=0, converter=_top_k)
    top_p: float = field(default=1.0, converter=_top_p)
    stop_token_ids: tuple[int, ...] = field(default=(), converter=_stop_token_ids)
    ignore_eos: bool = field(default=False, converter=_ignore_eos)

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
    top_k, top_p = settings[:, 1:2], settings[:, 2:3]
    # a temperature too small for float32 must not give inf - inf = NaN in the softmax:
    # scaled from the row's maximum (0), the other logits go to -inf at worst (argmax)
    temperature = settings[:, 0:1].clamp_min(torch.finfo(torch.float32).tiny)
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    ordered, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = rank >= top_k
    probs = ordered.masked_fill(drop, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
    drop |= before >= top_p  # the best token always stays (before == 0)
    kept = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(kept).scatter_(-1, order, kept).softmax(dim=-1)
