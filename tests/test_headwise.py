"""Head-wise caches against a dense float64 reference that knows only positions and masks.

What is compared to what: a ``Model`` drives ``HeadwiseKVCache`` + ``HeadwiseAttention``
(torch backend) and keeps on the side, per sequence and layer, the *full* K/V history
the model produced (never compressed) and a boolean keep mask per KV head over true
positions. ``dense_reference`` computes attention from that alone: the queries of a
sequence are its newest positions, a query at position ``p`` sees key ``j`` of KV head
``h`` when ``mask[h, j]`` and (causal) ``j <= p``. It never reads the paged cache and
shares no code with seqattn; so it checks the head-major mapping, the page tables after
compaction and flashinfer's bottom-right causal alignment over compressed heads at once.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from seqattn import (
    ArgumentTypeError,
    DuplicateSequenceError,
    IndexOutOfRangeError,
    InvalidLengthError,
    NoPageError,
    SeqAttnError,
    SequenceExistsError,
    TensorSpecError,
    UnknownSequenceError,
)
from seqattn.headwise import HeadwiseAttention, HeadwiseKVCache, adakv_select, snapkv_scores
from seqattn.headwise.batch import head_rows, row_order
from seqattn.headwise.compression import compaction_moves

ROOT = Path(__file__).resolve().parents[1]


def dense_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one sequence's newest ``qo_len`` positions in float64.

    Args:
        q: ``[qo_len, num_qo_heads, head_dim]``.
        keys, values: ``[n, num_kv_heads, head_dim]``, every position ever appended.
        mask: ``[num_kv_heads, n]`` bool, the positions each head kept.

    Returns:
        ``(out [qo_len, num_qo_heads, head_dim], lse2 [qo_len, num_qo_heads])``.
    """
    qo_len, num_qo_heads, head_dim = q.shape
    n, num_kv_heads, _ = keys.shape
    group = num_qo_heads // num_kv_heads
    query_pos = torch.arange(n - qo_len, n)[:, None]
    out = torch.zeros(qo_len, num_qo_heads, head_dim, dtype=torch.float64)
    lse = torch.zeros(qo_len, num_qo_heads, dtype=torch.float64)
    for qh in range(num_qo_heads):
        h = qh // group
        visible = mask[h][None, :].expand(qo_len, n)
        if causal:
            visible = visible & (torch.arange(n)[None, :] <= query_pos)
        logits = q[:, qh].double() @ keys[:, h].double().T / math.sqrt(head_dim)
        logits = logits.masked_fill(~visible, -math.inf)
        weights = torch.softmax(logits, dim=1)
        out[:, qh] = weights @ values[:, h].double()
        lse[:, qh] = torch.logsumexp(logits, dim=1) / math.log(2.0)
    return out, lse


class Model:
    """A head-wise cache, torch-backend attention, and the full history with keep masks."""

    def __init__(
        self,
        *,
        page_size: int,
        num_kv_heads: int = 2,
        group: int = 2,
        head_dim: int = 8,
        num_layers: int = 2,
        num_pages: int = 512,
        seed: int = 0,
        api: str = "layer",
    ) -> None:
        self.api = api  # "layer": append + plan per layer; "step": begin_step, plan_step, write
        self.cache = HeadwiseKVCache(
            num_pages, page_size, num_layers, num_kv_heads, head_dim, torch.float64, "cpu",
            check_invariants=True,
        )  # fmt: skip
        self.heads, self.group, self.dim = num_kv_heads, group, head_dim
        self.attn = HeadwiseAttention(self.cache, num_kv_heads * group, backend="torch")
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        # per sequence, per layer: full keys, values [n, H, D] and keep mask [H, n]
        self.k: dict[int, list[torch.Tensor]] = {}
        self.v: dict[int, list[torch.Tensor]] = {}
        self.mask: dict[int, list[torch.Tensor]] = {}

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)

    def add(self, ids: list[int]) -> None:
        self.cache.add_sequences(ids)
        layers = self.cache.num_layers
        empty = torch.zeros(0, self.heads, self.dim, dtype=torch.float64)
        for seq in ids:
            self.k[seq], self.v[seq] = [empty] * layers, [empty] * layers
            self.mask[seq] = [torch.zeros(self.heads, 0, dtype=torch.bool)] * layers

    def step(
        self, ids: list[int], lens: list[int], *, qo_lens: Optional[list[int]] = None, **options
    ) -> None:
        """Append ``lens`` new tokens to every layer, attend with the newest ``qo_lens``
        (default: all new tokens) and compare each layer with the dense reference."""
        step = None
        if self.api == "step":  # the bookkeeping and plans of every layer up front
            step = self.cache.begin_step(ids, lens)
            self.attn.plan_step(step, qo_lens, **options)
        for layer in range(self.cache.num_layers):
            k, v = (
                self.randn(sum(lens), self.heads, self.dim),
                self.randn(sum(lens), self.heads, self.dim),
            )
            if step is None:
                batch = self.cache.append(layer, ids, k, v, lens)
                self.attn.plan(batch, qo_lens, **options)
            else:
                self.cache.write(step, layer, k, v)
            self._record(layer, ids, lens, k, v)
            queries = lens if qo_lens is None else qo_lens
            q = self.randn(sum(queries), self.heads * self.group, self.dim)
            out, lse = self.attn.run(q, layer, return_lse=True)
            ref_out, ref_lse = self.reference(ids, queries, q, layer, **options)
            torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(lse.double(), ref_lse, atol=2e-6, rtol=2e-6)
        self.check_contents(ids)

    def _record(self, layer, ids, lens, k, v) -> None:
        start = 0
        for seq, n in zip(ids, lens, strict=True):
            self.k[seq][layer] = torch.cat([self.k[seq][layer], k[start : start + n]])
            self.v[seq][layer] = torch.cat([self.v[seq][layer], v[start : start + n]])
            new = torch.ones(self.heads, n, dtype=torch.bool)
            self.mask[seq][layer] = torch.cat([self.mask[seq][layer], new], dim=1)
            start += n

    def reference(self, ids, qo_lens, q, layer, *, causal: bool = True):
        outs, lses, start = [], [], 0
        for seq, n in zip(ids, qo_lens, strict=True):
            o, lse = dense_reference(
                q[start : start + n], self.k[seq][layer], self.v[seq][layer],
                self.mask[seq][layer], causal=causal,
            )  # fmt: skip
            outs.append(o)
            lses.append(lse)
            start += n
        return torch.cat(outs), torch.cat(lses)

    def compress(self, layer: int, seq: int, keep: list) -> None:
        """Compress in the cache and in the mask (``keep`` indexes each head's held tokens)."""
        self.cache.compress(layer, seq, keep)
        mask = self.mask[seq][layer].clone()
        for h, kh in enumerate(keep):
            if kh is None:
                continue
            held = torch.nonzero(mask[h]).squeeze(1)
            mask[h] = False
            mask[h, held[torch.as_tensor(kh, dtype=torch.long)]] = True
        self.mask[seq][layer] = mask

    def random_keep(self, layer: int, seq: int) -> list[np.ndarray]:
        """A random subset per head, with sizes from none to all."""
        held = self.cache.head_lens(layer, seq)
        keep = []
        for n in held.tolist():
            mode = min(int(self.rng.integers(0, 4)), 2)  # none, all, or (twice as often) random
            size = (0, n, int(self.rng.integers(0, n + 1)))[mode]
            keep.append(np.sort(self.rng.choice(n, size=size, replace=False)))
        return keep

    def check_contents(self, ids: list[int]) -> None:
        """Positions, page counts and stored K/V of every head equal the model's."""
        ps = self.cache.page_size
        for seq in ids:
            for layer in range(self.cache.num_layers):
                mask = self.mask[seq][layer]
                kept = mask.sum(dim=1).numpy()
                assert self.cache.seq_len(seq, layer) == mask.shape[1]
                assert self.cache.head_lens(layer, seq).tolist() == kept.tolist()
                assert self.cache.head_pages(layer, seq).tolist() == (-(-kept // ps)).tolist()
                for h in range(self.heads):
                    pos = torch.nonzero(mask[h]).squeeze(1)
                    assert self.cache.head_positions(layer, seq, h).tolist() == pos.tolist()
                    k, v = self.cache.read_head(layer, seq, h)
                    assert torch.equal(k, self.k[seq][layer][pos, h])
                    assert torch.equal(v, self.v[seq][layer][pos, h])


def snapshot(cache: HeadwiseKVCache) -> tuple:
    """Everything a failing call must leave alone."""
    heads = {}
    for layer in range(cache.num_layers):
        for seq in cache.seq_ids:
            heads[layer, seq] = (
                cache.seq_len(seq, layer),
                cache.head_lens(layer, seq).tolist(),
                [cache.head_positions(layer, seq, h).tolist() for h in range(cache.num_kv_heads)],
                [cache.head_page_ids(layer, seq, h).tolist() for h in range(cache.num_kv_heads)],
            )
    refcount = cache.storage.allocator.refcount.tolist()
    return cache.available_pages_count, refcount, heads, cache.storage.kv_data.clone()


def assert_same(before: tuple, after: tuple) -> None:
    assert before[:3] == after[:3]
    assert torch.equal(before[3], after[3])


# ------------------------------------------------------------------ attention parity
@pytest.mark.parametrize("api", ["layer", "step"])
@pytest.mark.parametrize("ps", [1, 3, 4])
@pytest.mark.parametrize(("heads", "group"), [(2, 2), (3, 1)], ids=["gqa", "mha"])
def test_attention_equals_masked_dense_after_rounds_of_compression(ps, heads, group, api):
    m = Model(page_size=ps, num_kv_heads=heads, group=group, seed=ps * 10 + heads, api=api)
    ids = [4, 1, 9]
    m.add(ids)
    m.step(ids, [ps + 1, 1, 2 * ps + 3])  # prefill across page boundaries
    for round_ in range(3):
        for layer in range(2):  # budgets differ per layer and per head
            for seq in ids:
                m.compress(layer, seq, m.random_keep(layer, seq))
        m.step(ids, [1, 1, 1])  # decode over compressed heads
        m.step(ids, [1, 1, 1])
        m.step(ids, [ps, 2, ps + 1 + round_])  # chunked prefill: causal inside the chunk
    m.step(ids, [2, 3, 1], qo_lens=[1, 2, 1])  # queries: only the newest tokens


@pytest.mark.parametrize("api", ["layer", "step"])
def test_non_causal_and_fully_dropped_heads(api):
    m = Model(page_size=2, seed=3, api=api)
    m.add([0, 1])
    m.step([0, 1], [5, 6])
    m.compress(0, 0, [[], [4]])  # head 0 of layer 0 keeps nothing
    m.compress(1, 1, [[0, 5], []])
    m.step([0, 1], [1, 1], causal=False)
    m.step([0, 1], [3, 1], causal=False)
    m.step([0, 1], [1, 1])


def test_queries_see_kept_tokens_by_true_position():
    """A hand-checked case: head 0 keeps positions 0 and 3; a 2-token chunk at 4, 5."""
    cache = HeadwiseKVCache(16, 2, 1, 1, 4, torch.float64, "cpu")
    attn = HeadwiseAttention(cache, 1, backend="torch")
    cache.add_sequences([0])
    values = torch.arange(6, dtype=torch.float64)[:, None, None].expand(6, 1, 4).contiguous()
    cache.append(0, [0], torch.zeros(4, 1, 4, dtype=torch.float64), values[:4], [4])
    cache.compress(0, 0, [[0, 3]])
    batch = cache.append(0, [0], torch.zeros(2, 1, 4, dtype=torch.float64), values[4:], [2])
    attn.plan(batch)
    out = attn.run(torch.zeros(2, 1, 4, dtype=torch.float64), 0)  # uniform weights
    # position 4 sees {0, 3, 4}; position 5 sees {0, 3, 4, 5}
    assert out[:, 0, 0].tolist() == pytest.approx([7 / 3, 12 / 4], abs=1e-12)
    assert cache.head_positions(0, 0, 0).tolist() == [0, 3, 4, 5]


# ------------------------------------------------------------------------- step API
def _run_both_apis(cache_factory, schedule, seed=0):
    """Drive the per-layer API and the step API through the same appends, compressions
    and queries; return each one's attention outputs and final contents."""
    results = []
    for api in ("layer", "step"):
        cache = cache_factory()
        attn = HeadwiseAttention(cache, 4 * cache.num_kv_heads // 2, backend="torch")
        gen = torch.Generator().manual_seed(seed)
        ids = [3, 5, 9]
        cache.add_sequences(ids)
        outs = []
        for lens, compress in schedule:
            kv = [
                torch.randn(2, sum(lens), cache.num_kv_heads, 8, generator=gen, dtype=torch.float64)
                for _ in range(cache.num_layers)
            ]
            q = torch.randn(sum(lens), attn.num_qo_heads, 8, generator=gen, dtype=torch.float64)
            attend = min(lens) > 0
            step = cache.begin_step(ids, lens) if api == "step" else None
            if step is not None and attend:
                attn.plan_step(step)
            for layer in range(cache.num_layers):
                if step is None:
                    batch = cache.append(layer, ids, kv[layer][0], kv[layer][1], lens)
                    if attend:
                        attn.plan(batch)
                else:
                    cache.write(step, layer, kv[layer][0], kv[layer][1])
                if attend:
                    outs.append(attn.run(q, layer))
            for layer, seq, keep in compress:
                cache.compress(layer, seq, keep)
        contents = {
            (layer, seq, h): (cache.head_positions(layer, seq, h), *cache.read_head(layer, seq, h))
            for layer in range(cache.num_layers)
            for seq in ids
            for h in range(cache.num_kv_heads)
        }
        results.append((outs, contents, cache.available_pages_count))
    return results


def test_step_api_equals_per_layer_api():
    def factory():
        return HeadwiseKVCache(256, 3, 3, 2, 8, torch.float64, "cpu", check_invariants=True)

    schedule = [
        ([5, 0, 7], []),  # a zero-length append: written, not attended
        ([2, 4, 1], [(0, 3, [[0, 2, 4], None]), (2, 9, [[], [1, 5]])]),
        ([1, 1, 1], []),  # decode over compressed heads
        ([1, 1, 1], [(1, 5, [None, [0]])]),
        ([3, 1, 2], []),
    ]
    (outs_a, contents_a, free_a), (outs_b, contents_b, free_b) = _run_both_apis(factory, schedule)
    assert len(outs_a) == len(outs_b) == 4 * 3
    for a, b in zip(outs_a, outs_b, strict=True):
        assert torch.equal(a, b)
    assert free_a == free_b and contents_a.keys() == contents_b.keys()
    for key, (pos, k, v) in contents_a.items():
        assert pos.tolist() == contents_b[key][0].tolist(), key
        assert torch.equal(k, contents_b[key][1]) and torch.equal(v, contents_b[key][2]), key


def test_one_upload_path_equals_host_path():
    """The GPU's packing path (one copy of every layer's index arrays, separate batches
    for plan() and for the append) runs on the CPU too; it must give the same results."""
    results = []
    for upload in (False, True):
        m = Model(page_size=2, num_kv_heads=2, group=2, num_layers=3, seed=4, api="step")
        if upload:
            m.cache._builder.device = torch.device("cpu")
        m.add([0, 1, 2])
        m.step([0, 1, 2], [3, 6, 1])  # mixed lengths: the row order's index goes up too
        m.compress(1, 1, [[0, 3], [5]])
        m.step([0, 1, 2], [1, 1, 1])
        m.step([0, 1, 2], [2, 1, 2], qo_lens=[1, 1, 2])
        results.append({seq: [k.clone() for k in m.cache.read_head(1, seq, 0)] for seq in (0, 1)})
    for seq in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(results[0][seq], results[1][seq], strict=True))


def test_begin_step_is_all_or_nothing():
    # after one token per head (12 pages), a layer's next 4 pages fit, three layers' do not
    cache = HeadwiseKVCache(16, 4, 3, 2, 8, torch.float64, "cpu", check_invariants=True)
    cache.add_sequences([0, 1])
    k = torch.randn(2, 2, 8, dtype=torch.float64)
    step = cache.begin_step([0, 1])
    for layer in range(3):
        cache.write(step, layer, k, k)
    bad = [
        (NoPageError, lambda: cache.begin_step([0, 1], [5, 4])),
        (UnknownSequenceError, lambda: cache.begin_step([0, 99])),
        (DuplicateSequenceError, lambda: cache.begin_step([1, 1], [1, 1])),
        (InvalidLengthError, lambda: cache.begin_step([0, 1], [1, -1])),
        (InvalidLengthError, lambda: cache.begin_step([0, 1], [1])),
        (ArgumentTypeError, lambda: cache.begin_step([0, 1], [0.5, 1])),
        (ArgumentTypeError, lambda: cache.begin_step([0, 1], [True, 1])),
        (NoPageError, lambda: cache.begin_step([0, 1], [2**30, 1])),  # refused before arrays
        (InvalidLengthError, lambda: cache.begin_step([0, 1], [2**40, 1])),
        (ArgumentTypeError, lambda: cache.begin_step("01")),
        (ArgumentTypeError, lambda: cache.begin_step([0.0, 1])),
    ]
    for error, call in bad:
        before = snapshot(cache)
        with pytest.raises(error) as info:
            call()
        assert str(info.value)
        assert_same(before, snapshot(cache))
        cache.check_integrity()
    assert cache.available_pages_count == 16 - 3 * 2 * 2  # one page per head and layer
    cache.append(0, [0, 1], torch.zeros(9, 2, 8, dtype=torch.float64), k.new_zeros(9, 2, 8), [5, 4])


def test_write_checks_tensors_and_that_the_step_is_current():
    cache = HeadwiseKVCache(64, 4, 2, 2, 8, torch.float64, "cpu", check_invariants=True)
    other = HeadwiseKVCache(64, 4, 2, 2, 8, torch.float64, "cpu")
    attn = HeadwiseAttention(cache, 4, backend="torch")
    for c in (cache, other):
        c.add_sequences([0, 1])
    step = cache.begin_step([0, 1], [2, 1])
    attn.plan_step(step)
    k = torch.randn(3, 2, 8, dtype=torch.float64)
    bad = [
        (TensorSpecError, lambda: cache.write(step, 0, k[:2], k[:2])),  # 2 tokens, not 3
        (TensorSpecError, lambda: cache.write(step, 0, k.float(), k.float())),
        (TensorSpecError, lambda: cache.write(step, 0, k, k[:, :1])),
        (ArgumentTypeError, lambda: cache.write(step, 0, k.tolist(), k)),
        (IndexOutOfRangeError, lambda: cache.write(step, 2, k, k)),  # no layer 2
        (ArgumentTypeError, lambda: cache.write(step, True, k, k)),
        (ArgumentTypeError, lambda: cache.write("step", 0, k, k)),
        (SeqAttnError, lambda: cache.write(other.begin_step([0, 1], [2, 1]), 0, k, k)),
    ]
    for error, call in bad:
        before = snapshot(cache)
        with pytest.raises(error, match=r"."):
            call()
        assert_same(before, snapshot(cache))
    cache.write(step, 0, k, k)
    q = torch.randn(3, 4, 8, dtype=torch.float64)
    attn.run(q, 0)
    # layer 1's new tokens hold no K/V yet: nothing may change or read that layer
    keep = [[0], None]
    unwritten = [
        lambda: cache.compress(1, 0, keep),
        lambda: cache.truncate_head(1, 0, 0, 0),
        lambda: cache.append(1, [0], k[:1], k[:1]),
        lambda: cache.pack(1, [0]),
        lambda: cache.begin_step([0]),
        lambda: cache.release([0]),  # not every sequence of the step
        lambda: attn.run(q, 1),
    ]
    for call in unwritten:
        before = snapshot(cache)
        with pytest.raises(SeqAttnError, match="not written"):
            call()
        assert_same(before, snapshot(cache))
    cache.write(step, 1, k, k)
    attn.run(q, 1)
    cache.compress(1, 0, keep)  # layer 1 changed: the step is stale there only
    with pytest.raises(SeqAttnError, match="stale for layer 1"):
        cache.write(step, 1, k, k)
    with pytest.raises(SeqAttnError, match="layer 1 changed after it was planned"):
        attn.run(q, 1)
    with pytest.raises(SeqAttnError, match="stale"):
        attn.plan(step.batches[1])
    attn.run(q, 0)  # layer 0 is as planned
    new_step = cache.begin_step([0, 1])  # every layer moved on
    with pytest.raises(SeqAttnError, match="stale for layer 0"):
        cache.write(step, 0, k, k)
    with pytest.raises(SeqAttnError, match="another HeadwiseKVCache"):
        HeadwiseAttention(other, 4, backend="torch").plan_step(new_step)


def test_releasing_every_sequence_of_an_unwritten_step_ends_it():
    cache = HeadwiseKVCache(64, 4, 2, 2, 8, torch.float64, "cpu", check_invariants=True)
    cache.add_sequences([0, 1, 2])
    step = cache.begin_step([0, 1, 2], [2, 0, 1])
    cache.write(step, 1, *[torch.randn(3, 2, 8, dtype=torch.float64)] * 2)
    with pytest.raises(SeqAttnError, match="release all of that step's sequences"):
        cache.release([0])
    cache.release([0, 2])  # sequence 1 took no token in the step
    assert cache.available_pages_count == 64
    cache.begin_step([1], [3])  # the step is over: a new one may begin
    with pytest.raises(SeqAttnError, match="another HeadwiseKVCache"):
        small = HeadwiseKVCache(8, 4, 1, 2, 8, torch.float64, "cpu")
        small.add_sequences([1])
        cache.write(small.begin_step([1]), 1, *[torch.randn(1, 2, 8)] * 2)


def test_pack_requires_every_head_to_hold_the_queries_positions():
    m = Model(page_size=2, num_kv_heads=2, group=1, num_layers=1)
    m.add([0, 1, 2])
    m.step([0, 1, 2], [6, 4, 4])
    m.compress(0, 0, [[0, 2, 4, 5], [0, 1, 2, 3, 4]])  # head 1 drops position 5
    m.compress(0, 1, [[2, 3], [0, 3]])  # both hold position 3, head 0 also 2
    m.compress(0, 2, [[1, 2, 3], [0, 2, 3]])  # both hold positions 2 and 3
    cache = m.cache
    for ids, lens in (([0], [1]), ([1, 2], [2, 1]), ([2], [3])):
        before = snapshot(cache)
        with pytest.raises(InvalidLengthError, match="newest"):
            cache.pack(0, ids, lens)
        assert_same(before, snapshot(cache))
    q = m.randn(3, 2, 8)
    m.attn.plan(cache.pack(0, [1, 2], [1, 2]))
    ref, _ = m.reference([1, 2], [1, 2], q, 0)
    torch.testing.assert_close(m.attn.run(q, 0), ref, atol=1e-10, rtol=1e-10)


def test_head_page_ids_are_int32():
    cache = HeadwiseKVCache(16, 4, 1, 2, 8, torch.float32, "cpu")
    cache.add_sequences([0])
    cache.append(0, [0], torch.randn(5, 2, 8), torch.randn(5, 2, 8), [5])
    cache.truncate_head(0, 0, 1, 0)
    assert [cache.head_page_ids(0, 0, h).dtype for h in (0, 1)] == [np.int32, np.int32]
    assert [cache.head_page_ids(0, 0, h).size for h in (0, 1)] == [2, 0]


def test_plan_step_needs_a_query_per_sequence():
    cache = HeadwiseKVCache(64, 4, 2, 2, 8, torch.float64, "cpu")
    attn = HeadwiseAttention(cache, 4, backend="torch")
    cache.add_sequences([0, 1, 2])
    step = cache.begin_step([0, 1, 2], [3, 0, 2])
    with pytest.raises(InvalidLengthError, match=r"sequences \[1\] append no token"):
        attn.plan_step(step)
    with pytest.raises(InvalidLengthError, match="tokens appended"):
        attn.plan_step(step, qo_lens=[1, 1, 1])  # sequence 1 appended none
    with pytest.raises(InvalidLengthError, match="tokens appended"):
        attn.plan_step(step, qo_lens=[4, 0, 1])
    with pytest.raises(TensorSpecError, match="HeadwiseStep"):
        attn.plan_step(step.batches[0])  # type: ignore[arg-type]
    with pytest.raises(TensorSpecError, match="HeadwiseBatch"):
        attn.plan(step)  # type: ignore[arg-type]


def test_an_empty_step():
    cache = HeadwiseKVCache(16, 4, 2, 2, 8, torch.float32, "cpu", check_invariants=True)
    step = cache.begin_step([])
    assert step.num_tokens == 0 and len(step.batches) == 2
    for layer in range(2):
        cache.write(step, layer, torch.zeros(0, 2, 8), torch.zeros(0, 2, 8))
    assert cache.available_pages_count == 16


# -------------------------------------------------------------------- memory budgets
def test_pages_freed_match_budgets_exactly():
    ps, heads, n = 4, 4, 61
    cache = HeadwiseKVCache(4 * 2 * heads * 16, ps, 2, heads, 8, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    cache.add_sequences([0, 1])
    for layer in range(2):
        k = torch.randn(2 * n, heads, 8, generator=gen)
        cache.append(layer, [0, 1], k, k, [n, n])
    full = cache.memory_bytes()
    assert full == cache.full_cache_bytes() == 2 * 2 * heads * -(-n // ps) * cache.page_bytes
    budgets = {0: 4 * 24, 1: 4 * 9}  # layer 0 keeps more (PyramidKV-like)
    for layer, budget in budgets.items():
        for seq in (0, 1):
            scores = torch.rand(heads, n, generator=gen) ** 4  # skewed
            keep = adakv_select(scores, budget, window=3, min_per_head=2)
            assert sum(k.size for k in keep) == budget
            cache.compress(layer, seq, keep)
            kept = np.array([k.size for k in keep])
            assert cache.head_lens(layer, seq).tolist() == kept.tolist()
            assert cache.head_pages(layer, seq).tolist() == (-(-kept // ps)).tolist()
    held = cache.pages_held()
    assert held.shape == (2, heads) and int(held.sum()) == cache.storage.num_pages - (
        cache.available_pages_count
    )
    assert cache.memory_bytes() == int(held.sum()) * cache.page_bytes
    assert cache.bytes_saved() == full - cache.memory_bytes() > 0
    assert cache.page_bytes == 2 * ps * 8 * 4
    cache.check_integrity()
    cache.release([0, 1])
    assert cache.available_pages_count == cache.storage.num_pages and cache.memory_bytes() == 0


def test_truncate_head_frees_its_pages_only():
    cache = HeadwiseKVCache(64, 4, 1, 2, 8, torch.float32, "cpu", check_invariants=True)
    cache.add_sequences([3])
    k = torch.randn(10, 2, 8)
    cache.append(0, [3], k, k, [10])
    free = cache.available_pages_count
    cache.truncate_head(0, 3, 1, 4)
    assert cache.head_lens(0, 3).tolist() == [10, 4]
    assert cache.available_pages_count == free + 2
    assert torch.equal(cache.read_head(0, 3, 1)[0], k[:4, 1])
    cache.append(0, [3], k[:1], k[:1])
    assert cache.head_positions(0, 3, 1).tolist() == [0, 1, 2, 3, 10]
    assert cache.seq_len(3) == 11


def test_compress_by_position_equals_compress_by_index():
    a = HeadwiseKVCache(64, 2, 1, 2, 4, torch.float64, "cpu", check_invariants=True)
    b = HeadwiseKVCache(64, 2, 1, 2, 4, torch.float64, "cpu", check_invariants=True)
    k = torch.randn(9, 2, 4, dtype=torch.float64)
    for cache in (a, b):
        cache.add_sequences([0])
        cache.append(0, [0], k, -k, [9])
        cache.compress(0, 0, [[1, 2, 5, 8], [0, 3]])  # positions == indices here
    a.compress(0, 0, [[2, 8], None], by_position=True)
    b.compress(0, 0, [[1, 3], None])
    assert a.head_positions(0, 0, 0).tolist() == b.head_positions(0, 0, 0).tolist() == [2, 8]
    assert torch.equal(a.read_head(0, 0, 0)[0], b.read_head(0, 0, 0)[0])
    before = snapshot(a)
    with pytest.raises(InvalidLengthError, match=r"does not hold positions \[5\]"):
        a.compress(0, 0, [[2, 5], None], by_position=True)
    with pytest.raises(InvalidLengthError, match="token positions"):
        a.compress(0, 0, [[8, 2], None], by_position=True)
    assert_same(before, snapshot(a))


def test_seq_len_per_layer_mid_step():
    cache = HeadwiseKVCache(64, 4, 3, 1, 8, torch.float32, "cpu")
    cache.add_sequences([0])
    cache.append(0, [0], torch.randn(5, 1, 8), torch.randn(5, 1, 8), [5])
    assert [cache.seq_len(0, layer) for layer in range(3)] == [5, 0, 0]
    assert cache.seq_len(0) == 5


# ------------------------------------------------------------------- all or nothing
def _bad_calls(cache: HeadwiseKVCache) -> list:
    f64 = torch.float64
    k = torch.randn(3, 2, 8, dtype=f64)
    bad_keep = [[0, 0], None]
    big = torch.randn(200, 2, 8, dtype=f64)
    return [
        (UnknownSequenceError, lambda: cache.append(0, [0, 99], k, k, [2, 1])),
        (DuplicateSequenceError, lambda: cache.append(0, [0, 0], k, k, [2, 1])),
        (InvalidLengthError, lambda: cache.append(0, [0, 1], k, k, [2, -1])),
        (InvalidLengthError, lambda: cache.append(0, [0, 1], k, k, [3])),
        (TensorSpecError, lambda: cache.append(0, [0, 1], k, k, [1, 1])),  # 3 rows, 2 tokens
        (TensorSpecError, lambda: cache.append(0, [0, 1], k.float(), k.float(), [2, 1])),
        (TensorSpecError, lambda: cache.append(0, [0, 1], k[:, :1], k[:, :1], [2, 1])),
        (TensorSpecError, lambda: cache.append(0, [0, 1], k, k[:, :, :4], [2, 1])),
        (IndexOutOfRangeError, lambda: cache.append(5, [0, 1], k, k, [2, 1])),
        (ArgumentTypeError, lambda: cache.append(True, [0, 1], k, k, [2, 1])),
        (ArgumentTypeError, lambda: cache.append(0, [0, 1], k, k, [2.0, 1])),
        (NoPageError, lambda: cache.append(0, [0, 1], big, big, [100, 100])),
        (UnknownSequenceError, lambda: cache.compress(0, 99, [None, None])),
        (InvalidLengthError, lambda: cache.compress(0, 0, [None])),
        (InvalidLengthError, lambda: cache.compress(0, 0, [[0, 99], None])),
        (InvalidLengthError, lambda: cache.compress(0, 0, [[-1, 2], None])),
        (InvalidLengthError, lambda: cache.compress(0, 0, [[2, 1], None])),
        (InvalidLengthError, lambda: cache.compress(0, 0, bad_keep)),
        (ArgumentTypeError, lambda: cache.compress(0, 0, [[0.5], None])),
        (ArgumentTypeError, lambda: cache.compress(True, 0, [[0], None])),  # not layer 1
        (ArgumentTypeError, lambda: cache.compress(1.0, 0, [[0], None])),
        (ArgumentTypeError, lambda: cache.compress(1, True, [[0], None])),  # not sequence 1
        (IndexOutOfRangeError, lambda: cache.truncate_head(0, 0, 2, 1)),
        (ArgumentTypeError, lambda: cache.truncate_head(0, 0, True, 1)),
        (InvalidLengthError, lambda: cache.truncate_head(0, 0, 0, 999)),
        (ArgumentTypeError, lambda: cache.truncate_head(0, 0, 0, 1.0)),
        (UnknownSequenceError, lambda: cache.release([0, 99])),
        (DuplicateSequenceError, lambda: cache.release([0, 0])),
        (SequenceExistsError, lambda: cache.add_sequences([7, 0])),
        (DuplicateSequenceError, lambda: cache.add_sequences([7, 7])),
        (ArgumentTypeError, lambda: cache.add_sequences(["a"])),
        (ArgumentTypeError, lambda: cache.add_sequences("56")),
        (ArgumentTypeError, lambda: cache.add_sequences([True])),
        (ValueError, lambda: cache.add_sequences([2**62])),  # its rows' ids overflow int64
        (ArgumentTypeError, lambda: cache.release(True)),
        (ArgumentTypeError, lambda: cache.release([1.0])),
        (ArgumentTypeError, lambda: cache.head_lens(0, True)),
        (IndexOutOfRangeError, lambda: cache.head_positions(0, 0, 2)),
    ]


def test_every_bad_call_raises_and_changes_nothing():
    cache = HeadwiseKVCache(24, 4, 2, 2, 8, torch.float64, "cpu", check_invariants=True)
    cache.add_sequences([0, 1])
    k = torch.randn(12, 2, 8, dtype=torch.float64)
    for layer in range(2):
        cache.append(layer, [0, 1], k, k, [7, 5])
    cache.compress(1, 0, [[1, 4], [0, 6]])
    for error, call in _bad_calls(cache):
        before = snapshot(cache)
        with pytest.raises(error) as info:
            call()
        assert isinstance(info.value, SeqAttnError) and str(info.value)
        assert_same(before, snapshot(cache))
        cache.check_integrity()
    cache.release([0, 1])
    with pytest.raises(UnknownSequenceError, match="not in the head-wise cache"):
        cache.release([0])  # double release


def test_attention_rejects_bad_queries():
    m = Model(page_size=4)
    m.add([0])
    m.step([0], [3])
    with pytest.raises(IndexOutOfRangeError, match="layer must be an integer in"):
        m.attn.run(torch.zeros(3, 4, 8, dtype=torch.float64), 5)
    with pytest.raises(ArgumentTypeError, match="layer must be an integer"):
        m.attn.run(torch.zeros(3, 4, 8, dtype=torch.float64), True)
    with pytest.raises(ArgumentTypeError, match=r"q must be a torch\.Tensor"):
        m.attn.run([[0.0]], 0)
    with pytest.raises(TensorSpecError, match=r"shape \[3, 4, 8\]"):
        m.attn.run(torch.zeros(2, 4, 8, dtype=torch.float64), 0)
    with pytest.raises(InvalidLengthError):
        m.attn.plan(m.cache.pack(0, [0], [3]), qo_lens=[1, 1])
    with pytest.raises(ValueError, match="multiple"):
        HeadwiseAttention(m.cache, 3, backend="torch")


# ------------------------------------------------------------------- building blocks
@pytest.mark.parametrize(
    ("lens", "heads"),
    [([1, 1, 1], 2), ([3, 3], 2), ([4], 3), ([2, 0, 3, 1], 2), ([0, 0], 2), ([2, 5], 1), ([], 2)],
    ids=["decode", "equal", "one-seq", "mixed-with-empty", "all-empty", "one-head", "no-seq"],
)
def test_head_rows_are_sequence_major_and_round_trip(lens, heads):
    lens = np.array(lens, dtype=np.int64)
    order = row_order(lens, heads)
    index = None if order is None else tuple(torch.from_numpy(a) for a in order)
    rows = head_rows(lens, heads, index)
    group, nnz = 3, int(lens.sum())
    t = torch.randn(nnz, heads * group, 5)
    r = rows.to_rows(t)
    assert r.shape == (nnz * heads, group, 5)
    # request b * heads + h holds head h of sequence b's tokens, in order
    row = 0
    for b, n in enumerate(lens.tolist()):
        start = int(lens[:b].sum())
        for h in range(heads):
            for j in range(n):
                assert torch.equal(r[row], t[start + j, h * group : (h + 1) * group]), (b, h, j)
                row += 1
    assert rows.is_view == (r.data_ptr() == t.data_ptr() or nnz == 0)
    assert torch.equal(rows.from_rows(r), t)
    out = torch.empty_like(t)
    assert rows.from_rows(r, out) is out and torch.equal(out, t)
    lse = torch.randn(nnz * heads, group)  # rest = []: a log-sum-exp
    assert torch.equal(rows.to_rows(rows.from_rows(lse)), lse)


def test_compaction_moves_only_what_moves():
    pages = [np.array([7, 2, 5]), np.array([9])]
    src_page, src_slot, dst_page, dst_slot = compaction_moves(
        pages, [np.array([0, 1, 5, 8]), np.array([1])], page_size=3
    )
    # head 0: index 5 (page 2, slot 2) -> 2 (page 7, slot 2); 8 (page 5, 2) -> 3 (page 2, 0)
    assert src_page.tolist() == [2, 5, 9] and src_slot.tolist() == [2, 2, 1]
    assert dst_page.tolist() == [7, 2, 9] and dst_slot.tolist() == [2, 0, 0]


def test_snapkv_scores_match_a_plain_loop():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 4, 8, generator=gen), torch.randn(10, 2, 8, generator=gen)
    scores = snapkv_scores(q, k, pool_kernel=1)
    expected = torch.zeros(2, 10)
    for h in range(2):
        for qh in (2 * h, 2 * h + 1):
            for w in range(3):
                pos = 7 + w
                weights = torch.softmax(k[: pos + 1, h] @ q[w, qh] / math.sqrt(8), dim=0)
                expected[h, : pos + 1] += weights / 6
    torch.testing.assert_close(scores, expected)
    pooled = snapkv_scores(q, k, pool_kernel=3)
    torch.testing.assert_close(pooled[:, 4], expected[:, 3:6].max(dim=1).values)


def test_adakv_select_budget_window_and_floor():
    scores = torch.tensor([[9.0, 8, 7, 6, 0, 0], [0.1, 0.2, 0.0, 0.0, 0.0, 0.0]])
    keep = adakv_select(scores, budget=7, window=1, min_per_head=2)
    assert [k.tolist() for k in keep] == [[0, 1, 2, 5], [0, 1, 5]]
    assert [k.tolist() for k in adakv_select(scores, 100)] == [list(range(6))] * 2
    with pytest.raises(InvalidLengthError, match="below"):
        adakv_select(scores, budget=3, window=2)


# ------------------------------------------------------------ example and benchmark
def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_snapkv_example_runs(capsys):
    _load(ROOT / "examples" / "headwise_snapkv.py").main(["--prompt", "48", "--decode", "3"])
    text = capsys.readouterr().out
    assert "max |diff|" in text and "memory" in text


def test_benchmark_runs_on_cpu(capsys):
    _load(ROOT / "benchmarks" / "bench_headwise.py").main(["--device", "cpu"])
    text = capsys.readouterr().out
    assert "| head-wise paged" in text and "masked full cache" in text


@pytest.mark.parametrize("held", [0, 1, 3, 4, 5])
@pytest.mark.parametrize("new", [1, 3, 4, 5, 9])
def test_pages_needed_is_what_begin_step_takes(held: int, new: int) -> None:
    """Across page boundaries, with heads a compression left at different lengths."""
    cache = HeadwiseKVCache(256, 4, num_layers=2, num_kv_heads=2, head_dim=8,
                            dtype=torch.float32, device="cpu")  # fmt: skip
    cache.add_sequences([3, 8])
    k = torch.randn(9, 2, 8)
    if held:
        cache.append(0, [3], k[:held], k[:held], append_lens=[held])
        cache.append(1, [3], k[:held], k[:held], append_lens=[held])
        cache.compress(1, 3, keep=[list(range(held - 1)), None])  # head 0 drops one
    need = cache.pages_needed([3, 8], [new, 2])
    free = cache.available_pages_count
    cache.begin_step([3, 8], append_lens=[new, 2])
    assert need == free - cache.available_pages_count


def test_pages_needed_refuses_bad_input() -> None:
    cache = HeadwiseKVCache(16, 4, num_layers=1, num_kv_heads=2, head_dim=8,
                            dtype=torch.float32, device="cpu")  # fmt: skip
    cache.add_sequences([1])
    with pytest.raises(UnknownSequenceError):
        cache.pages_needed([2], [1])
    with pytest.raises(DuplicateSequenceError):
        cache.pages_needed([1, 1], [1, 1])
    with pytest.raises(InvalidLengthError):
        cache.pages_needed([1], [-1])
    with pytest.raises(InvalidLengthError):
        cache.pages_needed([1], [1, 2])
    assert cache.pages_needed([1], [100]) == 50  # a question, not a promise: no room check
    assert cache.available_pages_count == 16
