"""HeadwiseCausalLM against transformers' own forward.

The reference is the HF model's full forward over each whole sequence (prompt and
generated tokens), its eager attention given per layer a per-head mask that hides, from
every query after a compression, the positions that KV head dropped at that compression
(the kept positions the runner reports in ``last_compressed`` / ``held_positions``).
Tokens and logits must agree, so the cache mechanics are checked: pages, positions,
RoPE, which K/V each head reads, and the queries a press is handed. Without
compression, tokens equal HF ``generate``.
"""

from __future__ import annotations

import copy
import sys
from typing import Optional

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from seqattn.headwise.press import Press, PressInput, StreamingLLMPress  # noqa: E402
from seqattn.integrations.hf_headwise import HeadwiseCausalLM  # noqa: E402
from seqattn.page_table import pages_for  # noqa: E402

VOCAB, PS = 96, 4
COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=VOCAB)  # fmt: skip


def llama(layers: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=layers, **COMMON)
    return transformers.LlamaForCausalLM(config).eval()


def qwen3(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(1)
    config = transformers.Qwen3Config(num_hidden_layers=layers, **COMMON)
    return transformers.Qwen3ForCausalLM(config).eval()


MODELS = {"llama": llama, "qwen3": qwen3}


class ScoredPress(Press):
    """A score-based press for the tests: each head keeps its newest ``window`` tokens
    and the held tokens whose keys best match the mean window query of its query heads
    (so heads keep different tokens); layers get budgets ``t + 1, t, t - 1, ...``
    (PyramidKV-like). It records what it was handed."""

    window = 3

    def __init__(self) -> None:
        self.seen: list[PressInput] = []

    def layer_budget(self, layer: int, num_layers: int, tokens_per_head: int) -> int:
        return max(self.window, tokens_per_head + 1 - layer)

    def select(self, view: PressInput, budget: int) -> list[np.ndarray]:
        self.seen.append(view)
        assert view.queries is not None
        group = view.queries.shape[1] // len(view.positions)
        keep = []
        for h, n in enumerate(view.lens.tolist()):
            if n <= budget:
                keep.append(np.arange(n))
                continue
            query = view.queries[:, h * group : (h + 1) * group].float().mean((0, 1))
            scores = view.keys[h, :n].float() @ query
            scores[n - self.window :] = float("inf")  # the window always stays
            top = torch.topk(scores, budget).indices.sort().values
            keep.append(top.numpy().astype(np.int64))
        return keep


class Reference:
    """HF eager attention over whole sequences, per-layer per-head masks from the
    compressions the runner reported; also keeps each layer's rotated queries."""

    name = "test_headwise_reference"

    def __init__(self, model: torch.nn.Module) -> None:
        transformers.AttentionInterface.register(self.name, self._attention)
        self.model = copy.deepcopy(model)
        self.model.set_attn_implementation(self.name)
        self.queries: dict[int, torch.Tensor] = {}  # layer -> [T, num_qo_heads, head_dim]

    def _attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0,
                   test_masks=None, **kwargs):  # fmt: skip
        self.queries[module.layer_idx] = query[0].transpose(0, 1)
        eager = sys.modules[type(module).__module__].eager_attention_forward
        mask = test_masks[module.layer_idx]
        return eager(module, query, key, value, mask, scaling=scaling, dropout=dropout)

    def logits(self, tokens: list[int], events: list[tuple[int, list]]) -> torch.Tensor:
        """``[len(tokens), vocab]``: position p sees j <= p, less what a compression at
        logical length ``L <= p`` dropped below L (``events``: (L, held[layer][head]))."""
        config = self.model.config
        n, heads = len(tokens), config.num_key_value_heads
        group = config.num_attention_heads // heads
        visible = torch.ones(config.num_hidden_layers, heads, n, n).tril().bool()
        for length, held in events:
            for layer, per_head in enumerate(held):
                for h, kept in enumerate(per_head):
                    dropped = np.setdiff1d(np.arange(length), kept)
                    visible[layer, h, length:, torch.from_numpy(dropped)] = False
        masks = [
            torch.zeros(1, heads * group, n, n).masked_fill(
                ~v.repeat_interleave(group, 0)[None], torch.finfo(torch.float32).min
            )
            for v in visible
        ]
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([tokens]), test_masks=masks, use_cache=False)
        return out.logits[0]


def serve(
    runner: HeadwiseCausalLM,
    prompts: list[list[int]],
    new_tokens: int,
    *,
    chunk: Optional[int] = None,
    settings: Optional[list[dict]] = None,
) -> tuple[list[list[int]], list[dict[int, torch.Tensor]], list[list]]:
    """Greedy generation: prefill (in chunks of ``chunk`` tokens, the batch shrinking as
    prompts end), then decode. Returns per sequence its tokens (prompt and output), its
    logits by position of the token they follow, and its compressions (length, held)."""
    ids = list(range(len(prompts)))
    for seq_id in ids:
        runner.add_sequences([seq_id], **(settings[seq_id] if settings else {}))
    tokens = [list(p) for p in prompts]
    logits: list[dict[int, torch.Tensor]] = [{} for _ in ids]
    events: list[list] = [[] for _ in ids]

    def record(batch: list[int], out: torch.Tensor) -> None:
        for row, seq_id in enumerate(batch):
            logits[seq_id][runner.seq_len(seq_id) - 1] = out[row]
        for seq_id in runner.last_compressed:
            events[seq_id].append((runner.seq_len(seq_id), runner.held_positions(seq_id)))

    done = [0] * len(ids)
    while any(d < len(p) for d, p in zip(done, prompts, strict=True)):
        batch = [s for s in ids if done[s] < len(prompts[s])]
        step = {s: (chunk or len(prompts[s])) for s in batch}
        rows = [prompts[s][done[s] : done[s] + step[s]] for s in batch]
        for s, row in zip(batch, rows, strict=True):
            done[s] += len(row)
        ends = [done[s] == len(prompts[s]) for s in batch]
        record(batch, runner.forward(batch, rows, ends_prompt=ends))
    for _ in range(new_tokens):
        nxt = [int(logits[s][len(tokens[s]) - 1].argmax()) for s in ids]
        for s in ids:
            tokens[s].append(nxt[s])
        record(ids, runner.decode(ids, nxt))
    return tokens, logits, events


def check_against_reference(model, runner, prompts, new_tokens, **kwargs) -> tuple[list, list]:
    """Serve, then compare every logit row and greedy token with the reference; each
    sequence's tokens and compression events, for further checks."""
    tokens, logits, events = serve(runner, prompts, new_tokens, **kwargs)
    reference = Reference(model)
    for prompt, seq_tokens, seq_logits, seq_events in zip(prompts, tokens, logits, events,
                                                          strict=True):  # fmt: skip
        ref = reference.logits(seq_tokens, seq_events)
        for position, row in seq_logits.items():
            torch.testing.assert_close(row, ref[position], atol=2e-4, rtol=1e-4)
            if len(prompt) - 1 <= position < len(seq_tokens) - 1:  # greedy's choice
                assert int(ref[position].argmax()) == seq_tokens[position + 1]
    return tokens, events


PROMPTS = [[(7 * i + 3) % VOCAB for i in range(n)] for n in (13, 21, 6)]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("press", ["streamingllm", "scored"])
def test_greedy_tokens_and_logits_equal_the_masked_reference(family, press) -> None:
    model = MODELS[family]()
    runner = HeadwiseCausalLM(model, num_pages=256, page_size=PS, backend="torch")
    make = {"streamingllm": lambda: StreamingLLMPress(sinks=2), "scored": ScoredPress}[press]
    settings = [dict(press=make(), budget=0.5), dict(press=make(), budget=7), {}]
    _, events = check_against_reference(model, runner, PROMPTS, 6, settings=settings)
    assert [len(e) for e in events] == [1, 1, 0]  # once, at the end of each pressed prompt
    kept = events[0][0][1]
    assert all(len(head) <= 7 + 2 for layer in kept for head in layer)  # ceil(0.5 * 13) + 1
    if press == "scored":  # heads and layers keep different tokens
        assert any(not np.array_equal(layer[0], layer[1]) for layer in kept)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_chunked_prefill_and_compress_every(family) -> None:
    """Chunks shorter than the press's window end a prompt; presses run again every 3
    decode steps, reading queries of earlier steps from the ring."""
    model = MODELS[family]()
    runner = HeadwiseCausalLM(model, num_pages=256, page_size=PS, backend="torch")
    presses = [ScoredPress(), StreamingLLMPress(sinks=1), ScoredPress()]
    budgets = (6, 0.5, 5)
    settings = [dict(press=p, budget=b, compress_every=3)
                for p, b in zip(presses, budgets, strict=True)]  # fmt: skip
    tokens, events = check_against_reference(model, runner, PROMPTS, 8, chunk=5,
                                             settings=settings)  # fmt: skip
    assert [len(e) for e in events] == [3, 3, 3]  # prompt end, decode steps 3 and 6
    assert [length for length, _ in events[0]] == [13, 13 + 3, 13 + 6]
    # the queries each press was handed are the model's, at the newest positions
    reference, layers = Reference(model), runner.cache.num_layers
    for seq_id in (0, 2):  # the scored presses (sequence 2: prompt shorter than a chunk)
        reference.logits(tokens[seq_id], events[seq_id])
        seen = presses[seq_id].seen
        assert len(seen) == 3 * layers
        for i, view in enumerate(seen):
            length = events[seq_id][i // layers][0]
            assert view.layer == i % layers and view.num_layers == layers
            window = reference.queries[view.layer][length - 3 : length]
            torch.testing.assert_close(view.queries, window, atol=1e-5, rtol=1e-5)


def test_pages_freed_equal_what_the_budgets_imply() -> None:
    model = llama(layers=2)
    runner = HeadwiseCausalLM(model, num_pages=128, page_size=PS, backend="torch")
    layers, heads = 2, 2
    runner.add_sequences([0], press=StreamingLLMPress(sinks=2), budget=5)
    runner.add_sequences([1])  # no press: keeps all
    runner.forward([0, 1], [list(range(1, 19)), list(range(1, 10))])
    full = layers * heads * (pages_for(18, PS) + pages_for(9, PS))
    held = layers * heads * (pages_for(5, PS) + pages_for(9, PS))
    assert runner.cache.available_pages_count == 128 - held
    assert full - held == layers * heads * (5 - 2)  # 18 tokens on 5 pages -> 5 on 2
    assert runner.cache.head_lens(1, 0).tolist() == [5, 5]
    assert runner.cache.head_positions(1, 0, 0).tolist() == [0, 1, 15, 16, 17]
    for _ in range(3):  # no compress_every: the pressed cache grows again
        runner.decode([0, 1], [1, 2])
    assert runner.cache.head_lens(0, 0).tolist() == [8, 8] and runner.seq_len(0) == 21
    assert runner.cache.memory_bytes() < runner.cache.full_cache_bytes()
    runner.release([0, 1])
    assert runner.cache.available_pages_count == 128


def test_compress_every_keeps_a_token_budget_bounded() -> None:
    runner = HeadwiseCausalLM(llama(2), num_pages=64, page_size=PS, backend="torch")
    runner.add_sequences([3], press=StreamingLLMPress(sinks=1), budget=6, compress_every=2)
    runner.forward([3], [list(range(1, 30))])
    lens = []
    for step in range(6):
        runner.decode([3], [step + 1])
        lens.append(int(runner.cache.head_lens(0, 3)[0]))
    assert lens == [7, 6, 7, 6, 7, 6] and runner.seq_len(3) == 35
    assert 64 - runner.cache.available_pages_count == 2 * 2 * pages_for(6, PS)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_without_compression_tokens_equal_hf_generate(family) -> None:
    model = MODELS[family]()
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    runner = HeadwiseCausalLM(model, num_pages=256, page_size=PS, backend="torch")
    settings = [dict(press=StreamingLLMPress(), budget=1.0), {},
                dict(press=ScoredPress(), budget=1.0)]  # fmt: skip
    tokens, _, events = serve(runner, PROMPTS, 7, chunk=4, settings=settings)
    for prompt, out in zip(PROMPTS, tokens, strict=True):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            expected = reference.generate(ids, attention_mask=torch.ones_like(ids),
                                          do_sample=False, max_new_tokens=7)  # fmt: skip
        assert out == expected[0].tolist()
    assert all(np.array_equal(head, np.arange(len(PROMPTS[0])))
               for layer in events[0][0][1] for head in layer)  # fmt: skip


def test_a_new_turn_after_compression_equals_the_reference() -> None:
    """Prompt, press, decode, then a second prompt (pressed when it ends) and decode:
    the second prompt's tokens attend over the kept tokens at their true positions."""
    model = llama()
    runner = HeadwiseCausalLM(model, num_pages=128, page_size=PS, backend="torch")
    runner.add_sequences([0], press=ScoredPress(), budget=6)
    tokens, events, logits = list(PROMPTS[1]), [], {}

    def step(out: torch.Tensor) -> int:
        logits[runner.seq_len(0) - 1] = out[0]
        if runner.last_compressed:
            events.append((runner.seq_len(0), runner.held_positions(0)))
        return int(out[0].argmax())

    nxt = step(runner.forward([0], [tokens]))
    for turn in ([5, 6, 7, 8, 9], None):
        for _ in range(3):
            tokens.append(nxt)
            nxt = step(runner.decode([0], [nxt]))
        if turn is not None:
            tokens += turn
            nxt = step(runner.forward([0], [turn]))
    assert [length for length, _ in events] == [21, 21 + 3 + 5]
    ref = Reference(model).logits(tokens, events)
    for position, row in logits.items():
        torch.testing.assert_close(row, ref[position], atol=2e-4, rtol=1e-4)


def test_the_library_reference_equals_this_one() -> None:
    """seqattn.integrations.hf_reference (SDPA, what the demo's parity line uses) against
    this file's reference (eager) on one served sequence."""
    from seqattn.integrations.hf_reference import masked_reference_logits

    model = llama()
    runner = HeadwiseCausalLM(model, num_pages=128, page_size=PS, backend="torch")
    settings = [dict(press=ScoredPress(), budget=5, compress_every=2)]
    tokens, _, events = serve(runner, PROMPTS[:1], 4, chunk=6, settings=settings)
    assert len(events[0]) == 3
    ours = masked_reference_logits(model, tokens[0], events[0])
    assert model.config._attn_implementation == "seqattn_headwise"  # restored
    torch.testing.assert_close(ours, Reference(model).logits(tokens[0], events[0]),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
