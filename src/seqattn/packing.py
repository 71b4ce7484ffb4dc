"""Build one step's :class:`FlashInferPackedData` from a :class:`SequencePageTable`.

Host side, a decode batch that repeats changes little between steps: only sequences
that crossed a page boundary gained a page. The packer keeps the last batch's page
indices and splices new pages in, never re-deriving what did not change (the table's
``row_layouts`` say which rows changed otherwise). No result is modified after it is
returned (when nothing changed, the next result shares its array).

Device side (CUDA), every device tensor of a step goes up in one pinned, non-blocking
copy, so packing never waits on the GPU. A batch of up to :data:`HOST_INDICES_MAX`
page ids sends them whole in that copy (spliced on the host as above: a few kilobytes,
and no launch). A larger one keeps its page ids in a device copy of the table's arena:
only the ids the copy lacks cross the bus, and the batch's indices are gathered on the
device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from attrs import define

from ._arrays import concat_ranges, indptr_of
from ._transfer import upload
from .packed_data import FlashInferPackedData, append_rows_positions, checked_indptr
from .page_table import SequencePageTable
from .shared_prefix import SharedPrefix, find_shared_prefixes


@define(slots=True)
class _Snapshot:
    """The last packed batch: enough to splice the next one from it."""

    slots: np.ndarray
    clock: int  # the table's clock then
    counts: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray


# up to this many page ids (256 KiB) a CUDA step sends its batch's ids whole in its one
# copy, spliced on the host from the last batch's; past it only the ids the device copy
# of the arena lacks go up, and the batch's are gathered there (a few more launches)
HOST_INDICES_MAX = 65536


class BatchPacker:
    """Builds the step (:class:`FlashInferPackedData`) of batches of one table."""

    def __init__(self, table: SequencePageTable) -> None:
        self.table = table
        self._snapshot: Optional[_Snapshot] = None
        self._mirror: Optional[_DeviceArena] = None
        self._shared: Optional[tuple[np.ndarray, int, SharedPrefix]] = None

    def pack(
        self,
        slots: np.ndarray,
        append_lens: object = None,
        device: Optional[torch.device] = None,
        shared_prefix: bool = False,
        inputs: Sequence[np.ndarray] = (),
    ) -> FlashInferPackedData:
        """The step of ``slots``: page table, append metadata when ``append_lens`` is
        given, shared-prefix groups when asked, and ``inputs`` (int32-sized arrays)
        on the device.

        With ``device`` None or a CPU device every tensor is on the CPU. With a CUDA
        device, every device tensor goes up in one pinned copy, and indptr and lengths
        stay in pinned host memory too (what ``plan()`` reads).
        """
        table = self.table
        ps = table.page_size
        lens = table.lengths(slots)
        # one divmod gives both: n + ps - 1 = ceil(n / ps) * ps + (n - 1) % ps, for n >= 1
        counts, last = np.divmod(lens + (ps - 1), ps)
        last += 1
        np.minimum(last, lens, out=last)  # an empty sequence: 0
        indptr = indptr_of(counts)
        append: list[np.ndarray] = []  # batch indices, positions, last rows
        host = [indptr, last, lens]
        if append_lens is not None:
            append_indptr = checked_indptr(
                append_lens, "append_lens", lens, 0, "allocate before packing"
            )
            append = [*append_rows_positions(append_indptr, lens), append_indptr[1:] - 1]
            host.append(append_indptr)
        to_device = [indptr, last, *append, *inputs]
        on_gpu = device is not None and device.type != "cpu"
        if on_gpu and int(indptr[-1]) > HOST_INDICES_MAX:
            indices, on_device, on_host = self._device_arena(device).gather(
                table, slots, counts, indptr, to_device, host
            )
        elif on_gpu:  # few pages: they ride along
            indices_of = self._host_indices(slots, counts, indptr)
            pieces, on_host = upload(device, [indices_of, *to_device], host)
            indices, on_device = pieces[0], pieces[1:]
        else:
            indices = torch.from_numpy(self._host_indices(slots, counts, indptr))
            on_host = [torch.from_numpy(a) for a in host]
            on_device = on_host[:2] + [torch.from_numpy(a.astype(np.int32)) for a in to_device[2:]]
        rows, positions, last_rows = on_device[2:5] if append else (None, None, None)
        return FlashInferPackedData(
            indices, on_host[0], on_host[1],
            kv_seq_lens=on_host[2],
            append_indptr=on_host[3] if append else None,
            append_batch_indices=rows, append_positions=positions, last_rows=last_rows,
            device_indptr=on_device[0], device_last_page_len=on_device[1],
            inputs=tuple(on_device[2 + len(append) :]),
            shared_prefix=self._shared_prefix(slots, lens) if shared_prefix else None,
            stamp=table.stamp(slots),
        )  # fmt: skip

    def _shared_prefix(self, slots: np.ndarray, lens: np.ndarray) -> SharedPrefix:
        """Groups of rows with common leading pages; the last answer while the rows only
        grew (new pages are never shared, so growth cannot change the groups)."""
        table, last = self.table, self._shared
        if last is not None and np.array_equal(last[0], slots) and self._grew_only(slots, last[1]):
            return last[2]
        found = find_shared_prefixes(table.arena, table.starts(slots), lens // table.page_size)
        self._shared = (slots, table.clock, found)
        return found

    def _grew_only(self, slots: np.ndarray, since: int) -> bool:
        """Whether ``slots`` changed since clock ``since`` at most by growing at their ends."""
        table = self.table
        return table.layout_clock <= since or not (table.row_layouts[slots] > since).any()

    def _host_indices(
        self, slots: np.ndarray, counts: np.ndarray, indptr: np.ndarray
    ) -> np.ndarray:
        table, snap = self.table, self._snapshot
        if snap is None or not (snap.slots is slots or np.array_equal(snap.slots, slots)):
            indices = table.pages_of_slots(slots)
        elif snap.clock == table.clock:  # nothing changed
            indices = snap.indices
        elif (grown := table.last_growth)[0] == table.clock == snap.clock + 1 and grown[1] is slots:
            # the one change since is a decode step of this batch: the table knows its pages
            indices = _insert_after_rows(snap, indptr, grown[2], None, grown[3])
        elif self._grew_only(slots, snap.clock):  # splice the pages the rows gained
            indices = _splice(snap, slots, counts, indptr, table)
        else:
            indices = table.pages_of_slots(slots)
        self._snapshot = _Snapshot(slots, table.clock, counts, indptr, indices)
        return indices

    def _device_arena(self, device: torch.device) -> _DeviceArena:
        if self._mirror is None or self._mirror.device != device:
            self._mirror = _DeviceArena(device)
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
    """A device copy of a page table's arena, brought up to date row by row: a row whose
    layout changed or that moved in the arena since it was last sent goes up whole, a
    row that grew sends its new page ids, and the rest send nothing."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.arena = torch.zeros(0, dtype=torch.int32, device=device)
        self.arange = torch.arange(1024, device=device)
        # on cpu, per slot: the row_layouts value, arena start and page count last sent
        self.sent_layout = np.zeros(0, dtype=np.int64)
        self.sent_start = np.zeros(0, dtype=np.int64)
        self.sent_count = np.zeros(0, dtype=np.int64)

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
        if table.arena.size != self.arena.shape[0]:  # a new arena: every row goes up again
            self.arena = torch.zeros(table.arena.size, dtype=torch.int32, device=self.device)
            self.sent_layout = np.full(table.slot_capacity, -1, dtype=np.int64)
            self.sent_start = np.zeros(table.slot_capacity, dtype=np.int64)
            self.sent_count = np.zeros(table.slot_capacity, dtype=np.int64)
        elif self.sent_layout.size < table.slot_capacity:
            grow = table.slot_capacity - self.sent_layout.size
            self.sent_layout = np.concatenate([self.sent_layout, np.full(grow, -1, np.int64)])
            self.sent_start = np.concatenate([self.sent_start, np.zeros(grow, np.int64)])
            self.sent_count = np.concatenate([self.sent_count, np.zeros(grow, np.int64)])
        starts = table.starts(slots)
        layouts = table.row_layouts[slots]
        same = (layouts == self.sent_layout[slots]) & (starts == self.sent_start[slots])
        sent = np.where(same, self.sent_count[slots], 0)  # a row changed or moved: all
        written = concat_ranges(starts + sent, np.maximum(counts - sent, 0))
        self.sent_layout[slots], self.sent_start[slots] = layouts, starts
        self.sent_count[slots] = counts
        # how far row b's page ids sit in the arena from their place in the batch
        shift = starts - indptr[:-1]
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
