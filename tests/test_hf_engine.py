"""HF models on seqattn: greedy tokens equal transformers' own generate (float32, tiny
random configs of each supported family), through batching, the prefix cache, chunked
prefill and preemption; sampling is reproducible."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from seqattn import (  # noqa: E402
    ArgumentTypeError,
    InvalidArgumentError,
    InvalidLengthError,
    SeqAttnError,
)
from seqattn.engine import Engine, SamplingParams, Status  # noqa: E402
from seqattn.integrations.hf import PagedCausalLM  # noqa: E402

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 6}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
}  # fmt: skip
PROMPTS = [[5, 9, 17, 3, 44], list(range(20, 33)), [7, 7, 8, 8, 9, 9, 10, 10, 11], [100]]


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' own generate with its eager attention, one prompt at a time."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    finally:
        model.set_attn_implementation(previous)
    return out[0, len(prompt) :].tolist()


def engine_for(model, *, num_pages=64, page_size=4, **options) -> Engine:
    return Engine(PagedCausalLM(model, num_pages=num_pages, page_size=page_size), **options)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_tokens_equal_hf_generate(family: str) -> None:
    model = tiny_model(family)
    engine = engine_for(model)
    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output == hf_greedy(model, prompt, 12), prompt
    assert engine.runner.cache.available_pages_count == engine.runner.cache.num_pages


def test_shared_prefix_is_served_from_the_prefix_cache() -> None:
    model = tiny_model("llama")
    engine = engine_for(model)
    system = list(range(40, 57))  # 17 tokens: 4 full pages
    prompts = [[*system, 1, 2], [*system, 3], [*system, 4, 5, 6]]
    first = engine.generate(prompts[:1], SamplingParams(max_new_tokens=6))
    rest = engine.generate(prompts[1:], SamplingParams(max_new_tokens=6))
    stats = engine.descriptor.prefix_stats
    assert stats.hit_tokens >= 2 * 16 and engine.stats.computed_prompt_tokens < 3 * 17
    for prompt, output in zip(prompts, first + rest, strict=True):
        assert output == hf_greedy(model, prompt, 6)


def test_requests_admitted_together_compute_a_shared_prompt_once() -> None:
    model = tiny_model("qwen2")
    system = list(range(40, 57))  # 17 tokens: 4 full pages of 4
    prompts = [[*system, 1], [*system, 2, 3], [*system, 4], list(range(60, 70)), [*system]]
    engine = engine_for(model, max_step_tokens=8)  # the system prompt takes 3 chunks
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=5))
    own = [len(p) - 16 for p in prompts[1:3]] + [10, 1]
    assert engine.stats.computed_prompt_tokens == len(prompts[0]) + sum(own)
    assert outputs == [hf_greedy(model, p, 5) for p in prompts]


def test_chunked_prefill() -> None:
    model = tiny_model("qwen3")
    engine = engine_for(model, max_step_tokens=5)
    long_prompt = list(range(3, 26))
    outputs = engine.generate([long_prompt, PROMPTS[0]], SamplingParams(max_new_tokens=8))
    assert engine.stats.steps > 23 // 5
    assert outputs == [hf_greedy(model, p, 8) for p in (long_prompt, PROMPTS[0])]


def test_a_token_budget_smaller_than_the_batch() -> None:
    """Decode rows leave one token of the budget: a prefill chunk of one token runs in
    a step of otherwise one-token rows, and must be fed its prompt token."""
    model = tiny_model("llama")
    for budget in (2, 3):
        engine = engine_for(model, max_step_tokens=budget)
        prompts = [PROMPTS[3], PROMPTS[1], PROMPTS[0]]
        outputs = engine.generate(prompts, SamplingParams(max_new_tokens=6))
        assert outputs == [hf_greedy(model, p, 6) for p in prompts], budget


def test_preemption_when_pages_run_out() -> None:
    model = tiny_model("mistral")
    engine = engine_for(model, num_pages=16, page_size=4, max_batch_size=4)
    prompts = [list(range(10 + i, 20 + i)) for i in range(4)]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=14))
    assert engine.stats.preemptions > 0
    assert outputs == [hf_greedy(model, p, 14) for p in prompts]
    engine.descriptor.check_integrity()


CONTENDED = [
    # two 32-token prompts of 8 pages each: 12 pages each by the end, 16 in the pool
    pytest.param(16, [list(range(1, 33)), list(range(40, 72))], 16, 1, id="2x32-in-16-pages"),
    # 14 pages of prompts (5, 13, 9 and 1 tokens) and 6 new tokens each, 8 in the pool
    pytest.param(8, PROMPTS, 6, 0, id="4-prompts-in-8-pages"),
]


@pytest.mark.parametrize(("num_pages", "prompts", "new_tokens", "most"), CONTENDED)
def test_requests_are_admitted_when_their_pages_fit_and_preempted_only_when_short(
    num_pages: int, prompts: list[list[int]], new_tokens: int, most: int
) -> None:
    """A request starts only once its prompt's pages fit beside what the running ones
    need next; a running request is preempted only at a step whose decode rows lack
    pages (the engine once admitted on any free page and preempted one of two 32-token
    requests 15 times, 11 of them at steps where no decode row was short)."""
    model = tiny_model("llama")
    engine = engine_for(model, num_pages=num_pages, page_size=4)
    scheduler, desc, pool = engine.scheduler, engine.descriptor, engine.runner.cache
    preempt, short = scheduler._preempt, []

    def checked_preempt(need: int) -> None:  # what the running requests lack, seen here
        rows = [r.id for r in engine.running if r.to_run == 1]
        short.append(desc.pages_needed(rows, [1] * len(rows)) > pool.available_pages_count)
        preempt(need)

    scheduler._preempt = checked_preempt
    params = SamplingParams(max_new_tokens=new_tokens)
    outputs = engine.generate(prompts, params)
    assert engine.stats.preemptions == len(short) <= most
    assert all(short), short  # every preemption: a decode row had no page
    log = scheduler.preemption_log
    assert len(log) == len(short)
    assert all(p.pages_needed > p.pages_available for p in log), log
    assert max(r.preemptions for r in engine.requests.values()) <= 1
    roomy = engine_for(model, num_pages=64, page_size=4)
    assert outputs == roomy.generate(prompts, params)
    assert roomy.stats.preemptions == 0
    assert outputs == [hf_greedy(model, p, new_tokens) for p in prompts]
    assert pool.available_pages_count == pool.num_pages
    desc.check_integrity()


def test_requests_admitted_in_one_step_each_count_the_pages_of_those_before() -> None:
    """20 pages, prompts of 6 pages: three start together (6 + 6 + 6 reserved), the
    fourth would need 24 and waits; it starts once pages come back."""
    model = tiny_model("llama")
    engine = engine_for(model, num_pages=20, page_size=4, max_step_tokens=8)
    prompts = [[(7 * i + j) % 100 + 1 for j in range(24)] for i in range(4)]
    params = SamplingParams(max_new_tokens=2)
    ids = [engine.add_request(p, params) for p in prompts]
    engine.step()
    assert [r.id for r in engine.running] == ids[:3]
    assert [r.id for r in engine.waiting] == ids[3:]
    while engine.has_work:
        engine.step()
    assert [engine.requests[i].output for i in ids] == [hf_greedy(model, p, 2) for p in prompts]
    assert engine.stats.preemptions == 0


def test_a_prompt_sharing_a_running_requests_pages_is_admitted_for_its_own_pages() -> None:
    """Admission counts the prefix-cache hit: a prompt whose first 7 pages a running
    request holds needs 1 page of its own, and starts though its 8 would not fit."""
    model = tiny_model("llama")
    engine = engine_for(model, num_pages=16, page_size=4)
    prompt, params = list(range(1, 33)), SamplingParams(max_new_tokens=12)
    first = engine.add_request(prompt, params)
    for _ in range(5):  # the prompt's 8 pages, and a 9th for the tokens generated since
        engine.step()
    assert engine.runner.cache.available_pages_count == 7
    second = engine.add_request(prompt, params)
    engine.step()
    assert [r.id for r in engine.running] == [first, second] and not engine.waiting
    assert engine.stats.computed_prompt_tokens == 32 + 4  # the second computes 1 page
    while engine.has_work:
        engine.step()
    expected = hf_greedy(model, prompt, 12)
    assert [engine.requests[i].output for i in (first, second)] == [expected, expected]
    assert engine.stats.preemptions == 0


def test_a_prefill_chunk_waits_for_pages_while_decode_rows_run() -> None:
    """When decode rows take the last pages, a prefill chunk is cut to the pages left (or
    waits) rather than preempting anyone; a preemption comes only once a decode row
    lacks a page."""
    model = tiny_model("llama")
    engine = engine_for(model, num_pages=11, page_size=4, max_step_tokens=2)
    long_run, params = [1, 2, 3, 4], SamplingParams(max_new_tokens=36)  # 10 pages
    decoding = engine.add_request(long_run, params)
    for _ in range(14):
        engine.step()
    prompt = list(range(10, 30))
    prefilling = engine.requests[engine.add_request(prompt, SamplingParams(max_new_tokens=2))]
    waited = 0  # steps the second request ran while its prompt had tokens left but fed none
    while engine.has_work:
        before = prefilling.computed if prefilling.status is Status.RUNNING else None
        engine.step()
        running = prefilling.status is Status.RUNNING
        waited += running and prefilling.computed == before and prefilling.pending > 1
    assert waited > 0
    assert engine.stats.preemptions == len(engine.scheduler.preemption_log) == 1
    (preemption,) = engine.scheduler.preemption_log
    assert preemption.request_id == prefilling.id
    assert preemption.pages_needed > preemption.pages_available
    assert engine.requests[decoding].output == hf_greedy(model, long_run, 36)
    assert prefilling.output == hf_greedy(model, prompt, 2)


def test_sampling_is_reproducible_with_a_seed() -> None:
    model = tiny_model("llama")
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9)
    runs = [engine_for(model, seed=seed).generate(PROMPTS, params) for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert all(0 <= t < 128 for out in runs[0] for t in out)


def test_stop_tokens_end_generation() -> None:
    model = tiny_model("llama")
    free_run = hf_greedy(model, PROMPTS[0], 10)
    stop = free_run[3]
    out = engine_for(model).generate([PROMPTS[0]], SamplingParams(10, stop_token_ids=[stop]))
    assert out[0] == free_run[: free_run.index(stop) + 1]


def test_unsupported_architecture_is_refused() -> None:
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    with pytest.raises(SeqAttnError, match="not supported"):
        PagedCausalLM(transformers.GPT2LMHeadModel(config), num_pages=8)


def test_a_request_larger_than_the_pool_is_refused_clearly() -> None:
    """Refused when added (it could never run), not later by a wedged step."""
    engine = engine_for(tiny_model("llama"), num_pages=3, page_size=4)
    with pytest.raises(InvalidArgumentError, match="give the engine more pages"):
        engine.add_request(list(range(1, 30)), SamplingParams(max_new_tokens=4))
    assert not engine.has_work and not engine.requests
    engine.descriptor.check_integrity()


def test_a_request_that_just_fits_the_pool_runs_to_the_end() -> None:
    """A sequence holds prompt + max_new_tokens - 1 tokens (the last sample is never fed):
    5 + 8 - 1 = 12 tokens fill the 3 pages of 4; one more token is refused."""
    model = tiny_model("llama")
    engine = engine_for(model, num_pages=3, page_size=4)
    (output,) = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8))
    assert output == hf_greedy(model, PROMPTS[0], 8)
    with pytest.raises(InvalidArgumentError, match="needs 4 pages"):
        engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=9))


def test_bad_prompts_and_settings_are_refused_up_front() -> None:
    engine = engine_for(tiny_model("llama"))  # vocabulary of 128
    bad = [
        (InvalidLengthError, [], "at least one token"),
        (ArgumentTypeError, [1.5, 2], "integers"),
        (ArgumentTypeError, [[1, 2]], "integers"),
        (InvalidArgumentError, [5, 128], r"\[0, 128\).*\[128\]"),
        (InvalidArgumentError, torch.tensor([-1, 3]), r"\[-1\]"),
    ]
    for error, prompt, message in bad:
        with pytest.raises(error, match=message):
            engine.add_request(prompt, SamplingParams())
    assert not engine.has_work and not engine.requests
    for error, options in (
        (InvalidArgumentError, {"max_batch_size": 0}),
        (InvalidArgumentError, {"max_step_tokens": 0}),
        (ArgumentTypeError, {"max_step_tokens": 1.5}),
    ):
        with pytest.raises(error, match=r"must be an integer"):
            Engine(engine.runner, **options)
    out = engine.generate([torch.tensor([5, 9, 17, 3, 44])], SamplingParams(max_new_tokens=3))
    assert out == [hf_greedy(engine.runner.model, PROMPTS[0], 3)]


def test_decode_steps_run_ahead_and_generated_pages_are_cached() -> None:
    model = tiny_model("llama")
    engine = engine_for(model)
    prompt = PROMPTS[0]
    (output,) = engine.generate([prompt], SamplingParams(max_new_tokens=12))
    assert output == hf_greedy(model, prompt, 12)
    assert engine.stats.decoded_ahead == 11  # every decode step, before the host read
    # the sequence held 5 + 11 tokens: 4 full pages, 3 of them generated ahead
    hits = engine.descriptor.prefix_stats.hit_tokens
    engine.generate([prompt + output], SamplingParams(max_new_tokens=1))
    assert engine.descriptor.prefix_stats.hit_tokens - hits == 16


LONG_PROMPT = list(range(3, 26))  # 23 tokens: chunks over several steps at budget 6


def spied_forwards(engine: Engine) -> list[int]:
    """How many rows of each ``runner.forward`` call came from the device (``fed``)."""
    runner, calls = engine.runner, []
    forward = runner.forward

    def spy(seq_ids, tokens, *, fed=None):
        calls.append(0 if fed is None else len(fed))
        return forward(seq_ids, tokens, fed=fed)

    runner.forward = spy
    return calls


def test_mixed_steps_run_ahead_and_their_decoded_pages_are_cached() -> None:
    """While a long prompt is prefilled in chunks, the short request's decode rows run
    in the same steps, fed its samples on the device before the host reads them."""
    model = tiny_model("llama")
    engine = engine_for(model, max_step_tokens=6)
    calls = spied_forwards(engine)
    prompts = [PROMPTS[0], LONG_PROMPT]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=8))
    assert outputs == [hf_greedy(model, p, 8) for p in prompts]
    # step 1: both prompts' first tokens (nothing to feed); steps 2-6: the short
    # request's decode row from the device beside a chunk of the long prompt
    assert calls == [0, 1, 1, 1, 1, 1]
    assert engine.stats.decoded_ahead == engine.stats.steps - 1
    # the short request held 5 + 7 tokens, 3 full pages, the second filled by decode
    # rows of mixed steps: all three are cached
    hits = engine.descriptor.prefix_stats.hit_tokens
    engine.generate([PROMPTS[0] + outputs[0]], SamplingParams(max_new_tokens=1))
    assert engine.descriptor.prefix_stats.hit_tokens - hits == 12
    engine.descriptor.check_integrity()


def test_a_stop_token_found_late_in_a_mixed_step_drops_the_extra_row() -> None:
    model = tiny_model("llama")
    short, long = hf_greedy(model, PROMPTS[0], 8), hf_greedy(model, LONG_PROMPT, 8)
    stop = short[1]
    engine = engine_for(model, max_step_tokens=6)
    calls = spied_forwards(engine)
    outputs = engine.generate([PROMPTS[0], LONG_PROMPT], SamplingParams(8, stop_token_ids=[stop]))
    expected = [r[: r.index(stop) + 1] if stop in r else r for r in (short, long)]
    assert outputs == expected and len(outputs[0]) == 2
    assert calls[:3] == [0, 1, 1]  # step 3 ran the short request's row past its stop token
    assert engine.stats.generated_tokens == sum(len(o) for o in expected)
    assert engine.runner.cache.available_pages_count == engine.runner.cache.num_pages
    engine.descriptor.check_integrity()


def test_a_stop_token_found_one_step_late_drops_the_extra_row() -> None:
    model = tiny_model("llama")
    runs = [hf_greedy(model, p, 10) for p in PROMPTS]
    stop = runs[1][2]
    engine = engine_for(model)
    outputs = engine.generate(PROMPTS, SamplingParams(10, stop_token_ids=[stop]))
    expected = [r[: r.index(stop) + 1] if stop in r else r for r in runs]
    assert outputs == expected
    assert engine.stats.generated_tokens == sum(len(o) for o in expected)
    assert engine.runner.cache.available_pages_count == engine.runner.cache.num_pages
    engine.descriptor.check_integrity()


def test_generation_stops_at_the_models_end_of_sequence_token_as_hf_generate() -> None:
    """With ``generation_config.eos_token_id`` set, the engine stops where HF's generate
    stops (the end token kept), for an int and for a list of ids; ``ignore_eos`` runs on."""
    model = tiny_model("llama")
    free_runs = [hf_greedy(model, p, 8) for p in PROMPTS]
    eos = free_runs[0][3]  # a token the greedy path of the first prompt produces
    other = free_runs[1][5]
    for eos_ids in (eos, [eos, other]):
        model.generation_config.eos_token_id = eos_ids
        engine = engine_for(model)
        ids = [engine.add_request(p, SamplingParams(max_new_tokens=8)) for p in PROMPTS]
        while engine.has_work:
            engine.step()
        outputs = [engine.requests[i].output for i in ids]
        assert outputs == [hf_greedy(model, p, 8) for p in PROMPTS], eos_ids
        assert len(outputs[0]) < 8 and outputs[0][-1] == eos
        stops = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
        for request in map(engine.requests.get, ids):
            stopped = request.output[-1] in stops
            assert request.finish_reason == ("stop" if stopped else "length")
        assert engine.runner.cache.available_pages_count == engine.runner.cache.num_pages
    ignoring = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert ignoring == free_runs
