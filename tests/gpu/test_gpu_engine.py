"""The engine's CUDA-graph decode against its eager decode, on a tiny bf16 Llama."""

from __future__ import annotations

import pytest
import torch

from seqattn.attention.triton_decode import triton_or_none
from seqattn.engine import Engine, SamplingParams
from seqattn.integrations.hf import PagedCausalLM
from tests.gpu.conftest import flashinfer_or_skip

pytestmark = pytest.mark.gpu


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("backend", ["flashinfer", "auto"])
def test_graph_decode_logits_equal_eager_decode(backend: str):
    flashinfer_or_skip()
    runner = PagedCausalLM(tiny_llama(), num_pages=128, page_size=16, backend=backend)
    assert runner.enable_cuda_graphs((4, 8))
    graphs = runner._graphs.attention.graphs
    triton = backend == "auto" and triton_or_none() is not None  # auto: Triton's decode
    assert all((b.wrapper is None) == triton for b in graphs._buckets.values())
    ids, prompts = [0, 1, 2, 3, 4], [list(range(5 + 7 * i, 25 + 9 * i)) for i in range(5)]
    runner.descriptor.allocate(ids, [len(p) for p in prompts])
    runner.forward(ids, prompts)
    tokens = [7, 8, 9, 10, 11]
    for _ in range(20):  # pages fill up and new ones start
        runner.descriptor.allocate_decoding(ids)
        eager = runner.forward(ids, [[t] for t in tokens]).float()
        graph = runner.decode(ids, tokens).float()  # appends the same K/V again
        again = runner.decode(ids, tokens).float()
        assert torch.equal(graph, again), "two replays differ"
        torch.testing.assert_close(graph, eager, atol=3e-2, rtol=3e-2)
        tokens = eager.argmax(-1).tolist()


def test_engine_with_graphs_generates_like_the_eager_engine():
    flashinfer_or_skip()
    model = tiny_llama()
    prompts = [list(range(3 + i, 30 + 5 * i)) for i in range(6)]
    params = SamplingParams(max_new_tokens=16)
    runs = []
    for graphs in (False, True):
        engine = Engine(PagedCausalLM(model, num_pages=256, page_size=16), cuda_graphs=graphs)
        assert engine.cuda_graphs == graphs
        runs.append(engine.generate(prompts, params))
    same = sum(a == b for x, y in zip(*runs, strict=True) for a, b in zip(x, y, strict=True))
    assert [o[0] for o in runs[0]] == [o[0] for o in runs[1]]  # first tokens: same prefill
    assert same >= 0.8 * 6 * 16, f"only {same} of 96 tokens agree"


@pytest.mark.parametrize("graphs, backend", [(False, "auto"), (True, "auto"), (True, "flashinfer")])
def test_steady_decode_steps_make_no_host_sync(graphs: bool, backend: str):
    flashinfer_or_skip()
    runner = PagedCausalLM(tiny_llama(), num_pages=256, page_size=16, backend=backend)
    engine = Engine(runner, cuda_graphs=graphs)
    ids = [engine.add_request(list(range(3 + i, 40 + i)), SamplingParams(24)) for i in range(6)]
    while any(not engine.requests[i].output for i in ids):
        engine.step()  # prefill (reads tokens on the host), first decode steps
    engine.step()
    ahead = engine.stats.decoded_ahead
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        for _ in range(8):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.stats.decoded_ahead == ahead + 8
    while engine.has_work:
        engine.step()
    assert all(len(engine.requests[i].output) == 24 for i in ids)


def test_enabling_graphs_again_never_replays_graphs_of_old_buffers():
    flashinfer_or_skip()
    runner = PagedCausalLM(tiny_llama(), num_pages=64, page_size=16)
    free = runner.cache.available_pages_count
    assert runner.enable_cuda_graphs((4, 8))
    first = runner._graphs
    assert runner.enable_cuda_graphs((8, 4)) and runner._graphs is first  # same buckets
    runner.descriptor.allocate([0], [3])
    runner.forward([0], [[5, 6, 7]])
    runner.descriptor.allocate_decoding([0])
    runner.decode([0], [8])
    assert first.captured
    assert runner.enable_cuda_graphs((2, 16))  # new buckets: the old graphs go
    assert runner._graphs is not first and not first.captured
    Engine(runner, cuda_graphs=False)  # turns them off
    assert runner._graphs is None and runner.graph_batch_limit() == 0
    runner.descriptor.release([0])
    assert runner.cache.available_pages_count == free  # every scratch page given back


def test_without_flashinfer_the_engine_decodes_eagerly_on_torch(monkeypatch):
    """backend="auto" on a CUDA machine where flashinfer does not import: attention runs
    on torch and graphs stay off (the engine once asked for flashinfer's graphs there)."""
    import seqattn.attention.paged_attention as paged
    import seqattn.integrations.hf as hf

    monkeypatch.setattr(hf, "flashinfer_or_none", lambda: None)
    monkeypatch.setattr(paged, "flashinfer_or_none", lambda: None)
    runner = PagedCausalLM(tiny_llama(), num_pages=64, page_size=16)
    engine = Engine(runner, max_batch_size=4)
    assert not engine.cuda_graphs and runner.attention_for(-1, None).backend == "torch"
    outputs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=4))
    assert [len(o) for o in outputs] == [4, 4]
