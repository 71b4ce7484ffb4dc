"""One generation request and where it stands."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from .sampling import SamplingParams

if TYPE_CHECKING:
    from ..integrations.press_requests import PressRequest


class Status(Enum):
    WAITING = "waiting"  # not holding pages (new, or preempted)
    RUNNING = "running"  # holds a sequence in the cache
    FINISHED = "finished"


class Request:
    """A prompt, its generated tokens, and how many of them the cache holds.

    ``tokens = prompt + output``. The sequence holds the KV of ``tokens[:computed]``; the
    rest are the request's next inputs (the whole prompt at first, one sampled token
    while decoding). ``eos_token_ids`` are the model's end-of-sequence ids: producing one
    ends the request (the token is kept; finish reason ``"stop"``) unless
    ``params.ignore_eos``. ``compression``: its press settings on a head-wise cache
    (press, budget, compress_every; checked), or None to keep every token. The engine
    makes requests from checked input
    (:meth:`Engine.add_request`); this class trusts its arguments.
    """

    def __init__(
        self,
        request_id: int,
        prompt: Union[list[int], np.ndarray],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        compression: Optional[PressRequest] = None,
    ) -> None:
        self.id = request_id
        # the prompt as the cache is asked with it: an int64 array is checked in O(1)
        # Python work, a list of ints one object at a time (a copy: the caller's array
        # may change later)
        self.prompt_ids = np.array(prompt, dtype=np.int64)
        self.prompt: list[int] = self.prompt_ids.tolist()
        self.params = params
        self.compression = compression
        # tokens that end the request when produced: its stop ids and, unless it ignores
        # them, the model's end-of-sequence ids
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops.update(eos_token_ids)
        self.stop_ids = frozenset(stops)
        self.output: list[int] = []
        self.computed = 0
        self.status = Status.WAITING
        self.finish_reason: Optional[str] = None
        self.arrival = 0.0
        self.first_token_time: Optional[float] = None
        self.preemptions = 0
        self.unread = 0  # tokens sampled on the device that the host has not read yet

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_ids(self) -> np.ndarray:
        """``tokens`` as ``[len(tokens)]`` int64."""
        if not self.output:
            return self.prompt_ids
        return np.concatenate([self.prompt_ids, np.array(self.output, dtype=np.int64)])

    def next_inputs(self, n: int) -> list[int]:
        """The ``n`` tokens after those the cache holds (without copying the rest)."""
        start, prompt_len = self.computed, len(self.prompt)
        if start >= prompt_len:
            return self.output[start - prompt_len : start - prompt_len + n]
        return self.prompt[start : start + n] + self.output[: max(0, start + n - prompt_len)]

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]

    @property
    def pending(self) -> int:
        """Tokens still to feed before the next one can be sampled."""
        return len(self.prompt) + len(self.output) + self.unread - self.computed

    @property
    def to_run(self) -> int:
        """Its pending tokens, or 0 when its unread tokens reach ``max_new_tokens``: its
        last token is sampled, nothing is left to run (one read per step and request)."""
        unread = self.unread
        if unread and len(self.output) + unread >= self.params.max_new_tokens:
            return 0
        return self.pending

    def finish_if_done(self) -> bool:
        """Mark finished after a stop or end-of-sequence token, or ``max_new_tokens``."""
        if self.output and self.output[-1] in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.output) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        else:
            return False
        self.status = Status.FINISHED
        return True
