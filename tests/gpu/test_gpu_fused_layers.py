"""The fused Llama forward on a GPU: its Triton kernels against transformers' modules on
the same device, and a runner on it against one on transformers' layers."""

from __future__ import annotations

import pytest
import torch

from seqattn.attention.triton_decode import triton_or_none
from seqattn.attention.triton_launch import programmatic
from seqattn.engine import Engine, SamplingParams
from seqattn.integrations.hf import PagedCausalLM
from seqattn.integrations.layer_ops import (
    LINEAR_MAX_ROWS,
    linear,
    on_triton,
    rms_norm,
    rotary_split,
    silu_mul,
)
from tests.gpu.conftest import flashinfer_or_skip

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")
llama = pytest.importorskip("transformers.models.llama.modeling_llama")


def mostly_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """RMSNorm sums its squares in another order than torch's mean: in float32 and
    float16 a normalized value may land a rounding step off, which the weight then
    scales (bf16: about none at these widths)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    exact = (got == want).float().mean().item()
    assert exact > 0.75, f"only {exact:.4f} of the values equal"
    step = torch.finfo(got.dtype).eps
    torch.testing.assert_close(got, want, rtol=4 * step, atol=4 * step)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("rows", "hidden", "heads", "kv_heads", "head_dim"),
                         [(1, 2048, 32, 8, 64), (64, 576, 9, 3, 64), (3000, 640, 4, 1, 80),
                          (37, 4096, 32, 8, 128)])  # fmt: skip
def test_the_kernels_equal_transformers_modules(dtype, rows, hidden, heads, kv_heads, head_dim):
    if triton_or_none() is None:
        pytest.skip("needs triton")
    torch.manual_seed(rows)
    with torch.device("cuda"):
        norm = llama.LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
        norm.weight.data.normal_()
        x, residual = (torch.randn(rows, hidden).to(dtype) for _ in range(2))
        qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim).to(dtype)
        cos, sin = (torch.randn(rows, head_dim).to(dtype) for _ in range(2))
        gate_up = torch.randn(rows, 2 * hidden).to(dtype)
    assert on_triton(x)
    normed, summed = rms_norm(x, norm.weight, 1e-5)
    mostly_equal(normed, norm(x))
    normed, summed = rms_norm(x, norm.weight, 1e-5, residual)
    assert torch.equal(summed, residual + x)
    mostly_equal(normed, norm(residual + x))

    q, k, v = rotary_split(qkv, cos, sin, heads, kv_heads, head_dim)
    as_hf = qkv.view(1, rows, -1, head_dim).transpose(1, 2)
    hq, hk = llama.apply_rotary_pos_emb(as_hf[:, :heads], as_hf[:, heads : heads + kv_heads],
                                        cos[None], sin[None])  # fmt: skip
    assert torch.equal(q, hq[0].transpose(0, 1)) and torch.equal(k, hk[0].transpose(0, 1))
    assert torch.equal(v, as_hf[0, heads + kv_heads :].transpose(0, 1))

    act = transformers.activations.ACT2FN["silu"]
    assert torch.equal(silu_mul(gate_up), act(gate_up[:, :hidden]) * gate_up[:, hidden:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k"), [(3072, 2048), (2048, 5632), (11264, 2048), (100, 72)])
def test_linear_equals_a_float64_product_to_rounding(dtype, n, k):
    """The decode-size GEMM against the float64 product: no further from it than cuBLAS
    (plus one rounding step of the output), with and without a bias, for rows that fill
    its block or not; more rows than it takes go to cuBLAS itself."""
    if triton_or_none() is None or not programmatic(torch.device("cuda")):
        pytest.skip("needs triton and a GPU of compute capability 9.0 or later")
    torch.manual_seed(n + k)
    with torch.device("cuda"):
        weight = (torch.randn(n, k) / k**0.5).to(dtype)
        bias = torch.randn(n).to(dtype)
        for rows in (1, 5, 33, LINEAR_MAX_ROWS):
            x = torch.randn(rows, k).to(dtype)
            for b in (None, bias):
                want = x.double() @ weight.double().t() + (0 if b is None else b.double())
                got = linear(x, weight, b)
                assert got.shape == (rows, n) and got.dtype == dtype
                cublas = torch.nn.functional.linear(x, weight, b)
                slack = (cublas.double() - want).abs().max().item()
                step = torch.finfo(dtype).eps * want.abs().max().item()
                assert (got.double() - want).abs().max().item() <= slack + step
        x = torch.randn(LINEAR_MAX_ROWS + 1, k).to(dtype)
        assert torch.equal(linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))


def test_a_chain_of_dependent_launches_replays_as_it_ran():
    """Sixteen layers of the fused kernels, each launched while the one before still
    runs (programmatic dependent launches, each waiting for the one before), captured
    in a CUDA graph: every replay gives the eager chain's values bit for bit."""
    if triton_or_none() is None or not programmatic(torch.device("cuda")):
        pytest.skip("needs triton and a GPU of compute capability 9.0 or later")
    torch.manual_seed(0)
    hidden, inner, heads, kv_heads, head_dim = 512, 1408, 8, 2, 64
    with torch.device("cuda"):
        qkv_w = torch.randn((heads + 2 * kv_heads) * head_dim, hidden) / hidden**0.5
        o_w, norm_w = torch.randn(hidden, heads * head_dim) / hidden**0.5, torch.rand(hidden)
        gate_up_w = torch.randn(2 * inner, hidden) / hidden**0.5
        down_w = torch.randn(hidden, inner) / inner**0.5
        weights = [w.to(torch.bfloat16) for w in (qkv_w, o_w, norm_w, gate_up_w, down_w)]
        x = torch.randn(48, hidden).to(torch.bfloat16)
        cos, sin = (torch.randn(48, head_dim).to(torch.bfloat16) for _ in range(2))

    def chain() -> torch.Tensor:
        qkv_w, o_w, norm_w, gate_up_w, down_w = weights
        normed, residual = rms_norm(x, norm_w, 1e-5)
        for _ in range(16):
            q, k, v = rotary_split(linear(normed, qkv_w, None), cos, sin, heads, kv_heads,
                                   head_dim)  # fmt: skip
            mixed = q + torch.repeat_interleave(k + v, heads // kv_heads, 1)
            normed, residual = rms_norm(linear(mixed.reshape(48, -1), o_w, None), norm_w,
                                        1e-5, residual)  # fmt: skip
            out = linear(silu_mul(linear(normed, gate_up_w, None)), down_w, None)
            normed, residual = rms_norm(out, norm_w, 1e-5, residual)
        return normed

    want = chain()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain()
    for _ in range(5):
        got.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)


FAMILIES = {
    "llama": ("Llama", {}),
    "mistral": ("Mistral", {"sliding_window": 24}),
    "qwen2": ("Qwen2", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1}),
}


def bf16_llama(seed: int = 0, family: str = "llama"):
    name, extra = FAMILIES[family]
    config = getattr(transformers, f"{name}Config")(
        hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = getattr(transformers, f"{name}ForCausalLM")(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_fused_runner_follows_one_on_transformers_layers(family: str):
    """Eager prompt chunks and decode steps (Triton's decode, flashinfer's prefill and,
    in windowed layers, decode) on the fused forward, against the same model on
    transformers' layers fed the same tokens."""
    flashinfer_or_skip()
    fused, plain = bf16_llama(0, family), bf16_llama(0, family)
    runners = [PagedCausalLM(m, num_pages=128, page_size=16, fused_layers=f)
               for m, f in ((fused, None), (plain, False))]  # fmt: skip
    assert runners[0].fused is not None and runners[1].fused is None
    ids, prompts = [0, 1, 2], [list(range(5 + 7 * i, 40 + 9 * i)) for i in range(3)]
    for runner in runners:
        runner.descriptor.allocate(ids, [len(p) for p in prompts])
    logits = [r.forward(ids, prompts).float() for r in runners]
    for _ in range(24):
        cosine = torch.nn.functional.cosine_similarity(logits[0], logits[1], dim=-1)
        assert cosine.min() > 0.999, cosine
        tokens = logits[1].argmax(-1).tolist()
        for runner in runners:
            runner.descriptor.allocate_decoding(ids)
        logits = [r.decode(ids, tokens).float() for r in runners]


def test_engine_on_fused_layers_with_graphs_generates_like_without():
    flashinfer_or_skip()
    model = bf16_llama(1)
    prompts = [list(range(3 + i, 30 + 5 * i)) for i in range(6)]
    runs = []
    for graphs in (False, True):
        engine = Engine(PagedCausalLM(model, num_pages=256, page_size=16), cuda_graphs=graphs)
        assert engine.runner.fused is not None
        runs.append(engine.generate(prompts, SamplingParams(max_new_tokens=16)))
    same = sum(a == b for x, y in zip(*runs, strict=True) for a, b in zip(x, y, strict=True))
    assert same >= 0.9 * 6 * 16, runs
