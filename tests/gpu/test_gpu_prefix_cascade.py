"""Prefix caching and cascade attention on CUDA: flashinfer cascade == flashinfer plain ==
the torch backend, and KV served from the cache == the KV its writer appended."""

from __future__ import annotations

import pytest
import torch

from seqattn import (
    CacheDescriptor,
    PagedAttention,
    PagedKVCacheManager,
)
from tests.conftest import read_back
from tests.gpu.conftest import flashinfer_or_skip

pytestmark = pytest.mark.gpu

HQ, HKV, D, PS = 32, 8, 128, 16


class SharedPrompt:
    """Requests behind one cached system prompt, plus unrelated requests between them."""

    def __init__(self, num_shared: int = 6, system: int = 100, dtype=torch.float16) -> None:
        self.cache = PagedKVCacheManager(512, PS, HKV, D, dtype, "cuda", num_layers=2)
        self.desc = CacheDescriptor(self.cache, prefix_caching=True, check_invariants=True)
        self.gen = torch.Generator(device="cuda").manual_seed(0)
        self.dtype = dtype
        self.written: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer 0 K/V
        prompt = list(range(system))
        for seq in range(num_shared):
            self.prefill(seq, prompt + [1000 + seq] * (seq + 3))
        for seq in (50, 51):  # unrelated: no token in common with anyone
            self.prefill(seq, [seq] * (40 + seq))
        self.ids = [50, 0, 1, 51, *range(2, num_shared)]  # grouped rows not contiguous

    def randn(self, *shape):
        return torch.randn(*shape, device="cuda", generator=self.gen).to(self.dtype)

    def prefill(self, seq: int, prompt: list[int]) -> None:
        cached = self.desc.start_sequence(seq, prompt)
        n = len(prompt) - cached
        self.desc.allocate([seq], [n])
        packed = self.desc.pack_for_flashinfer([seq], append_lens=[n], device="cuda")
        for layer in range(2):
            k, v = self.randn(n, HKV, D), self.randn(n, HKV, D)
            self.cache.append_kv(k, v, packed, layer=layer)
            if layer == 0:
                self.written[seq] = (k, v)
        self.desc.commit([seq])

    def step(self, lens: list[int]):
        self.desc.allocate(self.ids, lens)
        packed = self.desc.pack_for_flashinfer(
            self.ids, append_lens=lens, device="cuda", shared_prefix=True
        )
        for layer in range(2):
            n = sum(lens)
            self.cache.append_kv(self.randn(n, HKV, D), self.randn(n, HKV, D), packed, layer=layer)
        return packed


def test_kv_served_from_the_cache_is_the_writers():
    flashinfer_or_skip()
    s = SharedPrompt()
    stats = s.desc.prefix_stats
    assert stats.hit_tokens == 5 * 96  # 6 full pages of the 100-token prompt, 5 hits
    host = s.desc.pack_for_flashinfer([0, 3])
    k0, v0 = read_back(s.cache, host, 0)
    k3, v3 = read_back(s.cache, host, 1)
    assert torch.equal(k0, s.written[0][0]) and torch.equal(v0, s.written[0][1])
    assert torch.equal(k3[:96], k0[:96]) and torch.equal(v3[:96], v0[:96])
    assert torch.equal(k3[96:], s.written[3][0])  # its own tokens after the hit


@pytest.mark.parametrize("lens", [[1] * 8, [3, 1, 5, 2, 1, 4, 2, 1]], ids=["decode", "prefill"])
def test_flashinfer_cascade_matches_plain_and_torch(lens):
    flashinfer_or_skip()
    s = SharedPrompt()
    packed = s.step(lens)
    fi = PagedAttention(s.cache, HQ, backend="flashinfer", cascade_min_saved_tokens=1)
    ref = PagedAttention(s.cache, HQ, backend="torch")
    q = s.randn(sum(lens), HQ, D)
    ref.plan(packed)
    for layer in range(2):
        fi.plan(packed, cascade=False)
        plain, plain_lse = fi.run(q, layer, return_lse=True)
        fi.plan(packed)
        assert fi.cascade is not None and fi.cascade.shared.kv_lens.tolist() == [96]
        assert not isinstance(fi.cascade.query_rows, slice)
        out, lse = fi.run(q, layer, return_lse=True)
        want, want_lse = ref.run(q, layer, return_lse=True)
        torch.testing.assert_close(out, plain, atol=2e-3, rtol=2e-2)
        torch.testing.assert_close(out, want, atol=2e-3, rtol=2e-2)
        torch.testing.assert_close(lse, want_lse.float(), atol=1e-2, rtol=1e-3)
        torch.testing.assert_close(lse, plain_lse, atol=1e-2, rtol=1e-3)


def test_cuda_graph_cascade_replay_equals_eager():
    flashinfer_or_skip()
    s = SharedPrompt()
    dec = PagedAttention(
        s.cache, HQ, backend="flashinfer", cuda_graph_batch_sizes=(8,), cascade_groups=2
    )
    eager = PagedAttention(s.cache, HQ, backend="flashinfer")
    static_q = torch.zeros(8, HQ, D, dtype=torch.float16, device="cuda")
    static_kv = torch.zeros(2, 8, HKV, D, dtype=torch.float16, device="cuda")
    static_out = torch.zeros(2, 8, HQ, D, dtype=torch.float16, device="cuda")

    def layers_step():
        for layer in range(2):
            static_out[layer] = dec.forward(static_q, static_kv[0], static_kv[1], layer)

    graph, ids = None, list(s.ids)
    for step in range(12):  # pages fill up; at step 6 a row leaves (the bucket pads)
        if step == 6:
            s.desc.release([51])
            ids.remove(51)
        s.desc.allocate_decoding(ids, token_ids=[3] * len(ids))
        packed = s.desc.pack_for_flashinfer(ids, [1] * len(ids), device="cuda", shared_prefix=True)
        assert dec.plan(packed, cuda_graph=True) == 8
        assert dec.cascade is not None and dec.cascade.shared.kv_lens.tolist() == [96]
        static_q.copy_(s.randn(8, HQ, D))
        static_kv.copy_(s.randn(2, 8, HKV, D))
        if graph is None:
            graph = dec.capture(layers_step)
        graph.replay()
        n = len(ids)
        replayed = static_out[:, :n].clone()
        graph.replay()
        assert torch.equal(replayed, static_out[:, :n]), "two replays differ"
        eager.plan(packed, cascade=False)
        for layer in range(2):
            plain = eager.run(static_q[:n], layer)
            torch.testing.assert_close(replayed[layer], plain, atol=2e-3, rtol=2e-2)
        s.desc.commit(ids)
    dec.close()
