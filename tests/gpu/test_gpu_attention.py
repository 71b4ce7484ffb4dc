"""flashinfer backend on CUDA against the torch backend and flashinfer's single-request kernels.

The variant matrix is small on purpose: every dtype / head_dim / feature combination
is a kernel flashinfer compiles on first use (15-110 s each on a fresh machine).
"""

from __future__ import annotations

import pytest
import torch

from seqattn import (
    CacheDescriptor,
    PagedAttention,
    PagedKVCacheManager,
    StaleBatchError,
)
from tests.conftest import read_back
from tests.gpu.conftest import flashinfer_or_skip

pytestmark = pytest.mark.gpu

HQ, HKV, D, PS = 32, 8, 128, 16


class Model:
    """A cache, a descriptor, both attention backends, and random K/V appended per step."""

    def __init__(self, dtype=torch.float16, layout="NHD", num_layers=2, hq=HQ, hkv=HKV, **scales):
        self.cache = PagedKVCacheManager(
            2048, PS, hkv, D, dtype, "cuda", layout, num_layers=num_layers, **scales
        )
        self.desc = CacheDescriptor(self.cache)
        self.hq = hq
        self.q_dtype = torch.float16 if dtype.itemsize == 1 else dtype
        self.flashinfer = PagedAttention(self.cache, hq, backend="flashinfer")
        self.torch = PagedAttention(self.cache, hq, backend="torch")
        self.gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(self, *shape):
        return torch.randn(*shape, device="cuda", generator=self.gen).to(self.q_dtype)

    def step(self, ids, lens, *, decode=False):
        """Allocate and append K/V for every layer; return the packed batch."""
        if decode:
            self.desc.allocate_decoding(ids)
        else:
            self.desc.allocate(ids, lens)
        packed = self.desc.pack_for_flashinfer(ids, append_lens=lens, device="cuda")
        for layer in range(self.cache.num_layers):
            self.cache.append_kv(self.randn(sum(lens), self.cache.num_heads, D),
                                 self.randn(sum(lens), self.cache.num_heads, D), packed,
                                 layer=layer)  # fmt: skip
        return packed

    def compare(self, packed, atol=2e-3, rtol=2e-2, **options):
        """Both backends on every layer; returns flashinfer's last output."""
        nnz = int(packed.append_indptr[-1])
        for attn in (self.flashinfer, self.torch):
            attn.plan(packed, **options)
        for layer in range(self.cache.num_layers):
            q = self.randn(nnz, self.hq, D)
            out, lse = self.flashinfer.run(q, layer, return_lse=True)
            ref, ref_lse = self.torch.run(q, layer, return_lse=True)
            torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
            torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-3)
        return q, out


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_decode_fp16_matches_torch_and_single_decode(layout):
    fi = flashinfer_or_skip()
    m = Model(layout=layout)
    ids = [0, 1, 2, 3, 4]
    m.step(ids, [1, 15, 16, 17, 200])
    packed = m.step(ids, [1] * 5, decode=True)
    assert m.flashinfer.backend == "flashinfer"
    q, out = m.compare(packed)
    host = m.desc.pack_for_flashinfer(ids)
    for row in range(5):  # flashinfer's own single-request kernel on the gathered K/V
        k, v = read_back(m.cache, host, row, layer=1)
        single = fi.single_decode_with_kv_cache(q[row], k, v)
        torch.testing.assert_close(out[row], single, atol=2e-3, rtol=2e-2)


def test_chunked_prefill_and_mixed_batch_fp16_match_torch_and_single_prefill():
    fi = flashinfer_or_skip()
    m = Model()
    ids = [0, 1, 2]
    m.compare(m.step(ids, [100, 16, 33]))
    backend = m.flashinfer.impl
    assert backend._active in backend._prefill.wrappers  # flashinfer's default kernels
    packed = m.step(ids, [37, 1, 64])  # a chunk over a prefix, a decode row, a chunk
    q, out = m.compare(packed)
    assert backend._active in backend._mixed.wrappers and backend._active._backend == "fa2"
    host = m.desc.pack_for_flashinfer(ids)
    k, v = read_back(m.cache, host, 2, layer=1)
    rows = slice(38, 102)
    single = fi.single_prefill_with_kv_cache(q[rows], k, v, causal=True)
    torch.testing.assert_close(out[rows], single, atol=2e-3, rtol=2e-2)
    m.compare(packed, causal=False)


def test_decode_bf16_with_window_and_soft_cap():
    flashinfer_or_skip()
    m = Model(dtype=torch.bfloat16)
    ids = [0, 1, 2]
    m.step(ids, [50, 300, 7])
    packed = m.step(ids, [1, 1, 1], decode=True)
    m.compare(packed, atol=1e-2, rtol=5e-2, window_left=40, logits_soft_cap=5.0, sm_scale=0.05)


def test_decode_fp8_kv_with_scales():
    flashinfer_or_skip()
    m = Model(dtype=torch.float8_e4m3fn, k_scale=0.5, v_scale=2.0)
    ids = [0, 1, 2, 3]
    m.step(ids, [64, 1, 129, 40])
    packed = m.step(ids, [1] * 4, decode=True)
    m.compare(packed, atol=1e-2, rtol=5e-2)


def test_group_size_without_cuda_core_kernel_uses_tensor_cores():
    flashinfer_or_skip()
    m = Model(hq=12, hkv=2)  # group size 6
    ids = [0, 1]
    m.step(ids, [33, 70])
    m.compare(m.step(ids, [1, 1], decode=True))
    decode = m.flashinfer.impl._decode  # its wrappers are made when first planned
    assert decode.wrappers[decode.turn] is m.flashinfer.impl._active
    assert m.flashinfer.impl._active.use_tensor_cores


def graph_setup(backend: str, lens: list[int], buckets: tuple[int, ...]):
    """A Model whose sequences 0.. hold ``lens`` tokens, and a CUDA-graph attention."""
    flashinfer_or_skip()
    if backend == "triton":
        pytest.importorskip("triton", reason="needs triton")
    m = Model()
    ids = list(range(len(lens)))
    m.step(ids, lens)
    return m, ids, PagedAttention(m.cache, HQ, backend=backend, cuda_graph_batch_sizes=buckets)


@pytest.mark.parametrize("packed_on", ["cuda", None])  # None: the host (the runner's way)
@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
def test_cuda_graph_replay_equals_eager(backend, packed_on):
    m, ids, graph_attn = graph_setup(backend, [5 + 31 * i for i in range(6)], (4, 8))
    layers = m.cache.num_layers
    static_q = torch.zeros(8, HQ, D, dtype=torch.float16, device="cuda")
    static_kv = torch.zeros(2, 8, HKV, D, dtype=torch.float16, device="cuda")
    static_out = torch.zeros(layers, 8, HQ, D, dtype=torch.float16, device="cuda")

    def layers_step():
        for layer in range(layers):
            static_out[layer] = graph_attn.forward(static_q, static_kv[0], static_kv[1], layer)

    graph = None
    for _ in range(20):  # 20 steps: several sequences cross a page boundary
        m.desc.allocate_decoding(ids)
        packed = m.desc.pack_for_flashinfer(ids, append_lens=[1] * 6, device=packed_on)
        assert graph_attn.plan(packed, cuda_graph=True) == 8
        positions = packed.kv_seq_lens.tolist()
        assert graph_attn.graph_positions().tolist() == [n - 1 for n in positions] + [0, 0]
        static_q.copy_(m.randn(8, HQ, D))
        static_kv.copy_(m.randn(2, 8, HKV, D))
        if graph is None:
            graph = graph_attn.capture(layers_step)
        graph.replay()
        replayed = static_out[:, :6].clone()  # rows 6, 7 pad the batch: their output is noise
        graph.replay()  # appending the same K/V again changes nothing: a replay is repeatable
        again = static_out[:, :6].clone()
        layers_step()  # the same step eagerly
        diff = (replayed - static_out[:, :6]).abs().amax(dim=(0, 2, 3)).tolist()
        assert torch.equal(replayed, again), "two replays differ"
        assert torch.equal(replayed, static_out[:, :6]), f"replay - eager per row: {diff}"
        m.torch.plan(m.desc.pack_for_flashinfer(ids, append_lens=[1] * 6, device="cuda"))
        for layer in range(layers):
            ref = m.torch.run(static_q[:6], layer)
            torch.testing.assert_close(replayed[layer], ref, atol=2e-3, rtol=2e-2)
    graph_attn.close()
    m.desc.release(ids)
    assert m.cache.available_pages_count == m.cache.num_pages


def test_full_decode_step_with_attention_makes_no_host_sync():
    flashinfer_or_skip()
    m = Model()
    ids = list(range(32))
    m.step(ids, [40 + 9 * i for i in ids])
    q = m.randn(32, HQ, D)
    kv = m.randn(32, HKV, D)

    def step():
        m.desc.allocate_decoding(ids)
        packed = m.desc.pack_for_flashinfer(ids, append_lens=[1] * 32, device="cuda")
        m.flashinfer.plan(packed)
        for layer in range(m.cache.num_layers):
            m.cache.append_kv(kv, kv, packed, layer=layer)
            m.flashinfer.run(q, layer)
        return packed

    for _ in range(4):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            packed = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    m.torch.plan(packed)
    torch.testing.assert_close(m.flashinfer.run(q, 1), m.torch.run(q, 1), atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
def test_a_graph_step_packed_on_the_host_plans_without_a_host_sync(backend):
    """The engine's way: the step packed on the host, its tables and page ids sent up
    by the plan in one pinned copy; nothing waits for the GPU."""
    m, ids, graph_attn = graph_setup(backend, [40 + 9 * i for i in range(5)], (8,))
    q, kv = m.randn(8, HQ, D), m.randn(8, HKV, D)
    outs = []

    def step():
        m.desc.allocate_decoding(ids)
        graph_attn.plan(m.desc.pack_for_flashinfer(ids, append_lens=[1] * 5), cuda_graph=True)
        outs.append(graph_attn.forward(q, kv, kv, 1)[:5])

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    packed = m.desc.pack_for_flashinfer(ids, append_lens=[1] * 5, device="cuda")
    m.torch.plan(packed)
    torch.testing.assert_close(outs[-1], m.torch.run(q[:5], 1), atol=2e-3, rtol=2e-2)
    graph_attn.close()


def test_stale_and_foreign_batches_are_refused_before_any_kernel():
    """On the device path (flashinfer's append, plan, the CUDA-graph planner): a batch
    whose sequence was released and its pages handed to another is refused, and the
    other sequence's K/V stay as written."""
    flashinfer_or_skip()
    m = Model()
    m.step([20], [3])
    stale = m.desc.pack_for_flashinfer([20], append_lens=[3], device="cuda")
    m.desc.release([20])
    m.step([21], [3])  # the same page, now 21's
    before = m.cache.kv_data.clone()
    k = m.randn(3, HKV, D)
    graphs = PagedAttention(m.cache, HQ, backend="flashinfer", cuda_graph_batch_sizes=(1,))
    other = Model()
    other.step([1], [3])
    foreign = other.desc.pack_for_flashinfer([1], append_lens=[3], device="cuda")
    for packed in (stale, foreign):
        with pytest.raises(StaleBatchError):
            m.cache.append_kv(k, k, packed)
        with pytest.raises(StaleBatchError):
            m.flashinfer.plan(packed)
        with pytest.raises(StaleBatchError):
            graphs.plan(packed, cuda_graph=True)
    torch.cuda.synchronize()
    assert torch.equal(m.cache.kv_data, before)
    graphs.close()
