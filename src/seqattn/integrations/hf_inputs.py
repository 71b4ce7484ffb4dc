"""What :class:`~seqattn.integrations.hf.PagedCausalLM` checks in a step's inputs
before the model runs: sequence ids, token rows on the host, token tensors on the
device, and that every new token is allocated. Each raises a
:class:`~seqattn.errors.SeqAttnError` saying what was expected and what came."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._checks import id_list, int_array, shown
from ..descriptor import CacheDescriptor
from ..errors import ArgumentTypeError, InvalidArgumentError, InvalidLengthError, TensorSpecError
from ..page_table import check_distinct


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
    """One non-empty checked row per sequence, ``n`` of them."""
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


def check_allocated(descriptor: CacheDescriptor, seq_ids: list[int], new: np.ndarray) -> None:
    """Each sequence already holds its ``new[i]`` new tokens (allocated before the forward)."""
    lens = descriptor.seq_lens(seq_ids)
    short = np.flatnonzero(lens < new)
    if short.size:
        i = int(short[0])
        raise InvalidLengthError(
            f"sequence {seq_ids[i]} holds {int(lens[i])} tokens, fewer than the "
            f"{int(new[i])} new ones passed: allocate them first"
        )


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
