import math

import attrs
import numpy as np
import pytest
import torch

from seqattn import (
    CacheDescriptor,
    DuplicateSequenceError,
    InvalidLengthError,
    NoPageError,
    SequenceData,
    SequenceExistsError,
    UnknownSequenceError,
)
from tests.conftest import make_cache

PAGE_SIZES = [1, 16, 7]


def lengths_around(ps: int) -> list[int]:
    return sorted({0, 1, max(ps - 1, 0), ps, ps + 1, 3 * ps + 2})


def expected_last(n: int, ps: int) -> int:
    return 0 if n == 0 else (n - 1) % ps + 1


def state(desc: CacheDescriptor) -> tuple:
    """Everything a failing call must leave as it was."""
    alloc = desc.cache_manager.allocator
    seqs = {i: (desc.seq_len(i), desc.page_indices(i)) for i in desc.seq_ids}
    return alloc.refcount.tolist(), alloc.available_pages_count, seqs


@pytest.mark.parametrize("ps", PAGE_SIZES)
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_allocate_packs_ceil_pages_and_last_page_len(ps, batch):
    desc = CacheDescriptor(make_cache(num_pages=400, page_size=ps), check_invariants=True)
    lens = (lengths_around(ps) * batch)[:batch]
    ids = [10 * i + 3 for i in range(batch)]
    desc.allocate(ids, lens)
    packed = desc.pack_for_flashinfer(ids)
    counts = np.diff(packed.kv_page_indptr.numpy())
    assert counts.tolist() == [math.ceil(n / ps) for n in lens]
    assert packed.kv_last_page_len.tolist() == [expected_last(n, ps) for n in lens]
    assert packed.kv_seq_lens.tolist() == lens
    assert packed.kv_page_indices.dtype == torch.int32
    assert packed.kv_page_indptr.dtype == packed.kv_last_page_len.dtype == torch.int32
    assert len(set(packed.kv_page_indices.tolist())) == packed.kv_page_indices.numel()


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_growth_through_allocate_and_decoding_matches_fresh_lengths(ps):
    desc = CacheDescriptor(make_cache(num_pages=600, page_size=ps), check_invariants=True)
    ids = [1, 2, 3, 4, 5]
    lens = np.array([0, 1, ps - 1, ps, ps + 1])
    desc.allocate(ids, lens.tolist())
    rng = np.random.default_rng(ps)
    for step in range(3 * ps + 2):
        if step % 5 == 4:
            add = rng.integers(0, 2 * ps + 1, size=len(ids))
            desc.allocate(ids, add.tolist())
            lens += add
        else:
            desc.allocate_decoding(ids)
            lens += 1
        packed = desc.pack_for_flashinfer(ids)
        assert desc.seq_lens(ids).tolist() == lens.tolist()
        assert np.diff(packed.kv_page_indptr.numpy()).tolist() == [math.ceil(n / ps) for n in lens]
        assert packed.kv_last_page_len.tolist() == [expected_last(n, ps) for n in lens]
        for row, seq in enumerate(ids):  # the incremental pack agrees with each page list
            got = packed.kv_page_indices[
                packed.kv_page_indptr[row] : packed.kv_page_indptr[row + 1]
            ].tolist()
            assert got == desc.page_indices(seq)


def test_zero_length_sequence_holds_no_page_and_packs_as_zero(desc):
    desc.allocate([1], [0])
    packed = desc.pack_for_flashinfer([1])
    assert packed.kv_page_indptr.tolist() == [0, 0]
    assert packed.kv_last_page_len.tolist() == [0]
    assert desc.get(1) == SequenceData(kv_page_indices=[], last_page_len=0)
    desc.allocate_decoding([1])
    assert desc.pack_for_flashinfer([1]).kv_last_page_len.tolist() == [1]


def test_pack_order_follows_the_ids_and_subsets_work(desc):
    desc.allocate([1, 2, 3], [5, 9, 1])
    packed = desc.pack_for_flashinfer([3, 1])
    assert packed.kv_page_indptr.tolist() == [0, 1, 3]
    assert packed.kv_page_indices.tolist() == desc.page_indices(3) + desc.page_indices(1)
    assert desc.pack_for_flashinfer([]).kv_page_indptr.tolist() == [0]


def test_ids_may_be_tuples_numpy_or_tensors(desc):
    desc.allocate((1, 2), np.array([3, 4]))
    desc.allocate_decoding(np.array([1, 2]))
    packed = desc.pack_for_flashinfer(torch.tensor([2, 1]))
    assert packed.kv_last_page_len.tolist() == [1, 4]


def test_release_returns_every_page(desc):
    cache = desc.cache_manager
    desc.allocate([1, 2], [9, 4])
    desc.release([1, 2])
    assert cache.available_pages_count == cache.num_pages
    assert len(desc) == 0 and 1 not in desc


def test_released_id_can_start_again(desc):
    desc.allocate([1], [9])
    desc.pack_for_flashinfer([1])
    desc.release([1])
    desc.allocate([1], [2])
    assert desc.pack_for_flashinfer([1]).kv_last_page_len.tolist() == [2]


def test_seq_id_to_data_is_a_read_only_view(desc):
    desc.allocate([4, 5], [6, 0])
    view = desc.seq_id_to_data
    assert set(view) == {4, 5} and len(view) == 2
    assert view[4] == SequenceData(kv_page_indices=desc.page_indices(4), last_page_len=2)
    assert 9 not in view
    with pytest.raises(KeyError):
        view[9]


def test_pages_needed_predicts_allocate(desc):
    desc.allocate([1], [3])
    need = desc.pages_needed([1, 2], [6, 4])
    before = desc.cache_manager.available_pages_count
    desc.allocate([1, 2], [6, 4])
    assert before - desc.cache_manager.available_pages_count == need == 2 + 1


# ------------------------------------------------------------------ fork and truncate
def test_fork_shares_full_pages_and_copies_the_partial_one():
    cache = make_cache(page_size=4, num_layers=2)
    desc = CacheDescriptor(cache, check_invariants=True)
    desc.allocate([1], [10])
    cache.kv_data.normal_()
    src_pages = desc.page_indices(1)
    desc.fork(1, 2)
    dst_pages = desc.page_indices(2)
    assert desc.seq_len(2) == 10
    assert dst_pages[:2] == src_pages[:2] and dst_pages[2] != src_pages[2]
    assert cache.allocator.refcount[src_pages[:2]].tolist() == [2, 2]
    assert torch.equal(cache.kv_data[:, dst_pages[2]], cache.kv_data[:, src_pages[2]])
    desc.allocate_decoding([1, 2])
    assert desc.page_indices(1)[2] != desc.page_indices(2)[2]


def test_fork_at_a_page_boundary_shares_everything(desc):
    desc.allocate([1], [8])
    desc.fork(1, 2)
    assert desc.page_indices(1) == desc.page_indices(2)
    desc.allocate_decoding([1, 2])  # each starts its own new page
    assert desc.page_indices(1)[2] != desc.page_indices(2)[2]


def test_fork_errors(desc):
    desc.allocate([1, 2], [3, 3])
    before = state(desc)
    with pytest.raises(SequenceExistsError):
        desc.fork(1, 2)
    with pytest.raises(UnknownSequenceError):
        desc.fork(7, 8)
    assert state(desc) == before


def test_truncate_frees_tail_pages(desc):
    desc.allocate([1], [13])
    free = desc.cache_manager.available_pages_count
    desc.truncate(1, 5)
    assert desc.seq_len(1) == 5 and len(desc.page_indices(1)) == 2
    assert desc.cache_manager.available_pages_count == free + 2
    desc.truncate(1, 0)
    assert desc.page_indices(1) == [] and desc.pack_for_flashinfer([1]).kv_last_page_len[0] == 0


def test_truncate_into_a_shared_page_copies_it_first(cache):
    desc = CacheDescriptor(cache, check_invariants=True)
    desc.allocate([1], [8])
    cache.kv_data.normal_()
    desc.fork(1, 2)  # both share pages p0, p1 (full)
    shared = desc.page_indices(1)[1]
    desc.truncate(2, 6)  # p1 becomes 2's partial last page: must not stay shared
    own = desc.page_indices(2)[1]
    assert own != shared and desc.page_indices(1)[1] == shared
    assert torch.equal(cache.kv_data[:, own], cache.kv_data[:, shared])
    assert cache.allocator.refcount[shared] == 1


def test_truncate_rejects_bad_lengths(desc):
    desc.allocate([1], [5])
    before = state(desc)
    for bad in (-1, 6):
        with pytest.raises(InvalidLengthError, match=r"new_len must be an integer in \[0, 5\]"):
            desc.truncate(1, bad)
    for bad in (2.5, "3", True, None):
        with pytest.raises(TypeError, match="new_len must be an integer"):
            desc.truncate(1, bad)
    assert state(desc) == before


# -------------------------------------------------------------- errors change nothing
def test_out_of_pages_changes_nothing():
    desc = CacheDescriptor(make_cache(num_pages=5, page_size=4), check_invariants=True)
    desc.allocate([1, 2], [4, 5])  # 1 + 2 pages
    before = state(desc)
    with pytest.raises(NoPageError):
        desc.allocate([2, 3], [4, 5])  # 1 + 2 > 2 free
    with pytest.raises(NoPageError):
        desc.allocate([4], [9])
    assert state(desc) == before
    assert 3 not in desc


def test_decoding_out_of_pages_changes_nothing():
    desc = CacheDescriptor(make_cache(num_pages=2, page_size=2), check_invariants=True)
    desc.allocate([1, 2], [2, 2])
    before = state(desc)
    with pytest.raises(NoPageError):
        desc.allocate_decoding([1, 2])
    assert state(desc) == before


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda d: d.allocate_decoding([1, 99]), UnknownSequenceError),
        (lambda d: d.release([1, 99]), UnknownSequenceError),
        (lambda d: d.pack_for_flashinfer([99]), UnknownSequenceError),
        (lambda d: d.truncate(99, 0), UnknownSequenceError),
        (lambda d: d.allocate([1, 2], [1]), InvalidLengthError),
        (lambda d: d.allocate([1], [-1]), InvalidLengthError),
        (lambda d: d.allocate([1, 1], [1, 1]), DuplicateSequenceError),
        (lambda d: d.allocate_decoding([1, 1]), DuplicateSequenceError),
        (lambda d: d.release([1, 1]), DuplicateSequenceError),
        (lambda d: d.pack_for_flashinfer([1], append_lens=[4]), InvalidLengthError),
    ],
)
def test_bad_calls_raise_clear_errors_and_change_nothing(desc, call, error):
    desc.allocate([1, 2], [3, 5])
    before = state(desc)
    with pytest.raises(error) as info:
        call(desc)
    assert str(info.value)  # a message naming what was expected
    assert state(desc) == before


def test_release_twice_is_an_error(desc):
    desc.allocate([1], [3])
    desc.release([1])
    with pytest.raises(UnknownSequenceError, match="not allocated"):
        desc.release([1])
    desc.cache_manager.allocator.check_integrity()


def test_unknown_id_error_is_a_key_error_with_a_readable_message(desc):
    with pytest.raises(KeyError) as info:
        desc.seq_len(42)
    assert str(info.value).startswith("sequence id 42 is not allocated")


# ---------------------------------------------------------------- append metadata
def test_append_metadata_positions_follow_existing_tokens(desc):
    desc.allocate([1, 2], [6, 0])
    desc.allocate([1, 2], [3, 2])
    packed = desc.pack_for_flashinfer([1, 2], append_lens=[3, 2])
    assert packed.append_indptr.tolist() == [0, 3, 5]
    assert packed.append_batch_indices.tolist() == [0, 0, 0, 1, 1]
    assert packed.append_positions.tolist() == [6, 7, 8, 0, 1]


def test_the_step_carries_every_device_tensor_and_is_immutable(desc):
    desc.allocate([1, 2], [5, 2])
    desc.allocate([1, 2], [2, 1])
    tokens = np.array([7, 8, 9])
    step = desc.pack_for_flashinfer([1, 2], append_lens=[2, 1], inputs=[tokens])
    assert step.append_positions.tolist() == [5, 6, 2]
    assert step.last_rows.tolist() == [1, 2]  # each sequence's last new token
    assert step.device_indptr.tolist() == step.kv_page_indptr.tolist()
    assert step.device_last_page_len.tolist() == step.kv_last_page_len.tolist()
    assert [t.tolist() for t in step.inputs] == [[7, 8, 9]]
    assert step.inputs[0].dtype == torch.int32
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        step.kv_page_indices = torch.zeros(0)  # type: ignore[misc]
    with pytest.raises(ValueError):
        desc.pack_for_flashinfer([1], inputs=[[2**31]])


@pytest.mark.parametrize("seed", range(6))
def test_incremental_packing_matches_page_lists_under_any_call_order(seed):
    """Decode steps of the packed batch, of other batches, prefill chunks, truncation and
    packs of other batches, in random order: every pack equals the sequences' page lists."""
    rng = np.random.default_rng(seed)
    desc = CacheDescriptor(make_cache(num_pages=4000, page_size=int(rng.integers(1, 6))))
    batch, other = [0, 1, 2, 3, 4], [3, 4, 5]
    desc.allocate([*batch, 5], rng.integers(0, 9, 6).tolist())
    for _ in range(300):
        action = rng.integers(6)
        if action == 0:
            desc.allocate_decoding(batch)
        elif action == 1:
            desc.allocate_decoding(other)
        elif action == 2:
            desc.allocate(batch, rng.integers(0, 7, len(batch)).tolist())
        elif action == 3:
            seq = int(rng.choice(batch))
            desc.truncate(seq, int(rng.integers(0, desc.seq_len(seq) + 1)))
        ids = batch if action != 4 else other
        packed = desc.pack_for_flashinfer(ids)
        indptr = packed.kv_page_indptr.tolist()
        for row, seq in enumerate(ids):
            got = packed.kv_page_indices[indptr[row] : indptr[row + 1]].tolist()
            assert got == desc.page_indices(seq)
