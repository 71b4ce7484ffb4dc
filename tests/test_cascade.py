"""Cascade attention (shared prefixes read once per group) against dense float64 attention.

Sequences share leading pages by forking or through the prefix cache; every cascade
result is compared with the dense reference over each sequence's own history and with
the plain (non-cascade) result of the same backend.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqattn import CacheDescriptor, FlashInferPackedData, PagedAttention, SeqAttnError
from seqattn.attention.batch import AttentionBatch
from seqattn.attention.cascade import pad_shared_level, split_for_cascade
from seqattn.shared_prefix import find_shared_prefixes
from tests.conftest import make_cache
from tests.test_attention_torch import OUT_TOL, Harness


def shared_batch(h: Harness, prompt: int, forks: int, *, others: bool = True) -> list[int]:
    """Sequence 0 with ``prompt`` tokens forked into 1..forks, each then growing on its
    own; with ``others``, unrelated sequences sit between them in the batch."""
    h.append([0], [prompt])
    for seq in range(1, forks + 1):
        h.fork(0, seq)
    h.append(list(range(forks + 1)), [seq % 3 + 1 for seq in range(forks + 1)])
    if not others:
        return list(range(forks + 1))
    h.append([100, 101], [prompt + 5, 3])
    return [100, 0, 1, 101, *range(2, forks + 1)]


def run_both(h: Harness, ids, lens, q_dtype=torch.float64, **options):
    """(cascade output, lse), (plain output, lse), reference (output, lse); all layers."""
    results = []
    for cascade in (True, False):
        packed = h.desc.pack_for_flashinfer(ids, append_lens=lens, shared_prefix=cascade)
        h.attn.plan(packed, cascade=cascade, q_dtype=q_dtype, **options)
        assert (h.attn.cascade is not None) == cascade
        layer_out = []
        for layer in range(h.cache.num_layers):
            gen = torch.Generator().manual_seed(layer)
            shape = (sum(lens), h.num_qo_heads, h.cache.head_dim)
            q = torch.randn(*shape, generator=gen, dtype=torch.float64)
            out, lse = h.attn.run(q.to(q_dtype), layer, return_lse=True)
            ref = h.reference(ids, lens, q.to(q_dtype), layer, **options)
            layer_out.append((out.double(), lse.double(), ref))
        results.append(layer_out)
    return results


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_decode_over_a_shared_prompt(page_size: int, group: int, layout: str) -> None:
    h = Harness(page_size=page_size, group=group, layout=layout, num_layers=2)
    ids = shared_batch(h, prompt=3 * page_size + 2, forks=4)
    h.append(ids, [1] * len(ids), decode=True)
    cascade, plain = run_both(h, ids, [1] * len(ids))
    for (out, lse, (ref_out, ref_lse)), (plain_out, _, _) in zip(cascade, plain, strict=True):
        torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out, plain_out, atol=1e-12, rtol=1e-12)


def test_split_covers_the_grouped_rows() -> None:
    h = Harness(page_size=4)
    ids = shared_batch(h, prompt=14, forks=3)  # 3 full shared pages
    h.append(ids, [1] * len(ids), decode=True)
    packed = h.desc.pack_for_flashinfer(ids, append_lens=[1] * len(ids), shared_prefix=True)
    h.attn.plan(packed, cascade=True)
    split = h.attn.cascade
    assert split is not None
    assert split.saved_tokens == 3 * 3 * 4  # 4 rows, 3 pages, read once instead of 4 times
    assert split.query_rows.tolist() == [1, 2, 4, 5]  # rows 0 1 2 3 of the group, in batch order
    assert split.shared.kv_lens.tolist() == [12]
    lens = h.desc.seq_lens(ids).tolist()
    shared = [12 if seq in (0, 1, 2, 3) else 0 for seq in ids]
    assert split.suffix.kv_lens.tolist() == [n - s for n, s in zip(lens, shared, strict=True)]


@pytest.mark.parametrize("causal", [True, False])
def test_chunked_prefill_over_a_shared_prompt(causal: bool) -> None:
    h = Harness(page_size=4, group=2)
    ids = shared_batch(h, prompt=21, forks=3, others=False)
    lens = [5, 2, 7, 1]
    h.append(ids, lens)
    for opts in ({}, {"logits_soft_cap": 3.0, "sm_scale": 0.3}):
        cascade, plain = run_both(h, ids, lens, causal=causal, **opts)
        (out, lse, (ref_out, ref_lse)), (plain_out, _, _) = cascade[0], plain[0]
        torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out, plain_out, atol=1e-12, rtol=1e-12)


def test_groups_that_diverge_share_only_their_common_pages() -> None:
    h = Harness(page_size=2)
    h.append([0], [4])  # pages p0 p1
    h.fork(0, 1)
    h.append([0, 1], [6, 4])  # 0 and 1 now share only p0 p1
    h.fork(0, 2)  # 2 shares 0's first 5 pages
    ids = [2, 0, 1]
    h.append(ids, [1, 1, 1], decode=True)
    packed = h.desc.pack_for_flashinfer(ids, append_lens=[1, 1, 1], shared_prefix=True)
    assert packed.shared_prefix.num_pages.tolist() == [2]
    cascade, _ = run_both(h, ids, [1, 1, 1])
    torch.testing.assert_close(cascade[0][0], cascade[0][2][0], atol=1e-10, rtol=1e-10)


def test_queries_that_reach_into_shared_pages_shrink_the_shared_part() -> None:
    h = Harness(page_size=4)
    ids = shared_batch(h, prompt=12, forks=2, others=False)
    h.append(ids, [1, 1, 1], decode=True)
    lens = h.desc.seq_lens(ids).tolist()
    qo = [1, lens[1] - 7, 1]  # row 1 queries tokens 7.. : only page 0 precedes them
    packed = h.desc.pack_for_flashinfer(ids, shared_prefix=True)
    h.attn.plan(packed, qo, cascade=True)
    assert h.attn.cascade.shared.kv_lens.tolist() == [4]
    q = torch.randn(sum(qo), h.num_qo_heads, h.cache.head_dim, dtype=torch.float64)
    out = h.attn.run(q)
    torch.testing.assert_close(out, h.reference(ids, qo, q, 0)[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_cascade_matches_plain(dtype: torch.dtype) -> None:
    h = Harness(page_size=4, dtype=dtype)
    ids = shared_batch(h, prompt=30, forks=5)
    h.append(ids, [1] * len(ids), decode=True)
    cascade, plain = run_both(h, ids, [1] * len(ids), q_dtype=dtype)
    atol, rtol = OUT_TOL[dtype]
    torch.testing.assert_close(cascade[0][0], cascade[0][2][0], atol=atol, rtol=rtol)
    torch.testing.assert_close(cascade[0][0], plain[0][0], atol=atol, rtol=rtol)


def test_auto_mode_uses_cascade_only_when_it_saves_enough() -> None:
    h = Harness(page_size=4)
    ids = shared_batch(h, prompt=14, forks=3)
    h.append(ids, [1] * len(ids), decode=True)
    one = [1] * len(ids)
    h.attn.plan(h.desc.pack_for_flashinfer(ids, append_lens=one))
    assert h.attn.cascade is None  # not packed with shared_prefix
    packed = h.desc.pack_for_flashinfer(ids, append_lens=one, shared_prefix=True)
    h.attn.plan(packed)
    assert h.attn.cascade is None  # 36 tokens saved < the default threshold
    h.attn.cascade_min_saved_tokens = 36
    h.attn.plan(packed)
    assert h.attn.cascade is not None
    h.attn.plan(packed, window_left=3)
    assert h.attn.cascade is None
    with pytest.raises(SeqAttnError, match="window_left"):
        h.attn.plan(packed, window_left=3, cascade=True)


def test_hand_built_batch_is_searched_on_the_host() -> None:
    h = Harness(page_size=4)
    ids = shared_batch(h, prompt=14, forks=2, others=False)
    h.append(ids, [1, 1, 1], decode=True)
    packed = h.desc.pack_for_flashinfer(ids, append_lens=[1, 1, 1])
    by_hand = FlashInferPackedData(
        packed.kv_page_indices, packed.kv_page_indptr, packed.kv_last_page_len,
        append_indptr=packed.append_indptr,
    )  # fmt: skip
    h.attn.plan(by_hand, cascade=True)
    assert h.attn.cascade is not None and h.attn.cascade.shared.kv_lens.tolist() == [12]


def test_prefix_cache_hits_feed_cascade() -> None:
    cache = make_cache(num_pages=64, page_size=4, num_heads=2, head_dim=8, dtype=torch.float64)
    desc = CacheDescriptor(cache, prefix_caching=True)
    attn = PagedAttention(cache, 4, backend="torch", cascade_min_saved_tokens=1)
    gen = torch.Generator().manual_seed(0)
    system = list(range(20))
    for seq in range(4):
        prompt = system + [100 + seq] * (seq + 2)
        cached = desc.start_sequence(seq, prompt)
        assert cached == (0 if seq == 0 else 20)
        n = len(prompt) - cached
        desc.allocate([seq], [n])
        packed = desc.pack_for_flashinfer([seq], append_lens=[n])
        kv = torch.randn(2, n, 2, 8, generator=gen, dtype=torch.float64)
        cache.append_kv(kv[0], kv[1], packed)
        desc.commit([seq])
    ids = [0, 1, 2, 3]
    desc.allocate_decoding(ids, token_ids=[7, 7, 7, 7])
    packed = desc.pack_for_flashinfer(ids, append_lens=[1] * 4, shared_prefix=True)
    kv = torch.randn(2, 4, 2, 8, generator=gen, dtype=torch.float64)
    cache.append_kv(kv[0], kv[1], packed)
    q = torch.randn(4, 4, 8, generator=gen, dtype=torch.float64)
    attn.plan(packed, cascade=False)
    plain = attn.run(q)
    attn.plan(packed)
    assert attn.cascade is not None and attn.cascade.shared.kv_lens.tolist() == [20]
    torch.testing.assert_close(attn.run(q), plain, atol=1e-12, rtol=1e-12)


def test_find_shared_prefixes_on_a_csr_table() -> None:
    indices = np.array([5, 6, 7, 9, 5, 6, 8, 5, 1, 9, 3], dtype=np.int32)
    indptr = np.array([0, 3, 4, 7, 8, 11])
    found = find_shared_prefixes(indices, indptr[:-1], np.array([3, 1, 3, 1, 2]))
    assert found.rows.tolist() == [0, 2, 3] and found.num_pages.tolist() == [1]
    assert found.group_indptr.tolist() == [0, 3]
    found = find_shared_prefixes(indices, indptr[:-1], np.array([3, 1, 3, 0, 2]))
    assert found.rows.tolist() == [0, 2] and found.num_pages.tolist() == [2]


def test_max_groups_keeps_the_groups_that_save_most() -> None:
    h = Harness(page_size=2)
    h.append([0, 10], [9, 5])  # 0: 4 full pages, 10: 2 full pages
    for src, dst in ((0, 1), (0, 2), (10, 11)):
        h.fork(src, dst)
    ids = [0, 1, 2, 10, 11]
    h.append(ids, [1] * 5, decode=True)
    packed = h.desc.pack_for_flashinfer(ids, append_lens=[1] * 5, shared_prefix=True)
    batch = AttentionBatch.build(packed, h.cache)
    both = split_for_cascade(batch, packed.shared_prefix, 2, 1)
    one = split_for_cascade(batch, packed.shared_prefix, 2, 1, max_groups=1)
    assert both.shared.kv_lens.tolist() == [8, 4] and both.saved_tokens == 2 * 8 + 4
    assert one.shared.kv_lens.tolist() == [8] and one.query_tokens.tolist() == [0, 1, 2]


@pytest.mark.parametrize("with_groups", [True, False])
def test_padded_shared_level_reproduces_attention(with_groups: bool) -> None:
    """What a CUDA-graph cascade step does, on the torch backend: suffix level, padded
    shared level (empty slots, a dummy request), merge through the row maps."""
    h = Harness(page_size=4, group=2)
    ids = shared_batch(h, prompt=14, forks=3)
    h.append(ids, [1] * len(ids), decode=True)
    packed = h.desc.pack_for_flashinfer(ids, append_lens=[1] * len(ids), shared_prefix=True)
    batch = AttentionBatch.build(packed, h.cache)
    split = split_for_cascade(batch, packed.shared_prefix, 4, 1, 3) if with_groups else None
    size, scratch = 8, int(h.cache.allocator.allocate(1)[0])
    level = pad_shared_level(split, size, max_groups=3, page_size=4)
    assert level.qo_indptr[-1] == size and level.qo_indptr.size == 3 + 2
    shared_pages = [] if split is None else split.shared.packed.kv_page_indices.tolist()
    shared_batch_ = AttentionBatch(
        FlashInferPackedData(
            torch.tensor(shared_pages + [scratch] * level.unused, dtype=torch.int32),
            torch.from_numpy(level.kv_indptr), torch.from_numpy(level.last_page_len),
        ),
        level.qo_indptr, np.diff(level.kv_indptr) * 4 - 4 + level.last_page_len,
        causal=False, sm_scale=batch.sm_scale, window_left=-1, logits_soft_cap=0.0,
    )  # fmt: skip
    q = torch.randn(len(ids), h.num_qo_heads, h.cache.head_dim, dtype=torch.float64)
    q_padded = torch.cat([q, torch.zeros(size - len(ids), *q.shape[1:], dtype=q.dtype)])
    backend = h.attn.impl
    backend.plan(batch if split is None else split.suffix, torch.float64)
    merged, merged_lse = backend.run(q, 0, True, None)
    extra = size + 1 - len(ids)  # padding rows and the dump row
    merged = torch.cat([merged, torch.zeros(extra, *q.shape[1:], dtype=q.dtype)])
    merged_lse = torch.cat([merged_lse, torch.zeros(extra, q.shape[1], dtype=q.dtype)])
    backend.plan(shared_batch_, torch.float64)
    shared, shared_lse = backend.run(q_padded[torch.from_numpy(level.q_rows)], 0, True, None)
    out_rows = torch.from_numpy(level.out_rows)
    picked, picked_lse = merged[out_rows], merged_lse[out_rows]
    backend.merge(picked, picked_lse, shared, shared_lse)
    merged.index_copy_(0, out_rows, picked)
    ref, _ = h.reference(ids, [1] * len(ids), q, 0)
    torch.testing.assert_close(merged[: len(ids)], ref, atol=1e-10, rtol=1e-10)


CASCADED: list[bool] = []


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_fork_trees_cascade_equals_dense(data) -> None:
    """Random fork trees, appends, batch orders and query lengths: cascade == dense."""
    page_size = data.draw(st.sampled_from([1, 2, 4]))
    h = Harness(page_size=page_size, group=data.draw(st.sampled_from([1, 2])), num_pages=512)
    h.append([0], [data.draw(st.integers(1, 12))])
    live = [0]
    for seq in range(1, data.draw(st.integers(2, 6))):
        h.fork(data.draw(st.sampled_from(live)), seq)
        live.append(seq)
        grow = data.draw(st.lists(st.integers(0, 5), min_size=len(live), max_size=len(live)))
        h.append(live, grow)
    ids = data.draw(st.permutations(live))
    qo = [data.draw(st.integers(1, 3)) for _ in ids]
    h.append(ids, qo)
    packed = h.desc.pack_for_flashinfer(ids, append_lens=qo, shared_prefix=True)
    q = torch.randn(sum(qo), h.num_qo_heads, h.cache.head_dim, dtype=torch.float64)
    h.attn.plan(packed, cascade=True)
    CASCADED.append(h.attn.cascade is not None)
    out, lse = h.attn.run(q, return_lse=True)
    ref_out, ref_lse = h.reference(ids, qo, q, 0)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)


def test_the_random_trees_did_run_cascades() -> None:
    """Runs after the property test (file order): most of its batches were split."""
    if not CASCADED:
        pytest.skip("runs with test_random_fork_trees_cascade_equals_dense")
    assert sum(CASCADED) >= len(CASCADED) // 2 > 0, f"{sum(CASCADED)} of {len(CASCADED)}"
