"""HeadwiseCausalLM on flashinfer (and with CUDA-graph decode steps, which run the Triton
kernel), each press, against transformers' own masked forward.

A tiny fp16 Llama on CUDA (head_dim 64, GQA 4/2): prompts of different lengths, a press
per request, chunked prefill and a press again during decoding. Every logit row the
runner returns is compared with the masked full-cache reference (SDPA, the same kept
positions); fp16 differs in rounding, so rows must agree closely and the greedy tokens
must equal the reference's argmax wherever its top two logits are not a near tie.
"""

from __future__ import annotations

import pytest
import torch

from seqattn.headwise.press_names import PRESSES, make_press
from seqattn.integrations.hf_headwise import HeadwiseCausalLM
from seqattn.integrations.hf_reference import masked_reference_logits
from tests.gpu.conftest import flashinfer_or_skip
from tests.test_hf_headwise import serve

pytestmark = pytest.mark.gpu


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        return transformers.LlamaForCausalLM(config).to(torch.float16).eval()


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("press", list(PRESSES))
def test_each_press_on_flashinfer_matches_the_masked_reference(press, graphs) -> None:
    flashinfer_or_skip()
    model = tiny_llama()
    runner = HeadwiseCausalLM(model, num_pages=512, page_size=16, backend="flashinfer")
    if graphs:  # decode steps without a press replay a graph (3 sequences, bucket 4)
        pytest.importorskip("triton")
        assert runner.enable_cuda_graphs((1, 2, 4))
    prompts = [[(5 * i + 7 * s) % 256 for i in range(n)] for s, n in enumerate((150, 97, 40))]
    settings = [dict(press=make_press(press), budget=0.4, compress_every=8),
                dict(press=make_press(press), budget=48), {}]  # fmt: skip
    tokens, logits, events = serve(runner, prompts, 12, chunk=64, settings=settings)
    assert [len(e) for e in events] == [2, 1, 0]  # the prompt's end (then every 8 steps)
    checked = 0
    for seq_tokens, seq_logits, seq_events in zip(tokens, logits, events, strict=True):
        ref = masked_reference_logits(model, seq_tokens, seq_events).float()
        for position, row in seq_logits.items():
            torch.testing.assert_close(row.float(), ref[position], atol=3e-2, rtol=3e-2)
            if position + 1 < len(seq_tokens) and position + 1 >= len(seq_tokens) - 12:
                top2 = ref[position].topk(2).values
                if top2[0] - top2[1] > 5e-2:  # not a near tie in fp16
                    assert int(ref[position].argmax()) == seq_tokens[position + 1]
                    checked += 1
    assert checked >= 8
    if graphs:
        assert runner._graphs is not None and 4 in runner._graphs.captured
    runner.release([0, 1, 2])
    assert runner.cache.available_pages_count == 512 - runner.reserved_pages
