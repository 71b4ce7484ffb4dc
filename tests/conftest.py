"""Shared fixtures and helpers: a CPU cache, reading a sequence back through a packed
batch, hostile arguments, and the hypothesis profile.

Property tests and state machines are deterministic by default (a fixed derandomized
profile, no example database), so a commit passes or fails the same way every time.
``SEQATTN_LONG=N`` runs N times as many examples from random seeds instead: the long
runs, e.g. ``SEQATTN_LONG=10 python -m pytest -q -s tests/test_state_machine.py
tests/test_prefix_state_machine.py tests/test_headwise_state_machine.py``, which print
the operations they checked.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from seqattn import CacheDescriptor, FlashInferPackedData, PagedKVCacheManager, SeqAttnError

LONG = float(os.environ.get("SEQATTN_LONG", "0"))
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("long", derandomize=False, database=None, deadline=None)
settings.load_profile("long" if LONG else "ci")


def examples(default: int) -> int:
    """A property test's example count: ``default``, times ``SEQATTN_LONG`` when set."""
    return max(1, int(default * LONG)) if LONG else default


# Values that are not integers (or not int64) where an id, length or index belongs.
NOT_INTEGERS = [True, False, 1.0, 2.5, "1", b"1", None, (1,), [1], np.float64(1.0), np.bool_(True)]
HOSTILE_INTEGERS = st.sampled_from([*NOT_INTEGERS, 2**63, -(2**63) - 1, 2**64])
# What may stand for a list of ids and is refused as one: strings, sets, scalars, lists of
# non-integers, integers past int64.
HOSTILE_ID_LISTS = st.sampled_from(
    ["56", b"56", {1, 2}, {1: 2}, 1, None, 1.0, [True], [1.0], ["1"], [None], [(1,)], [2**63],
     np.array([1.0]), np.array([True]), torch.tensor([1.0]), np.zeros((1, 1), np.int64)]
)  # fmt: skip


def refused_kind(error: BaseException) -> type[Exception]:
    """The builtin a SeqAttnError is also (TypeError, ValueError, KeyError, IndexError,
    RuntimeError); fails the test if ``error`` is not a SeqAttnError."""
    assert isinstance(error, SeqAttnError), f"{type(error).__name__}: {error}"
    for builtin in (TypeError, KeyError, IndexError, ValueError, RuntimeError):
        if isinstance(error, builtin):
            return builtin
    raise AssertionError(f"{type(error).__name__} is no builtin error: {error}")


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


def machine_settings(count: int, steps: int) -> settings:
    """Hypothesis settings of a state machine: ``examples(count)`` runs of ``steps`` rules
    each, no deadline (CI machines are slow and uneven)."""
    return settings(
        max_examples=examples(count),
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def assert_refused_unchanged(snapshot, call) -> None:
    """``call()`` raises a SeqAttnError that is also a builtin (whichever), and changes
    nothing ``snapshot()`` sees (as :func:`assert_raises_unchanged`)."""
    before = snapshot()
    try:
        call()
    except Exception as error:  # which one is checked just below
        refused_kind(error)
    else:
        raise AssertionError("a hostile call was accepted")
    after = snapshot()
    assert before[:-1] == after[:-1] and torch.equal(before[-1], after[-1])


def assert_raises_unchanged(snapshot, error: type[Exception], call) -> None:
    """``call()`` raises ``error`` (a SeqAttnError) and changes nothing ``snapshot()``
    sees: a tuple whose last item is a tensor (the KV storage), compared exactly, the
    rest with ``==``."""
    before = snapshot()
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, SeqAttnError), f"{type(info.value).__name__}: {info.value}"
    after = snapshot()
    assert before[:-1] == after[:-1] and torch.equal(before[-1], after[-1])
