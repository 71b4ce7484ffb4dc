import numpy as np
import pytest
import torch

from seqattn import (
    ArgumentTypeError,
    IndexOutOfRangeError,
    NoPageError,
    PageAllocator,
    PageStateError,
    SeqAttnError,
)


def snapshot(alloc: PageAllocator) -> tuple:
    return alloc.refcount.copy(), alloc.available_pages_count


def test_allocate_hands_out_distinct_pages_with_one_reference():
    alloc = PageAllocator(10)
    a, b = alloc.allocate(3), alloc.allocate(4)
    assert len(set(a.tolist()) | set(b.tolist())) == 7
    assert alloc.available_pages_count == 3
    assert (alloc.refcount[np.concatenate([a, b])] == 1).all()
    alloc.check_integrity()


def test_too_many_pages_raises_and_changes_nothing():
    alloc = PageAllocator(4)
    alloc.allocate(3)
    before = snapshot(alloc)
    with pytest.raises(NoPageError, match="need 2 pages but only 1"):
        alloc.allocate(2)
    assert np.array_equal(snapshot(alloc)[0], before[0]) and snapshot(alloc)[1] == before[1]


def test_ref_unref_with_duplicates_frees_at_zero():
    alloc = PageAllocator(4)
    p = alloc.allocate(2).tolist()
    alloc.ref([p[0], p[0]])
    assert alloc.refcount[p[0]] == 3
    alloc.unref([p[0], p[0], p[1]])
    assert alloc.refcount[p[0]] == 1 and alloc.refcount[p[1]] == 0
    assert alloc.available_pages_count == 3
    alloc.release_pages([p[0]])
    assert alloc.available_pages_count == 4
    alloc.check_integrity()


def test_freed_pages_are_reused():
    alloc = PageAllocator(2)
    pages = alloc.allocate(2)
    alloc.unref(pages)
    assert sorted(alloc.allocate(2).tolist()) == [0, 1]


@pytest.mark.parametrize(
    "call, pages, error, builtin, message",
    [
        ("ref", [3], PageStateError, ValueError, "cannot ref free pages"),
        ("unref", [3], PageStateError, ValueError, "more references than allocate/ref took"),
        ("unref", [0, 0], PageStateError, ValueError, "more references than allocate/ref took"),
        ("ref", [9], IndexOutOfRangeError, IndexError, r"in \[0, 3\], got \[9\]"),
        ("unref", [-1], IndexOutOfRangeError, IndexError, r"in \[0, 3\], got \[-1\]"),
        ("unref", [2**63], IndexOutOfRangeError, IndexError, "fit in int64"),
        ("ref", [True], ArgumentTypeError, TypeError, "integers, got True"),
        ("ref", "0", ArgumentTypeError, TypeError, "list, tuple"),
        ("unref", [0.0], ArgumentTypeError, TypeError, "integers, got 0.0"),
    ],
)
def test_bad_ref_unref_raise_and_change_nothing(call, pages, error, builtin, message):
    alloc = PageAllocator(4)
    alloc.allocate(1)  # page 0 held once
    before = snapshot(alloc)
    with pytest.raises(error, match=message) as info:
        getattr(alloc, call)(pages)
    assert isinstance(info.value, builtin) and isinstance(info.value, SeqAttnError)
    assert np.array_equal(snapshot(alloc)[0], before[0]) and snapshot(alloc)[1] == before[1]
    alloc.check_integrity()


def test_accepts_numpy_and_torch_page_ids():
    alloc = PageAllocator(4)
    pages = alloc.allocate(2)
    alloc.ref(torch.tensor(pages, dtype=torch.int32))
    alloc.unref(np.asarray(pages))
    assert alloc.refcount[pages].tolist() == [1, 1]
    with pytest.raises(ArgumentTypeError, match="integers"):
        alloc.ref([0.5])


def test_refcount_view_is_read_only():
    alloc = PageAllocator(2)
    with pytest.raises(ValueError):
        alloc.refcount[0] = 5


def test_integrity_check_catches_corruption():
    alloc = PageAllocator(3)
    alloc.allocate(1)
    alloc._refcount[2] = 1  # held but still on the free list
    with pytest.raises(AssertionError):
        alloc.check_integrity()
