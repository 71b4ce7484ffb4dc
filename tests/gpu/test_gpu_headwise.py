"""Head-wise caches on flashinfer against the torch backend and the masked dense reference.

Same scenario as tests/test_headwise.py on a CUDA cache: prefill, per-head compression
(some heads keep nothing, some everything), decode and chunked prefill over compressed
heads, and another round, through the per-layer API (``append`` + ``plan``) and the
step API (``begin_step`` + ``plan_step``, then ``write`` + ``run`` per layer: one upload
of every layer's index arrays, mixed lengths gathered on the GPU). flashinfer's output
(CUDA-core decode, and tensor-core decode where asked) must match both the torch backend
on the same pages and ``dense_reference`` (float64, full history, per-head keep masks by
true position) to fp16 / bf16 tolerance. Kept small: every dtype / group size / kernel
kind is a kernel flashinfer compiles on first use.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqattn.headwise import HeadwiseAttention, HeadwiseKVCache
from tests.gpu.conftest import flashinfer_or_skip
from tests.test_headwise import dense_reference

pytestmark = pytest.mark.gpu

D, PS, LAYERS = 128, 16, 2
TOL = {torch.float16: (2e-3, 2e-2), torch.bfloat16: (2e-2, 2e-2)}


class GpuModel:
    """A CUDA head-wise cache, both backends, and the full history with keep masks."""

    def __init__(
        self, dtype: torch.dtype, hq: int, hkv: int, seed: int = 0, tensor_cores: bool = False
    ) -> None:
        self.cache = HeadwiseKVCache(4096, PS, LAYERS, hkv, D, dtype, "cuda", check_invariants=True)
        self.flashinfer = HeadwiseAttention(self.cache, hq, backend="flashinfer")
        self.torch = HeadwiseAttention(self.cache, hq, backend="torch")
        self.attentions = [self.flashinfer]
        if tensor_cores:  # flashinfer's tensor-core decode kernel, for decode steps
            options = dict(backend="flashinfer", decode_use_tensor_cores=True)
            self.attentions.append(HeadwiseAttention(self.cache, hq, **options))
        self.dtype, self.hq, self.hkv = dtype, hq, hkv
        self.gen = torch.Generator(device="cuda").manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.history: dict[tuple[int, int], list[torch.Tensor]] = {}  # k, v, mask on the CPU

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device="cuda").to(self.dtype)

    def add(self, ids: list[int]) -> None:
        self.cache.add_sequences(ids)
        empty = torch.zeros(0, self.hkv, D, dtype=torch.float64)
        for seq in ids:
            for layer in range(LAYERS):
                mask = torch.zeros(self.hkv, 0, dtype=torch.bool)
                self.history[seq, layer] = [empty, empty, mask]

    def step(self, ids: list[int], lens: list[int], *, check: bool = True, api: str) -> None:
        """Append to every layer, per layer (``api="layer"``) or as one step (``"step"``);
        with ``check``, attend and compare every layer both ways."""
        step = None
        if api == "step":
            step = self.cache.begin_step(ids, lens)
            if check:
                for attention in (*self.attentions, self.torch):
                    attention.plan_step(step)
        for layer in range(LAYERS):
            k, v = self.randn(sum(lens), self.hkv, D), self.randn(sum(lens), self.hkv, D)
            if step is None:
                batch = self.cache.append(layer, ids, k, v, lens)
                if check:
                    for attention in (*self.attentions, self.torch):
                        attention.plan(batch)
            else:
                self.cache.write(step, layer, k, v)
            self._record(layer, ids, lens, k, v)
            if check:
                self._compare(layer, ids, lens)

    def _record(self, layer, ids, lens, k, v) -> None:
        start = 0
        for seq, n in zip(ids, lens, strict=True):
            keys, values, mask = self.history[seq, layer]
            rows = slice(start, start + n)
            self.history[seq, layer] = [
                torch.cat([keys, k[rows].double().cpu()]),
                torch.cat([values, v[rows].double().cpu()]),
                torch.cat([mask, torch.ones(self.hkv, n, dtype=torch.bool)], dim=1),
            ]
            start += n

    def _compare(self, layer, ids, lens) -> None:
        q = self.randn(sum(lens), self.hq, D)
        ref, ref_lse = self.torch.run(q, layer, return_lse=True)
        atol, rtol = TOL[self.dtype]
        for attention in self.attentions:
            out, lse = attention.run(q, layer, return_lse=True)
            torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
            torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-3)
            start = 0
            for seq, n in zip(ids, lens, strict=True):
                keys, values, mask = self.history[seq, layer]
                rows = slice(start, start + n)
                dense, dense_lse = dense_reference(q[rows].cpu(), keys, values, mask)
                torch.testing.assert_close(out[rows].double().cpu(), dense, atol=atol, rtol=rtol)
                torch.testing.assert_close(
                    lse[rows].double().cpu(), dense_lse, atol=1e-2, rtol=1e-3
                )
                start += n
        buffer = torch.empty_like(q)  # the decode path writes straight into out
        assert self.flashinfer.run(q, layer, out=buffer) is buffer
        torch.testing.assert_close(buffer, ref, atol=atol, rtol=rtol)

    def compress_all(self, ids: list[int]) -> None:
        """Random per-head keeps (none, all, or a random subset) in every layer."""
        for layer in range(LAYERS):
            for seq in ids:
                keep = []
                for n in self.cache.head_lens(layer, seq).tolist():
                    mode = min(int(self.rng.integers(0, 4)), 2)
                    size = (0, n, int(self.rng.integers(0, n + 1)))[mode]
                    keep.append(np.sort(self.rng.choice(n, size=size, replace=False)))
                self.cache.compress(layer, seq, keep)
                mask = self.history[seq, layer][2]
                for h, kept in enumerate(keep):
                    held = torch.nonzero(mask[h]).squeeze(1)
                    mask[h] = False
                    mask[h, held[torch.as_tensor(kept, dtype=torch.long)]] = True
                for h in range(self.hkv):
                    expected = torch.nonzero(mask[h]).squeeze(1).tolist()
                    assert self.cache.head_positions(layer, seq, h).tolist() == expected


@pytest.mark.parametrize("api", ["layer", "step"])
def test_gqa_fp16_prefill_compress_decode_matches_dense(api):
    flashinfer_or_skip()
    m = GpuModel(torch.float16, hq=32, hkv=8, tensor_cores=api == "step")
    assert m.flashinfer.backend == "flashinfer"
    ids = [0, 1, 2]
    m.add(ids)
    m.step(ids, [17, 200, 1], api=api)  # prefill kernel, page boundaries, mixed lengths
    for round_ in range(2):
        m.compress_all(ids)
        m.step(ids, [1, 1, 1], api=api)  # decode kernels over compressed heads
        m.step(ids, [1, 1, 1], api=api)
        m.step(ids, [PS, 3, PS + 1 + round_], api=api)  # chunk: causal over the kept tokens
        m.step(ids, [4, 4, 4], api=api)  # equal lengths: one transpose, no gather
    m.step(ids, [1, 1, 1], api=api)
    m.step(ids, [5, 0, 2], check=False, api=api)  # a sequence without new tokens
    m.step(ids, [1, 1, 1], api=api)
    in_pool = (4096 - m.cache.available_pages_count) * m.cache.page_bytes
    assert m.cache.memory_bytes() == in_pool < m.cache.full_cache_bytes()  # compressed
    m.cache.release(ids)
    assert m.cache.available_pages_count == 4096


def test_mha_bf16_decode_after_compression_matches_dense():
    flashinfer_or_skip()
    m = GpuModel(torch.bfloat16, hq=8, hkv=8, seed=1)
    ids = [5, 7]
    m.add(ids)
    m.step(ids, [300, 33], check=False, api="step")  # decode kernels only: one variant
    m.compress_all(ids)
    for api in ("step", "layer", "step"):
        m.step(ids, [1, 1], api=api)
    m.compress_all(ids)
    m.step(ids, [1, 1], api="step")
