"""The engine's contract: bad input raises a SeqAttnError that is also the matching
builtin, before anything changes (queues, requests, sequences, pages, KV, stats); a step
that raises is undone and can be retried."""

from __future__ import annotations

import functools
import re

import attrs
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from seqattn import (  # noqa: E402
    ArgumentTypeError,
    InvalidArgumentError,
    InvalidLengthError,
    NoPageError,
    SeqAttnError,
)
from seqattn.engine import Engine, SamplingParams  # noqa: E402
from seqattn.engine import engine as engine_module  # noqa: E402
from seqattn.integrations.hf import PagedCausalLM  # noqa: E402
from tests.conftest import assert_raises_unchanged  # noqa: E402

VOCAB = 64
PROMPTS = [[5, 9, 17, 3, 44], list(range(20, 33)), [7, 7, 8, 8, 9], [60]]


@functools.cache
def shared_llama() -> torch.nn.Module:
    """One model for the tests that leave its settings alone (building one takes time)."""
    return tiny_llama()


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


def busy_engine(**options) -> Engine:
    """An engine mid-run: requests running (one decoding ahead) and one waiting."""
    runner = PagedCausalLM(shared_llama(), num_pages=32, page_size=4)
    engine = Engine(runner, max_batch_size=2, **options)
    for prompt in PROMPTS[:3]:
        engine.add_request(prompt, SamplingParams(max_new_tokens=6))
    engine.step()
    engine.step()
    assert engine.running and engine.waiting
    return engine


def engine_state(engine: Engine) -> tuple:
    """Everything a refused call must leave alone; the KV storage last (for
    ``assert_raises_unchanged``)."""
    desc, cache = engine.descriptor, engine.runner.cache
    requests = {
        i: (r.status, r.computed, list(r.output), r.unread, r.params)
        for i, r in engine.requests.items()
    }
    kv = torch.stack([cache.get_kv_cache(layer) for layer in range(cache.num_layers)]).clone()
    return (
        [r.id for r in engine.waiting],
        [r.id for r in engine.running],
        requests,
        engine._sampled is not None,
        desc.seq_ids,
        desc.seq_lens(desc.seq_ids).tolist(),
        cache.available_pages_count,
        attrs.asdict(engine.stats),
        kv,
    )


def refused(engine: Engine, error: type[SeqAttnError], builtin: type[Exception], call) -> str:
    """``call()`` raises ``error`` (also ``builtin``) and changes nothing; its message."""
    assert issubclass(error, builtin)
    assert_raises_unchanged(lambda: engine_state(engine), error, call)
    with pytest.raises(builtin) as info:
        call()
    return str(info.value)


def finish(engine: Engine) -> list[list[int]]:
    while engine.has_work:
        engine.step()
    return [r.output for _, r in sorted(engine.requests.items())]


@pytest.fixture(scope="module")
def clean_run() -> tuple[list[list[int]], dict]:
    """What :func:`busy_engine`'s requests generate, and its stats, when nothing goes wrong."""
    engine = busy_engine()
    return finish(engine), attrs.asdict(engine.stats)


@pytest.fixture(scope="module")
def clean_outputs(clean_run) -> list[list[int]]:
    return clean_run[0]


# --------------------------------------------------------------------- add_request
@pytest.mark.parametrize("params", [None, {}, "greedy", 3, SamplingParams])
def test_add_request_refuses_what_is_not_sampling_params(params, clean_outputs) -> None:
    engine = busy_engine()
    message = refused(engine, ArgumentTypeError, TypeError,
                      lambda: engine.add_request([1, 2], params))  # fmt: skip
    assert "params must be a SamplingParams" in message
    if params is None:  # it was once queued, and the engine never finished
        assert finish(engine) == clean_outputs


BAD_PROMPTS = [
    ("abc", ArgumentTypeError, TypeError, "str"),
    (b"ab", ArgumentTypeError, TypeError, "bytes"),
    (None, ArgumentTypeError, TypeError, "None"),
    (5, ArgumentTypeError, TypeError, "5"),
    ({1, 2}, ArgumentTypeError, TypeError, "set"),
    ([1.5, 2], ArgumentTypeError, TypeError, "1.5"),
    ([True, 2], ArgumentTypeError, TypeError, "True"),
    (["1"], ArgumentTypeError, TypeError, "'1'"),
    ([[1, 2]], ArgumentTypeError, TypeError, r"\[1, 2\]"),
    (np.array([[1, 2]]), ArgumentTypeError, TypeError, "1-D"),
    (torch.tensor([1.0, 2.0]), ArgumentTypeError, TypeError, "float"),
    ([], InvalidLengthError, ValueError, "at least one token"),
    (np.zeros(0, np.int64), InvalidLengthError, ValueError, "at least one token"),
    ([1, VOCAB], InvalidArgumentError, ValueError, r"\[0, 64\).*\[64\]"),
    (torch.tensor([-1, 3]), InvalidArgumentError, ValueError, r"\[-1\]"),
    ([2**63], InvalidArgumentError, ValueError, "2\\*\\*63"),
]


@pytest.mark.parametrize(("prompt", "error", "builtin", "message"), BAD_PROMPTS)
def test_add_request_refuses_bad_prompts(prompt, error, builtin, message) -> None:
    engine = busy_engine()
    text = refused(engine, error, builtin, lambda: engine.add_request(prompt, SamplingParams()))
    assert re.search(message, text), text


def test_a_request_that_can_never_fit_the_pool_is_refused(monkeypatch) -> None:
    engine = busy_engine()  # 32 pages of 4 tokens
    too_long = lambda: engine.add_request([1] * 120, SamplingParams(max_new_tokens=10))  # noqa: E731
    message = refused(engine, InvalidArgumentError, ValueError, too_long)
    assert "needs 33 pages of 4 tokens" in message and "has 32 for requests" in message
    # 128 tokens fill the pool exactly, unless the runner keeps a page (a graph's scratch)
    fits = lambda: engine.add_request([1] * 120, SamplingParams(max_new_tokens=9))  # noqa: E731
    monkeypatch.setattr(PagedCausalLM, "reserved_pages", property(lambda self: 1))
    assert "1 kept by the runner" in refused(engine, InvalidArgumentError, ValueError, fits)
    monkeypatch.undo()
    fits()
    assert len(finish(engine)[-1]) == 9


def test_generate_checks_every_prompt_before_queuing_any() -> None:
    engine = busy_engine()
    prompts = [[1, 2], [3, 4], [5, VOCAB]]
    params = SamplingParams(max_new_tokens=2)
    message = refused(engine, InvalidArgumentError, ValueError,
                      lambda: engine.generate(prompts, params))  # fmt: skip
    assert message.startswith("prompts[2]:")
    for bad, error, builtin in (
        ([[1, 2], [1.5]], ArgumentTypeError, TypeError),
        ([[1, 2], []], InvalidLengthError, ValueError),
        ([[1] * 200], InvalidArgumentError, ValueError),  # never fits 32 pages of 4
        ("abc", ArgumentTypeError, TypeError),
        (None, ArgumentTypeError, TypeError),
    ):
        refused(engine, error, builtin, lambda: engine.generate(bad, params))  # noqa: B023
    refused(engine, ArgumentTypeError, TypeError, lambda: engine.generate([[1, 2]], None))
    assert engine.generate([], params) == []


def test_refused_requests_take_no_id() -> None:
    engine = Engine(PagedCausalLM(shared_llama(), num_pages=8, page_size=4))
    for bad in ("ab", [], [VOCAB]):
        with pytest.raises(SeqAttnError):
            engine.add_request(bad, SamplingParams())
    assert not engine.has_work and not engine.requests
    assert engine.add_request([1, 2], SamplingParams(max_new_tokens=1)) == 0


# --------------------------------------------------------------------- constructor
BAD_SETTINGS = [
    ({"max_batch_size": 0}, InvalidArgumentError, ValueError),
    ({"max_batch_size": 1.5}, ArgumentTypeError, TypeError),
    ({"max_batch_size": True}, ArgumentTypeError, TypeError),
    ({"max_step_tokens": -1}, InvalidArgumentError, ValueError),
    ({"max_step_tokens": "512"}, ArgumentTypeError, TypeError),
    ({"seed": 1.5}, ArgumentTypeError, TypeError),
    ({"seed": "0"}, ArgumentTypeError, TypeError),
    ({"seed": None}, ArgumentTypeError, TypeError),
    ({"seed": 2**64}, InvalidArgumentError, ValueError),
    ({"cuda_graphs": 1}, ArgumentTypeError, TypeError),
    ({"cuda_graphs": None}, ArgumentTypeError, TypeError),
]


@pytest.mark.parametrize(("options", "error", "builtin"), BAD_SETTINGS)
def test_engine_refuses_bad_settings(options, error, builtin) -> None:
    engine = busy_engine()
    message = refused(engine, error, builtin, lambda: Engine(engine.runner, **options))
    (name,) = options
    assert message.startswith(name) and repr(options[name])[:10] in message


def test_engine_refuses_what_is_not_a_runner() -> None:
    with pytest.raises(ArgumentTypeError, match="runner must be a PagedCausalLM"):
        Engine(shared_llama())  # the bare model, not wrapped
    assert issubclass(ArgumentTypeError, TypeError)


def test_engine_accepts_numpy_settings_and_the_seed_range() -> None:
    runner = PagedCausalLM(shared_llama(), num_pages=8, page_size=4)
    for seed in (-(2**63), 2**64 - 1, np.int64(3)):
        Engine(runner, max_batch_size=np.int32(2), seed=seed, cuda_graphs=np.bool_(False))


@pytest.mark.parametrize("eos", [2.5, [1, "2"], "2"])
def test_a_malformed_end_of_sequence_id_is_refused_by_the_constructor(eos) -> None:
    model = tiny_llama()
    model.generation_config.eos_token_id = eos
    with pytest.raises(ArgumentTypeError, match="eos_token_id"):
        Engine(PagedCausalLM(model, num_pages=8, page_size=4))


def test_end_of_sequence_ids_are_read_once() -> None:
    model = tiny_llama()
    model.generation_config.eos_token_id = [7, np.int64(9)]
    engine = Engine(PagedCausalLM(model, num_pages=8, page_size=4))
    assert engine.eos_token_ids == (7, 9)
    model.generation_config.eos_token_id = 11
    assert engine.eos_token_ids == (7, 9)
    del model.generation_config
    assert Engine(PagedCausalLM(model, num_pages=8, page_size=4)).eos_token_ids == ()


# ------------------------------------------------------------ a step that raises
class Boom(RuntimeError):
    pass


def fail_once(monkeypatch, owner, name: str, after: int = 0, late: bool = False) -> list[tuple]:
    """Make ``owner.name`` raise Boom on its call number ``after`` (0-based), once: before
    it runs, or with ``late`` after it has run (a forward that wrote K/V, then failed).
    Returns each call's arguments."""
    original, calls = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        calls.append(args)
        if len(calls) != after + 1:
            return original(*args, **kwargs)
        if late:
            original(*args, **kwargs)
        raise Boom(f"{name} failed")

    monkeypatch.setattr(owner, name, wrapped)
    return calls


def assert_consistent(engine: Engine) -> None:
    """Queues, requests and the cache's sequences agree."""
    desc = engine.descriptor
    running = {r.id for r in engine.running}
    assert set(desc.seq_ids) == running
    assert not running & {r.id for r in engine.waiting}
    for request in engine.running:
        assert desc.seq_len(request.id) == request.computed
    desc.check_integrity()


@pytest.mark.parametrize(
    ("where", "after", "late"),
    [
        ("forward", 0, False),  # a prefill chunk next to a decode row
        ("forward", 0, True),
        ("decode", 0, False),  # decoding ahead, from the device's samples
        ("decode", 3, True),
        ("sample", 0, False),
        ("sample", 2, False),
    ],
)
def test_a_step_that_raises_is_undone_and_retried(
    where: str, after: int, late: bool, monkeypatch, clean_run
) -> None:
    engine = busy_engine()
    owner = engine_module if where == "sample" else engine.runner
    calls = fail_once(monkeypatch, owner, where, after, late)
    failures = 0
    while engine.has_work:
        stats = attrs.asdict(engine.stats)
        try:
            engine.step()
        except Boom:
            failures += 1
            assert attrs.asdict(engine.stats) == stats  # no step, token or prompt token counted
            assert_consistent(engine)
    assert failures == 1 and len(calls) > after + 1  # retried
    assert [r.output for _, r in sorted(engine.requests.items())] == clean_run[0]
    assert attrs.asdict(engine.stats) == clean_run[1]
    assert engine.runner.cache.available_pages_count == engine.runner.cache.num_pages


def test_a_request_stays_queued_when_starting_it_raises(monkeypatch, clean_outputs) -> None:
    engine = busy_engine()
    calls = fail_once(monkeypatch, engine.descriptor, "start_sequence")
    with pytest.raises(Boom):
        while engine.has_work:
            engine.step()
    (request_id, _), *_ = calls
    assert engine.waiting[0].id == request_id
    assert engine.requests[request_id].status.value == "waiting"
    assert_consistent(engine)
    assert finish(engine) == clean_outputs


def test_pages_held_outside_the_engine_stop_a_step_until_they_are_freed() -> None:
    """A request that fits the pool, but not what others leave of it, makes step() raise
    NoPageError with nothing allocated; once the pages are back, the engine goes on."""
    prompt, params = list(range(1, 21)), SamplingParams(max_new_tokens=8)  # 27 tokens: 7 pages
    outputs = []
    for hog in (False, True):
        engine = Engine(PagedCausalLM(shared_llama(), num_pages=8, page_size=4))
        request_id = engine.add_request(prompt, params)
        if hog:
            engine.descriptor.allocate([999], [8])  # 2 of the 8 pages, outside the engine
            with pytest.raises(NoPageError) as info:
                while engine.has_work:
                    engine.step()
            assert isinstance(info.value, RuntimeError)
            assert "give the engine more pages" in str(info.value)
            request = engine.requests[request_id]
            assert engine.running == [request] and engine.has_work
            assert set(engine.descriptor.seq_ids) == {999, request_id}
            assert engine.descriptor.seq_len(request_id) == request.computed
            engine.descriptor.release([999])
        outputs.append(finish(engine))
    assert outputs[0] == outputs[1] and len(outputs[0][0]) == 8
