"""PagedCausalLM's contract: a bad model, setting, sequence id or token is refused with a
SeqAttnError that is also the matching builtin, before the model is switched or run, and
nothing changes (sequences, pages, KV)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from seqattn import (  # noqa: E402
    ArgumentTypeError,
    DuplicateSequenceError,
    InvalidArgumentError,
    InvalidLengthError,
    SeqAttnError,
    TensorSpecError,
    UnknownSequenceError,
)
from seqattn.integrations.hf import PagedCausalLM  # noqa: E402
from tests.conftest import assert_raises_unchanged  # noqa: E402

VOCAB = 64
CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=VOCAB,
)  # fmt: skip


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()


@functools.cache
def shared_llama() -> torch.nn.Module:
    return tiny_llama()


# --------------------------------------------------------------------- constructor
def not_causal_lms() -> list[tuple[object, type[SeqAttnError], type[Exception], str]]:
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB)
    )
    base = transformers.LlamaModel(transformers.LlamaConfig(**CONFIG))
    return [
        (None, ArgumentTypeError, TypeError, "torch module with a config"),
        ("llama", ArgumentTypeError, TypeError, "'llama' \\(str\\)"),
        (torch.nn.Linear(2, 2), ArgumentTypeError, TypeError, "Linear"),
        (gpt2, InvalidArgumentError, ValueError, "'gpt2' is not supported"),
        (base, InvalidArgumentError, ValueError, "LlamaModel has none"),
    ]


def test_a_model_that_is_not_a_supported_causal_lm_is_refused() -> None:
    for model, error, builtin, message in not_causal_lms():
        assert issubclass(error, builtin)
        before = getattr(getattr(model, "config", None), "_attn_implementation", None)
        with pytest.raises(error, match=message):
            PagedCausalLM(model, num_pages=8)
        after = getattr(getattr(model, "config", None), "_attn_implementation", None)
        assert before == after  # the model was not switched to seqattn's attention


BAD_SETTINGS = [
    ({"num_pages": 0}, InvalidArgumentError, ValueError, "num_pages.*got 0"),
    ({"num_pages": 2.5}, ArgumentTypeError, TypeError, r"num_pages.*2\.5 \(float\)"),
    ({"num_pages": True}, ArgumentTypeError, TypeError, "num_pages.*True"),
    ({"num_pages": "8"}, ArgumentTypeError, TypeError, "num_pages.*'8'"),
    ({"page_size": 0}, InvalidArgumentError, ValueError, "page_size.*got 0"),
    ({"page_size": None}, ArgumentTypeError, TypeError, "page_size.*None"),
    ({"prefix_caching": 1}, ArgumentTypeError, TypeError, r"prefix_caching.*1 \(int\)"),
    ({"prefix_caching": "yes"}, ArgumentTypeError, TypeError, "prefix_caching.*'yes'"),
    ({"backend": "cuda"}, InvalidArgumentError, ValueError, "backend must be one of.*'cuda'"),
    ({"backend": "Torch"}, InvalidArgumentError, ValueError, "'auto', 'flashinfer', 'torch'"),
    ({"backend": None}, ArgumentTypeError, TypeError, "backend.*None"),
]


@pytest.mark.parametrize(("options", "error", "builtin", "message"), BAD_SETTINGS)
def test_bad_settings_are_refused_before_the_model_changes(
    options, error, builtin, message
) -> None:
    assert issubclass(error, builtin)
    model = tiny_llama()
    before = model.config._attn_implementation
    with pytest.raises(error, match=message):
        PagedCausalLM(model, **{"num_pages": 8, **options})
    assert model.config._attn_implementation == before


def test_numpy_settings_are_accepted() -> None:
    runner = PagedCausalLM(shared_llama(), num_pages=np.int64(8), page_size=np.int32(4),
                           prefix_caching=np.bool_(False), backend="torch")  # fmt: skip
    assert runner.cache.num_pages == 8 and runner.descriptor.prefix_cache is None
    assert runner.vocab_size == VOCAB and runner.reserved_pages == 0


# ---------------------------------------------------------------- forward / decode
@pytest.fixture
def runner() -> PagedCausalLM:
    """Sequences 0 (5 tokens) and 1 (3 tokens) computed, 0 grown by one more token, and
    an empty sequence 2; a hook counts the model's forwards."""
    runner = PagedCausalLM(shared_llama(), num_pages=16, page_size=4)
    runner.descriptor.allocate([0, 1, 2], [5, 3, 0])
    runner.forward([0, 1], [[1, 2, 3, 4, 5], [6, 7, 8]])
    runner.descriptor.allocate_decoding([0])
    runner.calls = []  # type: ignore[attr-defined]
    hook = runner.model.register_forward_pre_hook(lambda *_: runner.calls.append(1))
    yield runner
    hook.remove()


def runner_state(runner: PagedCausalLM) -> tuple:
    desc, cache = runner.descriptor, runner.cache
    kv = torch.stack([cache.get_kv_cache(layer) for layer in range(cache.num_layers)]).clone()
    ids = desc.seq_ids
    return (ids, desc.seq_lens(ids).tolist(), cache.available_pages_count,
            len(runner.calls), kv)  # fmt: skip


def refused(runner, error, builtin, call, message: str) -> None:
    assert issubclass(error, builtin)
    assert_raises_unchanged(lambda: runner_state(runner), error, call)
    with pytest.raises(builtin, match=message):
        call()


BAD_FORWARDS = [
    ([0], [[VOCAB]], InvalidArgumentError, ValueError, r"tokens\[0\].*\[0, 64\).*\[64\]"),
    ([0], [[-1]], InvalidArgumentError, ValueError, r"\[-1\]"),
    ([0], [[1.5]], ArgumentTypeError, TypeError, r"tokens\[0\].*1\.5"),
    ([0], [["a"]], ArgumentTypeError, TypeError, "'a'"),
    ([0], ["ab"], ArgumentTypeError, TypeError, "'ab'"),
    ([0], "ab", ArgumentTypeError, TypeError, "one sequence of token ids per sequence"),
    ([0], 5, ArgumentTypeError, TypeError, "5 \\(int\\)"),
    ([0], [torch.tensor([1.0])], ArgumentTypeError, TypeError, "float"),
    ([0], [[1], [2]], InvalidLengthError, ValueError, r"one token row per sequence \(1\), got 2"),
    ([0, 1], [[1]], InvalidLengthError, ValueError, "got 1"),
    ([0], [[]], InvalidLengthError, ValueError, r"rows \[0\] are empty"),
    ([], [], InvalidLengthError, ValueError, "at least one sequence"),
    ([9], [[1]], UnknownSequenceError, KeyError, "9"),
    ([0, 0], [[1], [2]], DuplicateSequenceError, ValueError, r"repeated: \[0\]"),
    ([1], [[1, 2, 3, 4]], InvalidLengthError, ValueError, "holds 3 tokens.*4 new"),
    ([2], [[1]], InvalidLengthError, ValueError, "sequence 2 holds 0 tokens"),
    ("0", [[1]], ArgumentTypeError, TypeError, "'0'"),
    ([True], [[1]], ArgumentTypeError, TypeError, "True"),
    ([0.0], [[1]], ArgumentTypeError, TypeError, "0.0"),
]


@pytest.mark.parametrize(("ids", "tokens", "error", "builtin", "message"), BAD_FORWARDS)
def test_forward_refuses_before_the_model_runs(runner, ids, tokens, error, builtin, message):
    refused(runner, error, builtin, lambda: runner.forward(ids, tokens), message)


def meta(dtype: torch.dtype, n: int = 1) -> torch.Tensor:
    """A tensor on a device that is not the model's, whose values cannot be read."""
    return torch.zeros(n, dtype=dtype, device="meta")


BAD_DECODES = [
    ([0], [VOCAB], InvalidArgumentError, ValueError, r"\[0, 64\).*\[64\]"),
    ([0], torch.tensor([VOCAB + 5]), InvalidArgumentError, ValueError, r"\[69\]"),
    ([0], [1.5], ArgumentTypeError, TypeError, "1.5"),
    ([0], torch.tensor([1.0]), ArgumentTypeError, TypeError, "float"),
    ([0], "a", ArgumentTypeError, TypeError, "'a'"),
    ([0], [1, 2], InvalidLengthError, ValueError, r"one token per sequence \(1\), got 2"),
    ([0], meta(torch.int64), TensorSpecError, ValueError, "on cpu, got .* on meta"),
    ([0], meta(torch.int32), TensorSpecError, ValueError, "torch.int64.*got torch.int32"),
    ([0], meta(torch.int64, 2), TensorSpecError, ValueError, r"shape \[1\].*shape \[2\]"),
    ([2], [1], InvalidLengthError, ValueError, "sequence 2 holds 0 tokens"),
    ([9], [1], UnknownSequenceError, KeyError, "9"),
    ([0, 0], [1, 2], DuplicateSequenceError, ValueError, "repeated: \\[0\\]"),
    ([], [], InvalidLengthError, ValueError, "at least one sequence"),
]


@pytest.mark.parametrize(("ids", "tokens", "error", "builtin", "message"), BAD_DECODES)
def test_decode_refuses_before_the_model_runs(runner, ids, tokens, error, builtin, message):
    refused(runner, error, builtin, lambda: runner.decode(ids, tokens), message)


def test_checked_calls_give_the_unchecked_logits(runner) -> None:
    """What passes the checks runs as before: numpy, tensors and lists alike."""
    from_list = runner.decode([0], [6])
    from_numpy = runner.decode(np.array([0]), np.array([6]))
    from_tensor = runner.forward(torch.tensor([0]), [torch.tensor([6])])
    torch.testing.assert_close(from_list, from_numpy, rtol=0, atol=0)
    torch.testing.assert_close(from_list, from_tensor, rtol=0, atol=0)
    assert len(runner.calls) == 3


BAD_FED = [
    ([0, 1], [[7]], [6], ArgumentTypeError, TypeError, r"fed must be a tensor.*\[6\]"),
    ([0, 1], [[7]], torch.tensor([[6]]), InvalidLengthError, ValueError,
     r"0 < k < 2, got shape \[1, 1\]"),
    ([0, 1], [], torch.tensor([6, 7]), InvalidLengthError, ValueError,
     r"0 < k < 2, got shape \[2\].*decode step"),
    ([0, 1], [[7]], meta(torch.int64), TensorSpecError, ValueError, "on cpu, got .* on meta"),
    ([0, 1], [[7]], torch.tensor([6], dtype=torch.int32), TensorSpecError, ValueError,
     "torch.int64.*got torch.int32"),
    ([0, 1], [[7]], torch.tensor([VOCAB]), InvalidArgumentError, ValueError, r"fed.*\[64\]"),
    ([0, 1], [[7], [8]], torch.tensor([6]), InvalidLengthError, ValueError,
     r"one token row per sequence \(1\), got 2"),
    ([2, 1], [[7]], torch.tensor([6]), InvalidLengthError, ValueError, "sequence 2 holds 0"),
]  # fmt: skip


@pytest.mark.parametrize(("ids", "tokens", "fed", "error", "builtin", "message"), BAD_FED)
def test_forward_with_fed_tokens_refuses_before_the_model_runs(
    runner, ids, tokens, fed, error, builtin, message
):
    refused(runner, error, builtin, lambda: runner.forward(ids, tokens, fed=fed), message)


def test_fed_tokens_give_the_logits_of_the_same_tokens_from_the_host(runner) -> None:
    """A mixed step: sequence 0's decode token already on the device, sequence 1's
    chunk from the host, in one forward; the logits are those of the host tokens."""
    runner.descriptor.allocate([1], [2])
    from_host = runner.forward([0, 1], [[6], [7, 8]])
    fed = runner.forward([0, 1], [[7, 8]], fed=torch.tensor([6]))
    torch.testing.assert_close(fed, from_host, rtol=0, atol=0)
    assert fed.shape == (2, VOCAB) and len(runner.calls) == 2
