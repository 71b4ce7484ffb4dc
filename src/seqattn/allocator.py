"""Free pages and per-page reference counts (numpy only, no torch).

A page is free exactly when its reference count is 0. Every holder of a page
(a sequence, a prefix cache, an explicit :meth:`PageAllocator.ref`) counts once.

Two kinds of holder use two sets of calls. The caller's own references
(:meth:`~PageAllocator.allocate`, :meth:`~PageAllocator.ref`,
:meth:`~PageAllocator.unref`, the seed's pool API) are counted apart, so that ``unref``
can only drop references the caller took: it can never free a page that a sequence or
the prefix cache still lists. Those structures hold pages through :meth:`take`,
:meth:`share` and :meth:`drop`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional, Protocol, Union

import numpy as np

from ._checks import exact_int, int_array
from .errors import IndexOutOfRangeError, NoPageError, PageStateError

PageIds = Union[Iterable[int], np.ndarray]
"""Page ids: a list of ints, a numpy integer array, or a 1-D integer torch tensor."""


class Reclaimer(Protocol):
    """A holder that gives pages back on demand (a prefix cache's unused pages).

    The allocator tells it when a watched page's reference count falls to 1 (the
    reclaimer is then its sole holder) or rises from 1, and asks it to reclaim pages
    before it would raise :class:`NoPageError`.
    """

    watched: np.ndarray
    """``shape: [num_pages], dtype: bool``: the pages whose counts it follows."""

    @property
    def reclaimable_count(self) -> int:
        """Pages it could give back now."""

    def reclaim(self, num_pages: int) -> None:
        """Drop its references to at least ``num_pages`` pages nobody else holds."""

    def on_sole_holder(self, pages: np.ndarray) -> None:
        """Watched pages whose count just fell to 1 (int32, distinct)."""

    def on_shared(self, pages: np.ndarray) -> None:
        """Watched pages whose count just rose from 1 (int32, distinct)."""


class PageAllocator:
    """Hands out pages of a fixed pool and counts their references.

    Args:
        num_pages: size of the pool; page ids are ``0 .. num_pages - 1``.

    Example:
        >>> alloc = PageAllocator(4)
        >>> pages = alloc.allocate(2)
        >>> pages.tolist(), alloc.available_pages_count
        ([0, 1], 2)
        >>> alloc.ref([0]); alloc.unref([0, 0, 1]); alloc.available_pages_count
        4
    """

    def __init__(self, num_pages: int) -> None:
        self.num_pages = exact_int(num_pages, "num_pages", low=1, high=2**31 - 1)
        # on cpu: refcount per page (every holder), and the references the caller took
        # through allocate/ref; the free pages are _free[_head:], a stack whose top is
        # at _head (so a fresh pool hands out 0, 1, 2, ... without reversing)
        self._refcount = np.zeros(self.num_pages, dtype=np.int32)
        self._external = np.zeros(self.num_pages, dtype=np.int32)
        self._free = np.arange(self.num_pages, dtype=np.int32)
        self._head = 0
        self.reclaimer: Optional[Reclaimer] = None

    def attach_reclaimer(self, reclaimer: Reclaimer) -> None:
        """Let ``reclaimer`` (one per pool) follow its pages and give them back on demand."""
        if self.reclaimer is not None:
            raise PageStateError("this pool already has a reclaimer (a prefix cache)")
        if reclaimer.watched.shape != (self.num_pages,):
            raise PageStateError(f"a reclaimer must watch [{self.num_pages}] pages")
        self.reclaimer = reclaimer

    @property
    def free_pages_count(self) -> int:
        """Pages no one holds."""
        return self.num_pages - self._head

    @property
    def available_pages_count(self) -> int:
        """Pages an allocation can take: the free ones, and those only a reclaimer holds."""
        free = self.num_pages - self._head
        return free if self.reclaimer is None else free + self.reclaimer.reclaimable_count

    @property
    def refcount(self) -> np.ndarray:
        """Read-only view of the reference counts, shape ``[num_pages]``, int32."""
        view = self._refcount.view()
        view.flags.writeable = False
        return view

    def allocate(self, num_pages: int) -> np.ndarray:
        """Take ``num_pages`` free pages for the caller, each with reference count 1.

        Returns:
            page ids, shape ``[num_pages]``, int32 (lowest ids first on a fresh pool).

        When too few pages are free, the reclaimer (if any) first gives back the pages
        only it holds, least recently used first.

        Raises:
            NoPageError: fewer pages are available; nothing is allocated or reclaimed.
            ArgumentTypeError, InvalidArgumentError: not an integer >= 0.
        """
        pages = self.take(exact_int(num_pages, "num_pages", low=0))
        self._external[pages] = 1
        return pages

    def ref(self, pages: PageIds) -> None:
        """Add one reference of the caller to each listed page (a page listed twice gets two).

        Raises:
            IndexOutOfRangeError: a page id outside the pool. PageStateError: a free page.
            ArgumentTypeError: not integers. Nothing changed.
        """
        ids = self._checked_ids(pages)
        if ids.size and (self._refcount[ids] == 0).any():
            free = ids[self._refcount[ids] == 0][:8].tolist()
            raise PageStateError(f"cannot ref free pages {free}: allocate them first")
        self.share(ids)
        np.add.at(self._external, ids, 1)

    def unref(self, pages: PageIds) -> None:
        """Drop one of the caller's references per listing; pages that reach 0 become free.

        Only references taken with :meth:`allocate` or :meth:`ref` can be dropped: a
        page a sequence or the prefix cache lists stays theirs (release the sequence).

        Raises:
            IndexOutOfRangeError: a page id outside the pool. PageStateError: more
            references dropped than the caller holds. ArgumentTypeError: not integers.
            Nothing changed.
        """
        ids = self._checked_ids(pages)
        if ids.size == 0:
            return
        unique, counts = np.unique(ids, return_counts=True)
        left = self._external[unique] - counts
        if (left < 0).any():
            bad = unique[left < 0][:8].tolist()
            raise PageStateError(
                f"unref of pages {bad} drops more references than allocate/ref took "
                "(a double release, or pages a sequence or the prefix cache holds: "
                "release the sequence instead)"
            )
        self._external[unique] = left
        self.drop(ids)

    # ------------------------------------------------- holders inside seqattn
    def take(self, num_pages: int) -> np.ndarray:
        """:meth:`allocate` for a structure of seqattn (a sequence's pages); int32 ids."""
        n = num_pages
        if n > self.num_pages - self._head:
            self._reclaim(n)
        head = self._head
        pages = self._free[head : head + n].copy()
        self._head = head + n
        self._refcount[pages] = 1
        return pages

    def share(self, ids: np.ndarray, *, distinct: bool = False) -> None:
        """One more holder of each listed page (held already; ids checked by the caller;
        ``distinct``: no id is listed twice, the caller knows)."""
        if ids.size == 0:
            return
        before = self._refcount[ids]
        if distinct:
            self._refcount[ids] = before + 1
        else:
            np.add.at(self._refcount, ids, 1)
        if self.reclaimer is not None:
            rising = ids[(before == 1) & self.reclaimer.watched[ids]]
            if rising.size:
                self.reclaimer.on_shared(np.unique(rising))

    def share_one(self, page: int) -> None:
        """:meth:`share` of one page (held already, a checked Python int): scalar reads,
        where arrays of one element would cost several microseconds (a prefix cache's
        insert, a commit that swaps a page for its cached copy)."""
        before = int(self._refcount[page])
        self._refcount[page] = before + 1
        reclaimer = self.reclaimer
        if before == 1 and reclaimer is not None and reclaimer.watched[page]:
            reclaimer.on_shared(np.array([page]))

    def drop(self, ids: np.ndarray) -> None:
        """One holder fewer per listing; pages that reach 0 become free."""
        if ids.size == 0:
            return
        unique, counts = np.unique(ids, return_counts=True)
        left = self._refcount[unique] - counts
        assert (left >= 0).all(), "a holder dropped a page it did not hold"
        self._refcount[unique] = left
        freed = unique[left == 0]
        self._head -= freed.size
        self._free[self._head : self._head + freed.size] = freed
        if self.reclaimer is not None:
            sole = unique[(left == 1) & self.reclaimer.watched[unique]]
            if sole.size:
                self.reclaimer.on_sole_holder(sole)

    @property
    def external_refcount(self) -> np.ndarray:
        """Read-only view of the caller's references (allocate/ref), ``[num_pages]`` int32."""
        view = self._external.view()
        view.flags.writeable = False
        return view

    release_pages = unref
    """Alias of :meth:`unref`, the seed's name: pages are freed when their count reaches 0."""

    def check_integrity(self) -> None:
        """Prove the pool is consistent; raise AssertionError naming what is not.

        Checks: free + held == num_pages, no page is free twice, a page is free
        exactly when its reference count is 0, and no count is negative.
        """
        free = self._free[self._head :]
        held = int(np.count_nonzero(self._refcount))
        assert (self._refcount >= 0).all(), "negative reference count"
        assert (self._external >= 0).all(), "negative caller reference count"
        assert (self._external <= self._refcount).all(), "caller references exceed the count"
        assert np.unique(free).size == free.size, "a page is on the free list twice"
        assert (self._refcount[free] == 0).all(), "a free page has references"
        assert free.size + held == self.num_pages, (
            f"free {free.size} + held {held} != num_pages {self.num_pages}"
        )

    def _reclaim(self, n: int) -> None:
        free = self.num_pages - self._head
        reclaimable = 0 if self.reclaimer is None else self.reclaimer.reclaimable_count
        if n > free + reclaimable:
            cached = f" and {reclaimable} held only by the prefix cache" if reclaimable else ""
            raise NoPageError(
                f"need {n} pages but only {free} of {self.num_pages} are free{cached}"
            )
        assert self.reclaimer is not None
        self.reclaimer.reclaim(n - free)

    def _checked_ids(self, pages: PageIds) -> np.ndarray:
        return checked_page_ids(pages, self.num_pages)


def checked_page_ids(pages: object, num_pages: int, what: str = "page ids") -> np.ndarray:
    """Page ids as int64, each in ``[0, num_pages)`` (IndexOutOfRangeError otherwise)."""
    return int_array(pages, what, low=0, high=num_pages - 1, error=IndexOutOfRangeError)
