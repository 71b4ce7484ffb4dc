"""The engine's sampler against the definitions of temperature, top-k and top-p."""

from __future__ import annotations

import math

import attrs
import numpy as np
import pytest
import torch

from seqattn import ArgumentTypeError, InvalidArgumentError
from seqattn.engine import SamplingParams, sample

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def frequencies(params: SamplingParams, n: int = 20000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    tokens = sample(LOGITS.expand(n, 4).clone(), [params] * n, gen)
    return torch.bincount(tokens, minlength=4).double() / n


def test_greedy_is_argmax() -> None:
    logits = torch.randn(6, 50)
    tokens = sample(logits, [SamplingParams()] * 6, torch.Generator())
    assert torch.equal(tokens, logits.argmax(-1))


def test_temperature_one_follows_the_softmax() -> None:
    torch.testing.assert_close(frequencies(SamplingParams(temperature=1.0)), PROBS.double(),
                               atol=0.015, rtol=0)  # fmt: skip


def test_temperature_sharpens() -> None:
    want = PROBS.double() ** 2 / (PROBS.double() ** 2).sum()  # temperature 0.5
    torch.testing.assert_close(frequencies(SamplingParams(temperature=0.5)), want,
                               atol=0.015, rtol=0)  # fmt: skip


def test_top_k_keeps_the_k_most_likely() -> None:
    got = frequencies(SamplingParams(temperature=1.0, top_k=2))
    assert got[2:].sum() == 0
    torch.testing.assert_close(got[:2], torch.tensor([0.625, 0.375], dtype=torch.float64),
                               atol=0.015, rtol=0)  # fmt: skip


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    got = frequencies(SamplingParams(temperature=1.0, top_p=0.7))  # 0.5 + 0.3 >= 0.7
    assert got[2:].sum() == 0 and math.isclose(got[0].item(), 0.625, abs_tol=0.015)
    assert frequencies(SamplingParams(temperature=1.0, top_p=0.1))[0] == 1.0  # the best stays


def test_rows_mix_greedy_and_sampled() -> None:
    logits = torch.randn(4, 30)
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1)] * 2
    tokens = sample(logits, params, torch.Generator().manual_seed(1))
    assert torch.equal(tokens, logits.argmax(-1))  # top_k=1 is greedy too


BAD_SETTINGS = [
    (dict(max_new_tokens=0), InvalidArgumentError, ValueError, "max_new_tokens.*got 0"),
    (dict(max_new_tokens=2.5), ArgumentTypeError, TypeError, r"max_new_tokens.*2\.5 \(float\)"),
    (dict(max_new_tokens=True), ArgumentTypeError, TypeError, "True"),
    (dict(max_new_tokens=None), ArgumentTypeError, TypeError, "None"),
    (dict(max_new_tokens="8"), ArgumentTypeError, TypeError, "'8'"),
    (dict(max_new_tokens=2**63), InvalidArgumentError, ValueError, "max_new_tokens"),
    (dict(temperature=-1.0), InvalidArgumentError, ValueError, r"temperature.*-1\.0"),
    (dict(temperature=math.nan), InvalidArgumentError, ValueError, "temperature.*nan"),
    (dict(temperature=math.inf), InvalidArgumentError, ValueError, "temperature.*inf"),
    (dict(temperature="0.7"), ArgumentTypeError, TypeError, "temperature.*'0.7'"),
    (dict(temperature=True), ArgumentTypeError, TypeError, "temperature.*True"),
    (dict(top_k=-2), InvalidArgumentError, ValueError, "top_k.*-2"),
    (dict(top_k=2.5), ArgumentTypeError, TypeError, r"top_k.*2\.5"),
    (dict(top_k=None), ArgumentTypeError, TypeError, "top_k.*None"),
    (dict(top_p=0.0), InvalidArgumentError, ValueError, r"top_p.*\(0\.0, 1\.0\]"),
    (dict(top_p=1.5), InvalidArgumentError, ValueError, "top_p.*1.5"),
    (dict(top_p=math.nan), InvalidArgumentError, ValueError, "top_p.*nan"),
    (dict(top_p=[0.9]), ArgumentTypeError, TypeError, "top_p"),
    (dict(stop_token_ids="ab"), ArgumentTypeError, TypeError, r"stop_token_ids.*'ab' \(str\)"),
    (dict(stop_token_ids=b"ab"), ArgumentTypeError, TypeError, "stop_token_ids.*bytes"),
    (dict(stop_token_ids=None), ArgumentTypeError, TypeError, "stop_token_ids.*None"),
    (dict(stop_token_ids=2), ArgumentTypeError, TypeError, r"stop_token_ids.*2 \(int\)"),
    (dict(stop_token_ids=[1.0]), ArgumentTypeError, TypeError, "stop_token_ids.*1.0"),
    (dict(stop_token_ids=[True]), ArgumentTypeError, TypeError, "stop_token_ids.*True"),
    (dict(stop_token_ids=[-1]), InvalidArgumentError, ValueError, r"stop_token_ids.*\[-1\]"),
    (dict(stop_token_ids={1: 2}), ArgumentTypeError, TypeError, "stop_token_ids.*dict"),
    (dict(ignore_eos=1), ArgumentTypeError, TypeError, r"ignore_eos.*1 \(int\)"),
    (dict(ignore_eos=None), ArgumentTypeError, TypeError, "ignore_eos.*None"),
]


@pytest.mark.parametrize(("settings", "error", "builtin", "message"), BAD_SETTINGS)
def test_bad_params_are_refused(settings, error, builtin, message) -> None:
    """Each setting is checked when the params are made: the SeqAttnError is also the
    builtin, and the message names the setting and shows the value."""
    assert issubclass(error, builtin)
    with pytest.raises(error, match=message):
        SamplingParams(**settings)


def test_params_are_normalized() -> None:
    params = SamplingParams(
        max_new_tokens=np.int64(8), temperature=np.float32(0.5), top_k=np.int32(3), top_p=1,
        stop_token_ids=(t for t in [3, 1]), ignore_eos=np.bool_(True),
    )  # fmt: skip
    assert params == SamplingParams(8, 0.5, 3, 1.0, (3, 1), True)
    assert type(params.max_new_tokens) is int and type(params.top_p) is float
    assert params.stop_token_ids == (3, 1) and type(params.stop_token_ids[0]) is int
    assert SamplingParams(stop_token_ids={7, 2}).stop_token_ids == (2, 7)
    assert SamplingParams(stop_token_ids=np.array([4])).stop_token_ids == (4,)
    assert SamplingParams(stop_token_ids=torch.tensor([5, 6])).stop_token_ids == (5, 6)
    assert SamplingParams().ignore_eos is False
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        params.top_k = 2  # type: ignore[misc]
    with pytest.raises(ArgumentTypeError):  # evolve checks as the constructor does
        attrs.evolve(params, top_k=1.5)


def test_a_tiny_temperature_is_greedy_not_nan() -> None:
    """Logits divided by a temperature below float32's range overflowed to inf - inf."""
    logits = torch.randn(5, 40) * 10
    params = [SamplingParams(temperature=1e-300)] * 5
    tokens = sample(logits, params, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, logits.argmax(-1))
