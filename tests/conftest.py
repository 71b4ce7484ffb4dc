"""Shared fixtures and helpers: a CPU cache, and reading a sequence back through a packed batch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

from seqattn import CacheDescriptor, FlashInferPackedData, PagedKVCacheManager


def make_cache(
    num_pages: int = 64,
    page_size: int = 4,
    num_heads: int = 2,
    head_dim: int = 4,
    *,
    dtype: torch.dtype = torch.float32,
    kv_layout: str = "NHD",
    num_layers: int = 1,
) -> PagedKVCacheManager:
    return PagedKVCacheManager(
        num_pages, page_size, num_heads, head_dim, dtype, "cpu", kv_layout, num_layers=num_layers
    )


def read_back(
    cache: PagedKVCacheManager, packed: FlashInferPackedData, row: int, layer: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of batch row ``row``, ``[seq_len, num_heads, head_dim]``, read page by page."""
    indptr = packed.kv_page_indptr.tolist()
    pages = packed.kv_page_indices[indptr[row] : indptr[row + 1]].tolist()
    last = int(packed.kv_last_page_len[row])
    key_cache, value_cache = cache.get_memory_tensors(layer)
    ks, vs = [], []
    for i, page in enumerate(pages):
        n = last if i == len(pages) - 1 else cache.page_size
        if cache.kv_layout == "NHD":
            ks.append(key_cache[page, :n])
            vs.append(value_cache[page, :n])
        else:
            ks.append(key_cache[page, :, :n].transpose(0, 1))
            vs.append(value_cache[page, :, :n].transpose(0, 1))
    empty = torch.zeros(0, cache.num_heads, cache.head_dim, dtype=cache.dtype)
    return (torch.cat(ks) if ks else empty), (torch.cat(vs) if vs else empty)


@pytest.fixture
def cache() -> PagedKVCacheManager:
    return make_cache()


@pytest.fixture
def desc(cache: PagedKVCacheManager) -> CacheDescriptor:
    return CacheDescriptor(cache, check_invariants=True)


def machine_settings(examples: int, steps: int) -> settings:
    """Hypothesis settings of a state machine: ``examples`` runs of ``steps`` rules each,
    no deadline (CI machines are slow and uneven)."""
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def assert_raises_unchanged(snapshot, error: type[Exception], call) -> None:
    """``call()`` raises ``error`` and changes nothing ``snapshot()`` sees: a tuple whose
    last item is a tensor (the KV storage), compared exactly, the rest with ``==``."""
    before = snapshot()
    with pytest.raises(error):
        call()
    after = snapshot()
    assert before[:-1] == after[:-1] and torch.equal(before[-1], after[-1])
