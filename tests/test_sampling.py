"""The engine's sampler against the definitions of temperature, top-k and top-p."""

from __future__ import annotations

import math

import pytest
import torch

from seqattn import InvalidArgumentError
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


def test_bad_params_are_refused() -> None:
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0)):
        with pytest.raises(InvalidArgumentError):
            SamplingParams(**bad)
