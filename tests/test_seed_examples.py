"""SEED.md's Quick Start and Advanced Usage, run as written (on the CPU), plus its API list."""

import torch

import seqattn
from seqattn import CacheDescriptor, HeadIDGenerator, PagedKVCacheManager


def test_quick_start():
    cache_manager = PagedKVCacheManager(
        num_pages=1024,
        page_size=16,
        num_heads=32,
        head_dim=128,
        dtype=torch.float16,
        device=torch.device("cpu"),
    )
    descriptor = CacheDescriptor(cache_manager)
    seq_ids = [1, 2, 3]
    seq_lengths = [100, 150, 80]
    descriptor.allocate(seq_ids, seq_lengths)
    flashinfer_data = descriptor.pack_for_flashinfer(seq_ids)

    assert flashinfer_data.kv_page_indptr.tolist() == [0, 7, 17, 22]
    assert flashinfer_data.kv_last_page_len.tolist() == [4, 6, 16]
    assert flashinfer_data.kv_page_indices.shape == (22,)
    assert cache_manager.available_pages_count == 1024 - 22


def test_reference_counting_for_prefix_caching():
    cache_manager = PagedKVCacheManager(64, 16, 4, 64, torch.float16, "cpu")
    shared_pages = cache_manager.allocate(3)
    assert shared_pages == [0, 1, 2]
    cache_manager.ref(shared_pages)  # Increment reference count
    cache_manager.release_pages(shared_pages)
    assert cache_manager.available_pages_count == 61  # still held by the ref
    cache_manager.unref(shared_pages)
    assert cache_manager.available_pages_count == 64


def test_head_wise_operations():
    head_gen = HeadIDGenerator(num_kv_heads=32)
    head_id = head_gen.get_head_id(seq_id=1, head_idx=5)
    assert head_id == (1 << 5) | 5  # what 0.0.2 gave for a power of two
    assert head_gen.split_head_id(head_id) == (1, 5)


def test_head_ids_use_as_seq_ids():
    cache = PagedKVCacheManager(64, 4, 1, 8, torch.float32, "cpu")
    desc = CacheDescriptor(cache)
    gen = HeadIDGenerator(3)
    desc.allocate(gen.get_head_ids(7), [5, 2, 0])
    assert desc.seq_lens([gen.get_head_id(7, h) for h in range(3)]).tolist() == [5, 2, 0]


def test_api_reference_calls_exist():
    for name in ("allocate", "ref", "unref", "release_pages", "append_kv", "get_memory_tensors"):
        assert callable(getattr(PagedKVCacheManager, name))
    for name in ("allocate", "allocate_decoding", "release", "pack_for_flashinfer"):
        assert callable(getattr(CacheDescriptor, name))
    for name in (
        "PagedKVCacheManager",
        "CacheDescriptor",
        "FlashInferPackedData",
        "HeadIDGenerator",
        "NoPageError",
        "SequenceData",
    ):
        assert name in seqattn.__all__
