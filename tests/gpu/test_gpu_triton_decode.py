"""The Triton decode backend against the torch backend (float32 math over the same
pages), on full paged caches and on head-wise ones."""

from __future__ import annotations

import pytest
import torch

from seqattn import CacheDescriptor, PagedAttention, PagedKVCacheManager
from seqattn.headwise import HeadwiseAttention, HeadwiseKVCache
from tests.gpu.conftest import flashinfer_or_skip

pytestmark = pytest.mark.gpu


def triton_or_skip() -> None:
    flashinfer_or_skip()  # prefill steps fall back to it
    pytest.importorskip("triton", reason="needs triton")


@pytest.mark.parametrize(
    "dtype, layout, kv_heads, group, head_dim, lens, one_launch",
    [
        (torch.float16, "NHD", 8, 4, 128, [1, 15, 16, 17, 700, 3000], False),
        (torch.bfloat16, "HND", 2, 8, 64, [33, 4096], False),
        (torch.float16, "NHD", 4, 1, 256, [5, 64, 65], True),  # one split: rows are short
        (torch.bfloat16, "NHD", 1, 2, 128, [1] * 40 + [5000], False),
        # (request, KV head) pairs past an H200's 132 multiprocessors: one launch; each
        # row of the balanced batch in one split, written directly
        (torch.bfloat16, "NHD", 8, 4, 64, [640] * 40, True),
        # one launch, the long row split and merged by its last split to finish
        (torch.float16, "HND", 8, 2, 128, [7000] + [100] * 39 + [1] * 8, True),
    ],
)
def test_decode_equals_the_torch_backend(
    dtype, layout, kv_heads, group, head_dim, lens, one_launch
) -> None:
    triton_or_skip()
    pages = sum(-(-n // 16) for n in lens) + 4
    cache = PagedKVCacheManager(pages, 16, kv_heads, head_dim, dtype, "cuda", layout,
                                num_layers=2)  # fmt: skip
    cache.kv_data.normal_(generator=torch.Generator("cuda").manual_seed(0))
    desc = CacheDescriptor(cache)
    ids = list(range(len(lens)))
    desc.allocate(ids, lens)
    step = desc.pack_for_flashinfer(ids, [1] * len(ids), device="cuda")
    q = torch.randn(len(ids), kv_heads * group, head_dim, dtype=dtype, device="cuda")
    results = {}
    for backend in ("triton", "torch"):
        attention = PagedAttention(cache, kv_heads * group, backend=backend)
        attention.plan(step, sm_scale=0.07)
        results[backend] = attention.run(q, layer=1, return_lse=True)
        if backend == "triton":
            assert attention.impl._decode.one_launch == one_launch
            # again: a launch leaves its merge counters as it found them
            again = attention.run(q, layer=1, return_lse=True)
            assert all(torch.equal(a, b) for a, b in zip(results[backend], again, strict=True))
    (out, lse), (ref, ref_lse) = results["triton"], results["torch"]
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    "dtype, layout, kv_heads, group, head_dim, lens",
    [
        (torch.float16, "NHD", 4, 4, 128, [1, 15, 16, 17, 300, 2000]),  # two launches
        (torch.bfloat16, "HND", 8, 4, 64, [640] * 40 + [15, 16]),  # one launch
    ],
)
def test_decode_forward_appends_in_its_launch_like_the_torch_backend(
    dtype, layout, kv_heads, group, head_dim, lens
) -> None:
    """PagedAttention.forward on a Triton decode step writes the new K/V in the kernel's
    launch: the cache afterwards is bit-equal to what the cache's own append writes, and
    the output close to the torch backend's, over steps that cross page boundaries."""
    triton_or_skip()
    pages = sum(-(-n // 16) + 1 for n in lens) + 4
    cache = PagedKVCacheManager(pages, 16, kv_heads, head_dim, dtype, "cuda", layout,
                                num_layers=2)  # fmt: skip
    gen = torch.Generator("cuda").manual_seed(2)
    cache.kv_data.normal_(generator=gen)
    desc = CacheDescriptor(cache)
    ids = list(range(len(lens)))
    desc.allocate(ids, lens)
    attention = {b: PagedAttention(cache, kv_heads * group, backend=b) for b in ("triton", "torch")}
    heads = (len(ids), kv_heads, head_dim)
    for _ in range(12):  # rows of 15, 16 and 640 tokens start a page on the way
        desc.allocate_decoding(ids)
        step = desc.pack_for_flashinfer(ids, [1] * len(ids), device="cuda")
        q = torch.randn(len(ids), kv_heads * group, head_dim, generator=gen, device="cuda")
        k, v = torch.randn(2, *heads, generator=gen, device="cuda").to(dtype)
        before = cache.kv_data.clone()
        attention["triton"].plan(step)
        assert attention["triton"]._appending is not None  # appends in the decode launch
        out = attention["triton"].forward(q.to(dtype), k, v, layer=1)
        written = cache.kv_data.clone()
        cache.kv_data.copy_(before)
        attention["torch"].plan(step)
        ref = attention["torch"].forward(q.to(dtype), k, v, layer=1)
        assert torch.equal(cache.kv_data, written), "the kernel wrote other K/V than the append"
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_decode_of_a_misaligned_query_after_aligned_ones() -> None:
    """A query view 2 bytes off 16-byte alignment compiles its own kernel variant; it is
    not launched with the aligned one's (DirectLaunch keys on alignment)."""
    triton_or_skip()
    lens = [100, 37, 900]
    cache = PagedKVCacheManager(80, 16, 2, 64, torch.float16, "cuda", num_layers=1)
    cache.kv_data.normal_(generator=torch.Generator("cuda").manual_seed(3))
    desc = CacheDescriptor(cache)
    desc.allocate([0, 1, 2], lens)
    step = desc.pack_for_flashinfer([0, 1, 2], [1, 1, 1], device="cuda")
    flat = torch.randn(3 * 8 * 64 + 1, dtype=torch.float16, device="cuda")
    aligned, misaligned = flat[:-1].view(3, 8, 64), flat[1:].view(3, 8, 64)  # same strides
    assert misaligned.data_ptr() % 16 != 0
    triton = PagedAttention(cache, 8, backend="triton")
    reference = PagedAttention(cache, 8, backend="torch")
    for attention in (triton, reference):
        attention.plan(step)
    for q in (aligned, aligned, misaligned, misaligned, aligned):
        want = reference.run(q.contiguous(), 0)
        torch.testing.assert_close(triton.run(q, 0).float(), want.float(), atol=2e-3, rtol=2e-3)


def test_prefill_steps_fall_back_to_flashinfer() -> None:
    triton_or_skip()
    cache = PagedKVCacheManager(32, 16, 2, 64, torch.float16, "cuda", num_layers=1)
    cache.kv_data.normal_()
    desc = CacheDescriptor(cache)
    desc.allocate([0, 1], [40, 9])
    step = desc.pack_for_flashinfer([0, 1], [40, 9], device="cuda")
    q = torch.randn(49, 8, 64, dtype=torch.float16, device="cuda")
    outs = []
    for backend in ("triton", "flashinfer"):
        attention = PagedAttention(cache, 8, backend=backend)
        attention.plan(step)
        outs.append(attention.run(q, 0))
    assert torch.equal(outs[0], outs[1])


def test_headwise_decode_on_triton_equals_flashinfer() -> None:
    triton_or_skip()
    cache = HeadwiseKVCache(2048, 16, num_layers=3, num_kv_heads=4, head_dim=128,
                            dtype=torch.float16, device="cuda")  # fmt: skip
    gen = torch.Generator("cuda").manual_seed(1)
    ids, lens = [0, 1, 2], [300, 1000, 37]
    cache.add_sequences(ids)
    for layer in range(3):
        for seq, n in zip(ids, lens, strict=True):
            k, v = torch.randn(2, n, 4, 128, generator=gen, device="cuda").half()
            cache.append(layer, [seq], k, v, [n])
            keep = [torch.arange(0, n, 2 + h + layer) for h in range(4)]  # heads differ
            cache.compress(layer, seq, keep)
    attentions = {b: HeadwiseAttention(cache, 16, backend=b) for b in ("triton", "flashinfer")}
    for _ in range(3):  # decode steps: a token in every layer, each layer its own lengths
        step = cache.begin_step(ids)
        for attention in attentions.values():
            attention.plan_step(step)
        for layer in range(3):
            k, v = torch.randn(2, 3, 4, 128, generator=gen, device="cuda").half()
            cache.write(step, layer, k, v)
            q = torch.randn(3, 16, 128, generator=gen, device="cuda").half()
            got, want = (attentions[b].run(q, layer) for b in ("triton", "flashinfer"))
            torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)
