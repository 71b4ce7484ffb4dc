"""The tensors flashinfer's paged kernels take for one batch, and the formulas that read them."""

from __future__ import annotations

from typing import Any, Optional, Protocol, Union

import numpy as np
import torch
from attrs import define, field

from ._arrays import indptr_of
from ._checks import int_array, is_int, shown
from .errors import (
    ArgumentTypeError,
    IndexOutOfRangeError,
    InvalidArgumentError,
    InvalidLengthError,
    StaleBatchError,
    TensorSpecError,
)
from .shared_prefix import SharedPrefix

Device = Union[torch.device, str, int]


def as_device(device: Device) -> torch.device:
    """A ``torch.device`` from a device, a string, or a CUDA ordinal (as the seed passes).

    Raises:
        ArgumentTypeError: not a device, str or int. InvalidArgumentError: a device
        string torch does not know, or a CUDA device where CUDA is not available.
    """
    try:
        known = _DEVICES.get((type(device), device))  # packing asks every step
    except TypeError:  # unhashable: certainly no device
        known = None
    if known is None:
        known = _checked_device(device)
        _DEVICES[type(device), device] = known
    if known.type == "cuda" and known.index is None:  # the current one, as torch resolves it
        return torch.device("cuda", torch.cuda.current_device())
    return known


_DEVICES: dict[tuple[type, object], torch.device] = {}


def _checked_device(device: object) -> torch.device:
    if isinstance(device, torch.device):
        dev = device
    elif is_int(device):
        dev = _parsed(lambda: torch.device("cuda", int(device)), device)  # type: ignore[call-overload]
    elif isinstance(device, str):
        dev = _parsed(lambda: torch.device(device), device)
    else:
        raise ArgumentTypeError(
            f"device must be a torch.device, a string or a CUDA ordinal, got {shown(device)}"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(f"device {device!r} is CUDA, but CUDA is not available")
        count = torch.cuda.device_count()
        if dev.index is not None and not 0 <= dev.index < count:
            raise InvalidArgumentError(f"device {device!r}: this machine has {count} CUDA devices")
    return dev


def _parsed(make: Any, device: object) -> torch.device:
    try:
        return make()  # type: ignore[no-any-return]
    except (RuntimeError, ValueError) as error:
        raise InvalidArgumentError(
            f"device {device!r} is not a device torch knows: {error}"
        ) from None


class VersionedTable(Protocol):
    """A page table that stamps its rows at each change (``SequencePageTable``)."""

    allocator: Any
    row_versions: np.ndarray
    clock: int


class BatchStamp:
    """What a packed batch was built from: its table, the table rows (slots) of its
    sequences, and each row's version then.

    A batch is current while none of *its own* rows changed (tokens added, pages cut
    or swapped, the sequence ended): changes to other sequences leave it valid. The
    check costs one integer compare while the table did not change at all since the
    last check, and O(batch) otherwise.
    """

    __slots__ = ("checked_at", "slots", "table", "versions")

    def __init__(
        self, table: VersionedTable, slots: np.ndarray, versions: np.ndarray, clock: int
    ) -> None:
        self.table = table
        self.slots = slots  # [batch_size] int64
        self.versions = versions  # [batch_size] int64
        self.checked_at = clock  # the table's clock when the batch was last found current

    def check(self, allocator: object, use: str) -> None:
        """Raise StaleBatchError unless the batch belongs to ``allocator``'s pool and its
        rows are as they were packed; ``use`` names the call (for the message)."""
        table = self.table
        if table.allocator is not allocator:
            raise StaleBatchError(
                f"{use}: this batch was packed by a CacheDescriptor over another cache; "
                "pack it with this cache's descriptor"
            )
        if self.checked_at == table.clock:
            return
        now = table.row_versions[self.slots]
        if not np.array_equal(now, self.versions):
            rows = np.flatnonzero(now != self.versions)[:8].tolist()
            raise StaleBatchError(
                f"{use}: this batch is stale: its rows {rows} changed after it was packed "
                "(allocate, allocate_decoding, truncate, commit or release); pack again"
            )
        self.checked_at = table.clock

    def rows(self, start: int, stop: int) -> BatchStamp:
        """The stamp of rows ``start:stop`` (a batch cut from this one)."""
        return BatchStamp(
            self.table, self.slots[start:stop], self.versions[start:stop], self.checked_at
        )


@define(slots=True, frozen=True)
class FlashInferPackedData:
    """One step's batch, described once: the page table in flashinfer's CSR form, what
    the step appends, and everything the step sends to the device.

    Sequence ``b`` of the batch holds pages
    ``kv_page_indices[kv_page_indptr[b] : kv_page_indptr[b + 1]]`` in token order,
    and ``kv_last_page_len[b]`` tokens of its last page are filled (0 for an empty
    sequence), so its length is ``(num_pages - 1) * page_size + kv_last_page_len[b]``.

    ``CacheDescriptor.pack_for_flashinfer`` builds it once per step (all device tensors
    in one host-to-device copy); storage, attention and model runners read it and never
    derive its facts again. It is immutable, and stamped: a call handed a batch whose
    own sequences changed since packing (or packed over another cache) refuses it.

    Attributes:
        kv_page_indices: ``shape: [total_pages], dtype: torch.int32``, on the device.
        kv_page_indptr: ``shape: [batch_size + 1], dtype: torch.int32``, host (pinned
            for a CUDA batch: ``plan()`` reads it there without a sync).
        kv_last_page_len: ``shape: [batch_size], dtype: torch.int32``, host.
        kv_seq_lens: tokens per sequence after the step's append,
            ``shape: [batch_size], dtype: torch.int32``, host; None if built by hand.
        append_indptr: where each sequence's new tokens start in a packed
            ``[nnz, num_heads, head_dim]`` K/V tensor, ``shape: [batch_size + 1],
            dtype: torch.int32``, host; None when packed without append lengths.
        append_batch_indices: batch row of each new token, ``shape: [nnz],
            dtype: torch.int32``, on the device.
        append_positions: position of each new token in its sequence, ``shape: [nnz],
            dtype: torch.int32``, on the device (also the model's position ids).
        device_indptr, device_last_page_len: ``kv_page_indptr`` and ``kv_last_page_len``
            on the device, where the append kernel reads them (the same tensors on a CPU).
        last_rows: the new-token row of each sequence's last new token (whose logits a
            model keeps), ``shape: [batch_size], dtype: torch.int32``, on the device.
        inputs: the caller's arrays that went up with the step (e.g. token ids), int32
            device tensors in the order given.
        shared_prefix: rows that start with the same pages (host), when packed with
            ``shared_prefix=True``; attention can then read those pages once per group.
        stamp: what the batch was packed from (None for a batch built by hand).
    """

    kv_page_indices: torch.Tensor
    kv_page_indptr: torch.Tensor
    kv_last_page_len: torch.Tensor
    kv_seq_lens: Optional[torch.Tensor] = field(default=None, kw_only=True)
    append_indptr: Optional[torch.Tensor] = field(default=None, kw_only=True)
    append_batch_indices: Optional[torch.Tensor] = field(default=None, kw_only=True)
    append_positions: Optional[torch.Tensor] = field(default=None, kw_only=True)
    device_indptr: Optional[torch.Tensor] = field(default=None, kw_only=True, repr=False)
    device_last_page_len: Optional[torch.Tensor] = field(default=None, kw_only=True, repr=False)
    last_rows: Optional[torch.Tensor] = field(default=None, kw_only=True, repr=False)
    inputs: tuple[torch.Tensor, ...] = field(default=(), kw_only=True, repr=False, eq=False)
    shared_prefix: Optional[SharedPrefix] = field(default=None, kw_only=True)
    stamp: Optional[BatchStamp] = field(default=None, kw_only=True, repr=False, eq=False)

    @property
    def batch_size(self) -> int:
        return self.kv_last_page_len.shape[0]

    def check_current(self, allocator: object, num_pages: int, use: str) -> None:
        """Raise unless this batch may address the pages of ``allocator``'s pool now.

        A packed batch must be current (:class:`BatchStamp`). A batch built by hand
        carries no stamp: its page ids are checked to lie in the pool where they are on
        the host (on a GPU that would cost a sync; they are the caller's promise).

        Raises:
            StaleBatchError: stale, or packed for another cache. IndexOutOfRangeError:
            a hand-built batch names pages outside the pool.
        """
        if self.stamp is not None:
            self.stamp.check(allocator, use)
            return
        indices = self.kv_page_indices
        if indices.device.type == "cpu" and indices.numel():
            int_array(indices, f"{use}: kv_page_indices", low=0, high=num_pages - 1,
                      error=IndexOutOfRangeError)  # fmt: skip


def checked_indptr(
    lengths: object, what: str, limits: np.ndarray, minimum: int, hint: str
) -> np.ndarray:
    """``[0, cumsum(lengths)]`` as int32, after checking ``minimum <= lengths[b] <= limits[b]``.

    Raises InvalidLengthError naming ``what``, with ``hint`` on how to fix it.
    """
    values = int_array(lengths, what, error=InvalidLengthError)
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


def derived_append(
    packed: FlashInferPackedData, append_indptr: object, nnz: int, page_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Batch row and position of each of ``nnz`` new tokens (host, int32) of a batch
    that does not carry them: built by hand, or appended with an explicit indptr (the
    seed's ``append_indptr_cpu``), checked against the batch's lengths.

    Raises:
        TensorSpecError: ``append_indptr`` is on a GPU, or not ``[batch_size + 1]``
            from 0 to ``nnz``. InvalidLengthError: an append longer than its sequence.
    """
    if isinstance(append_indptr, torch.Tensor) and append_indptr.device.type != "cpu":
        raise TensorSpecError("append_indptr_cpu must be a CPU tensor (the seed's contract)")
    indptr = int_array(append_indptr, "append_indptr_cpu", error=InvalidLengthError)
    batch_size = packed.kv_last_page_len.shape[0]
    if indptr.shape != (batch_size + 1,) or indptr[0] != 0 or int(indptr[-1]) != nnz:
        raise TensorSpecError(
            f"append_indptr_cpu must have shape [{batch_size + 1}], start at 0 and end "
            f"at nnz={nnz}, got {indptr.tolist()[:8]}"
        )
    # lengths from the host copy (a batch moved to the GPU by hand costs a sync here)
    seq_lens = seq_lens_from_page_table(
        packed.kv_page_indptr.cpu().numpy(), packed.kv_last_page_len.cpu().numpy(), page_size
    )
    append_lens = np.diff(indptr)
    if ((append_lens < 0) | (append_lens > seq_lens)).any():
        raise InvalidLengthError(
            f"append lengths {append_lens.tolist()[:8]} must lie in [0, length] for "
            f"sequence lengths {seq_lens.tolist()[:8]}: allocate before packing"
        )
    return append_rows_positions(indptr, seq_lens)
