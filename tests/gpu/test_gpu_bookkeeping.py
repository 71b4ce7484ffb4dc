"""Device-side packing and appending on CUDA: equal to the CPU path, and free of host syncs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqattn import CacheDescriptor, PagedKVCacheManager, packing
from tests.conftest import read_back
from tests.gpu.conftest import flashinfer_or_skip

pytestmark = pytest.mark.gpu


def make(num_pages=4096, page_size=16, num_heads=8, head_dim=128, num_layers=2):
    cache = PagedKVCacheManager(
        num_pages, page_size, num_heads, head_dim, torch.float16, "cuda", num_layers=num_layers
    )
    return cache, CacheDescriptor(cache)


@pytest.mark.parametrize("route", ["ids sent whole", "gathered from the device arena"])
def test_device_pack_equals_host_pack_through_growth_moves_and_releases(route, monkeypatch):
    if route != "ids sent whole":  # every batch past the limit: the device arena's route
        monkeypatch.setattr(packing, "HOST_INDICES_MAX", 0)
    _, desc = make(num_pages=20000, page_size=4)
    rng = np.random.default_rng(0)
    live: list[int] = []
    next_id = 0
    for step in range(300):
        if step % 7 == 0 or not live:  # new sequences of random lengths
            new = list(range(next_id, next_id + 3))
            next_id += 3
            desc.allocate(new, rng.integers(0, 40, size=3).tolist())
            live += new
        if step % 11 == 5:
            victim = live.pop(int(rng.integers(len(live))))
            desc.release([victim])
        if step % 13 == 6 and live:
            seq = live[int(rng.integers(len(live)))]
            desc.truncate(seq, int(rng.integers(0, desc.seq_len(seq) + 1)))
        if step % 17 == 8 and live:
            desc.fork(live[0], next_id)
            live.append(next_id)
            next_id += 1
        if live:
            desc.allocate_decoding(live)
            host = desc.pack_for_flashinfer(live)
            device = desc.pack_for_flashinfer(live, device="cuda")
            assert device.kv_page_indices.is_cuda and device.kv_page_indptr.is_pinned()
            assert torch.equal(device.kv_page_indices.cpu(), host.kv_page_indices)
            assert torch.equal(device.kv_page_indptr, host.kv_page_indptr)
            assert torch.equal(device.kv_last_page_len, host.kv_last_page_len)
            assert torch.equal(device.kv_seq_lens, host.kv_seq_lens)
    desc.check_integrity()


def test_append_metadata_matches_flashinfer():
    fi = flashinfer_or_skip()
    _, desc = make()
    ids, lens = [3, 1, 2], [17, 0, 33]
    desc.allocate(ids, [5, 9, 16])
    desc.allocate(ids, lens)
    packed = desc.pack_for_flashinfer(ids, append_lens=lens, device="cuda")
    # the step's device copies of its host arrays, what the append kernel reads
    assert torch.equal(packed.device_indptr.cpu(), packed.kv_page_indptr)
    assert torch.equal(packed.device_last_page_len.cpu(), packed.kv_last_page_len)
    seq_lens = fi.page.get_seq_lens(packed.device_indptr, packed.device_last_page_len, 16)
    append_indptr = packed.append_indptr.cuda()
    batch, positions = fi.page.get_batch_indices_positions(append_indptr, seq_lens, 50)
    assert torch.equal(batch, packed.append_batch_indices)
    assert torch.equal(positions, packed.append_positions)
    assert packed.last_rows.tolist() == (append_indptr[1:] - 1).tolist()


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_flashinfer_append_equals_torch_append_bit_for_bit(layout):
    flashinfer_or_skip()
    caches = []
    for use_flashinfer in (True, False):
        cache = PagedKVCacheManager(512, 16, 4, 128, torch.bfloat16, "cuda", layout)
        cache.use_flashinfer = use_flashinfer
        desc = CacheDescriptor(cache)
        gen = torch.Generator(device="cuda").manual_seed(0)
        ids = [1, 2, 3]
        for lens in ([40, 1, 16], [1, 1, 1], [15, 17, 2], [1, 1, 1]):
            desc.allocate(ids, lens)
            packed = desc.pack_for_flashinfer(ids, append_lens=lens, device="cuda")
            kv = torch.randn(sum(lens), 2, 4, 128, device="cuda", generator=gen).bfloat16()
            cache.append_kv(kv[:, 0], kv[:, 1], packed)
        caches.append((cache, desc.pack_for_flashinfer(ids)))
    (fi_cache, packed), (torch_cache, _) = caches
    for row in range(3):
        k_fi, v_fi = read_back(fi_cache, packed, row)
        k_t, v_t = read_back(torch_cache, packed, row)
        assert torch.equal(k_fi, k_t) and torch.equal(v_fi, v_t)


def test_decode_step_makes_no_host_device_sync():
    cache, desc = make(num_pages=8192)
    ids = list(range(64))
    desc.allocate(ids, [100 + 7 * i for i in ids])
    kv = torch.randn(64, 8, 128, device="cuda", dtype=torch.float16)

    def step():
        desc.allocate_decoding(ids)
        packed = desc.pack_for_flashinfer(ids, append_lens=[1] * 64, device="cuda")
        for layer in range(cache.num_layers):
            cache.append_kv(kv, kv, packed, layer=layer)
        return packed

    for _ in range(20):  # warm up: the device copy of the page table, allocator caches
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(40):  # crosses page boundaries for every sequence
            packed = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    host = desc.pack_for_flashinfer(ids)
    assert torch.equal(packed.kv_page_indices.cpu(), host.kv_page_indices)
    k, _ = read_back(cache, packed, 5)
    assert torch.equal(k[-1].cpu(), kv[5].cpu())


def test_float32_cuda_cache_appends_with_torch():
    """flashinfer's append has no float32 kernel: a float32 CUDA cache scatters with torch."""
    cache = PagedKVCacheManager(16, 4, 2, 64, torch.float32, "cuda")
    assert not cache.use_flashinfer
    desc = CacheDescriptor(cache)
    desc.allocate([0, 1], [5, 3])
    packed = desc.pack_for_flashinfer([0, 1], append_lens=[5, 3], device="cuda")
    k, v = torch.randn(2, 8, 2, 64, device="cuda").unbind(0)
    cache.append_kv(k, v, packed)
    host = desc.pack_for_flashinfer([0, 1])
    got_k, got_v = read_back(cache, host, 1)
    assert torch.equal(got_k, k[5:]) and torch.equal(got_v, v[5:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_step_packed_on_the_host_appends_to_a_cuda_cache(dtype):
    """pack_for_flashinfer(ids, append_lens) without a device (the seed's call) feeds
    append_kv on a CUDA cache: its rows and positions go up with the page table."""
    if dtype == torch.float16:
        flashinfer_or_skip()
    cache = PagedKVCacheManager(16, 4, 2, 64, dtype, "cuda")
    desc = CacheDescriptor(cache)
    desc.allocate([0, 1], [5, 3])
    packed = desc.pack_for_flashinfer([0, 1], append_lens=[5, 3])  # host tensors
    k, v = torch.randn(2, 8, 2, 64, device="cuda").to(dtype).unbind(0)
    cache.append_kv(k, v, packed)
    got_k, got_v = read_back(cache, packed, 0)
    assert torch.equal(got_k, k[:5]) and torch.equal(got_v, v[:5])
    got_k, _ = read_back(cache, packed, 1)
    assert torch.equal(got_k, k[5:])
