"""The fused Llama forward (``fused_layers``): its operations equal transformers' modules
bit for bit (the torch path; the Triton kernels are checked against it on a GPU), a
runner on it gives transformers' logits and greedy tokens, hooks send a step back to
transformers' forward, and what it cannot serve is refused before anything changes."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.llama import modeling_llama as llama  # noqa: E402

from seqattn import ArgumentTypeError, InvalidArgumentError, SeqAttnError  # noqa: E402
from seqattn.engine import Engine, SamplingParams  # noqa: E402
from seqattn.integrations.hf import PagedCausalLM  # noqa: E402
from seqattn.integrations.hf_fused import FusedLlama  # noqa: E402
from seqattn.integrations.layer_ops import (  # noqa: E402
    linear,
    linear_blocks,
    rms_norm,
    rotary_split,
    silu_mul,
)
from tests.test_hf_engine import PROMPTS, hf_greedy, tiny_model  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_operations_equal_transformers_modules_bit_for_bit(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    rows, hidden, heads, kv_heads, head_dim = 7, 48, 4, 2, 12
    norm = llama.LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    norm.weight.data.normal_()
    x, residual = (torch.randn(rows, hidden).to(dtype) for _ in range(2))
    normed, summed = rms_norm(x, norm.weight, 1e-5)
    assert torch.equal(normed, norm(x)) and summed is x
    normed, summed = rms_norm(x, norm.weight, 1e-5, residual)
    assert torch.equal(summed, residual + x) and torch.equal(normed, norm(residual + x))

    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim).to(dtype)
    cos, sin = torch.randn(rows, head_dim).to(dtype), torch.randn(rows, head_dim).to(dtype)
    q, k, v = rotary_split(qkv, cos, sin, heads, kv_heads, head_dim)
    as_hf = qkv.view(1, rows, -1, head_dim).transpose(1, 2)  # [1, heads, rows, head_dim]
    hq, hk = llama.apply_rotary_pos_emb(as_hf[:, :heads], as_hf[:, heads : heads + kv_heads],
                                        cos[None], sin[None])  # fmt: skip
    assert torch.equal(q, hq[0].transpose(0, 1)) and torch.equal(k, hk[0].transpose(0, 1))
    assert torch.equal(v, as_hf[0, heads + kv_heads :].transpose(0, 1)) and v.is_contiguous()

    gate_up = torch.randn(rows, 2 * hidden).to(dtype)
    act = transformers.activations.ACT2FN["silu"]
    assert torch.equal(silu_mul(gate_up), act(gate_up[:, :hidden]) * gate_up[:, hidden:])

    weight, bias = torch.randn(10, hidden).to(dtype), torch.randn(10).to(dtype)
    for b in (None, bias):  # the CPU's is torch's own
        assert torch.equal(linear(x, weight, b), torch.nn.functional.linear(x, weight, b))


def test_the_gemm_blocks_give_most_multiprocessors_a_program() -> None:
    """An H200's 132 multiprocessors and a 0.85B Llama's projections (the blocks an
    H200 run measured best); the narrowest block is 16 outputs, the widest 128."""
    assert [linear_blocks(n, 132)[:2] for n in (3072, 2048, 11264, 32000, 8)] == [
        (32, 128), (16, 256), (128, 128), (128, 128), (16, 256)
    ]  # fmt: skip
    for n in range(1, 40_000, 997):
        block_n = linear_blocks(n, 132)[0]
        assert block_n == 16 or -(-n // block_n) * 3 >= 132 * 2


FUSED_FAMILIES = ["llama", "mistral", "qwen2"]  # qwen2: q/k/v biases; both: windows


def runner_pair(family: str = "llama", **options) -> tuple[PagedCausalLM, PagedCausalLM]:
    """The same tiny model twice: on the fused forward and on transformers'."""
    fused, plain = tiny_model(family), tiny_model(family)
    return tuple(
        PagedCausalLM(model, num_pages=64, page_size=4, fused_layers=on, **options)
        for model, on in ((fused, True), (plain, False))
    )


def same_steps(runners, call) -> list[torch.Tensor]:
    return [call(runner) for runner in runners]


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_a_fused_runner_gives_transformers_logits_through_prefill_decode_and_mixed_steps(
    family: str,
) -> None:
    runners = runner_pair(family)
    assert runners[0].fused is not None and runners[1].fused is None
    for runner in runners:
        runner.descriptor.allocate([0, 1, 2], [5, 3, 4])
    first = same_steps(runners, lambda r: r.forward([0, 1], [[1, 2, 3, 4, 5], [6, 7, 8]]))
    second = same_steps(runners, lambda r: r.forward([2], [[9, 10, 11, 12]]))
    for runner in runners:
        runner.descriptor.allocate_decoding([0, 1, 2])
    decoded = same_steps(runners, lambda r: r.decode([0, 1, 2], [13, 14, 15]))
    for runner in runners:
        runner.descriptor.allocate_decoding([0])
        runner.descriptor.allocate([1], [2])
    fed = torch.tensor([16])
    mixed = same_steps(runners, lambda r: r.forward([0, 1], [[17, 18]], fed=fed))
    for a, b in (first, second, decoded, mixed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runners[0].cache.kv_data, runners[1].cache.kv_data,
                               rtol=1e-5, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_an_engine_on_fused_layers_generates_transformers_greedy_tokens(family: str) -> None:
    model = tiny_model(family)
    runner = PagedCausalLM(model, num_pages=64, page_size=4, fused_layers=True)
    engine = Engine(runner, max_step_tokens=6)  # chunked prompts beside decode rows
    system = list(range(40, 57))
    prompts = [*PROMPTS, [*system, 1, 2], [*system, 3]]  # the last two share cached pages
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=10))
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == hf_greedy(model, prompt, 10), prompt


def test_a_step_while_a_module_has_a_hook_runs_transformers_forward() -> None:
    runners = runner_pair()
    calls = []
    handle = runners[0].model.model.layers[1].mlp.register_forward_hook(lambda *_: calls.append(1))
    assert not runners[0].fused.usable()
    for runner in runners:
        runner.descriptor.allocate([0], [4])
    hooked = same_steps(runners, lambda r: r.forward([0], [[1, 2, 3, 4]]))
    assert calls == [1]
    torch.testing.assert_close(hooked[0], hooked[1], rtol=1e-5, atol=1e-6)
    handle.remove()
    assert runners[0].fused.usable()
    for runner in runners:
        runner.descriptor.allocate_decoding([0])
    unhooked = same_steps(runners, lambda r: r.decode([0], [5]))
    assert calls == [1]
    torch.testing.assert_close(unhooked[0], unhooked[1], rtol=1e-5, atol=1e-6)
    runners[0].model.train()
    assert not runners[0].fused.usable()


class OwnMLP(llama.LlamaMLP):
    """A subclass may compute something else: not served."""


@pytest.mark.parametrize(
    ("make", "options", "error", "message"),
    [
        (lambda: tiny_model("qwen3"), {"fused_layers": True}, InvalidArgumentError,
         "fused_layers=True needs a transformers Llama, Mistral or Qwen2 causal LM "
         ".got Qwen3ForCausalLM"),
        (lambda: own_mlp(), {"fused_layers": True}, InvalidArgumentError,
         "transformers' LlamaMLP .got OwnMLP"),
        (lambda: tiny_model("llama"), {"fused_layers": 1}, ArgumentTypeError,
         r"fused_layers must be None or a bool, got 1 \(int\)"),
        (lambda: tiny_model("llama"), {"fused_layers": "yes"}, ArgumentTypeError,
         "fused_layers must be None or a bool, got 'yes'"),
    ],
)  # fmt: skip
def test_what_the_fused_forward_cannot_serve_is_refused_before_anything_changes(
    make, options, error, message
) -> None:
    model = make()
    before = (model.config._attn_implementation,
              [p.data_ptr() for p in model.parameters()])  # fmt: skip
    with pytest.raises(error, match=message):
        PagedCausalLM(model, num_pages=8, **options)
    assert (model.config._attn_implementation,
            [p.data_ptr() for p in model.parameters()]) == before  # fmt: skip


def own_mlp() -> torch.nn.Module:
    model = tiny_model("llama")
    layer = model.model.layers[0]
    own = OwnMLP(model.config)
    own.load_state_dict(layer.mlp.state_dict())
    layer.mlp = own
    return model


def test_by_default_the_cpu_runs_transformers_forward_and_other_families_too() -> None:
    assert PagedCausalLM(tiny_model("llama"), num_pages=8).fused is None  # no Triton here
    assert PagedCausalLM(tiny_model("qwen3"), num_pages=8, fused_layers=False).fused is None
    assert FusedLlama.refusal(tiny_model("llama")) is None


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_weights_moved_after_the_runner_was_built_raise_before_the_cache_changes(which):
    runner = runner_pair("qwen2")[0]  # q/k/v biases: stacked too
    runner.descriptor.allocate([0], [3])
    proj = runner.model.model.layers[1].self_attn.k_proj
    moved = getattr(proj, which)
    moved.data = moved.data.clone()  # no longer a view of the stacked tensor
    kv = runner.cache.kv_data.clone()
    with pytest.raises(SeqAttnError, match="weights moved since its runner was built"):
        runner.forward([0], [[1, 2, 3]])
    assert torch.equal(runner.cache.kv_data, kv)
