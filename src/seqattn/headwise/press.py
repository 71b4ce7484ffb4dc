"""Compression policies ("presses"): which tokens each KV head of one layer keeps.

A press sees one (sequence, layer) at a time, as a :class:`PressInput`: the positions
and keys every KV head holds now (heads may hold different tokens after an earlier
compression) and, when the press asks for them, the queries of the newest ``window``
tokens. It returns, per KV head, the indices of the tokens to keep among those the head
holds, which is the ``keep`` argument of :meth:`HeadwiseKVCache.compress`.

Budgets are per request, in tokens per KV head on average over the model
(:func:`tokens_per_head` turns a fraction into that); :meth:`Press.layer_budget` lets a
press spread it unevenly over layers (PyramidKV) and :meth:`Press.select` over heads
(AdaKV). The caller never re-derives either.

Example:
    >>> import torch
    >>> press = StreamingLLMPress(sinks=2)
    >>> held = [torch.arange(10)] * 2                   # two KV heads holding positions 0..9
    >>> view = PressInput(0, 1, held, torch.zeros(2, 10, 4), torch.tensor([10, 10]), None)
    >>> [k.tolist() for k in press.select(view, press.layer_budget(0, 1, 5))]
    [[0, 1, 7, 8, 9], [0, 1, 7, 8, 9]]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .._checks import checked_index, exact_int
from ..errors import ArgumentTypeError, InvalidLengthError


@dataclass(frozen=True)
class PressInput:
    """What a press sees of one sequence in one layer.

    Attributes:
        layer: the layer, ``0 .. num_layers - 1``.
        num_layers: layers of the model.
        positions: per KV head, the positions it holds, increasing, ``int64`` tensors
            (on the CPU) of ``lens[h]`` elements.
        keys: ``[num_kv_heads, max(lens), head_dim]``, the held keys (rotated, as stored),
            head ``h``'s in ``keys[h, :lens[h]]``; the rest is padding. Cache dtype, on
            the cache's device.
        lens: ``[num_kv_heads]`` ``int64`` (CPU): tokens each head holds.
        queries: ``[window, num_qo_heads, head_dim]``, the rotated queries of the
            sequence's newest ``window`` tokens (positions ``seq_len - window ..
            seq_len - 1``) when the press's :attr:`Press.window` is > 0, else None.
        sm_scale: the attention's softmax scale.
    """

    layer: int
    num_layers: int
    positions: list[torch.Tensor]
    keys: torch.Tensor
    lens: torch.Tensor
    queries: Optional[torch.Tensor]
    sm_scale: float = 1.0


class Press(ABC):
    """A compression policy. Subclasses set :attr:`window` and implement :meth:`select`.

    Attributes:
        window: how many of the newest tokens' queries :meth:`select` reads (0: none).
            Those tokens are always kept.
    """

    window: int = 0

    def layer_budget(self, layer: int, num_layers: int, tokens_per_head: int) -> int:
        """Tokens per KV head on average that ``layer`` keeps, for a request whose
        budget is ``tokens_per_head`` on average over every layer. Default: the same in
        every layer. Raises IndexOutOfRangeError, InvalidLengthError, ArgumentTypeError
        (via :func:`checked_layer_args`)."""
        return checked_layer_args(layer, num_layers, tokens_per_head)[2]

    @abstractmethod
    def select(self, view: PressInput, budget: int) -> list[np.ndarray]:
        """Per KV head, the indices (increasing, ``int64``) of the tokens to keep among
        those it holds; ``budget`` tokens per head on average over the layer's heads.
        A head holding no more than it may keep keeps everything."""


def tokens_per_head(budget: object, seq_len: int) -> int:
    """A request's budget in tokens per KV head: an ``int`` is a token count, a
    ``float`` in ``(0, 1]`` a fraction of ``seq_len`` (rounded up)."""
    if isinstance(budget, float) and not isinstance(budget, bool):
        if not 0.0 < budget <= 1.0:
            raise InvalidLengthError(f"a fractional budget must be in (0, 1], got {budget}")
        return max(1, math.ceil(budget * seq_len))
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ArgumentTypeError(
            f"budget must be a token count (int) or a fraction (float), got {type(budget).__name__}"
        )
    return exact_int(budget, "budget", low=1)


def checked_layer_args(layer: object, num_layers: object, tokens_per_head: object) -> tuple:
    """``(layer, num_layers, tokens_per_head)`` as ints: ``num_layers`` in ``[1, 2**16]``,
    ``layer`` in ``[0, num_layers)`` (IndexOutOfRangeError), ``tokens_per_head >= 0``
    (InvalidLengthError); ArgumentTypeError for a value that is not an integer."""
    layers = exact_int(num_layers, "num_layers", low=1, high=2**16)
    index = checked_index(layer, f"layer (of {layers})", layers)
    average = exact_int(tokens_per_head, "tokens_per_head", low=0, error=InvalidLengthError)
    return index, layers, average


class StreamingLLMPress(Press):
    """StreamingLLM (Xiao et al., 2023): the first ``sinks`` positions ("attention
    sinks") and the newest tokens, ``budget`` in all, in every head alike."""

    def __init__(self, sinks: int = 4) -> None:
        self.sinks = exact_int(sinks, "sinks", low=0)

    def select(self, view: PressInput, budget: int) -> list[np.ndarray]:
        keep = []
        for n in view.lens.tolist():
            if n <= budget:
                keep.append(np.arange(n, dtype=np.int64))
                continue
            sinks = min(self.sinks, budget)
            recent = np.arange(n - (budget - sinks), n, dtype=np.int64)
            keep.append(np.concatenate([np.arange(sinks, dtype=np.int64), recent]))
        return keep
