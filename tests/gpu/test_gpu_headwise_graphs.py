"""CUDA-graph head-wise decode steps (``HeadwiseGraphs``) against independent references.

- The buffers directly: a graph of every layer's write + Triton attention, captured
  once and replayed over steps with padding (3 sequences in a bucket of 4) and a
  compression between steps; each replay's new K/V must sit at each head's newest
  token, and its outputs must equal the torch backend's attention over the same cache.
- The Engine on a ``HeadwiseCausalLM`` with graphs: the graphs are used, and its greedy
  tokens equal the same engine's without graphs (the Triton kernel both ways).
The HF runner with graphs against the masked reference is in ``test_gpu_hf_headwise.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqattn.attention.cuda_graph import capture
from seqattn.errors import InvalidLengthError
from seqattn.headwise import HeadwiseAttention, HeadwiseKVCache, SnapKVPress
from seqattn.headwise.graph import HeadwiseGraphs
from tests.gpu.conftest import flashinfer_or_skip

pytestmark = pytest.mark.gpu

L, H, GROUP, D, PS = 3, 2, 4, 64, 16


def compressed_cache(lens: list[int]) -> HeadwiseKVCache:
    rng = np.random.default_rng(0)
    cache = HeadwiseKVCache(4096, PS, L, H, D, torch.float16, "cuda")
    cache.add_sequences(range(len(lens)))
    for layer in range(L):
        for seq, n in enumerate(lens):
            k = torch.randn(n, H, D, dtype=torch.float16, device="cuda")
            cache.append(layer, [seq], k, torch.randn_like(k), [n])
            keep = [np.sort(rng.choice(n, int(rng.integers(1, n + 1)), replace=False))
                    for _ in range(H)]  # fmt: skip
            cache.compress(layer, seq, keep)
    return cache


def newest_kv(cache: HeadwiseKVCache, layer: int, seq: int, head: int) -> torch.Tensor:
    """K and V of the newest token a head holds, ``[2, D]``, read by its page list."""
    pages = cache.descriptor.page_indices((seq * L + layer) * H + head)
    held = int(cache.head_lens(layer, seq)[head])
    return cache.kv_pages[pages[-1], :, (held - 1) % PS]


def test_replayed_steps_write_each_heads_newest_token_and_equal_the_torch_backend() -> None:
    pytest.importorskip("triton")
    ids = [0, 1, 2]
    cache = compressed_cache([40, 130, 17])
    graphs = HeadwiseGraphs(cache, H * GROUP, [2, 4])
    reference = HeadwiseAttention(cache, H * GROUP, backend="torch")
    q = torch.zeros(4, H * GROUP, D, dtype=torch.float16, device="cuda")
    k, v = torch.zeros(2, 4, H, D, dtype=torch.float16, device="cuda").unbind(0)
    outs = torch.zeros(L, 4, H * GROUP, D, dtype=torch.float16, device="cuda")

    def layers() -> None:
        for layer in range(L):
            graphs.write(layer, k, v)
            graphs.run(q, layer, out=outs[layer])

    graph = None
    for step_number in range(6):
        if step_number == 3:  # a press between steps: the next tables differ
            cache.compress(1, 1, [np.arange(0, 60, 3), None])
        step = cache.begin_step(ids, on_device=step_number % 2 == 0)  # either way
        assert graphs.prepare(step) == 4
        for t in (q, k, v):
            t.normal_()
        if graph is None:
            graph = capture(layers)
        graph.replay()
        for layer in range(L):
            for b in ids:
                for h in range(H):
                    written = torch.stack([k[b, h], v[b, h]])
                    assert torch.equal(newest_kv(cache, layer, b, h), written)
            reference.plan(cache.pack(layer, ids))
            want = reference.run(q[:3], layer)
            torch.testing.assert_close(outs[layer, :3], want, atol=2e-3, rtol=2e-3)
    graphs.close()


def test_prepare_refuses_a_prompt_step_and_changes_nothing() -> None:
    pytest.importorskip("triton")
    cache = compressed_cache([20, 9])
    graphs = HeadwiseGraphs(cache, H * GROUP, [2])
    step = cache.begin_step([0, 1], append_lens=[2, 1])
    with pytest.raises(InvalidLengthError, match="one token per sequence"):
        graphs.prepare(step)
    assert cache.versions.unwritten_layers == list(range(L))  # still the caller's to write
    with pytest.raises(InvalidLengthError, match="exceeds the largest"):
        graphs.bucket_for(3)
    kv = torch.zeros(3, H, D, dtype=torch.float16, device="cuda")
    for layer in range(L):
        cache.write(step, layer, kv, kv)
    free = cache.available_pages_count
    graphs.close()
    assert cache.available_pages_count == free + 1  # the scratch page back


def test_engine_with_graphs_uses_them_and_equals_itself_without() -> None:
    pytest.importorskip("triton")
    flashinfer_or_skip()  # the runner's prefill attention is flashinfer's
    from seqattn.engine import Engine, SamplingParams
    from seqattn.integrations.hf_headwise import HeadwiseCausalLM
    from tests.gpu.test_gpu_hf_headwise import tiny_llama

    model = tiny_llama()  # fp16 Llama, GQA 4/2, vocab 256
    prompts = [[(3 * i + 11 * s) % 256 for i in range(n)] for s, n in enumerate((90, 33, 61))]
    params = SamplingParams(max_new_tokens=10)
    outputs = []
    for graphs in (False, True):
        runner = HeadwiseCausalLM(model, num_pages=2048, page_size=16, backend="triton")
        engine = Engine(runner, cuda_graphs=graphs, max_batch_size=4)
        assert engine.cuda_graphs is graphs
        outputs.append(engine.generate(prompts, params, press=SnapKVPress(), budget=0.5))
        if graphs:
            assert runner._graphs is not None and runner._graphs.captured  # replayed
        assert runner.cache.available_pages_count == 2048 - runner.reserved_pages
        runner.disable_cuda_graphs()
    assert outputs[0] == outputs[1]
