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


def test_a_request_stops_at_its_stop_ids_and_the_models_end_of_sequence_ids() -> None:
    def finished_after(params: SamplingParams, tokens: list[int]) -> list[bool]:
        request = Request(0, [1], params, eos_token_ids=(2, 3))
        done = []
        for token in tokens:
            request.output.append(token)
            done.append(request.finish_if_done())
        return done

    assert finished_after(SamplingParams(5), [4, 3]) == [False, True]  # end of sequence
    assert finished_after(SamplingParams(5, stop_token_ids=[9]), [9]) == [True]
    ignoring = SamplingParams(3, stop_token_ids=[9], ignore_eos=True)
    assert finished_after(ignoring, [2, 3, 4]) == [False, False, True]  # at max_new_tokens
    assert finished_after(ignoring, [9]) == [True]  # its own stop ids still count
    request = Request(0, [1], SamplingParams(4), eos_token_ids=(2,))
    request.output = [2]
    assert request.finish_if_done() and request.finish_reason == "stop"
