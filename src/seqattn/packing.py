"""Build a batch's CSR page table (and append positions) from a :class:`SequencePageTable`.

Host side, a decode batch that repeats changes little between steps: only sequences
that crossed a page boundary gained a page. The packer keeps the last batch's page
indices and splices new pages in, never re-deriving what did not change. No result is
modified after it is returned (when nothing changed, the next result shares its array).

Device side (CUDA), the page ids live in a device mirror of the table's arena: only
newly written page ids cross the bus (from pinned memory, non-blocking), and the
batch's indices are gathered on the device, so packing never waits on the GPU.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from attrs import define

from ._arrays import indptr_of
from ._transfer import upload
from .packed_data import FlashInferPackedData, append_rows_positions, checked_indptr
from .page_table import SequencePageTable
from .shared_prefix import SharedPrefix, find_shared_prefixes


@define(slots=True)
class _Snapshot:
    """The last packed batch: enough to splice the next one from it."""

    slots: np.ndarray
    layout_version: int
    growth_version: int
    counts: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray


class BatchPacker:
    """Packs batches of one :class:`SequencePageTable` for flashinfer."""

    def __init__(self, table: SequencePageTable) -> None:
        self.table = table
        self._snapshot: Optional[_Snapshot] = None
        self._mirror: Optional[_DeviceArena] = None
        self._shared: Optional[tuple[np.ndarray, int, int, SharedPrefix]] = None

    def pack(
        self,
        slots: np.ndarray,
        append_lens: object = None,
        device: Optional[torch.device] = None,
        shared_prefix: bool = False,
    ) -> FlashInferPackedData:
        """The CSR page table of ``slots`` (and append metadata when ``append_lens`` is given).

        With ``device`` None or a CPU device every tensor is on the CPU. With a CUDA
        device, ``kv_page_indices`` and the append metadata are on it, and indptr and
        lengths in pinned host memory (what ``plan()`` wants; ``to_device`` moves them).
        ``shared_prefix`` also finds the rows that start with the same pages.
        """
        table = self.table
        ps = table.page_size
        lens = table.lengths(slots)
        # one divmod gives both: n + ps - 1 = ceil(n / ps) * ps + (n - 1) % ps, for n >= 1
        counts, last = np.divmod(lens + (ps - 1), ps)
        last += 1
        np.minimum(last, lens, out=last)  # an empty sequence: 0
        indptr = indptr_of(counts)
        append: list[np.ndarray] = []  # [append_indptr, batch_indices, positions]
        if append_lens is not None:
            append_indptr = checked_indptr(
                append_lens, "append_lens", lens, 0, "allocate before packing"
            )
            append = [append_indptr, *append_rows_positions(append_indptr, lens)]
        if device is not None and device.type != "cpu":
            # the batch's page ids are gathered on the device; the new page ids and the
            # append metadata go up in the same single pinned copy
            indices, on_gpu, on_host = self._device_arena(device).gather(
                table, slots, counts, indptr, append[1:], [indptr, last, lens, *append[:1]]
            )
            packed = FlashInferPackedData(indices, on_host[0], on_host[1], kv_seq_lens=on_host[2])
            tensors = [on_host[3], *on_gpu] if append else []
        else:
            indices = torch.from_numpy(self._host_indices(slots, counts, indptr))
            packed = FlashInferPackedData(
                indices, torch.from_numpy(indptr), torch.from_numpy(last),
                kv_seq_lens=torch.from_numpy(lens),
            )  # fmt: skip
            tensors = [torch.from_numpy(a) for a in append]
        if tensors:
            packed.append_indptr, packed.append_batch_indices, packed.append_positions = tensors
        if shared_prefix:
            packed.shared_prefix = self._shared_prefix(slots, lens)
        packed.stamp = table.stamp(slots)
        return packed

    def _shared_prefix(self, slots: np.ndarray, lens: np.ndarray) -> SharedPrefix:
        """Groups of rows with common leading pages; the last answer while only growth
        happened (new pages are never shared, so growth cannot change the groups)."""
        table, last = self.table, self._shared
        versions = (table.layout_version, table.membership_version)
        if last is not None and last[1:3] == versions and np.array_equal(last[0], slots):
            return last[3]
        found = find_shared_prefixes(table.arena, table.starts(slots), lens // table.page_size)
        self._shared = (slots, *versions, found)
        return found

    def _host_indices(
        self, slots: np.ndarray, counts: np.ndarray, indptr: np.ndarray
    ) -> np.ndarray:
        table, snap = self.table, self._snapshot
        growth = table.last_growth
        if (
            snap is None
            or snap.layout_version != table.layout_version
            or not (snap.slots is slots or np.array_equal(snap.slots, slots))
        ):
            indices = table.pages_of_slots(slots)
        elif snap.growth_version == table.growth_version:
            indices = snap.indices  # nothing changed
        elif growth[0] == table.growth_version == snap.growth_version + 1 and growth[1] is slots:
            # the one change since the snapshot is a decode step of this very batch,
            # whose new pages the table recorded
            indices = _insert_after_rows(snap, indptr, growth[2], None, growth[3])
        else:
            # nothing but growth at the end since the snapshot: counts only went up
            indices = _splice(snap, slots, counts, indptr, table)
        self._snapshot = _Snapshot(
            slots, table.layout_version, table.growth_version, counts, indptr, indices
        )
        return indices

    def _device_arena(self, device: torch.device) -> _DeviceArena:
        if self._mirror is None or self._mirror.device != device:
            self._mirror = _DeviceArena(device, self.table)
        return self._mirror


def _splice(
    snap: _Snapshot,
    slots: np.ndarray,
    counts: np.ndarray,
    indptr: np.ndarray,
    table: SequencePageTable,
) -> np.ndarray:
    """The snapshot's indices with the pages each row gained appended to the row.

    Valid only when, since the snapshot, rows have gained pages at their ends and
    nothing else changed.
    """
    grown = (counts != snap.counts).nonzero()[0]  # not np.flatnonzero: 3 us slower
    if grown.size == 0:
        return snap.indices
    arena_ends = table.starts(slots[grown]) + counts[grown]
    if int(indptr[-1]) - snap.indices.size == grown.size:  # one page each: a decode step
        return _insert_after_rows(snap, indptr, grown, None, table.arena[arena_ends - 1])
    gained = counts[grown] - snap.counts[grown]
    back = np.arange(int(gained.sum())) - np.repeat(np.cumsum(gained), gained)
    pages = table.arena[np.repeat(arena_ends, gained) + back]
    return _insert_after_rows(snap, indptr, grown, gained, pages)


def _insert_after_rows(
    snap: _Snapshot,
    indptr: np.ndarray,
    rows: np.ndarray,
    gained: Optional[np.ndarray],
    pages: np.ndarray,
) -> np.ndarray:
    """The snapshot's indices with ``pages`` inserted at the ends of ``rows`` (ascending).

    ``gained[i]`` pages go to ``rows[i]`` (one each when None); ``indptr`` is the new
    batch's, so the inserted pages end each grown row there.
    """
    old = snap.indices
    if rows.size == 0:
        return old
    new = np.empty(int(indptr[-1]), dtype=np.int32)
    row_ends = rows + 1
    # old pages move right by the pages gained in earlier rows: copy them run by run
    # (through memoryviews, whose slicing costs a fraction of numpy's)
    to, frm = new.data, old.data
    src = shift = 0
    extras = [1] * rows.size if gained is None else gained.tolist()
    for end, extra in zip(snap.indptr[row_ends].tolist(), extras, strict=True):
        to[src + shift : end + shift] = frm[src:end]
        src, shift = end, shift + extra
    to[src + shift :] = frm[src:]
    new_ends = indptr[row_ends]
    if gained is None:
        new[new_ends - 1] = pages
    else:
        back = np.arange(pages.size) - np.repeat(np.cumsum(gained), gained)
        new[np.repeat(new_ends, gained) + back] = pages
    return new


class _DeviceArena:
    """A device copy of a page table's arena, kept current from the table's write log."""

    def __init__(self, device: torch.device, table: SequencePageTable) -> None:
        self.device = device
        self.arena = torch.from_numpy(table.arena).to(device)
        self.arange = torch.arange(1024, device=device)
        table.write_log = []  # the copy above already holds every earlier write

    def gather(
        self,
        table: SequencePageTable,
        slots: np.ndarray,
        counts: np.ndarray,
        indptr: np.ndarray,
        to_device: list[np.ndarray],
        to_host: list[np.ndarray],
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The batch's ``kv_page_indices`` gathered on the device (int32).

        Also returns ``to_device`` as int32 device tensors and ``to_host`` as int32 pinned
        host tensors: all of them share one pinned buffer and one host-to-device copy.
        """
        if table.arena.size != self.arena.shape[0]:
            # the arena grew; its compaction logged every live position
            self.arena = torch.zeros(table.arena.size, dtype=torch.int32, device=self.device)
        log = table.write_log
        # positions written since the last upload; a position written twice is sent once,
        # with the value the host arena holds now
        written = np.unique(np.concatenate(log)) if log else np.zeros(0, dtype=np.int64)
        log.clear()  # type: ignore[union-attr]
        # how far row b's page ids sit in the arena from their place in the batch
        shift = table.starts(slots) - indptr[:-1]
        parts = [written, table.arena[written], shift, counts, *to_device]
        pieces, host = upload(self.device, parts, to_host)  # int32: all fit
        if written.size:
            self.arena.index_copy_(0, pieces[0].long(), pieces[1])
        total = int(indptr[-1])
        if total > self.arange.shape[0]:
            self.arange = torch.arange(2 * total, device=self.device)
        per_page = torch.repeat_interleave(pieces[2], pieces[3], output_size=total)
        indices = self.arena[per_page + self.arange[:total]]
        return indices, pieces[4:], host
