"""The contract at every boundary of the core: a bad argument raises a SeqAttnError that is
also the matching builtin (TypeError, ValueError, KeyError, IndexError), with a message
naming what was expected and showing what came, and changes nothing: pages, reference
counts, lengths, page tables, K/V, prefix cache.

One test per class of misuse; the state machines draw the same hostile values at random
between ordinary calls.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqattn import (
    ArgumentTypeError,
    CacheDescriptor,
    FlashInferPackedData,
    IndexOutOfRangeError,
    InvalidArgumentError,
    InvalidLengthError,
    PagedAttention,
    PagedKVCacheManager,
    PageStateError,
    SeqAttnError,
    StaleBatchError,
    TensorSpecError,
    UnknownSequenceError,
)
from tests.conftest import NOT_INTEGERS, make_cache


def state(desc: CacheDescriptor) -> tuple:
    """Everything a refused call must leave as it was (the K/V storage last)."""
    cache = desc.cache_manager
    seqs = {i: (desc.seq_len(i), desc.page_indices(i)) for i in desc.seq_ids}
    pool = cache.allocator
    return (
        pool.refcount.tolist(),
        pool.external_refcount.tolist(),
        cache.available_pages_count,
        seqs,
        desc.prefix_stats,
        cache.kv_data.clone(),
    )


def refused(desc: CacheDescriptor, error: type[Exception], builtin: type[Exception], call,
            match: str | None = None) -> SeqAttnError:  # fmt: skip
    """``call()`` raises ``error`` (also ``builtin``) and changes nothing of ``desc``."""
    before = state(desc)
    with pytest.raises(error, match=match) as info:
        call()
    assert isinstance(info.value, SeqAttnError) and isinstance(info.value, builtin)
    after = state(desc)
    assert before[:-1] == after[:-1] and torch.equal(before[-1], after[-1])
    desc.check_integrity()
    return info.value


@pytest.fixture
def desc() -> CacheDescriptor:
    d = CacheDescriptor(make_cache(num_pages=16, page_size=4), prefix_caching=True,
                        check_invariants=True)  # fmt: skip
    d.allocate([1, 2], [6, 3])
    return d


def kv(n: int) -> torch.Tensor:
    return torch.full((n, 2, 4), 5.0)


# ----------------------------------------------------------- stale or foreign batches
STALE_CHANGES = {
    "release and reuse": lambda d: (d.release([1]), d.allocate([21], [6])),
    "allocate_decoding": lambda d: d.allocate_decoding([1]),
    "allocate": lambda d: d.allocate([1], [2]),
    "truncate": lambda d: d.truncate(1, 5),
    "fork": lambda d: d.fork(1, 9),
}


@pytest.mark.parametrize("change", list(STALE_CHANGES))
def test_a_batch_packed_before_its_sequence_changed_is_refused(desc, change) -> None:
    desc.allocate([1], [4])
    packed = desc.pack_for_flashinfer([1], append_lens=[4])
    STALE_CHANGES[change](desc)
    attn = PagedAttention(desc.cache_manager, 2, backend="torch")
    for call in (
        lambda: desc.cache_manager.append_kv(kv(4), kv(4), packed),
        lambda: attn.plan(packed),
    ):
        refused(desc, StaleBatchError, ValueError, call, match="stale")


def test_commit_that_swaps_a_page_makes_earlier_batches_stale() -> None:
    desc = CacheDescriptor(make_cache(num_pages=16, page_size=4), prefix_caching=True)
    for seq in (1, 2):  # the same prompt computed twice, at once
        desc.start_sequence(seq, [3] * 9)
        desc.allocate([seq], [9])
        desc.cache_manager.append_kv(kv(9), kv(9), desc.pack_for_flashinfer([seq], [9]))
    packed = desc.pack_for_flashinfer([2], append_lens=[1])
    desc.commit([1])
    desc.commit([2])  # 2's first two pages are swapped for 1's, and go back to the pool
    assert desc.page_indices(2)[:2] == desc.page_indices(1)[:2]
    refused(desc, StaleBatchError, ValueError,
            lambda: desc.cache_manager.append_kv(kv(1), kv(1), packed))  # fmt: skip


def test_a_change_to_other_sequences_leaves_a_batch_current(desc) -> None:
    packed = desc.pack_for_flashinfer([1], append_lens=[1])
    desc.allocate([3], [5])
    desc.allocate_decoding([2])
    desc.release([2])
    desc.fork(3, 4)
    desc.cache_manager.append_kv(kv(1), kv(1), packed)  # still 1's newest token
    PagedAttention(desc.cache_manager, 2, backend="torch").plan(packed)


def test_a_batch_of_another_cache_is_refused(desc) -> None:
    other = CacheDescriptor(make_cache(num_pages=64, page_size=4))
    other.allocate([1], [60])  # page ids past this pool's 16
    packed = other.pack_for_flashinfer([1], append_lens=[60])
    refused(desc, StaleBatchError, ValueError,
            lambda: desc.cache_manager.append_kv(kv(60), kv(60), packed),
            match="another cache")  # fmt: skip
    attn = PagedAttention(desc.cache_manager, 2, backend="torch")
    refused(desc, StaleBatchError, ValueError, lambda: attn.plan(packed))


def test_a_hand_built_batch_outside_the_pool_is_refused(desc) -> None:
    packed = FlashInferPackedData(
        torch.tensor([99], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
        torch.tensor([1], dtype=torch.int32),
    )  # fmt: skip
    refused(desc, IndexOutOfRangeError, IndexError,
            lambda: desc.cache_manager.append_kv(kv(1), kv(1), packed,
                                                 torch.tensor([0, 1])))  # fmt: skip


def test_run_after_the_batch_went_stale_is_refused(desc) -> None:
    attn = PagedAttention(desc.cache_manager, 2, backend="torch")
    packed = desc.pack_for_flashinfer([1], append_lens=[1])
    attn.plan(packed)
    desc.release([1])
    desc.allocate([5], [6])  # maybe 1's pages: their K/V are someone else's now
    with pytest.raises(StaleBatchError):
        attn.run(torch.zeros(1, 2, 4), 0)


# ---------------------------------------------------------------------------- ids
@pytest.mark.parametrize("bad", [*NOT_INTEGERS[:9], 2**63, -(2**63) - 1])
def test_a_sequence_id_is_an_int64_integer(desc, bad) -> None:
    builtin = ValueError if isinstance(bad, int) and not isinstance(bad, bool) else TypeError
    error = InvalidArgumentError if builtin is ValueError else ArgumentTypeError
    refused(desc, error, builtin, lambda: desc.allocate([bad], [1]))
    refused(desc, error, builtin, lambda: desc.fork(1, bad))
    refused(desc, error, builtin, lambda: desc.start_sequence(bad, [1, 2]))
    lookup = UnknownSequenceError if builtin is ValueError else ArgumentTypeError
    lookup_builtin = KeyError if builtin is ValueError else TypeError
    for call in (
        lambda: desc.release([bad]),
        lambda: desc.allocate_decoding([bad]),
        lambda: desc.truncate(bad, 0),
        lambda: desc.seq_len(bad),
        lambda: desc.pack_for_flashinfer([bad]),
        lambda: desc.commit([bad]),
        lambda: desc.pin_prefix(bad),
    ):
        refused(desc, lookup, lookup_builtin, call)
    assert bad not in desc


def test_true_and_one_point_oh_are_not_sequence_one(desc) -> None:
    for bad in (True, 1.0, np.float32(1), "1"):
        message = refused(desc, ArgumentTypeError, TypeError, lambda b=bad: desc.release([b]))
        assert repr(bad) in str(message)  # shows what came
        refused(desc, ArgumentTypeError, TypeError, lambda b=bad: desc.truncate(b, 0))
    assert desc.seq_len(1) == 6


@pytest.mark.parametrize("ids", ["56", b"56", {1, 2}, {1: 2}, 12, None, [[1]], np.ones((1, 1))])
def test_a_list_of_ids_is_a_sequence_of_integers(desc, ids) -> None:
    refused(desc, ArgumentTypeError, TypeError, lambda: desc.allocate(ids, [1, 1]))
    refused(desc, ArgumentTypeError, TypeError, lambda: desc.release(ids))
    assert desc.seq_ids == [1, 2]  # allocate("56") once created ids '5' and '6'


def test_any_iterable_of_ids_is_used(desc) -> None:
    desc.release(i for i in [1])  # a generator: consumed once, and used
    assert desc.seq_ids == [2]
    desc.allocate(range(5, 7), iter([1, 2]))
    desc.allocate_decoding(np.array([5, 6], dtype=np.uint8))
    desc.allocate_decoding(torch.tensor([5]))
    assert desc.seq_lens(i for i in (5, 6)).tolist() == [3, 3]


def test_page_and_token_ids_are_range_checked(desc) -> None:
    cache = desc.cache_manager
    refused(desc, IndexOutOfRangeError, IndexError, lambda: cache.ref([16]))
    refused(desc, IndexOutOfRangeError, IndexError, lambda: cache.unref([2**63]))
    refused(desc, IndexOutOfRangeError, IndexError, lambda: cache.copy_pages([-1], [0]))
    refused(desc, IndexOutOfRangeError, IndexError, lambda: cache.copy_pages([0], [-1]))
    refused(desc, InvalidLengthError, ValueError, lambda: cache.copy_pages([0, 1], [2, 2]))
    refused(desc, InvalidLengthError, ValueError, lambda: cache.copy_pages([0, 1], [2]))
    # a prompt of 2**63 once wrapped to -2**63 and hit that prompt's cached pages
    message = refused(desc, InvalidArgumentError, ValueError,
                      lambda: desc.start_sequence(3, [2**63, 5]))  # fmt: skip
    assert str(2**63) in str(message)  # the value passed, not a wrapped int64
    refused(desc, InvalidArgumentError, ValueError, lambda: desc.start_sequence(3, [-1, 5]))
    refused(desc, ArgumentTypeError, TypeError,
            lambda: desc.allocate_decoding([1], token_ids=[True]))  # fmt: skip


# -------------------------------------------------------------------------- prompts
CACHED = list(range(100, 120))  # five full pages of 4, cached by ``cached_prompt``


@pytest.fixture
def cached_prompt(desc) -> CacheDescriptor:
    """``desc`` with CACHED committed: a prompt that starts with it would share pages."""
    desc.start_sequence(5, CACHED)
    desc.allocate([5], [len(CACHED)])
    desc.commit([5])
    return desc


BAD_TOKENS = [
    (True, ArgumentTypeError, TypeError),  # not token 1
    (False, ArgumentTypeError, TypeError),
    (107.0, ArgumentTypeError, TypeError),  # not even a whole float
    (np.float64(107), ArgumentTypeError, TypeError),
    (np.bool_(True), ArgumentTypeError, TypeError),
    (torch.tensor(107), ArgumentTypeError, TypeError),  # a 0-d tensor is no int
    ("107", ArgumentTypeError, TypeError),
    (None, ArgumentTypeError, TypeError),
    (-1, InvalidArgumentError, ValueError),
    (-(2**63), InvalidArgumentError, ValueError),
    (2**63, InvalidArgumentError, ValueError),  # never wrapped to -2**63
    (2**64 + 107, InvalidArgumentError, ValueError),  # never wrapped to 107
]


@pytest.mark.parametrize("bad, error, builtin", BAD_TOKENS, ids=repr)
@pytest.mark.parametrize("where", [0, 7, -1])
def test_one_bad_token_refuses_the_whole_prompt(cached_prompt, bad, error, builtin, where):
    desc = cached_prompt
    prompt = [*CACHED, 120, 121]  # would share the five cached pages
    prompt[where] = bad
    for call in (lambda: desc.start_sequence(7, prompt), lambda: desc.pages_to_start(prompt)):
        message = str(refused(desc, error, builtin, call))
        assert "token ids" in message  # what was expected, and what came:
        assert (str(bad) if type(bad) is int else repr(bad)) in message
    assert 7 not in desc


PROMPT_ARRAYS = {
    "float64": (np.array([*CACHED, 120], dtype=np.float64), ArgumentTypeError, TypeError),
    "bool": (np.array([True] * 21), ArgumentTypeError, TypeError),
    "2-D": (np.array([[*CACHED, 120]]), ArgumentTypeError, TypeError),
    "float tensor": (torch.tensor([*CACHED, 120.0]), ArgumentTypeError, TypeError),
    "past int64": (np.array([*CACHED, 2**63], dtype=np.uint64), InvalidArgumentError, ValueError),
    "negative": (np.array([*CACHED, -1]), InvalidArgumentError, ValueError),
}


@pytest.mark.parametrize("kind", list(PROMPT_ARRAYS))
def test_a_prompt_array_of_the_wrong_kind_is_refused(cached_prompt, kind) -> None:
    desc, (prompt, error, builtin) = cached_prompt, PROMPT_ARRAYS[kind]
    for call in (lambda: desc.start_sequence(7, prompt), lambda: desc.pages_to_start(prompt)):
        assert "token ids" in str(refused(desc, error, builtin, call))
    assert 7 not in desc


def test_numpy_integer_tokens_stand_for_their_value(cached_prompt) -> None:
    """Numpy integer scalars (what iterating a numpy array gives) are accepted, as ints
    are: the prompt hits the cache as the same plain ints do."""
    desc = cached_prompt
    prompt = [*CACHED, 120, 121]
    mixed = [np.int64(t) if i % 3 else np.uint16(t) for i, t in enumerate(prompt)]
    assert desc.pages_to_start(mixed) == desc.pages_to_start(prompt)
    assert desc.start_sequence(7, mixed) == desc.start_sequence(8, prompt) == len(CACHED)
    assert desc.page_indices(7) == desc.page_indices(8)
    assert desc.recorded_tokens(7)[0].tolist() == CACHED


@pytest.mark.parametrize(
    "tokens", [[0, 1, 2**63 - 1], [5] * 3, [2**62, 0, 7]], ids=["bounds", "same", "mixed"]
)
def test_every_kind_of_prompt_reads_the_same_ids(tokens) -> None:
    from seqattn.prefix_cache import token_array

    kinds = [tokens, tuple(tokens), iter(tokens), np.array(tokens, dtype=np.uint64),
             np.array(tokens, dtype=np.int64), torch.tensor(tokens)]  # fmt: skip
    for kind in kinds:
        got = token_array(kind)
        assert got.dtype == np.int64 and got.tolist() == tokens, type(kind)


# -------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("bad", [2.5, 2.0, "3", True, None, np.float64(2)])
def test_lengths_are_exact_integers(desc, bad) -> None:
    refused(desc, ArgumentTypeError, TypeError, lambda: desc.allocate([1], [bad]))
    refused(desc, ArgumentTypeError, TypeError, lambda: desc.pages_needed([1], [bad]))
    refused(desc, ArgumentTypeError, TypeError,
            lambda: desc.pack_for_flashinfer([1], append_lens=[bad]))  # fmt: skip
    refused(desc, ArgumentTypeError, TypeError, lambda: desc.truncate(1, bad))


def test_overflow_is_checked_before_any_arithmetic(desc) -> None:
    big = 2**63 - 1
    refused(desc, InvalidLengthError, ValueError,
            lambda: desc.allocate([1, 2, 3], [big, big, 2]))  # fmt: skip
    assert 3 not in desc  # once left live
    refused(desc, InvalidLengthError, ValueError, lambda: desc.allocate([1], [2**31 - 6]))
    refused(desc, InvalidLengthError, ValueError, lambda: desc.allocate([1], [2**64]))
    refused(desc, InvalidLengthError, ValueError, lambda: desc.pages_needed([1], [2**63]))


@pytest.mark.parametrize(
    "kwargs, error, builtin",
    [
        ({"num_pages": 0}, InvalidLengthError, ValueError),
        ({"num_pages": 2.0}, ArgumentTypeError, TypeError),
        ({"page_size": True}, ArgumentTypeError, TypeError),
        ({"num_heads": "2"}, ArgumentTypeError, TypeError),
        ({"head_dim": -4}, InvalidLengthError, ValueError),
        ({"num_layers": 0}, InvalidLengthError, ValueError),
        ({"dtype": "float32"}, ArgumentTypeError, TypeError),
        ({"dtype": torch.int32}, ArgumentTypeError, TypeError),
        ({"device": "bogus"}, InvalidArgumentError, ValueError),
        ({"device": True}, ArgumentTypeError, TypeError),
        ({"device": 1.0}, ArgumentTypeError, TypeError),
        ({"kv_layout": "NDH"}, InvalidArgumentError, ValueError),
        ({"k_scale": 0.0}, InvalidArgumentError, ValueError),
        ({"v_scale": float("nan")}, InvalidArgumentError, ValueError),
        ({"num_pages": 2**31 - 1, "num_layers": 2**20}, InvalidArgumentError, ValueError),
    ],
)
def test_cache_constructor_arguments(kwargs, error, builtin) -> None:
    args = dict(num_pages=4, page_size=2, num_heads=1, head_dim=4, dtype=torch.float32,
                device="cpu")  # fmt: skip
    with pytest.raises(error) as info:
        PagedKVCacheManager(**{**args, **kwargs})
    assert isinstance(info.value, builtin) and str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_cuda_device_without_cuda_is_a_clear_error() -> None:
    for device in ("cuda", "cuda:0", 0, torch.device("cuda")):
        with pytest.raises(InvalidArgumentError, match="CUDA is not available"):
            PagedKVCacheManager(4, 2, 1, 4, torch.float16, device)
    desc = CacheDescriptor(make_cache())
    desc.allocate([1], [2])
    refused(desc, InvalidArgumentError, ValueError,
            lambda: desc.pack_for_flashinfer([1], device="cuda"))  # fmt: skip


def test_descriptor_and_attention_constructor_arguments() -> None:
    cache = make_cache()
    for kwargs in ({"check_invariants": 1}, {"prefix_caching": "yes"}, {"prefix_hash_fn": 3}):
        with pytest.raises(ArgumentTypeError):
            CacheDescriptor(cache, **kwargs)
    with pytest.raises(ArgumentTypeError, match="PagedKVCacheManager"):
        CacheDescriptor("cache")
    with pytest.raises(ArgumentTypeError, match="PagedKVCacheManager"):
        PagedAttention(None, 2)
    with pytest.raises(SeqAttnError):  # CUDA graphs need CUDA and flashinfer
        PagedAttention(cache, 2, cuda_graph_batch_sizes=[1])
    free = cache.available_pages_count
    for kwargs in ({"cuda_graph_batch_sizes": [1.5]}, {"max_pages": 2.0}, {"cascade_groups": True}):
        with pytest.raises(ArgumentTypeError):
            PagedAttention(cache, 2, **kwargs)
    with pytest.raises(InvalidArgumentError):
        PagedAttention(cache, 2, cuda_graph_batch_sizes=[])
    with pytest.raises(InvalidArgumentError, match="triton without cascade_groups"):
        PagedAttention(cache, 2, backend="triton", cuda_graph_batch_sizes=[1], cascade_groups=2)
    with pytest.raises(InvalidArgumentError, match="got backend 'torch'"):
        PagedAttention(cache, 2, backend="torch", cuda_graph_batch_sizes=[1])
    assert cache.available_pages_count == free  # no scratch page taken by a refusal
    with pytest.raises(InvalidArgumentError):  # an eager object has no buckets
        PagedAttention(cache, 2).plan(
            CacheDescriptor(cache).pack_for_flashinfer([]), cuda_graph=True
        )


# ------------------------------------------------------------------ reference counts
def test_unref_never_frees_a_page_a_sequence_or_the_prefix_cache_lists(desc) -> None:
    cache = desc.cache_manager
    page = desc.page_indices(1)[0]
    message = refused(desc, PageStateError, ValueError, lambda: cache.unref([page]))
    assert "release the sequence" in str(message)
    refused(desc, PageStateError, ValueError, lambda: cache.release_pages([page]))
    cache.ref([page])  # the caller's own reference may be dropped again
    cache.unref([page])
    refused(desc, PageStateError, ValueError, lambda: cache.unref([page]))
    desc.start_sequence(3, list(range(5)))
    desc.allocate([3], [5])
    desc.commit([3])  # its first page is cached; the sequence ends, the cache keeps it
    cached = desc.page_indices(3)[0]
    desc.release([3])
    assert desc.prefix_stats.cached_pages == 1
    refused(desc, PageStateError, ValueError, lambda: cache.unref([cached]))


def test_pin_handles_of_another_descriptor_are_refused(desc) -> None:
    other = CacheDescriptor(make_cache(num_pages=16, page_size=4), prefix_caching=True)
    other.start_sequence(1, list(range(9)))
    other.allocate([1], [9])
    other.commit([1])
    handle = other.pin_prefix(1)
    refused(desc, PageStateError, ValueError, lambda: desc.unpin_prefix(handle))
    assert desc.prefix_stats.pinned_pages == 0  # went to -2 once
    refused(desc, ArgumentTypeError, TypeError, lambda: desc.unpin_prefix("handle"))
    other.unpin_prefix(handle)
    refused(other, PageStateError, ValueError, lambda: other.unpin_prefix(handle),
            match="not pinned")  # fmt: skip


def test_prefix_caching_off_is_a_value_error() -> None:
    desc = CacheDescriptor(make_cache())
    desc.allocate([1], [4])
    refused(desc, InvalidArgumentError, ValueError, lambda: desc.pin_prefix(1))


def test_forward_checks_q_k_v_and_the_step_before_it_appends(desc) -> None:
    """``PagedAttention.forward`` appends and attends in one call: a bad query, a k/v of
    another token count or a stale step is refused before any K/V is written; a good
    call equals ``append_kv`` + ``run`` on a twin cache."""
    cache = desc.cache_manager
    attn = PagedAttention(cache, 4, backend="torch")
    desc.allocate([50], [2])
    step = desc.pack_for_flashinfer([50], append_lens=[2])
    assert attn.plan(step) == 2
    q, k = torch.randn(2, 4, 4), torch.randn(2, 2, 4)
    refused(desc, TensorSpecError, ValueError, lambda: attn.forward(q[:1], k, k, 0))
    refused(desc, TensorSpecError, ValueError, lambda: attn.forward(q, k[:1], k[:1], 0))
    refused(desc, ArgumentTypeError, TypeError, lambda: attn.forward(q, k, k, True))
    out = attn.forward(q, k, k, 0)
    twin = CacheDescriptor(make_cache(num_pages=16, page_size=4))
    twin.allocate([50], [2])
    twin_step = twin.pack_for_flashinfer([50], append_lens=[2])
    twin.cache_manager.append_kv(k, k, twin_step)
    plain = PagedAttention(twin.cache_manager, 4, backend="torch")
    plain.plan(twin_step)
    assert torch.equal(out, plain.run(q, 0))
    desc.allocate_decoding([50])  # the planned step is stale now
    refused(desc, StaleBatchError, ValueError, lambda: attn.forward(q, k, k, 0))
    attn.plan(desc.pack_for_flashinfer([50]), qo_lens=[1])  # no append lengths: nothing to write
    with pytest.raises(SeqAttnError, match="append_lens"):
        attn.forward(q[:1], k[:1], k[:1], 0)


def test_runners_decode_with_flashinfer_where_triton_cannot_serve() -> None:
    from seqattn.attention.triton_decode import decode_backend

    cpu_cache = make_cache()  # not CUDA: Triton's kernel cannot read it
    assert decode_backend("auto", -1, cpu_cache) == "flashinfer"
    assert decode_backend("flashinfer", -1, cpu_cache) == "flashinfer"
    assert decode_backend("auto", 127, cpu_cache) == "flashinfer"  # a window
