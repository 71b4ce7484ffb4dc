"""Score-based presses: SnapKV, PyramidKV (budgets per layer) and AdaKV (budgets per head).

Each follows the interface of :mod:`seqattn.headwise.press` and kvpress's definitions
(NVIDIA/kvpress, ``presses/*_press.py``), written anew for heads that may hold different
tokens; where kvpress and the paper differ, the class's docstring says which it follows.
Budgets count every token a head keeps, its observation window included (as kvpress's
``n_kept``), so they are memory: ``ceil(kept / page_size)`` pages per head.

The newest ``window`` tokens each head holds are always kept, unless the budget is below
the window: then a head keeps its newest ``budget`` tokens. Ties between equal scores go
to the newer token.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from fractions import Fraction

import numpy as np
import torch

from .._checks import (
    INT64_MAX,
    exact_int,
    int_array,
    one_of,
    real_number,
    shown,
)
from ..errors import ArgumentTypeError, InvalidArgumentError, InvalidLengthError, TensorSpecError
from .press import Press, PressInput, checked_layer_args
from .selection import POOLINGS, adakv_select, snapkv_head_scores, top_per_head


class ScorerPress(Press):
    """A press that scores every token a head holds and keeps each head's ``budget`` best.

    Subclasses implement :meth:`scores`; :class:`AdaKVPress` spends a layer's budget
    over the heads by the same scores.
    """

    @abstractmethod
    def scores(self, view: PressInput) -> torch.Tensor:
        """``[num_kv_heads, max(lens)]`` float32 (``keys``' device): each held token's
        score, ``+inf`` on each head's newest ``window`` held tokens, ``-inf`` on the
        padding. Raises TensorSpecError or InvalidLengthError for a malformed view."""

    def select(self, view: PressInput, budget: int) -> list[np.ndarray]:
        """Per head, the ``min(budget, lens[h])`` best tokens; see :class:`Press`."""
        budget = checked_budget(budget)
        scores = self.scores(view)
        return top_per_head(scores, np.minimum(view_lens(view), budget))


class SnapKVPress(ScorerPress):
    """SnapKV (Li et al., 2024): keep the tokens the observation window attends to.

    A held token's score is the attention it receives from the queries of the newest
    ``window`` tokens (``view.queries``; each query's softmax over the keys its head
    holds at positions up to its own), averaged over those queries, pooled over the
    head's neighbouring older tokens (``kernel`` wide, zero-padded at the ends), then
    averaged over the query heads of the KV head's GQA group. Each head keeps its newest
    ``window`` tokens and its ``budget - window`` best older ones.

    As kvpress's ``SnapKVPress``: defaults ``window=64, kernel=5``, average pooling
    (the paper's code offers max pooling too: ``pooling="max"``), the window left out of
    the pooling, pooling per query head then the mean over the group (kvpress, after
    SnapKV issue 22; the SnapKV code repeats the KV heads and keeps tokens per query
    head), and the window counted in the budget. Unlike kvpress, the softmax runs over
    what each head holds now, so the press also works after an earlier compression.
    :func:`~.selection.snapkv_scores` is the older, whole-prompt scorer (max pooling
    over the window too).

    Args:
        window: queries read, and newest tokens always kept (an ``int >= 1``).
        kernel: odd pooling width (1: no pooling).
        pooling: ``"avg"`` or ``"max"``.

    Example:
        >>> import torch
        >>> from seqattn.headwise import PressInput, SnapKVPress
        >>> queries = torch.zeros(2, 2, 4); queries[..., 0] = 1  # 2 query heads, 1 KV head
        >>> keys = torch.zeros(1, 10, 4); keys[0, 3, 0] = 8      # token 3 draws attention
        >>> view = PressInput(0, 1, [torch.arange(10)], keys, torch.tensor([10]), queries)
        >>> press = SnapKVPress(window=2, kernel=3)
        >>> press.select(view, budget=4)[0].tolist()  # 3, a neighbour (the newer), the window
        [3, 4, 8, 9]
    """

    def __init__(self, window: int = 64, kernel: int = 5, pooling: str = "avg") -> None:
        self.window = exact_int(window, "window", low=1, high=INT64_MAX)
        self.kernel = checked_kernel(kernel)
        self.pooling = one_of(pooling, "pooling", POOLINGS)

    def scores(self, view: PressInput) -> torch.Tensor:
        lens = view_lens(view, needs_queries=True)
        keys = view.keys
        if not lens.any():
            return torch.full(keys.shape[:2], -math.inf, device=keys.device)
        key_positions, query_positions = held_positions(view, lens)
        return snapkv_head_scores(
            view.queries,
            keys,
            torch.from_numpy(lens).to(keys.device),
            key_positions,
            query_positions,
            window=self.window,
            kernel=self.kernel,
            pooling=self.pooling,
            sm_scale=view.sm_scale,
        )


class PyramidKVPress(SnapKVPress):
    """PyramidKV (Cai et al., 2024): SnapKV in each layer, budgets falling over layers.

    Every layer keeps the newest ``window`` tokens (the paper's alpha "instruction
    tokens"); the rest of the request's budget ``B`` (tokens per head on average) is
    spread as an arithmetic sequence from ``2 (B - window) - (B - window) / beta`` in
    layer 0 down to ``(B - window) / beta`` in the last layer, so the layers average
    exactly ``B`` (:meth:`layer_budgets`: shares rounded by largest remainder, so they
    sum to ``num_layers * B``, each within 1 of its exact value, never rising).

    Where kvpress's ``PyramidKVPress.get_layer_budget`` differs, this follows the paper
    and its authors' code (Zefan-Cai/PyramidKV, now KVCache-Factory, ``PyramidKVCluster``):
    kvpress spreads the whole budget (the window inside each layer's share) and falls
    back to equal budgets when the top layer would get less than the window; the authors
    keep the window in every layer on top of its share of ``B - window``, as here.
    Followed by neither: the step is ``(max - min) / (num_layers - 1)`` exactly (kvpress
    rounds each layer, the authors' code floors the step), and the largest budget is not
    capped at the prompt length (``layer_budget`` does not see it): a layer whose budget
    exceeds what it holds keeps everything, so a short prompt keeps fewer tokens than
    ``num_layers * B``, never more. ``B <= window`` or ``beta == 1`` gives every layer ``B``.

    Args:
        window, kernel, pooling: as :class:`SnapKVPress`.
        beta: how steep the pyramid is, a real number ``>= 1`` (the paper's and kvpress's
            default 20): the top layer's share is ``1 / beta`` of the average.

    Example:
        >>> from seqattn.headwise import PyramidKVPress
        >>> press = PyramidKVPress(window=8, beta=4)
        >>> budgets = press.layer_budgets(num_layers=4, tokens_per_head=40)
        >>> budgets, sum(budgets) == 4 * 40
        ([64, 48, 32, 16], True)
        >>> press.layer_budget(3, 4, 40)  # what the serving loop asks per layer
        16
    """

    def __init__(
        self, window: int = 64, kernel: int = 5, pooling: str = "avg", beta: float = 20
    ) -> None:
        super().__init__(window, kernel, pooling)
        self.beta = real_number(beta, "beta", low=1.0)

    def layer_budget(self, layer: int, num_layers: int, tokens_per_head: int) -> int:
        layer, layers, average = checked_layer_args(layer, num_layers, tokens_per_head)
        return self.layer_budgets(layers, average)[layer]

    def layer_budgets(self, num_layers: int, tokens_per_head: int) -> list[int]:
        """Tokens per KV head each layer keeps, ``num_layers`` ints, non-increasing,
        summing to ``num_layers * tokens_per_head``, each within 1 of the exact share."""
        _, layers, average = checked_layer_args(0, num_layers, tokens_per_head)
        spread = average - self.window
        if layers == 1 or spread <= 0:
            return [average] * layers
        low = Fraction(spread) / Fraction(self.beta)
        high = 2 * spread - low
        step = (high - low) / (layers - 1)
        exact = [self.window + high - layer * step for layer in range(layers)]
        budgets = [math.floor(x) for x in exact]
        extra = layers * average - sum(budgets)  # the remainders' sum: 0 <= extra < layers
        ranked = sorted(range(layers), key=lambda layer: (budgets[layer] - exact[layer], layer))
        for layer in ranked[:extra]:  # the largest remainders (the lower layer on ties)
            budgets[layer] += 1
        return budgets


class AdaKVPress(Press):
    """AdaKV (Feng et al., 2024): a layer's budget goes to its best scores over all heads.

    The layer keeps ``budget * num_kv_heads`` tokens (all it holds if fewer): every head
    first keeps its newest ``window`` tokens and its own ``int(alpha_safeguard *
    budget)`` best (the window counting first, as its scores are the highest), then the
    rest go to the highest scores of the layer whichever head holds them, so heads whose
    attention is spread keep more than heads whose attention is concentrated.

    As kvpress's ``AdaKVPress`` (the safeguard forces each head's best ``n_safe =
    int(n_kept * alpha_safeguard)``, then the top of the layer fills the budget exactly).
    The authors' code (FFY0/AdaKV, ``AdaptiveSnapKVCluster``) instead keeps the window
    apart from the budget, counts each head's share of the layer's top ``budget * heads``
    scores and mixes it with an equal share, ``alpha * equal + (1 - alpha) * share``
    (rounded per head, so the layer's total may miss the budget by a few tokens).
    :meth:`layer_budget` is the scorer's: ``AdaKVPress(PyramidKVPress())`` is
    Ada-PyramidKV.

    Args:
        scorer: a :class:`ScorerPress` (e.g. :class:`SnapKVPress`) giving the scores
            and the window.
        alpha_safeguard: the floor per head as a fraction of ``budget``, in ``[0, 1]``
            (kvpress's default 0.20).

    Example:
        >>> import torch
        >>> from seqattn.headwise import AdaKVPress, PressInput, SnapKVPress
        >>> queries = torch.zeros(2, 2, 4); queries[..., 0] = 1  # 2 KV heads, 1 query each
        >>> keys = torch.zeros(2, 10, 4)
        >>> keys[0, 3, 0] = 8                    # head 0 attends to token 3 alone,
        >>> keys[1, :8, 0] = torch.arange(8.0)   # head 1 to many tokens
        >>> view = PressInput(0, 1, [torch.arange(10)] * 2, keys, torch.tensor([10, 10]), queries)
        >>> press = AdaKVPress(SnapKVPress(window=2, kernel=1), alpha_safeguard=0.5)
        >>> [k.tolist() for k in press.select(view, budget=5)]
        [[3, 8, 9], [3, 4, 5, 6, 7, 8, 9]]
    """

    def __init__(self, scorer: ScorerPress, alpha_safeguard: float = 0.20) -> None:
        if not isinstance(scorer, ScorerPress):
            raise ArgumentTypeError(
                f"scorer must be a ScorerPress (e.g. SnapKVPress()), got {shown(scorer)}"
            )
        self.alpha_safeguard = real_number(alpha_safeguard, "alpha_safeguard", low=0.0, high=1.0)
        self.scorer = scorer

    @property
    def window(self) -> int:  # type: ignore[override]
        return self.scorer.window

    def layer_budget(self, layer: int, num_layers: int, tokens_per_head: int) -> int:
        return self.scorer.layer_budget(layer, num_layers, tokens_per_head)

    def select(self, view: PressInput, budget: int) -> list[np.ndarray]:
        """The layer's ``budget * num_kv_heads`` best tokens; see :class:`Press`."""
        budget = checked_budget(budget)
        scores = self.scorer.scores(view)
        return adakv_select(
            scores,
            budget * scores.shape[0],
            window=min(self.window, budget),
            min_per_head=int(self.alpha_safeguard * budget),
            lens=view_lens(view),
        )


# ---------------------------------------------------------------------- checks
def checked_budget(budget: object) -> int:
    """``budget`` (tokens per head) as an int ``>= 0``."""
    return exact_int(budget, "budget (tokens per head)", low=0, error=InvalidLengthError)


def checked_kernel(kernel: object) -> int:
    """``kernel`` as an odd int ``>= 1`` (InvalidArgumentError otherwise)."""
    kernel = exact_int(kernel, "kernel (pooling width)", low=1, high=2**20)
    if kernel % 2 == 0:
        raise InvalidArgumentError(f"kernel (pooling width) must be odd, got {kernel}")
    return kernel


def view_lens(view: PressInput, needs_queries: bool = False) -> np.ndarray:
    """``view.lens`` as int64 numpy, checked against ``keys``, ``positions`` (and
    ``queries``): TensorSpecError or InvalidLengthError naming what came."""
    keys = view.keys
    if not isinstance(keys, torch.Tensor) or keys.dim() != 3:
        got = list(keys.shape) if isinstance(keys, torch.Tensor) else shown(keys)
        raise TensorSpecError(f"keys must be [num_kv_heads, max(lens), head_dim], got {got}")
    heads, length, dim = keys.shape
    lens = _lens(view.lens, heads, length)
    try:
        counts = [len(held) for held in view.positions]
    except TypeError:
        counts = shown(view.positions)  # type: ignore[assignment]
    if counts != lens.tolist():
        raise InvalidLengthError(f"positions must hold lens {lens.tolist()} each, got {counts}")
    if needs_queries:
        _check_queries(view.queries, heads, dim)
    return lens


def _lens(lens: object, heads: int, length: int) -> np.ndarray:
    what = f"lens (tokens each head holds, at most keys' {length})"
    arr = int_array(lens, what, low=0, high=length, error=InvalidLengthError)
    if arr.size != heads:
        raise TensorSpecError(f"lens must have one entry per KV head ({heads}), got {arr.size}")
    return arr


def _check_queries(queries: object, heads: int, dim: int) -> None:
    if not isinstance(queries, torch.Tensor):
        raise TensorSpecError(
            f"this press reads the window's queries: queries must be [window, num_qo_heads, "
            f"head_dim], got {shown(queries)}"
        )
    shape = list(queries.shape)
    if len(shape) != 3 or shape[0] < 1 or shape[1] % heads or shape[2] != dim:
        raise TensorSpecError(
            f"queries must be [window >= 1, num_qo_heads (a multiple of {heads} KV heads), "
            f"head_dim={dim}], got {shape}"
        )


def held_positions(view: PressInput, lens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of every held key, ``[num_kv_heads, max(lens)]`` int64 (padding:
    int64 max), and of the window's queries, ``[w]`` int64: the newest ``w`` positions
    of the sequence, whose newest token some head holds. Both on ``keys``' device."""
    keys = view.keys
    padded = torch.full(keys.shape[:2], INT64_MAX, dtype=torch.int64)
    for head, (held, n) in enumerate(zip(view.positions, lens.tolist(), strict=True)):
        padded[head, :n] = torch.as_tensor(held, dtype=torch.int64).reshape(-1)
    end = 1 + max(int(held[-1]) for held, n in zip(view.positions, lens, strict=True) if n)
    window = view.queries.shape[0]  # type: ignore[union-attr]
    return padded.to(keys.device), torch.arange(end - window, end, device=keys.device)
