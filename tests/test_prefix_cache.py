"""Prefix caching: hits page by page, namespaces, collisions, LRU eviction, KV through hits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqattn import (
    CacheDescriptor,
    InvalidLengthError,
    NoPageError,
    PagedKVCacheManager,
    SeqAttnError,
    SequenceExistsError,
    UnknownSequenceError,
)
from seqattn.allocator import PageAllocator
from seqattn.errors import PageStateError
from seqattn.prefix_cache import PrefixCache
from tests.conftest import make_cache, read_back

PS = 4


def prefill(desc: CacheDescriptor, seq_id: int, prompt: list[int], *, salt=None) -> int:
    """Start a sequence from its prompt, write KV for the uncached rest, commit; -> cached."""
    cached = desc.start_sequence(seq_id, prompt, salt=salt)
    write(desc, seq_id, prompt[cached:])
    desc.commit([seq_id])
    return cached


def write(desc: CacheDescriptor, seq_id: int, tokens: list[int]) -> None:
    """Allocate and append KV whose values encode (token, position): k = 1000 t + pos."""
    start = desc.seq_len(seq_id)
    desc.allocate([seq_id], [len(tokens)])
    packed = desc.pack_for_flashinfer([seq_id], append_lens=[len(tokens)])
    desc.cache_manager.append_kv(*kv_of(desc.cache_manager, tokens, start), packed)


def kv_of(cache: PagedKVCacheManager, tokens: list[int], start: int):
    pos = torch.arange(start, start + len(tokens), dtype=torch.float32)
    k = torch.tensor(tokens, dtype=torch.float32) * 1000 + pos
    shape = (len(tokens), cache.num_heads, cache.head_dim)
    return k[:, None, None].expand(shape).contiguous(), -k[:, None, None].expand(shape).contiguous()


def assert_kv_is(desc: CacheDescriptor, seq_id: int, tokens: list[int]) -> None:
    packed = desc.pack_for_flashinfer([seq_id])
    k, v = read_back(desc.cache_manager, packed, 0)
    want_k, want_v = kv_of(desc.cache_manager, tokens, 0)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


@pytest.fixture
def pdesc() -> CacheDescriptor:
    return CacheDescriptor(make_cache(num_pages=32, page_size=PS), prefix_caching=True,
                           check_invariants=True)  # fmt: skip


PROMPT = list(range(100, 114))  # 14 tokens: 3 full pages + 2


def test_miss_then_hit_page_by_page(pdesc: CacheDescriptor) -> None:
    assert prefill(pdesc, 1, PROMPT) == 0
    pdesc.release([1])
    stats = pdesc.prefix_stats
    assert stats.cached_pages == 3 and stats.evictable_pages == 3
    for diverge_at, expect in [(0, 0), (3, 0), (4, 4), (7, 4), (8, 8), (12, 12), (14, 12)]:
        prompt = PROMPT[:diverge_at] + [7] * (14 - diverge_at)
        assert pdesc.start_sequence(2, prompt) == expect, diverge_at
        write(pdesc, 2, prompt[expect:])
        assert_kv_is(pdesc, 2, prompt)
        pdesc.release([2])  # not committed: the new pages are not cached
    assert pdesc.prefix_stats.cached_pages == 3


def test_last_prompt_token_is_always_computed(pdesc: CacheDescriptor) -> None:
    prefill(pdesc, 1, PROMPT[:12])  # exactly 3 pages
    assert pdesc.start_sequence(2, PROMPT[:12]) == 8  # not 12: token 11 needs logits
    assert pdesc.start_sequence(3, PROMPT[:13]) == 12
    assert pdesc.start_sequence(4, PROMPT[:1]) == 0
    assert pdesc.start_sequence(5, []) == 0


def test_kv_through_a_hit_is_the_writers_kv(pdesc: CacheDescriptor) -> None:
    prefill(pdesc, 1, PROMPT)
    cached = prefill(pdesc, 2, [*PROMPT, 5, 6, 7])
    assert cached == 12
    assert pdesc.page_indices(2)[:3] == pdesc.page_indices(1)[:3]
    assert_kv_is(pdesc, 2, [*PROMPT, 5, 6, 7])
    assert_kv_is(pdesc, 1, PROMPT)


def test_salts_keep_namespaces_apart(pdesc: CacheDescriptor) -> None:
    prefill(pdesc, 1, PROMPT, salt="tenant-a")
    assert pdesc.start_sequence(2, PROMPT, salt="tenant-b") == 0
    assert pdesc.start_sequence(3, PROMPT) == 0
    assert pdesc.start_sequence(4, PROMPT, salt=b"tenant-a") == 0  # bytes != str
    assert pdesc.start_sequence(5, PROMPT, salt="tenant-a") == 12


def test_colliding_hashes_never_hand_out_wrong_kv() -> None:
    desc = CacheDescriptor(make_cache(num_pages=32, page_size=PS), prefix_caching=True,
                           check_invariants=True, prefix_hash_fn=lambda data: b"same")  # fmt: skip
    prefill(desc, 1, PROMPT)
    assert desc.prefix_stats.cached_pages == 1  # every later page collides with the first
    other = [9] * 4 + PROMPT[4:]
    assert prefill(desc, 2, other) == 0
    assert_kv_is(desc, 2, other)
    assert prefill(desc, 3, PROMPT, salt="x") == 0  # same tokens, other namespace
    assert prefill(desc, 4, PROMPT) == 4  # the one page that is cached, verified
    assert_kv_is(desc, 4, PROMPT)


def test_commit_swaps_duplicates_for_the_cached_page(pdesc: CacheDescriptor) -> None:
    free = pdesc.cache_manager.allocator.free_pages_count
    for seq in (1, 2):  # both start before either committed: both compute all pages
        assert pdesc.start_sequence(seq, PROMPT) == 0
        write(pdesc, seq, PROMPT)
    pdesc.commit([1, 2])
    assert pdesc.page_indices(1)[:3] == pdesc.page_indices(2)[:3]
    assert pdesc.cache_manager.allocator.free_pages_count == free - 4 - 1  # 3 shared + 2 tails
    assert_kv_is(pdesc, 2, PROMPT)


def test_a_swap_to_a_cached_page_nobody_held_takes_it_off_the_lru(pdesc: CacheDescriptor):
    for seq in (1, 2):  # both compute all pages
        assert pdesc.start_sequence(seq, PROMPT) == 0
        write(pdesc, seq, PROMPT)
    pdesc.commit([1])
    pdesc.release([1])  # only the cache holds 1's three full pages: evictable
    assert pdesc.prefix_stats.evictable_pages == 3
    pdesc.commit([2])  # 2 swaps its duplicates for them: held again, not evictable
    assert pdesc.prefix_stats.evictable_pages == 0
    assert_kv_is(pdesc, 2, PROMPT)


def test_nothing_is_cached_before_commit(pdesc: CacheDescriptor) -> None:
    pdesc.start_sequence(1, PROMPT)
    write(pdesc, 1, PROMPT)
    assert pdesc.start_sequence(2, PROMPT) == 0
    pdesc.release([1])
    assert pdesc.prefix_stats.cached_pages == 0


def test_decode_tokens_are_cached_once_their_page_fills(pdesc: CacheDescriptor) -> None:
    prefill(pdesc, 1, PROMPT[:6])
    generated = [50, 51, 52, 53]
    for token in generated:  # each decode step appends the KV of its input token
        pdesc.allocate_decoding([1], token_ids=[token])
        packed = pdesc.pack_for_flashinfer([1], append_lens=[1])
        pdesc.cache_manager.append_kv(*kv_of(pdesc.cache_manager, [token], pdesc.seq_len(1) - 1),
                                      packed)  # fmt: skip
        pdesc.commit([1])
    assert pdesc.prefix_stats.cached_pages == 2  # tokens 0-3 and 4-7 (6 prompt + 2 decoded)
    conversation = PROMPT[:6] + generated + [1, 2]
    assert pdesc.start_sequence(2, conversation) == 8
    write(pdesc, 2, conversation[8:])
    assert_kv_is(pdesc, 2, conversation)


def test_decode_without_token_ids_stops_caching_that_sequence(pdesc: CacheDescriptor) -> None:
    prefill(pdesc, 1, PROMPT[:6])
    for _ in range(4):
        pdesc.allocate_decoding([1])
        pdesc.commit([1])
    assert pdesc.prefix_stats.cached_pages == 1


def test_decode_tokens_recorded_after_the_step_are_cached(pdesc: CacheDescriptor) -> None:
    # an engine that decodes ahead learns each step's input token only after launching it
    prefill(pdesc, 1, PROMPT[:6])
    generated = [50, 51, 52, 53, 54, 55]
    for token in generated:
        pdesc.allocate_decoding([1])
        packed = pdesc.pack_for_flashinfer([1], append_lens=[1])
        pdesc.cache_manager.append_kv(*kv_of(pdesc.cache_manager, [token], pdesc.seq_len(1) - 1),
                                      packed)  # fmt: skip
        pdesc.record_decode_tokens([1], [token])
        pdesc.commit([1])
    assert pdesc.prefix_stats.cached_pages == 3  # 6 prompt + 6 decoded tokens
    conversation = PROMPT[:6] + generated + [1]
    assert pdesc.start_sequence(2, conversation) == 12
    assert_kv_is(pdesc, 2, conversation[:12])
    with pytest.raises(InvalidLengthError, match="one per sequence"):
        pdesc.record_decode_tokens([1, 2], [7])
    with pytest.raises(UnknownSequenceError):
        pdesc.record_decode_tokens([9], [7])


def test_truncate_into_a_cached_page_copies_it(pdesc: CacheDescriptor) -> None:
    prefill(pdesc, 1, PROMPT)
    cached_page = pdesc.page_indices(1)[2]
    pdesc.truncate(1, 10)  # page 2 now partial: must not be written in place
    assert pdesc.page_indices(1)[2] != cached_page
    write(pdesc, 1, [77, 78])
    pdesc.commit([1])
    assert prefill(pdesc, 2, PROMPT) == 12  # the cached page still holds PROMPT[8:12]
    assert_kv_is(pdesc, 2, PROMPT)
    assert_kv_is(pdesc, 1, [*PROMPT[:10], 77, 78])


def test_fork_of_a_cached_sequence_keeps_tracking(pdesc: CacheDescriptor) -> None:
    prefill(pdesc, 1, PROMPT)
    pdesc.fork(1, 2)
    pdesc.allocate_decoding([2], token_ids=[60])
    write(pdesc, 2, [61, 62])  # tokens nobody recorded: pages past 14 stay uncached
    pdesc.commit([2])
    assert pdesc.prefix_stats.cached_pages == 3


def test_lru_evicts_oldest_first_and_children_before_parents(pdesc: CacheDescriptor) -> None:
    alloc = pdesc.cache_manager.allocator
    prefill(pdesc, 1, [1] * 9)  # pages a0 a1 (+ partial)
    prefill(pdesc, 2, [2] * 9)  # pages b0 b1
    a, b = pdesc.page_indices(1)[:2], pdesc.page_indices(2)[:2]
    pdesc.release([2])
    pdesc.release([1])  # b released first: b is older
    lru = list(pdesc.prefix_cache._lru)
    assert lru == [b[1], b[0], a[1], a[0]]
    alloc.allocate(alloc.free_pages_count + 1)
    assert pdesc.prefix_stats.evictions == 1 and b[1] not in pdesc.prefix_cache
    assert pdesc.start_sequence(3, [2] * 9) == 4  # b0 still serves
    assert pdesc.start_sequence(4, [1] * 9) == 8


def test_eviction_under_pressure_then_no_page_error(pdesc: CacheDescriptor) -> None:
    alloc = pdesc.cache_manager.allocator
    prefill(pdesc, 1, list(range(41)))  # 10 full pages + 1
    pdesc.release([1])
    assert alloc.available_pages_count == 32 and alloc.free_pages_count == 22
    pdesc.allocate([5], [4 * 25])  # 25 pages: 3 evictions
    assert pdesc.prefix_stats.evictions == 3 and pdesc.prefix_stats.cached_pages == 7
    before = (alloc.refcount.tolist(), pdesc.prefix_stats)
    with pytest.raises(NoPageError, match="held only by the prefix cache"):
        pdesc.allocate([6], [4 * 8])  # 8 > 0 free + 7 evictable
    assert (alloc.refcount.tolist(), pdesc.prefix_stats) == before


def test_pinned_prefix_survives_pressure(pdesc: CacheDescriptor) -> None:
    alloc = pdesc.cache_manager.allocator
    prefill(pdesc, 1, PROMPT)
    handle = pdesc.pin_prefix(1)
    pdesc.release([1])
    assert pdesc.prefix_stats.pinned_pages == 3 and pdesc.prefix_stats.evictable_pages == 0
    with pytest.raises(NoPageError):
        alloc.allocate(30)
    pdesc.unpin_prefix(handle)
    assert pdesc.prefix_stats.evictable_pages == 3
    with pytest.raises(PageStateError):
        pdesc.unpin_prefix(handle)
    alloc.allocate(30)
    assert pdesc.prefix_stats.cached_pages == 2


def test_stats(pdesc: CacheDescriptor) -> None:
    prefill(pdesc, 1, PROMPT)
    prefill(pdesc, 2, PROMPT)
    stats = pdesc.prefix_stats
    assert (stats.lookups, stats.lookup_tokens, stats.hit_tokens) == (2, 28, 12)
    assert stats.hit_rate == pytest.approx(12 / 28)
    assert (stats.cached_pages, stats.inserted_pages, stats.evictions) == (3, 3, 0)


def test_seed_allocate_still_works_with_prefix_caching(pdesc: CacheDescriptor) -> None:
    pdesc.allocate([1, 2], [5, 9])
    pdesc.allocate_decoding([1, 2])
    pdesc.commit([1, 2])  # unknown tokens: nothing to cache
    assert pdesc.seq_lens([1, 2]).tolist() == [6, 10]
    assert pdesc.prefix_stats.cached_pages == 0


def test_start_sequence_without_prefix_caching() -> None:
    desc = CacheDescriptor(make_cache(page_size=PS))
    assert desc.start_sequence(1, PROMPT) == 0 and desc.seq_len(1) == 0
    desc.commit([1])
    assert desc.prefix_stats is None
    with pytest.raises(SeqAttnError, match="prefix_caching=True"):
        desc.pin_prefix(1)


def test_bad_input_changes_nothing(pdesc: CacheDescriptor) -> None:
    prefill(pdesc, 1, PROMPT)
    state = (pdesc.cache_manager.allocator.refcount.tolist(), pdesc.seq_len(1))
    with pytest.raises(SequenceExistsError):
        pdesc.start_sequence(1, PROMPT)
    with pytest.raises(TypeError, match="token ids"):
        pdesc.start_sequence(2, [[1, 2]])
    with pytest.raises(InvalidLengthError, match="one per sequence"):
        pdesc.allocate_decoding([1], token_ids=[3, 4])
    with pytest.raises(TypeError):
        pdesc.start_sequence(2, [0.5, 1.5])
    with pytest.raises(ValueError, match=r"token ids must fit in int64"):
        pdesc.start_sequence(2, [2**63])
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 2\*\*63\)"):
        pdesc.start_sequence(2, [-1])
    with pytest.raises(TypeError, match="salt"):
        pdesc.start_sequence(2, PROMPT, salt=7)
    assert (pdesc.cache_manager.allocator.refcount.tolist(), pdesc.seq_len(1)) == state
    assert 2 not in pdesc


def test_one_prefix_cache_per_pool() -> None:
    pool = PageAllocator(4)
    PrefixCache(pool, 2)
    with pytest.raises(PageStateError, match="already has a reclaimer"):
        PrefixCache(pool, 2)


def test_evicting_a_parent_orphans_nothing_reachable() -> None:
    pool = PageAllocator(8)
    cache = PrefixCache(pool, page_size=2)
    parent_page, child_page = pool.allocate(2).tolist()
    parent = cache.insert(None, np.array([1, 2]), parent_page, None)
    child = cache.insert(parent, np.array([3, 4]), child_page, None)
    assert child is not None
    pool.unref([child_page])  # the user keeps the parent: an odd order, but allowed
    pool.unref([parent_page])
    cache.reclaim(1)  # the child goes first
    assert child_page not in cache and parent_page in cache
    cache.check_integrity()


def test_caching_resumes_once_a_truncate_removes_an_unknown_decode_token() -> None:
    """The case the unseeded state machine once found: a decode token whose id was never
    told stopped the sequence from caching for good, even after truncate removed it."""
    desc = CacheDescriptor(make_cache(num_pages=8, page_size=2), prefix_caching=True,
                           check_invariants=True)  # fmt: skip
    desc.start_sequence(1, [0, 0])
    desc.allocate([1], [2])
    write_allocated(desc, 1, 2)
    desc.allocate_decoding([1])  # the new token's id is not told
    write_allocated(desc, 1, 1)
    desc.commit([1])
    desc.truncate(1, 1)  # cuts the unknown token (and the first page's second token)
    desc.allocate_decoding([1], token_ids=[0])
    write_allocated(desc, 1, 1)
    desc.commit([1])
    handle = desc.pin_prefix(1)  # "no cached pages to pin" before the fix
    assert desc.prefix_stats.pinned_pages == 1 and handle.tokens.tolist() == [0, 0]
    assert desc.start_sequence(2, [0, 0, 5]) == 2  # a later prompt hits it


def test_tokens_told_late_let_caching_go_on(pdesc: CacheDescriptor) -> None:
    prefill(pdesc, 1, PROMPT[:4])
    pdesc.allocate_decoding([1])  # the id comes later (decode-ahead engines)
    write_allocated(pdesc, 1, 1)
    pdesc.commit([1])  # not known yet: nothing more is cached
    pdesc.record_decode_tokens([1], [7])
    for token in (8, 9, 10):
        pdesc.allocate_decoding([1], token_ids=[token])
        write_allocated(pdesc, 1, 1)
    pdesc.commit([1])
    assert pdesc.prefix_stats.cached_pages == 2  # [100, 101, 102, 103] and [7, 8, 9, 10]
    assert pdesc.start_sequence(2, [*PROMPT[:4], 7, 8, 9, 10, 11]) == 8


def write_allocated(desc: CacheDescriptor, seq_id: int, n: int) -> None:
    """Write K/V for the ``n`` newest (allocated) tokens of a sequence."""
    cache = desc.cache_manager
    kv = torch.zeros(n, cache.num_heads, cache.head_dim)
    desc_packed = desc.pack_for_flashinfer([seq_id], append_lens=[n])
    cache.append_kv(kv, kv, desc_packed)
