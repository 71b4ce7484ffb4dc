"""K/V placement: what append_kv writes is read back through the packed page table, bit for bit."""

import pytest
import torch

from seqattn import CacheDescriptor, InvalidLengthError, TensorSpecError
from tests.conftest import make_cache, read_back


def run_steps(cache, desc, ids, chunks, decode_steps, *, layer=0, seed=0, use_indptr=False):
    """Append random chunks then decode tokens; return what each sequence should hold."""
    gen = torch.Generator().manual_seed(seed)
    shape = (cache.num_heads, cache.head_dim)
    truth = {i: (torch.zeros(0, *shape), torch.zeros(0, *shape)) for i in ids}
    steps = [(False, list(c)) for c in chunks] + [(True, [1] * len(ids))] * decode_steps
    for decoding, lens in steps:
        if decoding:
            desc.allocate_decoding(ids)
        else:
            desc.allocate(ids, lens)
        nnz = sum(lens)
        k = torch.randn(nnz, *shape, generator=gen).to(cache.dtype)
        v = torch.randn(nnz, *shape, generator=gen).to(cache.dtype)
        if use_indptr:
            packed = desc.pack_for_flashinfer(ids)
            indptr = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
            cache.append_kv(k, v, packed, indptr, layer=layer)
        else:
            packed = desc.pack_for_flashinfer(ids, append_lens=lens)
            cache.append_kv(k, v, packed, layer=layer)
        offset = 0
        for seq, n in zip(ids, lens, strict=True):
            tk, tv = truth[seq]
            truth[seq] = (
                torch.cat([tk, k[offset : offset + n]]),
                torch.cat([tv, v[offset : offset + n]]),
            )
            offset += n
    return truth


def assert_read_back(cache, desc, ids, truth, layer=0):
    packed = desc.pack_for_flashinfer(ids)
    for row, seq in enumerate(ids):
        k, v = read_back(cache, packed, row, layer)
        assert torch.equal(k, truth[seq][0]), f"keys of sequence {seq}"
        assert torch.equal(v, truth[seq][1]), f"values of sequence {seq}"


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("ps", [1, 5, 16])
@pytest.mark.parametrize("use_indptr", [False, True])
def test_chunks_and_decode_land_after_existing_tokens(layout, ps, use_indptr):
    cache = make_cache(num_pages=200, page_size=ps, kv_layout=layout, dtype=torch.float16)
    desc = CacheDescriptor(cache, check_invariants=True)
    ids = [5, 1, 9]
    chunks = [[ps + 1, 0, 1], [ps - 1, 2 * ps, 3], [1, 1, 0]]
    truth = run_steps(cache, desc, ids, chunks, decode_steps=ps + 2, use_indptr=use_indptr)
    assert_read_back(cache, desc, ids, truth)


def test_layers_are_independent():
    cache = make_cache(num_pages=40, page_size=4, num_layers=3)
    desc = CacheDescriptor(cache)
    ids = [1, 2]
    truths = []
    desc.allocate(ids, [6, 3])
    packed = desc.pack_for_flashinfer(ids, append_lens=[6, 3])
    for layer in range(3):
        k = torch.full((9, 2, 4), float(layer))
        cache.append_kv(k, -k, packed, layer=layer)
        truths.append(k)
    for layer in range(3):
        k, v = read_back(cache, packed, 0, layer)
        assert torch.equal(k, truths[layer][:6]) and torch.equal(v, -truths[layer][:6])


def test_forked_sequences_keep_their_own_tokens():
    cache = make_cache(num_pages=40, page_size=4)
    desc = CacheDescriptor(cache, check_invariants=True)
    truth = run_steps(cache, desc, [1], [[6]], decode_steps=0)
    desc.fork(1, 2)
    truth[2] = truth[1]
    more = run_steps(cache, desc, [1, 2], [], decode_steps=3, seed=1)
    for seq in (1, 2):
        truth[seq] = tuple(torch.cat([a, b]) for a, b in zip(truth[seq], more[seq], strict=True))
    assert_read_back(cache, desc, [1, 2], truth)


def test_truncate_then_append_overwrites_only_the_rolled_back_tail():
    cache = make_cache(num_pages=40, page_size=4)
    desc = CacheDescriptor(cache, check_invariants=True)
    truth = run_steps(cache, desc, [1], [[10]], decode_steps=0)
    desc.truncate(1, 7)
    more = run_steps(cache, desc, [1], [[2]], decode_steps=1, seed=3)
    expect = tuple(torch.cat([t[:7], m]) for t, m in zip(truth[1], more[1], strict=True))
    assert_read_back(cache, desc, [1], {1: expect})


def test_zero_tokens_is_a_no_op(cache, desc):
    desc.allocate([1], [0])
    packed = desc.pack_for_flashinfer([1], append_lens=[0])
    empty = torch.zeros(0, 2, 4)
    cache.append_kv(empty, empty, packed)
    assert not cache.kv_data.any()


@pytest.mark.parametrize(
    "keys, message",
    [
        (torch.zeros(3, 3, 4), r"shape \[nnz, 2, 4\]"),
        (torch.zeros(3, 2, 4, dtype=torch.float64), "dtype torch.float32"),
        (torch.zeros(3, 2), r"shape \[nnz, 2, 4\]"),
        (torch.zeros(2, 2, 4), "packed to append 3"),
    ],
)
def test_wrong_tensors_are_refused_before_writing(cache, desc, keys, message):
    desc.allocate([1], [3])
    packed = desc.pack_for_flashinfer([1], append_lens=[3])
    with pytest.raises(TensorSpecError, match=message):
        cache.append_kv(keys, keys.clone(), packed)
    assert not cache.kv_data.any()


def test_keys_and_values_must_agree(cache, desc):
    desc.allocate([1], [3])
    packed = desc.pack_for_flashinfer([1], append_lens=[3])
    with pytest.raises(TensorSpecError, match="same number of tokens"):
        cache.append_kv(torch.zeros(3, 2, 4), torch.zeros(2, 2, 4), packed)


def test_append_needs_lengths_from_somewhere(cache, desc):
    desc.allocate([1], [3])
    with pytest.raises(InvalidLengthError, match="append_indptr_cpu"):
        cache.append_kv(torch.zeros(3, 2, 4), torch.zeros(3, 2, 4), desc.pack_for_flashinfer([1]))


def test_append_longer_than_allocated_is_refused(cache, desc):
    desc.allocate([1], [3])
    packed = desc.pack_for_flashinfer([1])
    with pytest.raises(InvalidLengthError, match="allocate before packing"):
        cache.append_kv(torch.zeros(4, 2, 4), torch.zeros(4, 2, 4), packed, torch.tensor([0, 4]))
    assert not cache.kv_data.any()


def test_bad_layer_is_refused(cache, desc):
    desc.allocate([1], [1])
    packed = desc.pack_for_flashinfer([1], append_lens=[1])
    for layer, error in ((1, IndexError), (-1, IndexError), (True, TypeError), (0.0, TypeError)):
        with pytest.raises(error, match="layer must be an integer"):
            cache.append_kv(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), packed, layer=layer)
