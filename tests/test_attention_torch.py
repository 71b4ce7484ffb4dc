"""PagedAttention's torch backend against an independent dense float64 reference.

What is compared to what: a ``Harness`` drives ``CacheDescriptor`` +
``PagedKVCacheManager.append_kv`` + ``PagedAttention(backend="torch")`` step by step,
and keeps on the side, per sequence and per layer, the full K/V history the model
appended (as float64 copies of the values the cache is expected to hold: rounded to
the cache dtype, or quantized and dequantized for float8). ``reference_attention``
then computes dense attention in float64 from that history alone (it never reads the
paged cache, and shares no code with ``seqattn.attention.torch_backend``): the query
rows of a sequence are its newest ``qo_len`` positions, logits are ``q . k * sm_scale``
(optionally ``cap * tanh(x / cap)``), the causal mask keeps keys ``j <= p``, the window
keeps ``j >= p - window_left``, GQA query head ``h`` reads KV head ``h // group``, and
the log-sum-exp is returned in base 2. The backend's output and LSE must match the
reference to a tolerance set by the dtype (1e-10 for float64, 1e-5 for float32, looser
for float16 / bfloat16 outputs).
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqattn import (
    CacheDescriptor,
    InvalidArgumentError,
    InvalidLengthError,
    PagedAttention,
    PagedKVCacheManager,
    SeqAttnError,
    TensorSpecError,
)
from seqattn.attention.torch_backend import attention_groups
from seqattn.headwise import HeadwiseAttention, HeadwiseKVCache

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# (atol, rtol) for the output, by the dtype of q (the dtype the output comes back in)
OUT_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


# --------------------------------------------------------------------------- reference
def reference_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    causal: bool = True,
    sm_scale: Optional[float] = None,
    window_left: int = -1,
    logits_soft_cap: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of one sequence in float64.

    Args:
        q: ``[qo_len, num_qo_heads, head_dim]``, the newest ``qo_len`` positions.
        keys, values: ``[kv_len, num_kv_heads, head_dim]``, the whole history.

    Returns:
        ``(out [qo_len, num_qo_heads, head_dim], lse2 [qo_len, num_qo_heads])``.
    """
    q, keys, values = q.double(), keys.double(), values.double()
    qo_len, num_qo_heads, head_dim = q.shape
    kv_len, num_kv_heads, _ = keys.shape
    assert 1 <= qo_len <= kv_len and num_qo_heads % num_kv_heads == 0
    group = num_qo_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    pos = torch.arange(kv_len - qo_len, kv_len)[:, None]
    key_pos = torch.arange(kv_len)[None, :]
    visible = torch.ones(qo_len, kv_len, dtype=torch.bool)
    if causal:
        visible &= key_pos <= pos
    if window_left >= 0:
        visible &= key_pos >= pos - window_left
    out = torch.zeros(qo_len, num_qo_heads, head_dim, dtype=torch.float64)
    lse = torch.zeros(qo_len, num_qo_heads, dtype=torch.float64)
    for h in range(num_qo_heads):
        kv_head = h // group
        logits = (q[:, h] @ keys[:, kv_head].T) * scale
        if logits_soft_cap:
            logits = logits_soft_cap * torch.tanh(logits / logits_soft_cap)
        logits = torch.where(visible, logits, torch.tensor(-math.inf, dtype=torch.float64))
        peak = logits.max(dim=1, keepdim=True).values
        weights = torch.exp(logits - peak)
        total = weights.sum(dim=1, keepdim=True)
        out[:, h] = (weights / total) @ values[:, kv_head]
        lse[:, h] = (peak + torch.log(total)).squeeze(1) / math.log(2.0)
    return out, lse


def stored_values(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """What a cache of ``dtype`` holds for input ``x``, read back as float64 (dequantized)."""
    if dtype in FP8:
        if x.dtype == dtype:
            return x.double() * scale
        limit = torch.finfo(dtype).max
        return (x.double() / scale).clamp(-limit, limit).to(dtype).double() * scale
    return x.to(dtype).double()


# ----------------------------------------------------------------------------- harness
class Harness:
    """A cache, its descriptor, a torch-backend PagedAttention, and the model's history."""

    def __init__(
        self,
        *,
        page_size: int,
        num_kv_heads: int = 2,
        group: int = 2,
        head_dim: int = 16,
        dtype: torch.dtype = torch.float64,
        layout: str = "NHD",
        num_layers: int = 1,
        num_pages: int = 256,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
        kv_input_dtype: Optional[torch.dtype] = None,
        kv_magnitude: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.cache = PagedKVCacheManager(
            num_pages, page_size, num_kv_heads, head_dim, dtype, "cpu", layout,
            num_layers=num_layers, k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip
        self.desc = CacheDescriptor(self.cache, check_invariants=True)
        self.num_qo_heads = num_kv_heads * group
        self.attn = PagedAttention(self.cache, self.num_qo_heads, backend="torch")
        self.kv_input_dtype = kv_input_dtype or (torch.float32 if dtype in FP8 else dtype)
        self.kv_magnitude = kv_magnitude
        self.gen = torch.Generator().manual_seed(seed)
        empty = torch.zeros(0, num_kv_heads, head_dim, dtype=torch.float64)
        self.empty = (empty, empty)
        # history[seq][layer] = (keys, values), float64, as the cache should hold them;
        # raw: the same before rounding / quantization to the cache dtype
        self.history: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.raw: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.last_q = torch.zeros(0)
        self.last_append: list[int] = []

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)

    def append(self, ids: list[int], lens: list[int], *, decode: bool = False):
        """Allocate ``lens`` tokens (or one each when ``decode``), append random K/V to
        every layer, record them; returns the packed batch."""
        if decode:
            lens = [1] * len(ids)
            self.desc.allocate_decoding(ids)
        else:
            self.desc.allocate(ids, lens)
        packed = self.desc.pack_for_flashinfer(ids, append_lens=lens)
        cache, nnz = self.cache, sum(lens)
        for layer in range(cache.num_layers):
            shape = (nnz, cache.num_heads, cache.head_dim)
            k = (self.randn(*shape) * self.kv_magnitude).to(self.kv_input_dtype)
            v = (self.randn(*shape) * self.kv_magnitude).to(self.kv_input_dtype)
            cache.append_kv(k, v, packed, layer=layer)
            held = (
                stored_values(k, cache.dtype, cache.k_scale),
                stored_values(v, cache.dtype, cache.v_scale),
            )
            self._record(self.history, ids, lens, layer, held)
            self._record(self.raw, ids, lens, layer, (k.double(), v.double()))
        self.last_append = list(lens)
        return packed

    def fork(self, src: int, dst: int) -> None:
        """Fork in the descriptor, and in the model's history."""
        self.desc.fork(src, dst)
        self.history[dst] = list(self.history[src])
        self.raw[dst] = list(self.raw[src])

    def _record(self, history, ids, lens, layer, kv) -> None:
        start = 0
        for seq, n in zip(ids, lens, strict=True):
            layers = history.setdefault(seq, [self.empty] * self.cache.num_layers)
            old_k, old_v = layers[layer]
            layers[layer] = (
                torch.cat([old_k, kv[0][start : start + n]]),
                torch.cat([old_v, kv[1][start : start + n]]),
            )
            start += n

    def query(self, qo_lens: list[int], dtype: torch.dtype, q_magnitude: float = 1.0):
        shape = (sum(qo_lens), self.num_qo_heads, self.cache.head_dim)
        return (self.randn(*shape) * q_magnitude).to(dtype)

    def reference(self, ids, qo_lens, q, layer, *, raw=False, **options):
        """Reference output and LSE of the whole batch, rows in batch order (from the
        unquantized inputs when ``raw``)."""
        outs, lses, start = [], [], 0
        for seq, n in zip(ids, qo_lens, strict=True):
            keys, values = (self.raw if raw else self.history)[seq][layer]
            o, lse = reference_attention(q[start : start + n], keys, values, **options)
            outs.append(o)
            lses.append(lse)
            start += n
        return torch.cat(outs), torch.cat(lses)

    def check(
        self,
        packed,
        ids: list[int],
        qo_lens: Optional[list[int]] = None,
        *,
        q_dtype: Optional[torch.dtype] = None,
        q_magnitude: float = 1.0,
        **options,
    ) -> list[torch.Tensor]:
        """Plan (explicit qo_lens when given), run every layer, compare with the reference.

        Returns each layer's output as float64."""
        lens = self.last_append if qo_lens is None else [int(n) for n in qo_lens]
        plan_kwargs = {"q_dtype": q_dtype} if q_dtype is not None else {}
        self.attn.plan(packed, qo_lens, **options, **plan_kwargs)
        q_dtype = q_dtype or (torch.float16 if self.cache.dtype in FP8 else self.cache.dtype)
        atol, rtol = OUT_TOL[q_dtype]
        lse_tol = 1e-10 if q_dtype == torch.float64 else 3e-5
        outputs = []
        for layer in range(self.cache.num_layers):
            q = self.last_q = self.query(lens, q_dtype, q_magnitude)
            out, lse = self.attn.run(q, layer, return_lse=True)
            ref_out, ref_lse = self.reference(ids, lens, q, layer, **options)
            assert out.shape == q.shape and out.dtype == q_dtype
            lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            assert lse.shape == q.shape[:2] and lse.dtype == lse_dtype
            torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
            torch.testing.assert_close(lse.double(), ref_lse, atol=lse_tol, rtol=lse_tol)
            plain = self.attn.run(q, layer)
            assert torch.equal(plain, out), "return_lse must not change the output"
            outputs.append(out.double())
        return outputs


def boundary_lens(ps: int, batch: int) -> list[int]:
    """``batch`` lengths around page boundaries: 1, ps - 1, ps, ps + 1, 2 ps + 3."""
    pool = [ps + 1, 1, ps, max(ps - 1, 2), 2 * ps + 3]
    return pool[:batch]


# ------------------------------------------------------------------- reference sanity
def test_reference_sanity():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(5, 1, 4, generator=gen, dtype=torch.float64)
    v = torch.randn(5, 1, 4, generator=gen, dtype=torch.float64)
    # window 0, causal: each query sees only its own key, so out = v at its position
    out, lse = reference_attention(q, k, v, window_left=0)
    for h in range(2):
        torch.testing.assert_close(out[:, h], v[2:, 0])
        logit = (q[:, h] * k[2:, 0]).sum(-1) / 2.0
        torch.testing.assert_close(lse[:, h], logit / math.log(2.0))
    # non-causal, scale 0: uniform weights over all keys, lse2 = log2(kv_len)
    out, lse = reference_attention(q, k, v, causal=False, sm_scale=0.0)
    torch.testing.assert_close(out, v.mean(0, keepdim=True).expand(3, 2, 4))
    torch.testing.assert_close(lse, torch.full((3, 2), math.log2(5), dtype=torch.float64))


# -------------------------------------------------------------------------- main paths
@pytest.mark.parametrize("ps", [1, 5, 16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_from_empty(ps, layout, batch, causal):
    h = Harness(page_size=ps, layout=layout, head_dim=64, seed=ps * 10 + batch)
    ids = [100 + 7 * i for i in range(batch)]
    packed = h.append(ids, boundary_lens(ps, batch))
    h.check(packed, ids, causal=causal)


@pytest.mark.parametrize("ps", [1, 5, 16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_chunked_prefill_queries_only_last_chunk(ps, layout):
    h = Harness(page_size=ps, layout=layout, num_layers=2, seed=ps)
    ids = [3, 11, 4]
    h.append(ids, [max(ps - 1, 1), ps + 1, 1])
    h.append(ids, [ps, 1, 2 * ps])
    h.append(ids, [1, ps - 1 if ps > 1 else 2, ps + 2])
    packed = h.append(ids, [ps + 1, 2, ps])
    h.check(packed, ids)
    h.check(packed, ids, causal=False)


@pytest.mark.parametrize("ps", [1, 5, 16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_decode_steps_across_page_boundaries(ps, layout):
    h = Harness(page_size=ps, layout=layout, group=3, num_layers=2, seed=ps + 1)
    ids = [0, 9, 5]
    packed = h.append(ids, boundary_lens(ps, 3))
    h.check(packed, ids)
    for _ in range(ps + 2):
        packed = h.append(ids, [], decode=True)
        h.check(packed, ids)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_ragged_decode_batch_is_attended_in_groups(layout):
    """Pages [16, 1, 1, 8, 1]: sequences 0, 1 and 3 padded to 16 pages (not in batch
    order), 2 and 4 to one; every row still equals the reference."""
    h = Harness(page_size=4, layout=layout, num_layers=2, seed=31)
    ids = [1, 2, 3, 4, 5]
    h.append(ids, [60, 1, 2, 30, 3])
    packed = h.append(ids, [], decode=True)
    h.check(packed, ids, window_left=9)
    h.check(packed, ids)
    groups = [group.pages.shape for group in h.attn.impl._groups]
    assert groups == [(3, 16), (2, 1)]


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("causal", [True, False])
def test_ragged_prefill_batch_is_attended_in_padded_groups(layout, causal):
    """Query runs [3, 9, 1, 4, 8] over [2, 3, 1, 2, 3] pages: some groups hold
    sequences of several query lengths (padded rows, written back unpadded)."""
    h = Harness(page_size=4, layout=layout, num_layers=2, seed=33)
    ids = [1, 2, 3, 4, 5]
    h.append(ids, [3, 2, 1, 1, 2])
    packed = h.append(ids, [3, 9, 1, 4, 8])
    h.check(packed, ids, causal=causal)
    h.check(packed, ids, causal=causal, window_left=2)
    groups = h.attn.impl._groups
    assert len(groups) < 5 and any(group.real is not None for group in groups)


@pytest.mark.parametrize("seed", range(20))
def test_attention_groups_partition_the_batch_within_both_bounds(seed):
    rng = np.random.default_rng(seed)
    size = int(seed) + 1
    pages = rng.integers(1, 50, size=size) ** (seed % 3 + 1)
    queries = np.ones(size, dtype=np.int64) if seed % 2 else rng.integers(1, 30, size=size)
    limit = 4000
    groups = attention_groups(queries, pages, limit)
    assert sorted(np.concatenate(groups).tolist()) == list(range(size))
    for group in groups:
        assert (np.diff(group) > 0).all()  # ascending: batch order
        padded = group.size * queries[group].max() * pages[group].max()
        assert padded <= 2 * (queries[group] * pages[group]).sum()
        assert padded <= limit or group.size == 1
    for group, following in itertools.pairwise(groups):  # each stopped at a bound
        grown = np.append(group, following[np.argmax(queries[following] * pages[following])])
        padded = grown.size * queries[grown].max() * pages[grown].max()
        assert padded > 2 * (queries[grown] * pages[grown]).sum() or padded > limit


@pytest.mark.parametrize("ps", [1, 5, 16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_mixed_prefill_chunks_and_decodes_in_one_step(ps, layout):
    h = Harness(page_size=ps, layout=layout, num_layers=2, seed=ps + 2)
    old = [1, 2, 3, 4]
    h.append(old, [ps, ps + 1, max(ps - 1, 1), 2 * ps + 1])
    # 1 and 3 decode, 2 and 4 prefill a chunk, 77 and 78 start from empty
    ids = [1, 77, 2, 3, 78, 4]
    packed = h.append(ids, [1, ps + 1, ps, 1, 1, 3])
    h.check(packed, ids)
    packed = h.append(ids, [], decode=True)
    h.check(packed, ids)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gqa_group_sizes_and_head_dims_float32(group, head_dim):
    h = Harness(
        page_size=5, num_kv_heads=1 if group == 6 else 2, group=group,
        head_dim=head_dim, dtype=torch.float32, num_pages=64, seed=group * head_dim,
    )  # fmt: skip
    ids = [8, 6, 7]
    h.append(ids, [4, 5, 6])
    packed = h.append(ids, [1, 6, 5])  # one decode, two chunks
    h.check(packed, ids)
    packed = h.append(ids, [], decode=True)
    h.check(packed, ids)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window_left", [-1, 0, 3, 1000])
@pytest.mark.parametrize("logits_soft_cap", [None, 2.5])
@pytest.mark.parametrize("sm_scale", [None, 0.37])
def test_masks_soft_cap_and_scale(causal, window_left, logits_soft_cap, sm_scale):
    h = Harness(page_size=4, group=2, head_dim=32, seed=window_left + 7)
    ids = [5, 6, 7]
    h.append(ids, [9, 1, 6])
    packed = h.append(ids, [5, 1, 7])  # qo_len < kv_len for every row
    options = dict(
        causal=causal, window_left=window_left, logits_soft_cap=logits_soft_cap,
        sm_scale=sm_scale,
    )  # fmt: skip
    # q scaled up so the logits reach well past the soft cap
    h.check(packed, ids, q_magnitude=3.0, **options)
    packed = h.append(ids, [], decode=True)  # a decode batch: attended at once, padded
    h.check(packed, ids, q_magnitude=3.0, **options)


def test_options_change_the_output():
    """The option tests can fail: each option alone moves the output away from the default."""
    h = Harness(page_size=4, seed=3)
    ids = [1, 2]
    h.append(ids, [9, 6])
    packed = h.append(ids, [5, 4])
    q = h.query([5, 4], torch.float64, q_magnitude=3.0)
    h.attn.plan(packed)
    base = h.attn.run(q, 0)
    for options in (
        {"causal": False},
        {"window_left": 2},
        {"logits_soft_cap": 1.0},
        {"sm_scale": 0.9},
    ):
        h.attn.plan(packed, **options)
        changed = h.attn.run(q, 0)
        torch.testing.assert_close(changed, h.reference(ids, [5, 4], q, 0, **options)[0])
        assert (changed - base).abs().max() > 1e-3, options


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_each_layer_reads_its_own_kv(layout):
    h = Harness(page_size=5, layout=layout, num_layers=3, seed=4)
    ids = [10, 20, 30]
    h.append(ids, [6, 5, 11])
    packed = h.append(ids, [3, 5, 1])
    h.attn.plan(packed)
    q = h.query([3, 5, 1], torch.float64)
    refs = [h.reference(ids, [3, 5, 1], q, layer)[0] for layer in range(3)]
    for layer in range(3):
        out = h.attn.run(q, layer)
        torch.testing.assert_close(out, refs[layer], atol=1e-10, rtol=1e-10)
        for other in range(3):
            if other != layer:
                assert (out - refs[other]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_cache_dtypes(dtype, layout):
    h = Harness(page_size=16, layout=layout, group=2, head_dim=64, dtype=dtype, seed=5)
    ids = [1, 2, 3]
    h.append(ids, [15, 17, 1])
    packed = h.append(ids, [1, 16, 4])
    h.check(packed, ids)
    packed = h.append(ids, [], decode=True)
    h.check(packed, ids, window_left=5, logits_soft_cap=3.0)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize(
    ("k_scale", "v_scale", "magnitude"),
    [(0.5, 2.0, 1.0), (0.013, 0.07, 1.0), (0.004, 0.003, 3.0)],  # last: some values saturate
)
@pytest.mark.parametrize("kv_input_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_fp8_cache_dequantizes_with_scales(
    fp8, k_scale, v_scale, magnitude, kv_input_dtype, layout
):
    h = Harness(
        page_size=5, layout=layout, group=2, head_dim=64, dtype=fp8, k_scale=k_scale,
        v_scale=v_scale, kv_input_dtype=kv_input_dtype, kv_magnitude=magnitude, seed=6,
    )  # fmt: skip
    ids = [4, 2, 9]
    h.append(ids, [6, 4, 1])
    packed = h.append(ids, [5, 1, 2])
    h.check(packed, ids)  # q float16, the default for a float8 cache
    h.check(packed, ids, q_dtype=torch.float32, window_left=3)
    packed = h.append(ids, [], decode=True)
    h.check(packed, ids, q_dtype=torch.float32)


def test_fp8_comparison_is_tighter_than_the_quantization_error():
    """Against the unquantized K/V the same output is far outside the tolerance used."""
    h = Harness(page_size=5, dtype=torch.float8_e4m3fn, k_scale=0.013, v_scale=0.07, seed=8)
    ids = [1, 2]
    packed = h.append(ids, [9, 4])
    (out,) = h.check(packed, ids, q_dtype=torch.float32)
    unquantized, _ = h.reference(ids, [9, 4], h.last_q, 0, raw=True)
    assert (out - unquantized).abs().max() > 100 * OUT_TOL[torch.float32][0]


@pytest.mark.parametrize("fp8", FP8)
def test_fp8_values_out_of_range_saturate(fp8):
    """K/V beyond the format's range are stored as +-max (finite), not inf or NaN."""
    h = Harness(page_size=4, dtype=fp8, k_scale=1e-4, v_scale=2e-5, kv_magnitude=3.0, seed=20)
    ids = [1, 2]
    packed = h.append(ids, [7, 5])
    keys, values = h.history[1][0]
    assert keys.abs().max() == torch.finfo(fp8).max * 1e-4  # the case does saturate
    assert values.abs().max() == torch.finfo(fp8).max * 2e-5
    (out,) = h.check(packed, ids, q_dtype=torch.float32)
    assert torch.isfinite(out).all()


def test_fp8_cache_accepts_already_quantized_kv():
    h = Harness(page_size=4, dtype=torch.float8_e4m3fn, k_scale=0.25, v_scale=3.0, seed=9)
    h.kv_input_dtype = torch.float8_e4m3fn  # stored as given, dequantized by the scales
    ids = [1, 2]
    packed = h.append(ids, [5, 3])
    h.check(packed, ids, q_dtype=torch.float32)


# ------------------------------------------------------------------- explicit qo_lens
def test_explicit_qo_lens_smaller_larger_and_without_append():
    h = Harness(page_size=4, num_layers=2, seed=10)
    ids = [1, 2, 3]
    h.append(ids, [7, 3, 4])
    packed = h.append(ids, [5, 0, 2])  # sequence 2 appends nothing this step
    h.check(packed, ids, qo_lens=[2, 1, 6])  # fewer, a re-query, more than appended
    h.check(packed, ids, qo_lens=[12, 3, 6], causal=False, window_left=1)  # qo_len == kv_len
    h.check(packed, ids, qo_lens=[1, 1, 1])  # decode-shaped plan over a prefill pack


def test_qo_lens_accepts_numpy_and_tensors():
    import numpy as np

    h = Harness(page_size=3, seed=11)
    ids = [1, 2]
    packed = h.append(ids, [4, 5])
    h.check(packed, ids, qo_lens=np.array([2, 5]))
    h.check(packed, ids, qo_lens=torch.tensor([4, 1], dtype=torch.int32))


def test_out_buffer_is_filled_and_returned():
    h = Harness(page_size=4, seed=12)
    ids = [1, 2]
    packed = h.append(ids, [6, 3])
    h.attn.plan(packed)
    q = h.query([6, 3], torch.float64)
    buffer = torch.full_like(q, math.nan)
    result = h.attn.run(q, 0, out=buffer)
    assert result is buffer
    torch.testing.assert_close(buffer, h.reference(ids, [6, 3], q, 0)[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    ("rows", "dtype"),
    [(2, torch.float64), (12, torch.float64), (9, torch.float32)],  # q: 9 rows, float64
    ids=["short", "long", "dtype"],
)
def test_out_buffer_of_wrong_shape_or_dtype_is_rejected(rows, dtype):
    """``out`` must be shaped like q (run's docstring; errors.TensorSpecError), as q is."""
    h = Harness(page_size=4, seed=21)
    ids = [1, 2]
    packed = h.append(ids, [6, 3])
    h.attn.plan(packed)
    q = h.query([6, 3], torch.float64)
    with pytest.raises(TensorSpecError):
        h.attn.run(q, 0, out=torch.zeros(rows, 4, 16, dtype=dtype))


def test_shared_prefix_after_fork_and_truncate():
    h = Harness(page_size=4, num_layers=2, seed=13)
    h.append([1], [10])
    h.desc.fork(1, 2)
    h.history[2] = list(h.history[1])
    h.desc.truncate(1, 6)
    h.history[1] = [(k[:6], v[:6]) for k, v in h.history[1]]
    ids = [1, 2]
    packed = h.append(ids, [3, 2])
    h.check(packed, ids)
    packed = h.append(ids, [], decode=True)
    h.check(packed, ids)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_stale_nan_past_a_sequence_end_never_reaches_the_output(layout):
    """Pages are gathered whole: the slots past each sequence's length (and the
    padding's) hold whatever an earlier sequence left there, NaN here, and must not
    reach the output (as flashinfer never reads them)."""
    h = Harness(page_size=4, layout=layout, num_layers=2, seed=40)
    for layer in range(2):
        h.cache.get_kv_cache(layer).fill_(math.nan)
    ids = [1, 2, 3]
    packed = h.append(ids, [5, 1, 10])
    h.check(packed, ids)
    h.check(packed, ids, causal=False)
    packed = h.append(ids, [], decode=True)
    h.check(packed, ids)


# ---------------------------------------------------------------------------- errors
@pytest.fixture
def planned() -> Harness:
    h = Harness(page_size=4, seed=14)
    packed = h.append([1, 2], [3, 5])
    h.attn.plan(packed)
    return h


@pytest.mark.parametrize(
    "shape", [(7, 4, 16), (8, 2, 16), (8, 4, 8), (8, 64), (1, 8, 4, 16)], ids=str
)
def test_q_of_wrong_shape(planned, shape):
    with pytest.raises(TensorSpecError, match="shape"):
        planned.attn.run(torch.zeros(shape, dtype=torch.float64), 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_q_of_wrong_dtype(planned, dtype):
    with pytest.raises(TensorSpecError, match="dtype"):
        planned.attn.run(torch.zeros(8, 4, 16, dtype=dtype), 0)


def test_q_of_wrong_dtype_for_fp8_cache():
    h = Harness(page_size=4, dtype=torch.float8_e4m3fn, seed=15)
    packed = h.append([1], [3])
    h.attn.plan(packed)  # q_dtype defaults to float16
    with pytest.raises(TensorSpecError, match="dtype"):
        h.attn.run(torch.zeros(3, 4, 16, dtype=torch.float32), 0)


def test_q_on_wrong_device(planned):
    with pytest.raises(TensorSpecError, match="meta"):
        planned.attn.run(torch.zeros(8, 4, 16, dtype=torch.float64, device="meta"), 0)


def test_layer_out_of_range(planned):
    with pytest.raises(IndexError, match="layer"):
        planned.attn.run(torch.zeros(8, 4, 16, dtype=torch.float64), 1)


@pytest.mark.parametrize("qo_lens", [[4, 5], [3, 6], [0, 5], [3, 0], [-1, 5], [3], [1, 1, 1]])
def test_bad_qo_lens(qo_lens):
    h = Harness(page_size=4, seed=16)
    packed = h.append([1, 2], [3, 5])
    with pytest.raises(InvalidLengthError):
        h.attn.plan(packed, qo_lens=qo_lens)


@pytest.mark.parametrize(
    "options, error",
    [
        ({"window_left": -2}, ValueError),
        ({"window_left": 1.5}, TypeError),
        ({"window_left": True}, TypeError),
        ({"logits_soft_cap": -1.0}, ValueError),
        ({"logits_soft_cap": float("inf")}, ValueError),
        ({"sm_scale": float("nan")}, ValueError),
        ({"sm_scale": 0.0}, ValueError),
        ({"sm_scale": "0.1"}, TypeError),
        ({"causal": 1}, TypeError),
        ({"q_dtype": torch.int32}, TypeError),
        ({"cascade": "yes"}, TypeError),
        ({"qo_lens": [2.0]}, TypeError),
    ],
)
def test_bad_plan_options_leave_the_last_plan(options, error):
    h = Harness(page_size=4, seed=17)
    packed = h.append([1], [3])
    h.attn.plan(packed)
    q = torch.randn(3, 4, 16, dtype=torch.float64)
    before = h.attn.run(q, 0)
    with pytest.raises(error) as info:
        h.attn.plan(packed, **options)
    assert isinstance(info.value, SeqAttnError)
    assert torch.equal(h.attn.run(q, 0), before)  # the last plan still holds


def test_plan_without_query_lengths():
    h = Harness(page_size=4, seed=18)
    h.append([1], [3])
    with pytest.raises(InvalidLengthError, match="qo_lens"):
        h.attn.plan(h.desc.pack_for_flashinfer([1]))


def test_run_before_plan():
    h = Harness(page_size=4, seed=19)
    h.append([1], [3])
    with pytest.raises(SeqAttnError, match="plan"):
        h.attn.run(torch.zeros(3, 4, 16, dtype=torch.float64), 0)


def test_flashinfer_backend_on_cpu_cache_says_what_is_needed():
    cache = PagedKVCacheManager(8, 4, 2, 64, torch.float16, "cpu")
    with pytest.raises(SeqAttnError) as err:
        PagedAttention(cache, 4, backend="flashinfer")
    message = str(err.value)
    assert "pip install flashinfer" in message or "CUDA" in message, message


def test_triton_backend_on_a_cpu_cache_is_refused_with_what_it_needs():
    cache = PagedKVCacheManager(8, 4, 2, 64, torch.float16, "cpu")
    with pytest.raises(InvalidArgumentError, match="the triton backend needs triton and a CUDA"):
        PagedAttention(cache, 4, backend="triton")
    headwise = HeadwiseKVCache(8, 4, 1, 2, 64, torch.float16, "cpu")
    with pytest.raises(ValueError, match="CUDA cache; the cache is on cpu"):
        HeadwiseAttention(headwise, 4, backend="triton")


def test_a_direct_launch_keys_on_what_triton_specializes() -> None:
    """Triton compiles a variant per tensor dtype and 16-byte alignment and per integer
    value (1 and multiples of 16 are special), never per runtime float: a launch reuses
    a compiled kernel only where all of these match."""
    from seqattn.attention.triton_launch import _key

    flat = torch.zeros(65, dtype=torch.float16)
    aligned, misaligned = flat[:64], flat[1:]

    def options(warps=4, stages=2, fusion=True):
        return dict(num_warps=warps, num_stages=stages, enable_fp_fusion=fusion)

    base = _key((aligned, 16, 0.5), (4, True), options(), 0)
    assert _key((flat[:32], 16, 0.25), (4, True), options(), 0) == base  # another float, same
    others = [
        _key((misaligned, 16, 0.5), (4, True), options(), 0),
        _key((aligned.float(), 16, 0.5), (4, True), options(), 0),
        _key((aligned, 17, 0.5), (4, True), options(), 0),
        _key((aligned, 16, 0.5), (4, False), options(), 0),
        _key((aligned, 16, 0.5), (4, True), options(warps=8), 0),
        _key((aligned, 16, 0.5), (4, True), options(stages=3), 0),
        _key((aligned, 16, 0.5), (4, True), options(fusion=False), 0),
        _key((aligned, 16, 0.5), (4, True), options(), 1),
    ]
    assert all(key != base for key in others)
    assert len(set(others)) == len(others)


def test_a_step_appends_in_the_decode_launch_only_with_one_token_per_sequence() -> None:
    from seqattn.attention.paged_attention import newest_token_each

    desc = CacheDescriptor(PagedKVCacheManager(16, 4, 2, 8, torch.float32, "cpu"))
    desc.allocate([0, 1], [5, 3])
    assert not newest_token_each(desc.pack_for_flashinfer([0, 1], [2, 0]))  # 2 tokens: one each
    assert not newest_token_each(desc.pack_for_flashinfer([0, 1]))  # no append lengths
    assert newest_token_each(desc.pack_for_flashinfer([0, 1], [1, 1]))


def test_backend_selection_and_head_checks():
    cache = PagedKVCacheManager(8, 4, 2, 64, torch.float32, "cpu")
    assert PagedAttention(cache, 4).backend == "torch"  # auto on a CPU cache
    assert PagedAttention(cache, 2, backend="torch").backend == "torch"
    with pytest.raises(SeqAttnError, match="backend"):
        PagedAttention(cache, 4, backend="cuda")
    for heads, error in ((0, ValueError), (3, ValueError), (5, ValueError), (4.0, TypeError)):
        with pytest.raises(error, match="num_qo_heads must be"):
            PagedAttention(cache, heads, backend="torch")
    for bad, error in (({"backend": 7}, TypeError), ({"workspace_bytes": 0}, ValueError),
                       ({"decode_use_tensor_cores": 1}, TypeError),
                       ({"cascade_min_saved_tokens": -1}, ValueError)):  # fmt: skip
        with pytest.raises(error):
            PagedAttention(cache, 4, **bad)


# ------------------------------------------------------------------------ hypothesis
@st.composite
def random_batches(draw):
    ps = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16]))
    group = draw(st.sampled_from([1, 2, 3, 4, 6]))
    batch = draw(st.integers(1, 5))
    prefixes = draw(st.lists(st.integers(0, 2 * ps + 3), min_size=batch, max_size=batch))
    appends = draw(st.lists(st.integers(1, 2 * ps + 2), min_size=batch, max_size=batch))
    kv_lens = [p + a for p, a in zip(prefixes, appends, strict=True)]
    use_qo = draw(st.booleans())
    qo_lens = [draw(st.integers(1, n)) for n in kv_lens] if use_qo else None
    window = draw(st.sampled_from([-1, -1, 0, 1, 2, 5, 40]))
    return {
        "ps": ps,
        "group": group,
        "num_kv_heads": draw(st.integers(1, 2)),
        "layout": draw(st.sampled_from(["NHD", "HND"])),
        "ids": draw(st.lists(st.integers(0, 10**6), min_size=batch, max_size=batch, unique=True)),
        "prefixes": prefixes,
        "appends": appends,
        "qo_lens": qo_lens,
        "options": {
            "causal": draw(st.booleans()),
            "window_left": window,
            "logits_soft_cap": draw(st.sampled_from([None, None, 1.5, 30.0])),
            "sm_scale": draw(st.sampled_from([None, None, 0.05, 1.0])),
        },
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_batches())
def test_random_batches_match_reference(case):
    h = Harness(
        page_size=case["ps"], num_kv_heads=case["num_kv_heads"], group=case["group"],
        head_dim=16, layout=case["layout"], num_pages=128, seed=case["seed"],
    )  # fmt: skip
    ids = case["ids"]
    started = [(i, n) for i, n in zip(ids, case["prefixes"], strict=True) if n > 0]
    if started:
        h.append([i for i, _ in started], [n for _, n in started])
    packed = h.append(ids, case["appends"])
    h.check(packed, ids, case["qo_lens"], q_magnitude=2.0, **case["options"])


@pytest.mark.parametrize(
    "num_qo_heads, num_kv_heads, choice, expected",
    [(32, 8, None, False), (12, 2, None, True), (40, 8, None, True), (8, 8, None, False),
     (32, 8, True, True), (12, 2, False, False)],
)  # fmt: skip
def test_tensor_core_decode_only_where_the_cuda_core_kernel_lacks_the_group_size(
    num_qo_heads, num_kv_heads, choice, expected
):
    from seqattn.attention.flashinfer_backend import decode_tensor_cores

    assert decode_tensor_cores(num_qo_heads, num_kv_heads, choice) is expected


def test_a_hand_built_batch_without_seq_lens_plans_the_same():
    from seqattn import FlashInferPackedData

    cache = PagedKVCacheManager(32, 4, 2, 8, torch.float64, "cpu")
    desc = CacheDescriptor(cache)
    desc.allocate([1, 2], [7, 3])
    packed = desc.pack_for_flashinfer([1, 2], append_lens=[7, 3])
    cache.append_kv(
        torch.randn(10, 2, 8, dtype=torch.float64),
        torch.randn(10, 2, 8, dtype=torch.float64),
        packed,
    )
    by_hand = FlashInferPackedData(
        packed.kv_page_indices, packed.kv_page_indptr, packed.kv_last_page_len,
        append_indptr=packed.append_indptr,
    )  # fmt: skip
    assert by_hand.kv_seq_lens is None
    q = torch.randn(10, 4, 8, dtype=torch.float64)
    attn = PagedAttention(cache, 4, backend="torch")
    attn.plan(packed)
    expected = attn.run(q)
    attn.plan(by_hand)
    assert torch.equal(attn.run(q), expected)
