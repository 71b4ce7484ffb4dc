"""The tensors flashinfer's paged kernels take for one batch, and the formulas that read them."""

from __future__ import annotations

from typing import Optional, Union

import torch
from attrs import define, field

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
        kv_seq_lens: tokens per sequence after the step's append,
            ``shape: [batch_size], dtype: torch.int32``, or None.
        append_indptr: where each sequence's new tokens start in a packed
            ``[nnz, num_heads, head_dim]`` K/V tensor, ``shape: [batch_size + 1],
            dtype: torch.int32``; None when the batch was packed without append lengths.
        append_batch_indices: batch row of each new token, ``shape: [nnz], dtype: torch.int32``.
        append_positions: position of each new token in its sequence,
            ``shape: [nnz], dtype: torch.int32``.

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
        target = as_device(device)
        cached = self._device_copy
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
        )
        self._device_copy = copy
        return copy


def seq_lens_from_page_table(
    kv_page_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, page_size: int
) -> torch.Tensor:
    """Tokens per sequence, ``[batch_size]`` int32, on the device of the inputs."""
    num_pages = kv_page_indptr[1:] - kv_page_indptr[:-1]
    return torch.where(num_pages > 0, (num_pages - 1) * page_size + kv_last_page_len, 0).to(
        torch.int32
    )


def append_batch_indices_positions(
    append_indptr: torch.Tensor, seq_lens: torch.Tensor, nnz: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch row and in-sequence position of each appended token.

    ``seq_lens`` are the lengths *after* the append, so token ``j`` of sequence ``b``
    lands at ``seq_lens[b] - append_len[b] + j``: right after what was there before.

    Args:
        append_indptr: ``shape: [batch_size + 1]``, any integer dtype.
        seq_lens: ``shape: [batch_size]``, on the same device.
        nnz: ``append_indptr[-1]``, passed by the caller so nothing syncs.

    Returns:
        ``(batch_indices, positions)``, each ``shape: [nnz], dtype: torch.int32``.
    """
    device = append_indptr.device
    append_indptr = append_indptr.long()
    append_lens = append_indptr[1:] - append_indptr[:-1]
    rows = torch.arange(append_lens.shape[0], device=device)
    batch = torch.repeat_interleave(rows, append_lens, output_size=nnz)
    first_new = (seq_lens.long() - append_lens - append_indptr[:-1])[batch]
    positions = torch.arange(nnz, device=device) + first_new
    return batch.to(torch.int32), positions.to(torch.int32)
