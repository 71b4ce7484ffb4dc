"""A request's view of its tokens: prompt, output, and what the cache holds."""

from __future__ import annotations

from seqattn.engine import Request, SamplingParams


def test_request_inputs_span_prompt_and_output() -> None:
    request = Request(0, [1, 2, 3], SamplingParams())
    request.output = [4, 5]
    for computed in range(5):
        request.computed = computed
        for n in range(1, 6 - computed):
            assert request.next_inputs(n) == request.tokens[computed : computed + n]
    assert request.last_token == 5
