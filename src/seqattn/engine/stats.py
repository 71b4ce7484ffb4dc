"""What the engine counts: its stats, and a record of each preemption."""

from __future__ import annotations

from attrs import define


@define
class EngineStats:
    """Counters since the engine started."""

    steps: int = 0
    prompt_tokens: int = 0
    computed_prompt_tokens: int = 0  # prompt (and recomputed) tokens that ran the model
    generated_tokens: int = 0
    preemptions: int = 0
    decoded_ahead: int = 0  # steps launched with decode rows fed the unread last samples


@define(frozen=True)
class Preemption:
    """One preemption and why it happened: before step ``step`` (the steps launched so
    far), the running requests' rows needed ``pages_needed`` pages of the pool (each
    decode row one token, each prefill row its chunk, uncut) and ``pages_available``
    were available, so request ``request_id`` gave its pages back."""

    step: int
    request_id: int
    pages_needed: int
    pages_available: int
