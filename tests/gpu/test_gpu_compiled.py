"""The compiled steps on CUDA (integrations/compiled.py), on a tiny bf16 Llama: the
compiled prefill and CUDA graphs of the compiled decode against an eager runner, two
compiled decode graphs for every bucket, no host sync in steady steps."""

from __future__ import annotations

import pytest
import torch

from seqattn import MissingDependencyError
from seqattn.engine import Engine, SamplingParams
from seqattn.integrations.hf import PagedCausalLM
from tests.gpu.conftest import flashinfer_or_skip
from tests.gpu.test_gpu_engine import tiny_llama

pytestmark = pytest.mark.gpu


def compiled_runner(
    model: torch.nn.Module, num_pages: int = 128, backend: str = "auto"
) -> PagedCausalLM:
    flashinfer_or_skip()
    torch._dynamo.reset()  # compiled code outlives runners: count this test's graphs
    try:
        return PagedCausalLM(model, num_pages=num_pages, page_size=16, compile=True,
                             backend=backend)  # fmt: skip
    except MissingDependencyError as error:
        pytest.skip(str(error))


@pytest.mark.parametrize("backend", ["auto", "flashinfer"])  # auto: Triton's decode in graphs
def test_compiled_graph_decode_logits_equal_eager_decode(backend: str):
    """The compiled prefill and the compiled decode, replayed from graphs, against an
    eager runner of the same model fed the same steps."""
    model = tiny_llama()
    runner = compiled_runner(model, backend=backend)
    eager_runner = PagedCausalLM(model, num_pages=128, page_size=16, backend=backend)
    assert runner.enable_cuda_graphs((1, 4, 8))
    ids, prompts = [0, 1, 2, 3, 4], [list(range(5 + 7 * i, 25 + 9 * i)) for i in range(5)]
    for r in (runner, eager_runner):
        r.descriptor.allocate(ids, [len(p) for p in prompts])
    prefill = runner.forward(ids, prompts).float()
    torch.testing.assert_close(prefill, eager_runner.forward(ids, prompts).float(),
                               atol=3e-2, rtol=3e-2)  # fmt: skip
    tokens = [7, 8, 9, 10, 11]
    for step in range(24):  # pages fill up and new ones start; buckets 8, 1, 4
        batch = ids if step < 8 else ids[:1] if step < 16 else ids[:3]
        tokens = [*tokens, 7, 8, 9, 10, 11][: len(batch)]  # the batch may grow back
        for r in (runner, eager_runner):
            r.descriptor.allocate_decoding(batch)
        eager = eager_runner.forward(batch, [[t] for t in tokens]).float()
        # bucket 4 (step 16) is captured from the dynamic graph bucket 8 compiled
        with torch._dynamo.config.patch(error_on_recompile=step not in (0, 8)):
            graph = runner.decode(batch, tokens).float()
        again = runner.decode(batch, tokens).float()  # appends the same K/V again
        assert torch.equal(graph, again), "two replays differ"
        torch.testing.assert_close(graph, eager, atol=3e-2, rtol=3e-2)
        tokens = eager.argmax(-1).tolist()
    compiled = runner.compiled
    assert compiled is not None and compiled.compiles == 3  # prefill; decode sizes >= 2, 1
    assert runner.compile_seconds > 0


def test_compiled_engine_generates_like_the_graph_engine():
    model = tiny_llama()
    prompts = [list(range(3 + i, 30 + 5 * i)) for i in range(6)]
    params = SamplingParams(max_new_tokens=16)
    # on transformers' layers, as the compiled forward traces them
    graphs = Engine(PagedCausalLM(model, num_pages=256, page_size=16, fused_layers=False)).generate(
        prompts, params
    )
    compiled = Engine(compiled_runner(model, num_pages=256)).generate(prompts, params)
    same = sum(
        a == b for x, y in zip(graphs, compiled, strict=True) for a, b in zip(x, y, strict=True)
    )
    firsts = sum(x[0] == y[0] for x, y in zip(graphs, compiled, strict=True))
    assert firsts >= 5, f"first tokens (eager prefill, compiled prefill) agree {firsts} of 6"
    assert same >= 0.8 * 6 * 16, f"only {same} of 96 tokens agree"


@pytest.mark.parametrize("graphs", [False, True])
def test_steady_compiled_decode_steps_make_no_host_sync(graphs: bool):
    engine = Engine(compiled_runner(tiny_llama(), num_pages=256), cuda_graphs=graphs)
    ids = [engine.add_request(list(range(3 + i, 40 + i)), SamplingParams(24)) for i in range(6)]
    while any(not engine.requests[i].output for i in ids):
        engine.step()  # prefill, the first decode steps and their compile
    engine.step()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        for _ in range(8):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    while engine.has_work:
        engine.step()
    assert all(len(engine.requests[i].output) == 24 for i in ids)
