"""The Engine over a HeadwiseCausalLM, a press per request.

What each test compares against:

- per request, the greedy tokens of :class:`HeadwiseCausalLM` driven by hand for that
  request alone (a fresh runner on the same weights, the same press, budget and
  ``compress_every``; its prompt in one forward, then one decode per token). A press
  chooses from its own sequence's keys and queries, so continuous batching, chunked
  prefill and requests arriving mid-run must not change what it keeps;
- with budget 1.0 or no press, the PagedCausalLM engine's tokens and transformers'
  ``generate``;
- after a preemption, a run by hand that re-prefills ``prompt + outputs so far`` as one
  prompt (pressed once, when it ends), as the engine documents: the outputs a request
  had at each preemption are recorded as it happens (a wrapper around the scheduler's
  ``_preempt``), and each stretch of outputs is checked against the hand run that
  starts from the tokens before it.

CPU, float32, fixed seeds, tiny Llama and Qwen3 configs with GQA (4 query heads, 2 KV).
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from seqattn import (  # noqa: E402
    ArgumentTypeError,
    InvalidArgumentError,
    SeqAttnError,
)
from seqattn.engine import Engine, SamplingParams  # noqa: E402
from seqattn.headwise import AdaKVPress, SnapKVPress, StreamingLLMPress  # noqa: E402
from seqattn.integrations.hf import PagedCausalLM  # noqa: E402
from seqattn.integrations.hf_headwise import HeadwiseCausalLM  # noqa: E402

VOCAB, PS = 96, 4
COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=VOCAB)  # fmt: skip
PROMPTS = [[(7 * i + 3 * k + 1) % VOCAB for i in range(n)] for k, n in enumerate((13, 21, 6, 17))]
GREEDY = SamplingParams(max_new_tokens=7, ignore_eos=True)


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed({"llama": 0, "qwen3": 1}[family])
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    model = model_cls(config_cls(num_hidden_layers=2, **COMMON)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def presses() -> list[dict[str, Any]]:
    """One setting per prompt: each request its own press, budget and schedule."""
    return [
        dict(press=SnapKVPress(window=3, kernel=3), budget=0.5),
        dict(press=StreamingLLMPress(sinks=2), budget=6, compress_every=3),
        dict(),  # keeps every token
        dict(press=AdaKVPress(SnapKVPress(window=2, kernel=1), alpha_safeguard=0.5), budget=0.4),
    ]


def by_hand(model: torch.nn.Module, prompt: list[int], n: int, settings: dict) -> list[int]:
    """Greedy tokens of a HeadwiseCausalLM serving ``prompt`` alone (a fresh runner)."""
    runner = HeadwiseCausalLM(model, num_pages=512, page_size=PS)
    runner.add_sequences([0], **settings)
    logits = runner.forward([0], [prompt])
    out = []
    for _ in range(n):
        out.append(int(logits[0].argmax()))
        if len(out) < n:
            logits = runner.decode([0], [out[-1]])
    runner.release([0])
    return out


def headwise_engine(model: torch.nn.Module, num_pages: int = 512, **options: Any) -> Engine:
    return Engine(HeadwiseCausalLM(model, num_pages=num_pages, page_size=PS), **options)


def check_all_pages_back(engine: Engine) -> None:
    cache = engine.runner.cache
    assert len(cache) == 0
    assert cache.available_pages_count == cache.storage.num_pages
    cache.check_integrity()


def record_preemptions(engine: Engine) -> dict[int, list[int]]:
    """Each request's output count at each of its preemptions, recorded as they happen."""
    seen: dict[int, list[int]] = {}
    preempt = engine.scheduler._preempt

    def wrapped(need: int) -> None:
        request = engine.scheduler.running[-1]  # the one _preempt gives back
        seen.setdefault(request.id, []).append(len(request.output))
        preempt(need)

    engine.scheduler._preempt = wrapped  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_each_request_equals_its_runner_driven_by_hand(family: str) -> None:
    """Requests arriving at different times, prefill chunked to 8 tokens a step: each
    one's tokens equal its own hand run (same press and budget)."""
    model = tiny(family)
    settings = presses()
    engine = headwise_engine(model, max_step_tokens=8)
    ids = [engine.add_request(PROMPTS[i], GREEDY, **settings[i]) for i in (0, 1)]
    for _ in range(3):  # the first two prefill (in chunks) while the others arrive
        engine.step()
    ids += [engine.add_request(PROMPTS[i], GREEDY, **settings[i]) for i in (2, 3)]
    while engine.has_work:
        engine.step()
    assert engine.stats.steps > 8 and engine.stats.preemptions == 0
    for i, request_id in enumerate(ids):
        expected = by_hand(model, PROMPTS[i], GREEDY.max_new_tokens, settings[i])
        assert engine.requests[request_id].output == expected, f"request {i}"
        if settings[i]:  # the press changed what it generates: the test sees presses
            assert expected != by_hand(model, PROMPTS[i], GREEDY.max_new_tokens, {})
    check_all_pages_back(engine)


def test_a_mixed_step_equals_decode_and_forward_apart() -> None:
    """HeadwiseCausalLM.step: decode rows and prompt chunks in one forward give the
    logits (and the press's choices) that separate decode and forward calls give."""
    model = tiny("llama")
    logits, held = [], []
    for mixed in (True, False):
        runner = HeadwiseCausalLM(model, num_pages=256, page_size=PS)
        runner.add_sequences([0], press=SnapKVPress(window=3, kernel=3), budget=0.5,
                             compress_every=1)  # fmt: skip
        runner.add_sequences([1], press=StreamingLLMPress(sinks=2), budget=5)
        runner.forward([0], [PROMPTS[0]])
        runner.forward([1], [PROMPTS[1][:9]], ends_prompt=False)
        if mixed:
            out = runner.step([0], [5], [1], [PROMPTS[1][9:]], ends_prompt=[True])
        else:
            out = torch.cat([runner.decode([0], [5]), runner.forward([1], [PROMPTS[1][9:]])])
        logits.append(out)
        held.append([runner.held_positions(s) for s in (0, 1)])
    torch.testing.assert_close(logits[0], logits[1], atol=2e-5, rtol=1e-5)
    for a, b in zip(held[0], held[1], strict=True):
        for la, lb in zip(a, b, strict=True):
            assert all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_budget_one_or_no_press_equals_the_paged_engine_and_hf_generate(family: str) -> None:
    model = tiny(family)
    reference = []
    for prompt in PROMPTS:
        out = copy.deepcopy(model).generate(torch.tensor([prompt]), max_new_tokens=7,
                                            do_sample=False)  # fmt: skip
        reference.append(out[0, len(prompt) :].tolist())
    paged = Engine(PagedCausalLM(copy.deepcopy(model), num_pages=128, page_size=PS),
                   max_step_tokens=8)  # fmt: skip
    assert paged.generate(PROMPTS, GREEDY) == reference
    for settings in (dict(), dict(press=SnapKVPress(window=3, kernel=3), budget=1.0)):
        engine = headwise_engine(copy.deepcopy(model), max_step_tokens=8)
        assert engine.generate(PROMPTS, GREEDY, **settings) == reference
        check_all_pages_back(engine)


def preempting_engine(model: torch.nn.Module) -> tuple[Engine, list[int], list[dict]]:
    """Four requests on a pool too small for them all: some wait, some are preempted."""
    settings = [dict(), dict(press=StreamingLLMPress(sinks=2), budget=8),
                dict(press=SnapKVPress(window=3, kernel=3), budget=0.5),
                dict(press=StreamingLLMPress(sinks=2), budget=6, compress_every=2)]  # fmt: skip
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    # 2 layers x 2 KV heads: a token takes 4 slots, a page-length of tokens 4 pages
    engine = headwise_engine(model, num_pages=48, max_step_tokens=64)
    ids = [engine.add_request(PROMPTS[i][:8], params, **settings[i]) for i in range(4)]
    return engine, ids, settings


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_small_pool_makes_requests_wait_and_preempts_them(family: str) -> None:
    """Each stretch of a preempted request's outputs equals the hand run that prefills
    its prompt plus the outputs before the stretch as one prompt."""
    model = tiny(family)
    engine, ids, settings = preempting_engine(model)
    seen = record_preemptions(engine)
    waited = False
    while engine.has_work:
        engine.step()
        waited |= bool(engine.waiting) and bool(engine.running)
        cache = engine.runner.cache
        cache.check_integrity()
    assert waited and engine.stats.preemptions > 0 and seen
    assert sum(len(v) for v in seen.values()) == engine.stats.preemptions
    for i, request_id in enumerate(ids):
        request = engine.requests[request_id]
        prompt, output = PROMPTS[i][:8], request.output
        assert len(output) == 12
        starts = [0, *seen.get(request_id, [])]
        assert request.preemptions == len(starts) - 1
        for start, end in zip(starts, [*starts[1:], len(output)], strict=True):
            expected = by_hand(model, prompt + output[:start], end - start, settings[i])
            assert output[start:end] == expected, f"request {i}, outputs {start}:{end}"
    check_all_pages_back(engine)


def test_bad_press_settings_raise_and_change_nothing() -> None:
    model = tiny("llama")
    engine = headwise_engine(model)
    engine.add_request(PROMPTS[0], GREEDY, press=SnapKVPress(window=3), budget=0.5)
    before = (len(engine.waiting), dict(engine.requests), engine.stats.prompt_tokens)
    bad = [
        (ArgumentTypeError, TypeError, dict(press="snapkv", budget=0.5)),
        (SeqAttnError, ValueError, dict(press=SnapKVPress())),  # no budget
        (SeqAttnError, ValueError, dict(budget=0.5)),  # no press
        (SeqAttnError, ValueError, dict(press=SnapKVPress(), budget=1.5)),
        (SeqAttnError, ValueError, dict(press=SnapKVPress(), budget=0)),
        (ArgumentTypeError, TypeError, dict(press=SnapKVPress(), budget=True)),
        (SeqAttnError, ValueError, dict(press=SnapKVPress(), budget=4, compress_every=0)),
        (SeqAttnError, ValueError, dict(compress_every=2)),  # without a press
    ]
    for error, builtin, settings in bad:
        for call, args in (
            (engine.add_request, (PROMPTS[1], GREEDY)),
            (engine.generate, ([PROMPTS[1], PROMPTS[2]], GREEDY)),
        ):
            with pytest.raises(error) as info:
                call(*args, **settings)
            assert isinstance(info.value, builtin), settings
            after = (len(engine.waiting), dict(engine.requests), engine.stats.prompt_tokens)
            assert after == before
    paged = Engine(PagedCausalLM(copy.deepcopy(model), num_pages=64, page_size=PS))
    with pytest.raises(InvalidArgumentError, match="head-wise cache"):
        paged.add_request(PROMPTS[0], GREEDY, press=SnapKVPress(), budget=0.5)
    assert not paged.has_work


def test_head_wise_runners_run_eagerly_without_cuda_graphs() -> None:
    model = tiny("llama")
    runner = HeadwiseCausalLM(model, num_pages=64, page_size=PS)
    with pytest.raises(InvalidArgumentError, match="eagerly"):
        Engine(runner, compile=True)
    engine = Engine(runner, cuda_graphs=True, compile=False)
    assert engine.cuda_graphs is False and engine.descriptor is None
    with pytest.raises(ArgumentTypeError, match=r"PagedCausalLM .* or a HeadwiseCausalLM"):
        Engine(model)


def test_a_request_whose_whole_prompt_cannot_fit_is_refused() -> None:
    """Admission counts the uncompressed prompt in every layer and head."""
    engine = headwise_engine(tiny("llama"), num_pages=16)  # 4 pages a page-length
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    with pytest.raises(InvalidArgumentError, match="needs 20 pages"):
        engine.add_request(list(range(14)), params, press=SnapKVPress(window=2), budget=2)
    assert engine.generate([list(range(13))], params) != [[]]  # 16 tokens: 16 pages
    check_all_pages_back(engine)


class FailingOnce(StreamingLLMPress):
    """Raises at its ``fail_at``-th choice (one per layer each time it presses)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__(sinks=2)
        self.calls, self.fail_at = 0, fail_at

    def select(self, view: Any, budget: int) -> list[np.ndarray]:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return super().select(view, budget)


@pytest.mark.parametrize("fail_at", [1, 5])  # at the prompt's end; in a decode run ahead
def test_a_step_that_fails_inside_the_model_is_undone_and_retried(fail_at: int) -> None:
    """A press that raises: the step's error propagates, its requests wait to be
    recomputed from their tokens so far (as after a preemption), and the engine goes on.
    Their outputs then equal hand runs that re-prefill the tokens before the failure."""
    model = tiny("llama")
    engine = headwise_engine(model)
    settings = [dict(press=FailingOnce(fail_at), budget=6, compress_every=1), {}]
    prompts = [PROMPTS[0], PROMPTS[2]]
    ids = [engine.add_request(prompts[i], GREEDY, **settings[i]) for i in (0, 1)]
    with pytest.raises(RuntimeError, match="boom"):
        while engine.has_work:
            engine.step()
    requests = [engine.requests[i] for i in ids]
    assert engine.waiting == deque(requests) and engine.runner.failed == frozenset()
    # failing in a decode run ahead, each holds a sample not read yet: kept, not rerun
    assert [r.unread for r in requests] == ([0, 0] if fail_at == 1 else [1, 1])
    restart = [len(r.output) + r.unread for r in requests]
    while engine.has_work:
        engine.step()
    settings[0]["press"] = StreamingLLMPress(sinks=2)
    for i, request_id in enumerate(ids):
        output, start = engine.requests[request_id].output, restart[i]
        assert output[:start] == by_hand(model, prompts[i], start, settings[i])
        rest = by_hand(model, prompts[i] + output[:start], 7 - start, settings[i])
        assert output[start:] == rest, f"request {i}"
    check_all_pages_back(engine)


def test_a_mixed_step_refuses_bad_rows_and_changes_nothing() -> None:
    runner = HeadwiseCausalLM(tiny("llama"), num_pages=64, page_size=PS)
    runner.add_sequences([0, 1])
    runner.forward([0], [PROMPTS[2]])
    runner.forward([1], [PROMPTS[2][:3]], ends_prompt=False)
    free, lens = runner.cache.available_pages_count, [runner.seq_len(s) for s in (0, 1)]
    bad = [
        (SeqAttnError, ValueError, ([0], [5], [0], [[1, 2]])),  # one id in both parts
        (SeqAttnError, ValueError, ([1], [5], [0], [[1, 2]])),  # 1's prompt is open
        (SeqAttnError, ValueError, ([], [], [], [])),  # no row at all
        (SeqAttnError, ValueError, ([0], [5, 6], [1], [[1, 2]])),  # two tokens for one
        (ArgumentTypeError, TypeError, ([0], [5], [1], [[1.5, 2]])),
        (SeqAttnError, ValueError, ([0], [5], [1], [[1, VOCAB]])),  # outside the vocabulary
    ]
    for error, builtin, args in bad:
        with pytest.raises(error) as info:
            runner.step(*args)
        assert isinstance(info.value, builtin), args
        assert runner.cache.available_pages_count == free
        assert [runner.seq_len(s) for s in (0, 1)] == lens
    with pytest.raises(SeqAttnError):
        runner.step([0], [5], [1], [[1, 2]], ends_prompt=[True, False])  # one flag per row
    assert runner.step([0], [5], [1], [[1, 2]], ends_prompt=[True]).shape == (2, VOCAB)
