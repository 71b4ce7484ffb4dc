"""Steps through torch.compile (integrations/compiled.py): float32 greedy tokens equal
transformers' generate and the eager seqattn engine; one compiled graph serves every
decode batch size from 2 up (size 1 is a second), another every prefill step, with no
recompile across steps; the custom op's contract; bad settings are refused unchanged.

Skipped where inductor cannot build CPU kernels (no C++ compiler)."""

from __future__ import annotations

import itertools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from seqattn import (  # noqa: E402
    ArgumentTypeError,
    InvalidArgumentError,
    MissingDependencyError,
    SeqAttnError,
)
from seqattn.engine import Engine, SamplingParams  # noqa: E402
from seqattn.integrations.compiled import (  # noqa: E402
    OP_NAME,
    check_compiler,
    current_step,
)
from seqattn.integrations.hf import PagedCausalLM  # noqa: E402
from seqattn.integrations.hf_attention import StepContext  # noqa: E402
from tests.test_fused_linears import storage_bytes  # noqa: E402
from tests.test_hf_engine import PROMPTS, hf_greedy, tiny_model  # noqa: E402

CPU = torch.device("cpu")


def compiler_or_skip() -> None:
    try:
        check_compiler(CPU)
    except MissingDependencyError as error:
        pytest.skip(f"inductor cannot compile here: {error}")


@pytest.fixture
def fresh_dynamo():
    """Compiled code is cached per code object across runners (a second runner of the
    same model reuses it): start each counting test from none."""
    compiler_or_skip()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_compiled_greedy_tokens_equal_hf_generate_and_the_eager_engine(
    family: str, fresh_dynamo
) -> None:
    """Qwen2 here has a sliding window on one layer of two: two attention variants, each
    planned once per step inside the op."""
    model = tiny_model(family)
    params = SamplingParams(max_new_tokens=12)
    runner = PagedCausalLM(model, num_pages=64, page_size=4, compile=True)
    outputs = Engine(runner).generate(PROMPTS, params)
    eager = Engine(PagedCausalLM(model, num_pages=64, page_size=4)).generate(PROMPTS, params)
    assert outputs == eager
    assert outputs == [hf_greedy(model, p, 12) for p in PROMPTS]
    assert runner.compiled is not None and runner.compiled.compiles == 2  # prefill; batch 4
    assert runner.compile_seconds > 0
    assert runner.cache.available_pages_count == runner.cache.num_pages


def test_one_graph_for_every_batch_size_from_two_and_none_compiled_again(fresh_dynamo) -> None:
    """Prefill steps (any token count, any sequence count from 2) compile one graph;
    decode steps of batch 2..6, repeated, compile one more; batch 1 once more. Each
    compiled step's logits equal an eager runner's on the same step of the same model."""
    model = tiny_model("llama")
    runner = PagedCausalLM(model, num_pages=128, page_size=4, compile=True)
    eager_runner = PagedCausalLM(model, num_pages=128, page_size=4)
    compiled = runner.compiled
    assert compiled is not None

    def both(call: str, ids: list[int], tokens: object) -> torch.Tensor:
        expected = getattr(eager_runner, call)(ids, tokens)
        got = getattr(runner, call)(ids, tokens)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        return got

    ids = list(range(6))
    prompts = [list(range(3 + i, 8 + 3 * i)) for i in ids]
    for r in (runner, eager_runner):
        r.descriptor.allocate(ids, [len(p) for p in prompts])
    tokens = both("forward", ids, prompts).argmax(-1)
    assert compiled.compiles == 1  # prefill: rows and sequences dynamic
    sizes = [3, 5, 2, 6, 4, 3, 1, 2, 1, 6]
    for step, n in enumerate(sizes):
        batch = ids[:n]
        for r in (runner, eager_runner):
            r.descriptor.allocate_decoding(batch)
        may_compile = step == 0 or (n == 1 and 1 not in sizes[:step])  # a recompile raises
        with torch._dynamo.config.patch(error_on_recompile=not may_compile):
            logits = both("decode", batch, tokens[:n])
        tokens = torch.cat([logits.argmax(-1), tokens[n:]])
    assert compiled.compiles == 3  # prefill, batch >= 2 (dynamic) and batch 1
    more = [list(range(40, 40 + k)) for k in (1, 7, 2)]  # prefill of 1, 7 and 2 tokens
    for r in (runner, eager_runner):
        r.descriptor.allocate([10, 11, 12], [len(p) for p in more])
    with torch._dynamo.config.patch(error_on_recompile=True):
        both("forward", [10, 11, 12], more)
    assert compiled.compiles == 3


def test_the_op_appends_and_attends_as_the_eager_path() -> None:
    """Outside a compiled graph the op is a plain call: same output and KV writes as
    PagedAttention.forward; its schema says it writes the cache; its fake gives the
    shape; without a current step, or given a copy of the cache, it refuses."""
    runner = PagedCausalLM(tiny_model("llama"), num_pages=16, page_size=4)
    cache = runner.cache
    runner.descriptor.allocate([0, 1], [5, 3])
    step = runner.descriptor.pack_for_flashinfer([0, 1], [5, 3])
    q, k, v = torch.randn(8, 4, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    op = torch.ops.seqattn.paged_attention
    with pytest.raises(SeqAttnError, match="runs inside PagedCausalLM"):
        op(q, k, v, cache.kv_data, 0, None, 0.25)
    with (
        torch.inference_mode(),
        current_step(StepContext(step, runner.attention_for), cache.kv_data),
    ):
        out = op(q, k, v, cache.kv_data, 1, None, 0.25)
        with pytest.raises(SeqAttnError, match="copy of the KV cache"):
            op(q, k, v, cache.kv_data.clone(), 1, None, 0.25)
    expected = runner.attention_for(-1, 0.25)
    expected.plan(step, sm_scale=0.25)
    torch.testing.assert_close(out, expected.run(q, 1))
    schema = op.default._schema
    assert str(schema.name) == OP_NAME
    writes = [
        a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
    ]
    assert writes == ["kv_cache"]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as fake:
        shaped = op(*(fake.from_tensor(t) for t in (q, k, v, cache.kv_data)), 0, 5, None)
    assert shaped.shape == q.shape and shaped.dtype == q.dtype


def test_bad_compile_settings_are_refused_before_anything_changes() -> None:
    model = tiny_model("llama")
    before = model.config._attn_implementation
    bad = [
        (ArgumentTypeError, {"compile": "yes"}, r"compile must be a bool, got 'yes' \(str\)"),
        (ArgumentTypeError, {"compile": 1}, r"compile must be a bool, got 1 \(int\)"),
        (InvalidArgumentError, {"compile": True, "compile_mode": "reduce-overhead"},
         r"one of \('default', 'max-autotune-no-cudagraphs'\).*got 'reduce-overhead'"),
        (ArgumentTypeError, {"compile_mode": None}, r"compile_mode must be one of .*None"),
    ]  # fmt: skip
    for error, options, message in bad:
        with pytest.raises(error, match=message):
            PagedCausalLM(model, num_pages=8, **options)
        assert model.config._attn_implementation == before  # not switched
    runner = PagedCausalLM(model, num_pages=8)
    with pytest.raises(ArgumentTypeError, match=r"compile must be None or a bool, got 'yes'"):
        Engine(runner, compile="yes")
    with pytest.raises(InvalidArgumentError, match="got 'max-autotune'"):
        runner.enable_compile("max-autotune")
    assert runner.compiled is None
    # no C++ compiler for inductor: refused up front, not at the first decode step
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-compiler++",)}):
        with pytest.raises(MissingDependencyError, match=r"needs a C\+\+ compiler"):
            PagedCausalLM(model, num_pages=8, compile=True)
        with pytest.raises(MissingDependencyError):
            Engine(runner, compile=True)
    assert runner.compiled is None


def test_the_engine_switches_its_runner_and_keeps_it_by_default() -> None:
    compiler_or_skip()
    runner = PagedCausalLM(tiny_model("llama"), num_pages=8, compile=True)
    assert Engine(runner).runner.compiled is not None  # None: as the runner was built
    Engine(runner, compile=False)
    assert runner.compiled is None and runner.compile_seconds == 0.0
    Engine(runner, compile=True)
    assert runner.compiled is not None and runner.compiled.mode == "default"
    runner.enable_compile("max-autotune-no-cudagraphs")
    assert runner.compiled.mode == "max-autotune-no-cudagraphs"


def test_runners_made_one_after_another_each_compile(fresh_dynamo) -> None:
    """Dynamo stops compiling a code object after ``recompile_limit`` variants and runs
    it eagerly: each runner compiles a code object of its own, so a second runner of
    another model (another guard) is compiled too, not silently run eagerly."""
    params = SamplingParams(max_new_tokens=3)
    with torch._dynamo.config.patch(recompile_limit=1):
        for family in ("llama", "qwen3"):
            runner = PagedCausalLM(tiny_model(family), num_pages=64, page_size=4, compile=True)
            Engine(runner).generate(PROMPTS[:2], params)
            compiled = runner.compiled
            assert compiled is not None and compiled.compiles == 2, family  # prefill, decode


def test_projections_on_one_input_are_one_matmul_at_no_memory_cost(fresh_dynamo, tmp_path) -> None:
    """q/k/v and gate/up are stacked in each compiled graph (two per layer per graph):
    the model's own parameters become consecutive views of one buffer per group, with
    the same values, and no byte more is held; the tokens equal the eager engine's
    (the greedy test above); the model still saves and loads back equal, and a second
    runner finds the weights stacked already."""
    model = tiny_model("qwen2")  # q/k/v with biases
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    held = storage_bytes(model)
    runner = PagedCausalLM(model, num_pages=64, page_size=4, compile=True)
    Engine(runner).generate(PROMPTS, SamplingParams(max_new_tokens=3))
    layers = model.config.num_hidden_layers
    assert runner.compiled is not None and runner.compiled.stacked_matmuls == 2 * layers * 2
    assert storage_bytes(model) == held
    for name, p in model.named_parameters():
        assert torch.equal(p, values[name]), name
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for group in ((attention.q_proj, attention.k_proj, attention.v_proj),
                      (mlp.gate_proj, mlp.up_proj)):  # fmt: skip
            for kind in ("weight", "bias") if group[0].bias is not None else ("weight",):
                tensors = [getattr(m, kind) for m in group]
                for before, after in itertools.pairwise(tensors):
                    assert after.data_ptr() == before.data_ptr() + before.nbytes
    saved = tmp_path / "model"
    model.save_pretrained(saved)
    loaded = type(model).from_pretrained(saved)
    for name, p in loaded.named_parameters():
        assert torch.equal(p, values[name]), name
    again = PagedCausalLM(model, num_pages=64, page_size=4, compile=True)
    Engine(again).generate(PROMPTS[:2], SamplingParams(max_new_tokens=3))
    assert again.compiled is not None and again.compiled.stacked_matmuls == 2 * layers * 2
    assert storage_bytes(model) == held


def test_backward_hooks_do_not_break_the_graph_and_stay(fresh_dynamo) -> None:
    """transformers 5.17 gives tensor-parallel Qwen3's q_norm/k_norm a backward hook;
    dynamo breaks a graph at every module that has one. The compiled runner hides them
    while it runs: one graph for prefill, one for decode, no break, same tokens, and
    the hooks are still there afterwards."""
    from torch._dynamo.utils import counters

    model = tiny_model("qwen3")
    hook = lambda *args: None  # noqa: E731
    norms = [layer.self_attn.q_norm for layer in model.model.layers]
    for norm in norms:
        norm.register_full_backward_hook(hook)
    counters.clear()
    params = SamplingParams(max_new_tokens=6)
    runner = PagedCausalLM(model, num_pages=64, page_size=4, compile=True)
    outputs = Engine(runner).generate(PROMPTS, params)
    assert runner.compiled is not None and runner.compiled.compiles == 2
    assert sum(counters["graph_break"].values()) == 0
    assert all(list(norm._backward_hooks.values()) == [hook] for norm in norms)
    eager = PagedCausalLM(model, num_pages=64, page_size=4)
    assert outputs == Engine(eager).generate(PROMPTS, params)
