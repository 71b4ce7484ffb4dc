"""HeadwiseCausalLM's contract: a bad model, setting, id, token or flag is refused with a
SeqAttnError that is also the matching builtin, before the model is switched or run,
and nothing changes (sequences, positions, press state, pages, KV). A step that fails
inside the model leaves only its own sequences unusable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from seqattn import (  # noqa: E402
    ArgumentTypeError,
    DuplicateSequenceError,
    InvalidArgumentError,
    InvalidLengthError,
    NoPageError,
    SeqAttnError,
    SequenceExistsError,
    TensorSpecError,
    UnknownSequenceError,
)
from seqattn.headwise.press import Press, StreamingLLMPress  # noqa: E402
from seqattn.integrations.hf_headwise import HeadwiseCausalLM  # noqa: E402
from tests.conftest import assert_raises_unchanged  # noqa: E402

VOCAB = 64
CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)  # fmt: skip


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()


# --------------------------------------------------------------------- constructor
def test_bad_models_and_settings_are_refused_before_the_model_is_switched() -> None:
    model = tiny_llama()
    mistral = transformers.MistralForCausalLM(
        transformers.MistralConfig(**CONFIG, sliding_window=8)
    )
    cases = [
        (None, {}, ArgumentTypeError, TypeError, "torch module with a config"),
        (transformers.LlamaModel(transformers.LlamaConfig(**CONFIG)), {}, InvalidArgumentError,
         ValueError, "LlamaModel has none"),
        (model, {"num_pages": 2.5}, ArgumentTypeError, TypeError, "num_pages"),
        (model, {"num_pages": 0}, InvalidArgumentError, ValueError, "num_pages"),
        (model, {"page_size": True}, ArgumentTypeError, TypeError, "page_size"),
        (model, {"backend": None}, ArgumentTypeError, TypeError, "backend"),
        (model, {"backend": "cuda"}, InvalidArgumentError, ValueError, "backend"),
        (mistral, {}, InvalidArgumentError, ValueError, "sliding-window.*8 tokens"),
    ]  # fmt: skip
    for candidate, settings, error, builtin, message in cases:
        before = getattr(getattr(candidate, "config", None), "_attn_implementation", None)
        kwargs = {"num_pages": 16, **settings}
        with pytest.raises(error, match=message) as info:
            HeadwiseCausalLM(candidate, **kwargs)
        assert isinstance(info.value, builtin)
        after = getattr(getattr(candidate, "config", None), "_attn_implementation", None)
        assert before == after != "seqattn_headwise"


def test_the_model_runs_only_through_the_runner() -> None:
    runner = HeadwiseCausalLM(tiny_llama(), num_pages=16, page_size=4)
    with pytest.raises(SeqAttnError, match="HeadwiseCausalLM"):
        runner.model(input_ids=torch.tensor([[1, 2]]))


# ---------------------------------------------------------------- the calls
class Boom(Press):
    """A press that raises on its second layer."""

    def select(self, view, budget):
        if view.layer == 1:
            raise RuntimeError("boom")
        return [np.arange(min(n, budget)) for n in view.lens.tolist()]


@pytest.fixture
def runner() -> HeadwiseCausalLM:
    """Sequences 0 (7 tokens, pressed, decoding), 1 (a prompt left open after 3 tokens)
    and 2 (empty); a hook counts the model's forwards."""
    runner = HeadwiseCausalLM(tiny_llama(), num_pages=40, page_size=4)
    runner.add_sequences([0], press=StreamingLLMPress(sinks=1), budget=4, compress_every=2)
    runner.add_sequences([1, 2])
    runner.forward([0, 1], [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10]], ends_prompt=[True, False])
    runner.decode([0], [5])
    runner.calls = []  # type: ignore[attr-defined]
    hook = runner.model.register_forward_pre_hook(lambda *_: runner.calls.append(1))
    yield runner
    hook.remove()


def state(runner: HeadwiseCausalLM) -> tuple:
    cache = runner.cache
    ids = cache.seq_ids
    held = [[p.tolist() for layer in runner.held_positions(s) for p in layer] for s in ids]
    requests = sorted((s, r.prompt_open, r.decoded) for s, r in runner.requests.items())
    return (ids, [cache.seq_len(s) for s in ids], held, requests, cache.available_pages_count,
            runner.last_compressed, len(runner.calls), cache.kv_pages.clone())  # fmt: skip


def refused(runner, error, builtin, call, message: str) -> None:
    assert issubclass(error, builtin)
    assert_raises_unchanged(lambda: state(runner), error, call)
    with pytest.raises(builtin, match=message):
        call()


BAD_FORWARDS = [
    (([0], [[VOCAB]]), {}, InvalidArgumentError, ValueError, r"tokens\[0\].*\[0, 64\)"),
    (([0], [[1.5]]), {}, ArgumentTypeError, TypeError, r"tokens\[0\]"),
    (([0], "ab"), {}, ArgumentTypeError, TypeError, "one sequence of token ids"),
    (([0, 1], [[1]]), {}, InvalidLengthError, ValueError, r"one token row per sequence \(2\)"),
    (([0], [[]]), {}, InvalidLengthError, ValueError, "rows \\[0\\] are empty"),
    (([], []), {}, InvalidLengthError, ValueError, "at least one sequence"),
    (([0, 0], [[1], [2]]), {}, DuplicateSequenceError, ValueError, "0"),
    (([9], [[1]]), {}, UnknownSequenceError, KeyError, r"\[9\] are not live"),
    (([True], [[1]]), {}, ArgumentTypeError, TypeError, "True"),
    (([1], [[1]]), {"ends_prompt": 1}, ArgumentTypeError, TypeError, "ends_prompt"),
    (([1], [[1]]), {"ends_prompt": "yes"}, ArgumentTypeError, TypeError, "ends_prompt"),
    (([1], [[1]]), {"ends_prompt": [True, False]}, InvalidLengthError, ValueError,
     r"one ends_prompt flag per sequence \(1\)"),
    (([1], [[1]]), {"ends_prompt": [1]}, ArgumentTypeError, TypeError, r"ends_prompt\[0\]"),
    (([2], [list(range(60))]), {}, NoPageError, RuntimeError, "pages"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "kwargs", "error", "builtin", "message"), BAD_FORWARDS)
def test_bad_forwards_change_nothing(runner, args, kwargs, error, builtin, message) -> None:
    refused(runner, error, builtin, lambda: runner.forward(*args, **kwargs), message)


BAD_DECODES = [
    (([1], [1]), InvalidArgumentError, ValueError, r"\[1\] have no finished prompt"),
    (([2], [1]), InvalidArgumentError, ValueError, r"\[2\] have no finished prompt"),
    (([0], [1, 2]), InvalidLengthError, ValueError, r"one token per sequence \(1\)"),
    (([0], [VOCAB]), InvalidArgumentError, ValueError, r"\[0, 64\)"),
    (([0], [None]), ArgumentTypeError, TypeError, "None"),
    (([7], [1]), UnknownSequenceError, KeyError, "not live"),
    (([0], np.array([[1]])), ArgumentTypeError, TypeError, "1-D"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "error", "builtin", "message"), BAD_DECODES)
def test_bad_decodes_change_nothing(runner, args, error, builtin, message) -> None:
    refused(runner, error, builtin, lambda: runner.decode(*args), message)


BAD_STARTS = [
    ({"press": "streamingllm", "budget": 0.5}, ArgumentTypeError, TypeError, "Press or None"),
    ({"press": StreamingLLMPress()}, InvalidArgumentError, ValueError, "press needs a budget"),
    ({"budget": 0.5}, InvalidArgumentError, ValueError, "budget needs a press"),
    ({"press": StreamingLLMPress(), "budget": 0}, InvalidArgumentError, ValueError, "budget"),
    ({"press": StreamingLLMPress(), "budget": 1.5}, InvalidLengthError, ValueError, r"\(0, 1\]"),
    ({"press": StreamingLLMPress(), "budget": "0.5"}, ArgumentTypeError, TypeError, "budget"),
    ({"press": StreamingLLMPress(), "budget": True}, ArgumentTypeError, TypeError, "budget"),
    ({"press": StreamingLLMPress(), "budget": 4, "compress_every": 0}, InvalidArgumentError,
     ValueError, "compress_every"),
    ({"compress_every": 2}, InvalidArgumentError, ValueError, "compress_every needs a press"),
]  # fmt: skip


@pytest.mark.parametrize(("settings", "error", "builtin", "message"), BAD_STARTS)
def test_bad_press_settings_change_nothing(runner, settings, error, builtin, message) -> None:
    refused(runner, error, builtin, lambda: runner.add_sequences([5], **settings), message)


def test_bad_ids_change_nothing(runner) -> None:
    refused(runner, SequenceExistsError, ValueError, lambda: runner.add_sequences([5, 0]), "0")
    refused(runner, DuplicateSequenceError, ValueError, lambda: runner.add_sequences([5, 5]), "5")
    refused(runner, ArgumentTypeError, TypeError, lambda: runner.add_sequences("5"), "'5'")
    refused(runner, UnknownSequenceError, KeyError, lambda: runner.release([0, 5]), "5")
    refused(runner, ArgumentTypeError, TypeError, lambda: runner.release([0.0]), "0.0")


def test_device_tokens_are_checked(runner) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a device other than the CPU")
    bad = torch.tensor([1], dtype=torch.int32, device="cuda")
    refused(runner, TensorSpecError, ValueError, lambda: runner.decode([0], bad), "int64")


def test_decoding_compresses_every_n_steps_and_prompts_can_reopen(runner) -> None:
    assert runner.cache.head_lens(0, 0).tolist() == [5, 5]  # pressed to 4, then a decode
    runner.decode([0], [6])  # the 2nd decode step: pressed again
    assert runner.last_compressed == (0,) and runner.cache.head_lens(1, 0).tolist() == [4, 4]
    runner.forward([1], [[11, 12]])  # sequence 1's prompt ends (no press)
    runner.forward([0], [[1, 2, 3]])  # a new turn for 0: pressed when it ends
    assert runner.last_compressed == (0,) and runner.cache.head_lens(0, 0).tolist() == [4, 4]
    assert runner.cache.head_positions(0, 0, 0).tolist() == [0, 9, 10, 11]
    runner.decode([0, 1], [1, 2])
    assert runner.seq_len(0) == 13 and runner.seq_len(1) == 6


def test_a_press_that_raises_leaves_only_its_step_unusable(runner) -> None:
    runner.add_sequences([5], press=Boom(), budget=2)
    with pytest.raises(RuntimeError, match="boom"):
        runner.forward([5, 1], [[1, 2, 3], [4]])
    with pytest.raises(InvalidArgumentError, match=r"\[1, 5\] were in a step that failed"):
        runner.decode([1, 5], [1, 2])
    runner.decode([0], [3])  # the others go on
    runner.release([1, 5])
    runner.release([0, 2])
    runner.cache.check_integrity()
    assert runner.cache.available_pages_count == 40


def test_cuda_graph_settings_are_checked_and_stay_off_on_the_cpu(runner) -> None:
    call = runner.enable_cuda_graphs
    refused(runner, InvalidArgumentError, ValueError, lambda: call([0, 4]), "batch_sizes")
    refused(runner, ArgumentTypeError, TypeError, lambda: call([1.5]), "batch_sizes")
    refused(runner, InvalidArgumentError, ValueError, lambda: call([]), "at least one bucket")
    assert call((1, 2)) is False and runner.reserved_pages == 0  # no triton kernel on a CPU
    runner.decode([0], [1])  # eager, as before
    runner.disable_cuda_graphs()


def test_begin_step_takes_on_device_as_a_bool_only(runner) -> None:
    cache = runner.cache
    for bad in (1, "yes", None):
        refused(runner, ArgumentTypeError, TypeError,
                lambda bad=bad: cache.begin_step([0], on_device=bad), "on_device")  # fmt: skip
    step = cache.begin_step([0], on_device=False)  # packed on the host: the same step
    kv = torch.zeros(1, cache.num_kv_heads, cache.head_dim)
    for layer in range(cache.num_layers):
        cache.write(step, layer, kv, kv)
    assert step.tables is not None and step.tables.indptr.size == cache.num_layers * 2 + 1
