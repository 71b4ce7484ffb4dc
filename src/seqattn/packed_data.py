"""The tensors flashinfer's paged kernels take for one batch, and the formulas that read them."""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from attrs import define, field

from ._arrays import as_int_array, indptr_of
from .errors import InvalidLengthError
from .shared_prefix import SharedPrefix

Device = Union[torch.device, str, int]


def as_device(device: Device) -> torch.device:
    """A ``torch.device`` from a device, a string, or a CUDA ordinal (as the seed passes)."""
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@define(slots=True)
class FlashInferPackedData:
    """The page table of a batch in flashinfer's CSR form, plus optional append metadata.

    Sequence ``b`` of the batch holds pages
    ``kv_page_indices[kv_page_indptr[b] : kv_page_indptr[b + 1]]`` in token order,
    and ``kv_last_page_len[b]`` tokens of its last page are filled (0 for an empty
    sequence), so its length is ``(num_pages - 1) * page_size + kv_last_page_len[b]``.

    Attributes:
        kv_page_indices: ``shape: [total_pages], dtype: torch.int32``.
        kv_page_indptr: ``shape: [batch_size + 1], dtype: torch.int32``.
        kv_last_page_len: ``shape: [batch_size], dtype: torch.int32``.
        kv_seq_lens: tokens per sequence (after the step's append), on the host,
            ``shape: [batch_size], dtype: torch.int32``; None if built by hand.
        append_indptr: where each sequence's new tokens start in a packed
            ``[nnz, num_heads, head_dim]`` K/V tensor, ``shape: [batch_size + 1],
            dtype: torch.int32``; None when the batch was packed without append lengths.
        append_batch_indices: batch row of each new token, ``shape: [nnz], dtype: torch.int32``.
        append_positions: position of each new token in its sequence,
            ``shape: [nnz], dtype: torch.int32``.
        shared_prefix: rows that start with the same pages (host), when packed with
            ``shared_prefix=True``; attention can then read those pages once per group.

    Tensors may live on different devices: a batch packed for a CUDA device keeps
    ``kv_page_indices`` there and the small indptr / length arrays in pinned host
    memory, which is where flashinfer's ``plan()`` reads them without a sync.
    """

    kv_page_indices: torch.Tensor
    kv_page_indptr: torch.Tensor
    kv_last_page_len: torch.Tensor
    kv_seq_lens: Optional[torch.Tensor] = field(default=None, kw_only=True)
    append_indptr: Optional[torch.Tensor] = field(default=None, kw_only=True)
    append_batch_indices: Optional[torch.Tensor] = field(default=None, kw_only=True)
    append_positions: Optional[torch.Tensor] = field(default=None, kw_only=True)
    shared_prefix: Optional[SharedPrefix] = field(default=None, kw_only=True)
    _device_copy: Optional[FlashInferPackedData] = field(
        default=None, init=False, repr=False, eq=False
    )

    @property
    def batch_size(self) -> int:
        return self.kv_last_page_len.shape[0]

    def to_device(self, device: Device, non_blocking: bool = True) -> FlashInferPackedData:
        """A copy with every tensor on ``device`` (tensors already there are shared).

        The copy is remembered: asking again for the same device (as ``append_kv`` does
        once per layer) returns it without new transfers.
        """
        cached = self._device_copy
        if cached is not None and cached.kv_page_indptr.device == device:
            return cached  # the common case: the batch was moved already
        target = as_device(device)
        if cached is not None and cached.kv_page_indptr.device == target:
            return cached

        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(target, non_blocking=non_blocking)

        copy = FlashInferPackedData(
            move(self.kv_page_indices),  # type: ignore[arg-type]
            move(self.kv_page_indptr),  # type: ignore[arg-type]
            move(self.kv_last_page_len),  # type: ignore[arg-type]
            kv_seq_lens=move(self.kv_seq_lens),
            append_indptr=move(self.append_indptr),
            append_batch_indices=move(self.append_batch_indices),
            append_positions=move(self.append_positions),
            shared_prefix=self.shared_prefix,
        )
        self._device_copy = copy
        return copy


def checked_indptr(
    lengths: object, what: str, limits: np.ndarray, minimum: int, hint: str
) -> np.ndarray:
    """``[0, cumsum(lengths)]`` as int32, after checking ``minimum <= lengths[b] <= limits[b]``.

    Raises InvalidLengthError naming ``what``, with ``hint`` on how to fix it.
    """
    values = as_int_array(lengths, what, InvalidLengthError)
    if values.size != limits.size:
        raise InvalidLengthError(
            f"expected {limits.size} {what} (one per sequence), got {values.size}"
        )
    if values.size and (values.min() < minimum or (values > limits).any()):
        raise InvalidLengthError(
            f"{what} must lie in [{minimum}, sequence length]: got {values.tolist()[:8]} "
            f"for lengths {limits.tolist()[:8]} ({hint})"
        )
    return indptr_of(values)


def seq_lens_from_page_table(
    kv_page_indptr: np.ndarray, kv_last_page_len: np.ndarray, page_size: int
) -> np.ndarray:
    """Tokens per sequence, ``[batch_size]`` int64, from a CSR page table on the host."""
    num_pages = np.diff(kv_page_indptr.astype(np.int64))
    return np.where(num_pages > 0, (num_pages - 1) * page_size + kv_last_page_len, 0)


def append_rows_positions(
    append_indptr: np.ndarray, seq_lens: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Batch row and in-sequence position of each appended token.

    ``seq_lens`` are the lengths *after* the append, so token ``j`` of sequence ``b``
    lands at ``seq_lens[b] - append_len[b] + j``: right after what was there before.

    Args:
        append_indptr: ``shape: [batch_size + 1]``, integers, on the host.
        seq_lens: ``shape: [batch_size]``.

    Returns:
        ``(batch_indices, positions)``, each ``shape: [nnz], dtype: int32``.
    """
    counts: np.ndarray = np.diff(append_indptr.astype(np.int64))
    nnz = int(counts.sum())
    if nnz == counts.size and (counts == 1).all():  # a decode step: one token each
        return np.arange(nnz, dtype=np.int32), (seq_lens - 1).astype(np.int32)
    rows = np.repeat(np.arange(counts.size, dtype=np.int32), counts)
    first = np.repeat(seq_lens - counts - append_indptr[:-1], counts)
    return rows, (np.arange(nnz) + first).astype(np.int32)
