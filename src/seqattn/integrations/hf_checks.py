"""Checks shared by the transformers runners (:class:`~.hf.PagedCausalLM`,
:class:`~.hf_headwise.HeadwiseCausalLM`): the model, the backend, a step's ids and
tokens. Each raises a :class:`~seqattn.errors.SeqAttnError` that is also the matching
builtin, before anything changes.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from .._checks import id_list, int_array, shown
from ..attention.paged_attention import BACKENDS
from ..errors import ArgumentTypeError, InvalidArgumentError, InvalidLengthError, TensorSpecError
from ..page_table import check_distinct

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_model(model: Any) -> None:
    """Raise unless ``model`` is a ``*ForCausalLM`` of a family seqattn runs.

    Raises:
        ArgumentTypeError: not a torch module with a ``config``.
        InvalidArgumentError: an unsupported family, no language-model head (a base
            model such as ``LlamaModel``), or no parameters.
    """
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        raise ArgumentTypeError(
            f"model must be a transformers *ForCausalLM (a torch module with a config), "
            f"got {shown(model)}"
        )
    check_supported(model.config)
    heads = getattr(model, "get_output_embeddings", None)
    if heads is None or heads() is None:
        raise InvalidArgumentError(
            f"model must be a *ForCausalLM with a language-model head; "
            f"{type(model).__name__} has none (a base model?)"
        )
    if next(model.parameters(), None) is None:
        raise InvalidArgumentError(f"model {type(model).__name__} has no parameters")


def check_supported(config: Any) -> None:
    """Raise InvalidArgumentError unless ``config`` is a decoder family seqattn runs
    (Llama-like attention)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgumentError(
            f"model type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def head_dim_of(config: Any) -> int:
    """The attention head size: the config's ``head_dim`` (Qwen3 sets its own), else
    ``hidden_size // num_attention_heads``."""
    return int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )


def check_backend(backend: object) -> None:
    """Raise unless ``backend`` names an attention backend."""
    if not isinstance(backend, str):
        raise ArgumentTypeError(f"backend must be one of {BACKENDS}, got {shown(backend)}")
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend must be one of {BACKENDS}, got {backend!r}")


def attention_variants(model: Any) -> set[tuple[int, Optional[float]]]:
    """The (window_left, scale) pairs the model's attention layers use (window_left -1:
    no sliding window)."""
    variants: set[tuple[int, Optional[float]]] = set()
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "scaling"):
            window = sliding_window(module, model.config)
            variants.add((-1 if window is None else int(window) - 1, float(module.scaling)))
    return variants


def sliding_window(attention: Any, config: Any) -> Optional[int]:
    """The ``sliding_window`` an attention module passes to its attention function: its
    own (Qwen2/3's ``layer_types``), else the config's (Mistral), else None."""
    return getattr(attention, "sliding_window", getattr(config, "sliding_window", None))  # type: ignore[no-any-return]


def batch_ids(seq_ids: object) -> list[int]:
    """A step's sequence ids: integers, at least one, none twice."""
    ids = id_list(seq_ids, "seq_ids")
    if not ids:
        raise InvalidLengthError("a forward needs at least one sequence, got none")
    check_distinct(ids)
    return ids


def token_row(tokens: object, what: str, vocab_size: int) -> np.ndarray:
    """``[n]`` int64 token ids, each inside the model's vocabulary ``[0, vocab_size)``."""
    row = int_array(tokens, what)
    if row.size and (int(row.min()) < 0 or int(row.max()) >= vocab_size):
        bad = row[(row < 0) | (row >= vocab_size)][:8].tolist()
        raise InvalidArgumentError(
            f"{what}: token ids must lie in [0, {vocab_size}) (the model's vocabulary), got {bad}"
        )
    return row


def token_rows(tokens: Any, n: int, vocab_size: int) -> list[np.ndarray]:
    """One non-empty checked row of token ids per sequence (``n`` of them)."""
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
        raise ArgumentTypeError(
            f"tokens must be one sequence of token ids per sequence, got {shown(tokens)}"
        )
    rows = [token_row(row, f"tokens[{i}]", vocab_size) for i, row in enumerate(tokens)]
    if len(rows) != n:
        raise InvalidLengthError(f"pass one token row per sequence ({n}), got {len(rows)}")
    empty = [i for i, row in enumerate(rows) if row.size == 0]
    if empty:
        raise InvalidLengthError(f"every token row needs a token; rows {empty[:8]} are empty")
    return rows


def decode_tokens(tokens: object, n: int, vocab_size: int) -> np.ndarray:
    """One checked host token id per sequence of a decode step, ``[n]`` int64."""
    row = token_row(tokens, "tokens", vocab_size)
    if row.size != n:
        raise InvalidLengthError(f"pass one token per sequence ({n}), got {row.size}")
    return row


def check_device_tokens(tokens: torch.Tensor, n: int, device: torch.device) -> None:
    """dtype, shape and device of tokens on the device (values stay unread)."""
    where = tokens.device
    index_ok = None in (where.index, device.index) or where.index == device.index
    same = where.type == device.type and index_ok
    if tokens.dtype != torch.int64 or tuple(tokens.shape) != (n,) or not same:
        raise TensorSpecError(
            f"tokens on the device must be torch.int64 of shape [{n}] on {device}, got "
            f"{tokens.dtype} of shape {list(tokens.shape)} on {tokens.device}"
        )


def checked_forward(
    descriptor: Any,
    seq_ids: object,
    tokens: Any,
    fed: Optional[torch.Tensor],
    vocab_size: int,
    device: torch.device,
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """A forward's arguments, checked: the ids, each sequence's new-token count (the
    ``fed`` ones first, one token each) and the host rows' tokens flat, ``[sum]`` int64.

    ``fed``: None, or the first ``k`` sequences' tokens, int64 ``[k]`` on ``device``,
    ``0 < k < len(seq_ids)``; ``tokens`` then holds the rows of the sequences after them.
    Their values are read (and checked) only on the CPU, where that costs no wait."""
    seq_ids = batch_ids(seq_ids)
    k = 0
    if fed is not None:
        if not isinstance(fed, torch.Tensor):
            raise ArgumentTypeError(f"fed must be a tensor of token ids, got {shown(fed)}")
        k = fed.shape[0] if fed.dim() == 1 else 0
        if not 0 < k < len(seq_ids):
            raise InvalidLengthError(
                f"fed must hold one token for each of the first k of the {len(seq_ids)} "
                f"sequences, 0 < k < {len(seq_ids)}, got shape {list(fed.shape)} (a batch "
                "fed entirely from the device is a decode step)"
            )
        check_device_tokens(fed, k, device)
        if fed.device.type == "cpu":
            token_row(fed, "fed", vocab_size)
    rows = token_rows(tokens, len(seq_ids) - k, vocab_size)
    lens = np.array([1] * k + [row.size for row in rows], dtype=np.int64)
    check_allocated(descriptor, seq_ids, lens)
    return seq_ids, lens, np.concatenate(rows)


def checked_decode(
    descriptor: Any, seq_ids: object, tokens: Any, vocab_size: int, device: torch.device
) -> tuple[list[int], np.ndarray, Any]:
    """A decode step's arguments, checked: the ids, ``[n]`` ones (a token each) and the
    tokens: a device tensor as it is (values unread), host tokens as ``[n]`` int64."""
    seq_ids = batch_ids(seq_ids)
    n = len(seq_ids)
    if isinstance(tokens, torch.Tensor) and tokens.device.type != "cpu":
        check_device_tokens(tokens, n, device)
    else:
        tokens = decode_tokens(tokens, n, vocab_size)
    ones = np.ones(n, np.int64)
    check_allocated(descriptor, seq_ids, ones)
    return seq_ids, ones, tokens


def check_allocated(descriptor: Any, seq_ids: list[int], new: np.ndarray) -> None:
    """Each sequence of ``descriptor`` (a ``CacheDescriptor``) already holds its
    ``new[i]`` new tokens (allocated before the forward); else InvalidLengthError."""
    lens = descriptor.seq_lens(seq_ids)
    short = np.flatnonzero(lens < new)
    if short.size:
        i = int(short[0])
        raise InvalidLengthError(
            f"sequence {seq_ids[i]} holds {int(lens[i])} tokens, fewer than the "
            f"{int(new[i])} new ones passed: allocate them first"
        )
