"""Per-request KV compression on a head-wise cache: each sequence's press, budget and
schedule (:class:`PressRequest`), and the compression of one (sequence, layer)
(:func:`compress_layer`), for :class:`~.hf_headwise.HeadwiseCausalLM`.

A request's press runs when its prompt ends (the forward whose ``ends_prompt`` is set
for it) and, with ``compress_every=N``, again every ``N`` decode steps after that. Its
budget is :func:`~seqattn.headwise.press.tokens_per_head` of the logical length at the
time: a token count caps the cache, a fraction keeps that share of the sequence so far.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from attrs import define

from .._checks import exact_int, shown
from ..errors import ArgumentTypeError, InvalidArgumentError
from ..headwise import HeadwiseKVCache
from ..headwise.press import Press, PressInput, tokens_per_head
from .query_window import QueryWindows

Budget = Union[int, float]


@define(slots=True)
class PressRequest:
    """One sequence's compression settings and where it stands.

    Attributes:
        press: the policy, or None (the sequence keeps every token).
        budget: tokens per KV head (``int``) or a fraction of the length (``float``).
        compress_every: press again every this many decode steps, or None (once, when
            the prompt ends).
        prompt_open: the prompt is still being prefilled (no decode step yet).
        decoded: decode steps since the last compression.
    """

    press: Optional[Press]
    budget: Optional[Budget]
    compress_every: Optional[int]
    prompt_open: bool = True
    decoded: int = 0

    @property
    def window(self) -> int:
        """Queries the press reads (0 without a press)."""
        return 0 if self.press is None else int(self.press.window)

    def compresses_in_decode(self) -> bool:
        """Whether the next decode step ends with a compression."""
        every = self.compress_every
        return every is not None and self.decoded + 1 >= every

    def tokens_per_head(self, seq_len: int) -> int:
        """The budget for a sequence of logical length ``seq_len``."""
        assert self.budget is not None, "a press always has a budget"
        return tokens_per_head(self.budget, seq_len)


def press_request(press: object, budget: object, compress_every: object) -> PressRequest:
    """Checked settings (ArgumentTypeError, InvalidArgumentError, InvalidLengthError).

    ``press`` and ``budget`` come together or not at all; ``compress_every`` needs a
    press. A press's ``window`` must be an integer >= 0.
    """
    if press is not None and not isinstance(press, Press):
        raise ArgumentTypeError(
            f"press must be a seqattn.headwise.press.Press or None, got {shown(press)}"
        )
    if (press is None) != (budget is None):
        given, missing = ("press", "budget") if budget is None else ("budget", "press")
        raise InvalidArgumentError(f"a {given} needs a {missing}: pass both or neither")
    if budget is not None:
        tokens_per_head(budget, 1)  # its type and range
    every = None
    if compress_every is not None:
        every = exact_int(compress_every, "compress_every", low=1)
        if press is None:
            raise InvalidArgumentError("compress_every needs a press (and a budget)")
    if press is not None:
        exact_int(press.window, f"{type(press).__name__}.window", low=0)
    return PressRequest(press, budget, every)  # type: ignore[arg-type]


def check_prompts_ended(requests: dict[int, PressRequest], decode_ids: list[int]) -> None:
    """Raise InvalidArgumentError if a sequence to decode has its prompt still open."""
    open_ = [s for s in decode_ids if requests[s].prompt_open]
    if open_:
        raise InvalidArgumentError(
            f"sequences {open_[:8]} have no finished prompt to decode after: end it "
            "with forward(..., ends_prompt=True)"
        )


def after_step(
    requests: dict[int, PressRequest],
    decode_ids: list[int],
    prompt_ends: dict[int, bool],
    pressed: list[int],
) -> None:
    """Advance each sequence's schedule by a step that ran: a decode row counts towards
    ``compress_every`` (from 0 again once pressed); a prompt row opens or closes its
    prompt (``prompt_ends``: whether it was the prompt's last chunk)."""
    for seq_id in decode_ids:
        request = requests[seq_id]
        request.decoded = 0 if seq_id in pressed else request.decoded + 1
    for seq_id, end in prompt_ends.items():
        requests[seq_id].prompt_open = not end
        if seq_id in pressed:
            requests[seq_id].decoded = 0


def compress_layer(
    cache: HeadwiseKVCache,
    windows: QueryWindows,
    layer: int,
    seq_id: int,
    request: PressRequest,
    budget: int,
    sm_scale: float,
) -> None:
    """Run a sequence's press on one layer and keep what it selects.

    Args:
        cache: the head-wise cache, ``layer`` written in this step.
        windows: the rings holding the sequence's newest queries (if its press reads any).
        layer: the layer.
        seq_id: the sequence.
        request: its settings (with a press).
        budget: its tokens per KV head on average over the model, for this compression.
        sm_scale: the attention's softmax scale.
    """
    press = request.press
    assert press is not None
    heads = range(cache.num_kv_heads)
    lens = cache.head_lens(layer, seq_id)
    positions = [torch.from_numpy(cache.head_positions(layer, seq_id, h)) for h in heads]
    seq_len = cache.seq_len(seq_id, layer)
    queries = windows.read(seq_id, layer, seq_len) if press.window else None
    view = PressInput(layer, cache.num_layers, positions, held_keys(cache, layer, seq_id, lens),
                      torch.from_numpy(lens), queries, sm_scale)  # fmt: skip
    keep = press.select(view, press.layer_budget(layer, cache.num_layers, budget))
    cache.compress(layer, seq_id, keep)


def held_keys(cache: HeadwiseKVCache, layer: int, seq_id: int, lens: np.ndarray) -> torch.Tensor:
    """The keys each KV head holds, ``[num_kv_heads, max(lens), head_dim]`` (cache dtype
    and device; head ``h``'s in ``[h, :lens[h]]``, zeros after)."""
    longest = int(lens.max()) if lens.size else 0
    keys = torch.zeros(cache.num_kv_heads, longest, cache.head_dim, dtype=cache.dtype,
                       device=cache.device)  # fmt: skip
    for head, n in enumerate(lens.tolist()):
        pages = torch.as_tensor(cache.head_page_ids(layer, seq_id, head), device=cache.device)
        keys[head, :n] = cache.kv_pages[pages.long(), 0].reshape(-1, cache.head_dim)[:n]
    return keys
