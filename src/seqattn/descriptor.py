"""Sequence-level view of a paged KV cache: the seed's ``CacheDescriptor``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Optional, Union

import numpy as np
from attrs import define

from ._checks import exact_bool, id_list, int_array, shown
from .errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    PageStateError,
)
from .packed_data import Device, FlashInferPackedData, as_device
from .packing import BatchPacker
from .page_table import SeqIds, SequencePageTable
from .prefix_cache import (
    CachedPage,
    HashFn,
    PrefixCache,
    PrefixCacheStats,
    Salt,
    default_hash,
)
from .prefix_tracking import NoPrefixCaching, PrefixTracker, token_list
from .storage import PagedKVCacheManager


@define(slots=True)
class SequenceData:
    """A snapshot of one sequence: its pages in token order and the fill of the last.

    ``last_page_len`` is in ``[1, page_size]`` for a non-empty sequence and 0 for an
    empty one (which holds no page).
    """

    kv_page_indices: list[int]
    last_page_len: int


class CacheDescriptor:
    """Sequences over a :class:`PagedKVCacheManager`: allocate, grow, fork, truncate, release.

    Every mutating call is all or nothing: if it raises (``NoPageError``, an unknown
    id, a bad length), no page, reference count or length has changed, so a caller
    can catch ``NoPageError``, preempt or evict, and retry.

    With ``prefix_caching=True``, full pages stay cached after their sequences end and
    serve later sequences that start with the same tokens (:meth:`start_sequence`,
    :meth:`commit`); they are evicted, least recently used first, only when the pool
    runs out.

    Args:
        cache_manager: owns the page pool and the K/V storage.
        check_invariants: run :meth:`check_integrity` after every mutating call
            (slow; for tests and debugging).
        prefix_caching: keep a :class:`PrefixCache` over the pool (one per pool).
        prefix_hash_fn: the prefix cache's key function (default 128-bit xxh3).

    Example:
        >>> import torch
        >>> from seqattn import CacheDescriptor, PagedKVCacheManager
        >>> cache = PagedKVCacheManager(32, 4, 1, 8, torch.float32, "cpu")
        >>> desc = CacheDescriptor(cache)
        >>> desc.allocate([1, 2], [6, 3])       # two new sequences
        >>> desc.allocate_decoding([1, 2])      # one more token each
        >>> desc.seq_lens([1, 2]).tolist()
        [7, 4]
        >>> packed = desc.pack_for_flashinfer([1, 2])
        >>> packed.kv_page_indptr.tolist(), packed.kv_last_page_len.tolist()
        ([0, 2, 3], [3, 4])
        >>> desc.fork(1, 3)                     # shares page 0, copies the partial page
        >>> desc.truncate(1, 4); desc.release([1, 2, 3])
        >>> cache.available_pages_count
        32
    """

    def __init__(
        self,
        cache_manager: PagedKVCacheManager,
        *,
        check_invariants: bool = False,
        prefix_caching: bool = False,
        prefix_hash_fn: HashFn = default_hash,
    ):
        if not isinstance(cache_manager, PagedKVCacheManager):
            raise ArgumentTypeError(
                f"cache_manager must be a PagedKVCacheManager, got {shown(cache_manager)}"
            )
        check_invariants = bool(exact_bool(check_invariants, "check_invariants"))
        prefix_caching = bool(exact_bool(prefix_caching, "prefix_caching"))
        if not callable(prefix_hash_fn):
            raise ArgumentTypeError(f"prefix_hash_fn must be callable, got {shown(prefix_hash_fn)}")
        self.cache_manager = cache_manager
        self.table = SequencePageTable(cache_manager.allocator, cache_manager.page_size)
        self.check_invariants = check_invariants
        self._packer = BatchPacker(self.table)
        self.prefix_cache: Optional[PrefixCache] = None
        self._tracker: Union[PrefixTracker, NoPrefixCaching] = NoPrefixCaching(self.table)
        if prefix_caching:
            self.prefix_cache = PrefixCache(
                cache_manager.allocator, cache_manager.page_size, hash_fn=prefix_hash_fn
            )
            self._tracker = PrefixTracker(self.table, self.prefix_cache)

    # --------------------------------------------------------------------- seed API
    def allocate(self, seq_ids: SeqIds, seq_new_lens: SeqIds) -> None:
        """Add ``seq_new_lens[i]`` tokens to sequence ``seq_ids[i]``, starting unknown ids.

        Raises:
            NoPageError: the pool lacks pages (nothing changed).
            InvalidLengthError: a negative length, or one length per id not given.
            DuplicateSequenceError: an id listed twice.
        """
        self.table.extend(seq_ids, seq_new_lens)
        self._after_change()

    def allocate_decoding(self, seq_ids: SeqIds, token_ids: Optional[SeqIds] = None) -> None:
        """Add one token to each of the (live) sequences, for a decode step.

        Args:
            seq_ids: live sequences.
            token_ids: with prefix caching, the id of each sequence's new token (the one
                whose KV this step appends), so that its pages can be cached once full.
        """
        slots = self.table.slots(seq_ids)
        tokens = None if token_ids is None else token_list(token_ids, slots.size)
        self.table.grow_by_one(slots)
        if tokens is not None:
            self._tracker.record_decode(slots, tokens)
        self._after_change()

    def record_decode_tokens(self, seq_ids: SeqIds, token_ids: SeqIds) -> None:
        """With prefix caching: the tokens of the last :meth:`allocate_decoding` of
        ``seq_ids``, when they were not known then (e.g. still on the GPU). Call it
        before :meth:`commit`; without it those sequences' later pages are not cached.
        """
        slots = self.table.slots(seq_ids)
        self._tracker.record_decode(slots, token_list(token_ids, slots.size))

    def release(self, seq_ids: SeqIds) -> None:
        """End the sequences and drop their references to their pages.

        With prefix caching, pages not yet committed are not cached (call :meth:`commit`
        first for a sequence whose KV is written and should be kept).
        """
        ids = id_list(seq_ids)
        slots = self.table.slots(ids)
        self.table.release(ids)
        self._tracker.release(slots)
        self._after_change()

    def pack_for_flashinfer(
        self,
        seq_ids: SeqIds,
        append_lens: Optional[SeqIds] = None,
        *,
        device: Optional[Device] = None,
        shared_prefix: bool = False,
        inputs: Sequence[object] = (),
    ) -> FlashInferPackedData:
        """The step of a batch (:class:`FlashInferPackedData`), built once.

        Args:
            seq_ids: live sequences, in batch order.
            append_lens: tokens each sequence receives in this step (already allocated):
                the step then carries their append metadata and query rows.
            device: None or CPU: every tensor on the CPU (the seed's behaviour). A CUDA
                device: page indices, append metadata and ``inputs`` on it, in one
                copy (only page ids the device lacks cross the bus, nothing syncs);
                indptr and lengths in pinned host memory, where ``plan()`` reads them.
            shared_prefix: also find rows that start with the same pages (prefix-cache
                hits, forks) for cascade attention (``packed.shared_prefix``).
            inputs: 1-D integer arrays (int32 range) the step also needs on the device,
                e.g. a model's token ids (``packed.inputs``, int32 tensors).
        """
        target = None if device is None else as_device(device)
        shared = bool(exact_bool(shared_prefix, "shared_prefix"))
        arrays = [int_array(a, "inputs", low=-(2**31), high=2**31 - 1) for a in inputs or ()]
        return self._packer.pack(self.table.slots(seq_ids), append_lens, target, shared, arrays)

    # ---------------------------------------------------------------- prefix caching
    def start_sequence(self, seq_id: int, token_ids: SeqIds, *, salt: Salt = None) -> int:
        """Start ``seq_id`` from its prompt, sharing the longest cached prefix.

        The sequence starts holding the cached tokens; the caller then allocates and
        computes the rest (``allocate([seq_id], [len(token_ids) - cached])``, at once or
        in chunks) and calls :meth:`commit` after appending their KV. At most
        ``len(token_ids) - 1`` tokens come from the cache, so the last prompt token is
        always computed and yields logits. Without prefix caching nothing is cached.

        Args:
            seq_id: a new sequence id.
            token_ids: the prompt, ``[prompt_len]`` ints (list, numpy or torch).
            salt: namespace (str or bytes): prefixes are shared only within one salt,
                e.g. per tenant or adapter. None: the default namespace.

        Returns:
            The number of prompt tokens already cached (the sequence's length now).
        """
        cached = self._tracker.start(seq_id, token_ids, salt)
        self._after_change()
        return cached

    def pages_to_start(self, token_ids: SeqIds, *, salt: Salt = None) -> int:
        """Free pages that :meth:`start_sequence` of ``token_ids`` followed by allocating
        the rest of it would take now, counting the prefix-cache hit (changes nothing):
        what a scheduler checks before admitting a request."""
        return self._tracker.pages_to_start(token_ids, salt)

    def recorded_tokens(self, seq_id: int) -> Optional[tuple[np.ndarray, Salt]]:
        """The token ids of every token ``seq_id`` holds (``[seq_len]`` int64, a copy)
        and its salt: what a copy of it needs to share cached pages. None without prefix
        caching or where some are unknown (tokens allocated without their ids)."""
        return self._tracker.recorded(self.table.slot(seq_id))

    def commit(self, seq_ids: SeqIds) -> None:
        """Publish the full pages of these sequences in the prefix cache.

        Call it once the KV of every token the sequences hold has been appended to every
        layer (on a GPU: once the appends are enqueued; later reads follow them on the
        stream). Pages already cached under the same prefix are swapped for the cached
        copy, so duplicates return to the pool. A no-op without prefix caching.
        """
        self._tracker.commit(self.table.slots(seq_ids))
        self._after_change()

    def pin_prefix(self, seq_id: int) -> CachedPage:
        """Keep the committed pages of ``seq_id`` cached for good (a system prompt).

        Returns a handle for :meth:`unpin_prefix`.
        """
        return self._tracker.pin(self.table.slot(seq_id))

    def unpin_prefix(self, handle: CachedPage) -> None:
        """Let a pinned prefix be evicted again.

        Raises:
            ArgumentTypeError: not a handle. PageStateError: a handle of another
            descriptor's cache, or one not pinned (unpinned already).
        """
        cache = self.prefix_cache
        if cache is None:
            raise InvalidArgumentError(
                "prefix caching is off: CacheDescriptor(..., prefix_caching=True)"
            )
        if isinstance(handle, CachedPage) and not cache.owns(handle):
            raise PageStateError("this pin handle comes from another descriptor's prefix cache")
        cache.unpin([handle])

    @property
    def prefix_stats(self) -> Optional[PrefixCacheStats]:
        """The prefix cache's counters (lookups, hit tokens, hit rate, pages), or None."""
        return None if self.prefix_cache is None else self.prefix_cache.stats

    # ---------------------------------------------------------------- beyond the seed
    def fork(self, src_id: int, dst_id: int) -> None:
        """Start ``dst_id`` as a copy of ``src_id`` that shares its full pages.

        A partially filled last page is copied to a fresh page (in every layer), so
        neither sequence ever writes into a page the other reads.
        """
        src = self.table.slot(src_id)
        dst, copy = self.table.fork(src, dst_id)
        self._copy_on_write(copy)
        self._tracker.fork(src, dst)
        self._after_change()

    def truncate(self, seq_id: int, new_len: int) -> None:
        """Keep the first ``new_len`` tokens of ``seq_id`` (speculative-decoding rollback).

        Pages past ``new_len`` lose this sequence's reference. If the new last page is
        partial and shared (after a fork), it is first copied to a fresh page.
        """
        slot = self.table.slot(seq_id)
        self._copy_on_write(self.table.truncate(slot, new_len))
        self._tracker.truncate(slot, self.table.length(slot))
        self._after_change()

    def pages_needed(self, seq_ids: SeqIds, seq_new_lens: SeqIds) -> int:
        """Free pages that ``allocate(seq_ids, seq_new_lens)`` would take (changes nothing)."""
        return self.table.pages_to_extend(seq_ids, seq_new_lens)

    def seq_len(self, seq_id: int) -> int:
        """Tokens held by one sequence."""
        return self.table.length(self.table.slot(seq_id))

    def seq_lens(self, seq_ids: SeqIds) -> np.ndarray:
        """Tokens held by each sequence, ``[len(seq_ids)]`` int32."""
        return self.table.lengths(self.table.slots(seq_ids))

    def page_indices(self, seq_id: int) -> list[int]:
        """Pages of one sequence, in token order."""
        return self.table.page_ids(self.table.slot(seq_id)).tolist()

    def get(self, seq_id: int) -> SequenceData:
        """A :class:`SequenceData` snapshot of one sequence."""
        length = self.seq_len(seq_id)
        pages = self.page_indices(seq_id)
        last = length - (len(pages) - 1) * self.table.page_size if pages else 0
        return SequenceData(kv_page_indices=pages, last_page_len=last)

    @property
    def seq_id_to_data(self) -> Mapping[int, SequenceData]:
        """Read-only mapping of live sequence ids to :class:`SequenceData` snapshots."""
        return _SequenceView(self)

    @property
    def seq_ids(self) -> list[int]:
        """Live sequence ids, oldest first."""
        return self.table.seq_ids

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self.table

    def __len__(self) -> int:
        return len(self.table)

    def check_integrity(self) -> None:
        """Raise AssertionError unless every page, count and length is consistent.

        Besides the pool, the table and the prefix cache: each page has at least one
        reference per holder this descriptor knows of (its sequences, its prefix cache,
        the caller's own ``ref``/``allocate``); more only if other descriptors share
        the pool.
        """
        others = self.cache_manager.allocator.external_refcount
        self._tracker.check_integrity()
        if self.prefix_cache is not None:
            self.prefix_cache.check_integrity()
            others = others + self.prefix_cache.watched
        self.table.check_integrity(others)

    def _copy_on_write(self, copy: Optional[tuple[int, int]]) -> None:
        if copy is not None:  # (shared page, its fresh copy)
            self.cache_manager.copy_pages([copy[0]], [copy[1]])

    def _after_change(self) -> None:
        if self.check_invariants:
            self.check_integrity()


class _SequenceView(Mapping[int, SequenceData]):
    def __init__(self, descriptor: CacheDescriptor) -> None:
        self._descriptor = descriptor

    def __getitem__(self, seq_id: int) -> SequenceData:
        return self._descriptor.get(seq_id)

    def __iter__(self) -> Iterator[int]:
        return iter(self._descriptor.seq_ids)

    def __len__(self) -> int:
        return len(self._descriptor)
