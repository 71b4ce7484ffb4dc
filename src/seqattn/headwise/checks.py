"""Argument checks of the head-wise write path, run before anything changes.

Each raises a :class:`~seqattn.errors.SeqAttnError` that is also the matching builtin,
saying what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from attrs import define, field

from .._checks import int_array, shown
from ..errors import (
    ArgumentTypeError,
    InvalidLengthError,
    NoPageError,
    SeqAttnError,
    TensorSpecError,
)
from ..page_table import MAX_LENGTH
from ..storage import accepted_kv_dtypes
from .batch import HeadwiseBatch, HeadwiseStep
from .builder import StepBuilder
from .positions import HeadPositions

if TYPE_CHECKING:
    from .cache import HeadwiseKVCache


@define(slots=True, frozen=True)
class KVSpec:
    """What the K/V of a step's new tokens must be: ``[nnz, num_kv_heads, head_dim]``
    tensors of the storage dtype (or, for a float8 cache, float16/bfloat16/float32 to
    quantize) on the cache's device.

    Example:
        >>> spec = KVSpec(2, 8, torch.float32, torch.device("cpu"))
        >>> spec.check(torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), nnz=3)  # fits
        >>> try:
        ...     spec.check(torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), nnz=4)
        ... except TensorSpecError as error:
        ...     print(error)
        k must have shape [nnz, num_kv_heads, head_dim] = [4, 2, 8], got [3, 2, 8]
    """

    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    accepted: tuple[torch.dtype, ...] = field(init=False, repr=False)  # the dtypes K/V may have

    @accepted.default
    def _accepted(self) -> tuple[torch.dtype, ...]:
        return accepted_kv_dtypes(self.dtype)

    def check(self, k: torch.Tensor, v: torch.Tensor, nnz: int) -> None:
        """Raise ArgumentTypeError or TensorSpecError unless ``k`` and ``v`` fit ``nnz`` tokens."""
        try:  # the common case in a few attribute reads: this runs per layer per step
            if (
                k.shape == v.shape == (nnz, self.num_kv_heads, self.head_dim)
                and k.dtype == v.dtype
                and k.dtype in self.accepted
                and k.device == v.device == self.device
            ):
                return
        except AttributeError:
            pass
        expected = [nnz, self.num_kv_heads, self.head_dim]
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {shown(t)}")
            if list(t.shape) != expected:
                raise TensorSpecError(
                    f"{name} must have shape [nnz, num_kv_heads, head_dim] = {expected}, "
                    f"got {list(t.shape)}"
                )
            if t.dtype not in self.accepted:
                raise TensorSpecError(f"{name} must have dtype {self.dtype}, got {t.dtype}")
            if t.device != self.device:
                raise TensorSpecError(f"{name} must be on {self.device}, got {t.device}")
        if k.dtype != v.dtype:
            raise TensorSpecError(f"k and v differ in dtype: {k.dtype}, {v.dtype}")


def checked_lens(
    lens: Optional[Sequence[int]], batch_size: int, k: Optional[torch.Tensor] = None
) -> np.ndarray:
    """Tokens per sequence, ``[batch_size]`` int64 in ``[0, MAX_LENGTH]`` (default one each),
    summing to ``k``'s rows when ``k`` is given (InvalidLengthError, TensorSpecError)."""
    if lens is None:
        out = np.ones(batch_size, dtype=np.int64)
    else:
        out = int_array(lens, "append_lens", low=0, high=MAX_LENGTH, error=InvalidLengthError)
    if out.size != batch_size:
        raise InvalidLengthError(
            f"expected {batch_size} append lengths >= 0 (one per sequence), got {out.tolist()[:8]}"
        )
    if k is not None and isinstance(k, torch.Tensor) and k.dim() and k.shape[0] != out.sum():
        raise TensorSpecError(
            f"k holds {k.shape[0]} tokens but append_lens sum to {int(out.sum())}"
        )
    return out


def check_room(
    positions: HeadPositions,
    builder: StepBuilder,
    layers: Sequence[int],
    ids: list[int],
    slots: np.ndarray,
    lens: np.ndarray,
) -> None:
    """Refuse ``lens`` new tokens per sequence in every head of ``layers`` if they take a
    sequence past ``MAX_LENGTH`` (InvalidLengthError) or need more pages than the pool
    has free (NoPageError), before any array of the tokens' size is made."""
    longest = positions.longest(slots) + lens
    if longest.size and longest.max() > MAX_LENGTH:
        raise InvalidLengthError(
            f"append_lens {lens.tolist()[:8]} would take a sequence past {MAX_LENGTH} tokens"
        )
    need = pages_to_append(builder, builder.row_ids(layers, ids), lens, len(layers))
    free = builder.descriptor.cache_manager.available_pages_count
    if need > free:
        raise NoPageError(
            f"append_lens {lens.tolist()[:8]} need {need} pages in {len(layers)} layers, "
            f"but {free} are available"
        )


def pages_to_append(
    builder: StepBuilder, row_ids: list[int], lens: np.ndarray, num_layers: int
) -> int:
    """Free pages that ``lens[b]`` new tokens of sequence ``b`` would take in each of its
    page lists ``row_ids`` (``builder.row_ids(layers, ids)``, ``num_layers`` layers):
    each head fills its own last page first (heads a press compressed hold fewer
    tokens, so their pages differ)."""
    table = builder.descriptor.table
    held = table.lengths(table.slots(row_ids))
    added = np.tile(np.repeat(lens, builder.num_kv_heads), num_layers)
    return int(table.pages_needed(held, held + added))


def check_queries_held(
    positions: HeadPositions, layer: int, ids: list[int], slots: np.ndarray, counts: np.ndarray
) -> None:
    """Raise InvalidLengthError unless every head of sequence ``ids[b]`` holds its newest
    ``counts[b]`` positions in ``layer`` (the queries', which the causal mask, counting
    tokens, takes to be each head's last)."""
    held = positions.hold_newest(layer, slots, counts)
    if not held.all():
        b, h = (int(i) for i in np.argwhere(~held)[0])
        raise InvalidLengthError(
            f"head {h} of sequence {ids[b]} in layer {layer} does not hold all of the "
            f"newest {counts[b]} positions, the queries' own (see head_positions): "
            "attend with fewer query tokens"
        )


def step_batch(cache: HeadwiseKVCache, step: HeadwiseStep, layer: int) -> HeadwiseBatch:
    """The batch of ``layer`` in ``step``, checked to be of ``cache`` and current
    (ArgumentTypeError, IndexOutOfRangeError, SeqAttnError)."""
    if not isinstance(step, HeadwiseStep):
        raise ArgumentTypeError(f"step must be a HeadwiseStep, got {shown(step)}")
    if step.batches[0].owner is not cache:
        raise SeqAttnError("this step was begun on another HeadwiseKVCache")
    layer = cache.checked_layer(layer)
    batch = step.batches[layer - step.batches[0].layer]  # begin_step's: from layer 0
    if batch.version != cache.versions[layer]:
        raise SeqAttnError(
            f"the step is stale for layer {layer}: the layer changed after begin_step "
            "(append, compress, truncate_head or release); begin a new step"
        )
    return batch
