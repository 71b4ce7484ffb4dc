"""Random workloads through the engine: every request's greedy tokens equal transformers'
own generate for its prompt, whatever the schedule (requests arriving while others
decode, prompt chunks beside decode rows fed from the device, a token budget smaller
than the batch, prompts sharing prefixes, pages short enough to preempt, stop tokens),
and every page comes back. Deterministic in CI (tests/conftest.py); ``SEQATTN_LONG=N``
runs N times the examples from random seeds."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from seqattn.engine import Engine, SamplingParams  # noqa: E402
from seqattn.integrations.hf import PagedCausalLM  # noqa: E402
from tests.conftest import examples  # noqa: E402
from tests.test_hf_engine import hf_greedy as hf_greedy_of  # noqa: E402
from tests.test_hf_engine import tiny_model  # noqa: E402

PAGE = 4
VOCAB = 128
TIE = 1e-4  # logits this close to the top one are a float tie: either token is greedy's


@functools.cache
def model() -> torch.nn.Module:
    return tiny_model("llama")  # vocabulary of VOCAB, no end-of-sequence token


@functools.cache
def hf_greedy(prompt: tuple[int, ...], n: int) -> tuple[int, ...]:
    """transformers' own generate, eager attention, one prompt alone (memoized)."""
    return tuple(hf_greedy_of(model(), list(prompt), n))


def matches_hf(prompt: list[int], out: list[int], n: int, stop: tuple[int, ...]) -> bool:
    """``out`` is HF's greedy path cut after its first stop token, or leaves it only at
    a float tie (its token within ``TIE`` of the top logit, HF's forward on its tokens)."""
    ref = list(hf_greedy(tuple(prompt), n))
    cut = next((i + 1 for i, t in enumerate(ref) if t in stop), len(ref))
    if out == ref[:cut]:
        return True
    i = next((i for i, (a, b) in enumerate(zip(out, ref, strict=False)) if a != b), None)
    if i is None:
        return False  # one is a prefix of the other: a stop token missed or invented
    llama = model()
    previous = llama.config._attn_implementation
    llama.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            logits = llama(torch.tensor([prompt + out[:i]])).logits[0, -1]
    finally:
        llama.set_attn_implementation(previous)
    return bool(logits.max() - logits[out[i]] < TIE)


@st.composite
def workloads(draw: st.DrawFn) -> dict:
    base = draw(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=14))
    requests = []
    for _ in range(draw(st.integers(1, 6))):
        shared = draw(st.integers(0, len(base)))  # a prefix of another prompt, or none
        own = draw(st.lists(st.integers(1, VOCAB - 1), min_size=0 if shared else 1,
                            max_size=10))  # fmt: skip
        prompt = base[:shared] + own
        n = draw(st.integers(1, 9))
        stop = tuple(draw(st.lists(st.integers(1, VOCAB - 1), max_size=2)))
        if draw(st.booleans()):  # a stop token the greedy path does produce
            stop += (hf_greedy(tuple(prompt), n)[draw(st.integers(0, n - 1))],)
        requests.append((draw(st.integers(0, 6)), prompt, n, stop))  # arrival step first
    largest = max(-(-(len(p) + n) // PAGE) for _, p, n, _ in requests)
    return dict(requests=requests, budget=draw(st.integers(1, 24)),
                batch=draw(st.integers(1, 6)), pages=largest + draw(st.integers(0, 5)))  # fmt: skip


@settings(max_examples=examples(40))
@given(workloads())
def test_random_workloads_generate_what_hf_generates(work: dict) -> None:
    runner = PagedCausalLM(model(), num_pages=work["pages"], page_size=PAGE)
    engine = Engine(runner, max_batch_size=work["batch"], max_step_tokens=work["budget"])
    pending = sorted(enumerate(work["requests"]), key=lambda item: item[1][0])
    ids: dict[int, int] = {}
    step = 0
    while pending or engine.has_work:
        while pending and pending[0][1][0] <= step:  # arrivals, between steps
            index, (_, prompt, n, stop) = pending.pop(0)
            ids[index] = engine.add_request(prompt, SamplingParams(n, stop_token_ids=stop))
        if engine.has_work:
            engine.step()
        step += 1
    for index, (_, prompt, n, stop) in enumerate(work["requests"]):
        out = engine.requests[ids[index]].output
        assert matches_hf(prompt, out, n, stop), (index, prompt, out, hf_greedy(tuple(prompt), n))
    assert runner.cache.available_pages_count == runner.cache.num_pages
    engine.descriptor.check_integrity()
