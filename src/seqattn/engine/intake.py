"""What the engine checks before it queues a request: its params, its prompt, and that
the pool could ever hold it (nothing is queued unless every check passes)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._checks import int_array, is_int, shown
from ..errors import ArgumentTypeError, InvalidArgumentError, InvalidLengthError
from ..integrations.hf import PagedCausalLM
from ..page_table import pages_for
from .sampling import SamplingParams


def check_params(params: object) -> None:
    """Raise ArgumentTypeError unless ``params`` is a :class:`SamplingParams` (whose
    settings were checked when it was made)."""
    if not isinstance(params, SamplingParams):
        raise ArgumentTypeError(f"params must be a SamplingParams, got {shown(params)}")


def checked_prompt(
    prompt: object, params: SamplingParams, runner: PagedCausalLM, what: str
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
    vocab = runner.vocab_size
    if tokens.min() < 0 or tokens.max() >= vocab:
        bad = tokens[(tokens < 0) | (tokens >= vocab)][:8].tolist()
        raise InvalidArgumentError(
            f"{what}: token ids must lie in [0, {vocab}) (the model's vocabulary), got {bad}"
        )
    check_fits(runner, tokens.size, params.max_new_tokens, what)
    return tokens


def check_fits(runner: PagedCausalLM, prompt_len: int, max_new_tokens: int, what: str) -> None:
    """Refuse a request that needs more pages than the engine can ever give it.

    A ValueError rather than a ``NoPageError``: ``NoPageError`` says "not now, free
    pages and retry", and no retry could ever serve this request.
    """
    # the last sampled token is never fed back: the sequence holds one token less
    held = prompt_len + max_new_tokens - 1
    cache = runner.cache
    need = pages_for(held, cache.page_size)
    usable = cache.num_pages - runner.reserved_pages
    if need > usable:
        raise InvalidArgumentError(
            f"{what} of {prompt_len} tokens with max_new_tokens={max_new_tokens} needs "
            f"{need} pages of {cache.page_size} tokens, but the pool has {usable} for "
            f"requests ({cache.num_pages} pages, {runner.reserved_pages} kept by the "
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
