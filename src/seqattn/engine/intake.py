"""What the engine checks before it queues a request: its params, its prompt, and that
the pool could ever hold it (nothing is queued unless every check passes)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .._checks import int_array, is_int, shown
from ..errors import ArgumentTypeError, InvalidArgumentError, InvalidLengthError
from ..integrations.press_requests import PressRequest, press_request
from .sampling import SamplingParams
from .store import SequenceStore


def check_params(params: object) -> None:
    """Raise ArgumentTypeError unless ``params`` is a :class:`SamplingParams` (whose
    settings were checked when it was made)."""
    if not isinstance(params, SamplingParams):
        raise ArgumentTypeError(f"params must be a SamplingParams, got {shown(params)}")


def checked_compression(
    store: SequenceStore, press: object, budget: object, compress_every: object
) -> Optional[PressRequest]:
    """A request's press settings, checked (None: keep every token).

    Raises:
        ArgumentTypeError, InvalidArgumentError, InvalidLengthError: as
            ``HeadwiseCausalLM.add_sequences`` (a press that is not a ``Press``, a press
            without a budget, a budget of 0 or 1.5, ``compress_every=0``), or any setting
            on a runner whose cache keeps every token (a ``PagedCausalLM``).
    """
    if press is None and budget is None and compress_every is None:
        return None
    if not store.presses:
        raise InvalidArgumentError(
            "press, budget and compress_every need a runner on a head-wise cache "
            "(Engine(HeadwiseCausalLM(...))); a PagedCausalLM keeps every token"
        )
    return press_request(press, budget, compress_every)


def checked_prompt(
    prompt: object, params: SamplingParams, vocab: int, store: SequenceStore, what: str
) -> np.ndarray:
    """The prompt's token ids (``[prompt_len]`` int64), once the prompt and params pass
    every check.

    Raises:
        ArgumentTypeError: ``params`` is not a SamplingParams, or the prompt is not a
            1-D sequence of integers.
        InvalidLengthError: an empty prompt.
        InvalidArgumentError: a token id outside the model's vocabulary, or a request
            the pool could never hold (see :func:`check_fits`).
    """
    check_params(params)
    tokens = int_array(prompt, what)
    if tokens.size == 0:
        raise InvalidLengthError(f"{what} needs at least one token, got {shown(prompt)}")
    if tokens.min() < 0 or tokens.max() >= vocab:
        bad = tokens[(tokens < 0) | (tokens >= vocab)][:8].tolist()
        raise InvalidArgumentError(
            f"{what}: token ids must lie in [0, {vocab}) (the model's vocabulary), got {bad}"
        )
    check_fits(store, tokens.size, params.max_new_tokens, what)
    return tokens


def check_fits(store: SequenceStore, prompt_len: int, max_new_tokens: int, what: str) -> None:
    """Refuse a request that needs more pages than the engine can ever give it.

    A ValueError rather than a ``NoPageError``: ``NoPageError`` says "not now, free
    pages and retry", and no retry could ever serve this request. Counted without
    compression (every token kept, in every layer and head of a head-wise cache): a
    press may keep less, but what it keeps is known only once it has run.
    """
    # the last sampled token is never fed back: the sequence holds one token less
    held = prompt_len + max_new_tokens - 1
    need = store.pages_to_hold(held)
    usable = store.usable_pages
    if need > usable:
        raise InvalidArgumentError(
            f"{what} of {prompt_len} tokens with max_new_tokens={max_new_tokens} needs "
            f"{need} pages of {store.page_size} tokens, but the pool has {usable} for "
            f"requests ({store.num_pages} pages, {store.num_pages - usable} kept by the "
            "runner); give the engine more pages or ask for fewer tokens"
        )


def eos_token_ids(model: Any) -> tuple[int, ...]:
    """The model's end-of-sequence ids: ``generation_config.eos_token_id``, an int, a
    list of ints or None (no end-of-sequence token).

    Raises:
        ArgumentTypeError: an id that is not an integer.
    """
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if value is None:
        return ()
    if is_int(value):
        return (int(value),)  # type: ignore[call-overload]
    return tuple(int_array(value, "generation_config.eos_token_id").tolist())
