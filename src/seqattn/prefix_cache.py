"""Full pages kept after their sequences end, found again by the tokens they hold.

A page whose KV is written and full can serve any later sequence that starts with
the same tokens. Each cached page is keyed by a chained hash: the key of its parent
page (the one before it), its own tokens, and at the root a *salt* that separates
namespaces (tenants, adapters), so equal keys mean equal prefixes. Lookups also
compare the tokens and the parent itself, so a hash collision can never hand out
another prefix's KV.

The cache holds one reference to each cached page. A page only the cache holds is
*evictable*: it stays reusable until the pool runs out, then the least recently used
go first (children before their parents), each in O(1). Pinned prefixes never go.

A hit costs one hash and three compares of bytes per page: the prompt's tokens are
turned into bytes once, each page's key is a 128-bit xxh3 (``xxhash``; BLAKE2b where it
is not installed) of its parent's key and its tokens, and each cached page keeps its
tokens as bytes, so checking them is one ``memcmp`` rather than an array comparison.

This module is pure bookkeeping (numpy and a hash, no torch); which sequence holds
which page, and when its KV counts as written, is the descriptor's business.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from itertools import islice
from typing import Optional, Union

import numpy as np
from attrs import define

from ._checks import INT64_MAX, exact_int, int_array, shown
from .allocator import PageAllocator, checked_page_ids
from .errors import ArgumentTypeError, PageStateError

Salt = Union[str, bytes, None]
HashFn = Callable[[bytes], bytes]


def blake2b_128(data: bytes) -> bytes:
    """128-bit BLAKE2b: the key function where xxhash is not installed."""
    return hashlib.blake2b(data, digest_size=16).digest()


try:  # xxh3 is several times faster than BLAKE2b on a page's 128 bytes
    from xxhash import xxh3_128_digest as default_hash
except ImportError:  # pragma: no cover - xxhash is a dependency
    default_hash = blake2b_128


class CachedPage:
    """One cached page: its key, page id, parent page, tokens and namespace."""

    __slots__ = ("alive", "depth", "key", "page", "parent", "pins", "salt", "token_bytes")

    def __init__(
        self, key: bytes, page: int, parent: Optional[CachedPage], data: bytes, salt: bytes
    ) -> None:
        self.key = key
        self.page = page
        self.parent = parent
        self.token_bytes = data  # the page's tokens as int64 little-endian (page_bytes)
        self.salt = salt
        self.depth: int = 0 if parent is None else parent.depth + 1
        self.pins = 0
        self.alive = True  # False once evicted: its children can no longer be matched

    @property
    def tokens(self) -> np.ndarray:
        """``[page_size]`` int64: the tokens this page holds."""
        return np.frombuffer(self.token_bytes, dtype="<i8").astype(np.int64)

    def follows(self, parent: Optional[CachedPage], data: bytes, salt: bytes) -> bool:
        """Whether this page holds the tokens ``data`` (:func:`page_bytes`) right after
        ``parent``: exact, not by hash."""
        if self.parent is not parent or (parent is None and self.salt != salt):
            return False
        return self.token_bytes == data


@define(frozen=True)
class PrefixCacheStats:
    """Counters of a :class:`PrefixCache` (since it was created)."""

    lookups: int
    lookup_tokens: int
    hit_tokens: int
    cached_pages: int
    evictable_pages: int
    pinned_pages: int
    inserted_pages: int
    evictions: int

    @property
    def hit_rate(self) -> float:
        """Fraction of looked-up tokens served from the cache."""
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


class PrefixCache:
    """Pages keyed by their token prefix, with LRU eviction (a :class:`Reclaimer`).

    Args:
        allocator: the pool; the cache attaches to it to be asked for pages when the
            pool runs out (one prefix cache per pool).
        page_size: tokens per page.
        hash_fn: bytes -> key; default 128-bit xxh3 (tests force collisions with it).

    Example:
        >>> import numpy as np
        >>> from seqattn.allocator import PageAllocator
        >>> pool = PageAllocator(8)
        >>> cache = PrefixCache(pool, page_size=2)
        >>> page = int(pool.allocate(1)[0])          # a sequence wrote tokens 5, 6 here
        >>> entry = cache.insert(None, np.array([5, 6]), page, salt=None)
        >>> [e.page for e in cache.match(np.array([5, 6, 7]), None, max_pages=1)]
        [0]
        >>> pool.unref([page]); cache.stats.evictable_pages   # the sequence ended
        1
        >>> _ = pool.allocate(8); cache.stats.evictions        # the pool ran out
        1
    """

    def __init__(self, allocator: PageAllocator, page_size: int, *, hash_fn: HashFn = default_hash):
        self.allocator = allocator
        self.page_size = int(page_size)
        self.hash_fn = hash_fn
        # on cpu: which pages the cache holds (the allocator reports their count changes)
        self.watched = np.zeros(allocator.num_pages, dtype=bool)
        self._by_key: dict[bytes, CachedPage] = {}
        self._by_page: dict[int, CachedPage] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # evictable pages, oldest first
        self._counts = dict(lookups=0, lookup_tokens=0, hit_tokens=0, inserted=0, evictions=0)
        self._pinned = 0
        allocator.attach_reclaimer(self)

    # ------------------------------------------------------------------ keys
    def root_key(self, salt: bytes) -> bytes:
        """The key every chain of namespace ``salt`` starts from."""
        return self.hash_fn(b"seqattn-prefix-root:" + salt)

    def page_key(self, parent_key: bytes, data: bytes) -> bytes:
        """The key of a page holding the tokens ``data`` (:func:`page_bytes`) after the
        page keyed ``parent_key``."""
        return self.hash_fn(parent_key + data)

    # --------------------------------------------------------------- lookups
    def match(
        self, token_ids: np.ndarray, salt: Salt, max_pages: int, *, record: bool = True
    ) -> list[CachedPage]:
        """The cached pages that hold the longest prefix of ``token_ids``, up to ``max_pages``.

        Does not take references (the caller does, before anything can evict them).
        ``record`` counts the lookup in :attr:`stats`.
        """
        tokens = token_array(token_ids)
        salt_bytes = as_salt(salt)
        max_pages = exact_int(max_pages, "max_pages", low=0)
        return self.match_checked(tokens, salt_bytes, max_pages, record=record)

    def match_checked(
        self, tokens: np.ndarray, salt_bytes: bytes, max_pages: int, *, record: bool = True
    ) -> list[CachedPage]:
        """:meth:`match` of arguments known to be valid (int64 token ids from
        :func:`token_array`, the salt as bytes): what a tracker that checked them calls."""
        ps = self.page_size
        whole = min(max_pages, tokens.size // ps) * ps  # the tokens of the pages looked up
        chain = self._walk(split_pages(tokens[:whole], ps), salt_bytes)
        if record:
            self._counts["lookups"] += 1
            self._counts["lookup_tokens"] += int(tokens.size)
            self._counts["hit_tokens"] += len(chain) * ps
        return chain

    def _walk(self, pages: list[bytes], salt_bytes: bytes) -> list[CachedPage]:
        """The cached entries of the longest prefix of ``pages`` (:func:`split_pages`)."""
        if not pages:
            return []
        by_key, hash_fn = self._by_key, self.hash_fn
        entry = by_key.get(self.page_key(self.root_key(salt_bytes), pages[0]))
        if entry is None or not entry.follows(None, pages[0], salt_bytes):
            return []
        chain = [entry]  # the root page; below it, the parent check covers the salt
        for page in islice(pages, 1, None):  # the hot loop: one hash, a dict, a memcmp
            parent, entry = entry, by_key.get(hash_fn(entry.key + page))
            if entry is None or entry.parent is not parent or entry.token_bytes != page:
                break
            chain.append(entry)
        return chain

    def entry_of(self, page: int) -> Optional[CachedPage]:
        """The entry of a cached page, if ``page`` is cached."""
        return self._by_page.get(page)

    # -------------------------------------------------------------- mutation
    def insert(
        self, parent: Optional[CachedPage], tokens: np.ndarray, page: int, salt: Salt
    ) -> Optional[CachedPage]:
        """Cache ``page`` (full, KV written) as holding ``tokens`` right after ``parent``.

        Takes a reference to ``page``. Returns the new entry; the existing one when the
        same prefix is cached already (under any page: the caller may switch to it); or
        None when a different prefix owns the key (a hash collision: nothing cached).
        """
        tokens = token_array(tokens)
        salt_bytes = as_salt(salt)
        if tokens.size != self.page_size:
            raise PageStateError(f"a cached page holds {self.page_size} tokens, got {tokens.size}")
        page = int(checked_page_ids([page], self.allocator.num_pages, "page")[0])
        if self.allocator.refcount[page] == 0:
            raise PageStateError(f"page {page} is free: only a held page with written KV is cached")
        if parent is not None and not self.owns(parent) and parent.alive:
            raise PageStateError("parent is not a page of this prefix cache")
        return self.insert_checked(parent, page_bytes(tokens), page, salt_bytes)

    def insert_checked(
        self, parent: Optional[CachedPage], data: bytes, page: int, salt_bytes: bytes
    ) -> Optional[CachedPage]:
        """:meth:`insert` of arguments known to be valid (a page of tokens ``data``, a
        held page, a parent of this cache, the salt as bytes): what a tracker of this
        cache's own sequences calls."""
        if parent is not None and not parent.alive:
            return None  # its prefix is gone: nothing could find this page
        key = self.page_key(self.root_key(salt_bytes) if parent is None else parent.key, data)
        existing = self._by_key.get(key)
        if existing is not None:
            if existing.follows(parent, data, salt_bytes):
                return existing
            if existing.parent is None or existing.parent.alive:
                return None
            self._evict([existing.page])  # an orphan whose parent was evicted: replace it
        if self.watched[page]:
            return None  # the page is cached under another prefix already
        entry = CachedPage(key, int(page), parent, data, salt_bytes)
        self.allocator.share_one(page)
        self.watched[page] = True
        self._by_key[key] = entry
        self._by_page[entry.page] = entry
        self._counts["inserted"] += 1
        return entry

    def pin(self, entries: list[CachedPage]) -> None:
        """Keep these pages (and their ancestors) cached until :meth:`unpin`."""
        self._check_handles(entries)
        chain = _with_ancestors(entries)
        if not all(entry.alive for entry in chain):
            raise PageStateError("cannot pin a page that was evicted")
        for entry in chain:
            if entry.pins == 0:
                self._pinned += 1
                self._lru.pop(entry.page, None)
            entry.pins += 1

    def owns(self, entry: object) -> bool:
        """Whether ``entry`` is a live page of this cache (a handle it handed out)."""
        return isinstance(entry, CachedPage) and self._by_page.get(entry.page) is entry

    def unpin(self, entries: list[CachedPage]) -> None:
        """Undo one :meth:`pin` of these pages."""
        self._check_handles(entries)
        chain = _with_ancestors(entries)
        if any(entry.pins == 0 for entry in chain):
            raise PageStateError("unpin of a prefix that is not pinned")
        released = []
        for entry in chain:
            entry.pins -= 1
            if entry.pins == 0:
                self._pinned -= 1
                released.append(entry.page)
        refcount = self.allocator.refcount
        self.on_sole_holder(np.array([p for p in released if refcount[p] == 1], dtype=np.int32))

    def clear(self) -> None:
        """Drop every evictable page (pages still in use stay cached)."""
        self._evict(list(self._lru))

    # ------------------------------------------------------ Reclaimer protocol
    @property
    def reclaimable_count(self) -> int:
        return len(self._lru)

    def reclaim(self, num_pages: int) -> None:
        """Evict the ``num_pages`` least recently used evictable pages."""
        lru = self._lru
        self._evict([lru.popitem(last=False)[0] for _ in range(min(num_pages, len(lru)))])

    def on_sole_holder(self, pages: np.ndarray) -> None:
        # deepest first: in one release, a child becomes older than its parent
        entries = sorted((self._by_page[p] for p in pages.tolist()), key=lambda e: -e.depth)
        for entry in entries:
            if entry.pins == 0:
                self._lru[entry.page] = None

    def on_shared(self, pages: np.ndarray) -> None:
        for page in pages.tolist():
            self._lru.pop(page, None)

    # ---------------------------------------------------------------- report
    @property
    def stats(self) -> PrefixCacheStats:
        c = self._counts
        return PrefixCacheStats(
            lookups=c["lookups"],
            lookup_tokens=c["lookup_tokens"],
            hit_tokens=c["hit_tokens"],
            cached_pages=len(self._by_page),
            evictable_pages=len(self._lru),
            pinned_pages=self._pinned,
            inserted_pages=c["inserted"],
            evictions=c["evictions"],
        )

    def __len__(self) -> int:
        return len(self._by_page)

    def __contains__(self, page: object) -> bool:
        return page in self._by_page

    def check_integrity(self) -> None:
        """Raise AssertionError unless keys, pages, counts and the LRU agree."""
        refcount = self.allocator.refcount
        assert len(self._by_key) == len(self._by_page), "key and page maps differ"
        assert int(self.watched.sum()) == len(self._by_page), "watched pages != cached pages"
        for page, entry in self._by_page.items():
            assert entry.alive and self._by_key[entry.key] is entry, "stale entry"
            assert refcount[page] >= 1, f"cached page {page} has no reference"
            evictable = refcount[page] == 1 and entry.pins == 0
            assert (page in self._lru) == evictable, f"page {page}: LRU membership is wrong"
        pinned = sum(1 for e in self._by_page.values() if e.pins)
        assert pinned == self._pinned, "pinned count is wrong"
        age = {page: i for i, page in enumerate(self._lru)}
        for page, i in age.items():  # a parent is never older than its child in the LRU
            parent = self._by_page[page].parent
            assert parent is None or age.get(parent.page, i + 1) > i, (
                f"page {page} is younger than its parent {parent.page} in the LRU"
            )

    def _check_handles(self, entries: object) -> None:
        if not isinstance(entries, (list, tuple)):
            raise ArgumentTypeError(f"expected a list of cached pages, got {shown(entries)}")
        for entry in entries:
            if not isinstance(entry, CachedPage):
                raise ArgumentTypeError(
                    f"expected a cached page (a pin handle), got {shown(entry)}"
                )
            if not self.owns(entry) and entry.alive:
                raise PageStateError("this handle belongs to another prefix cache")

    def _evict(self, pages: list[int]) -> None:
        for page in pages:
            entry = self._by_page.pop(page)
            del self._by_key[entry.key]
            self._lru.pop(page, None)
            entry.alive = False
            self.watched[page] = False
        self._counts["evictions"] += len(pages)
        self.allocator.drop(np.array(pages, dtype=np.int32))


def page_bytes(tokens: np.ndarray) -> bytes:
    """Tokens (int64) as the bytes that pages are keyed and compared by."""
    return tokens.astype("<i8", copy=False).tobytes()


def split_pages(tokens: np.ndarray, page_size: int) -> list[bytes]:
    """Whole pages of ``tokens`` (int64), each as its :func:`page_bytes`: numpy cuts them
    in one call (a void dtype one page wide lists as bytes), not a slice per page."""
    page = np.dtype((np.void, 8 * page_size))
    return np.ascontiguousarray(tokens, dtype="<i8").view(page).tolist()


def token_array(token_ids: object) -> np.ndarray:
    """Token ids as int64, each an integer in ``[0, 2**63)``."""
    return int_array(token_ids, "token ids", low=0, high=INT64_MAX)


def as_salt(salt: Salt) -> bytes:
    """A namespace as bytes: None is the shared default namespace."""
    if salt is None:
        return b""
    if isinstance(salt, str):
        return b"s:" + salt.encode()
    if isinstance(salt, bytes):
        return b"b:" + salt
    raise ArgumentTypeError(f"a salt is a str, bytes or None, got {shown(salt)}")


def _with_ancestors(entries: list[CachedPage]) -> list[CachedPage]:
    seen: dict[int, CachedPage] = {}
    for entry in entries:
        node: Optional[CachedPage] = entry
        while node is not None and id(node) not in seen:
            seen[id(node)] = node
            node = node.parent
    return list(seen.values())
