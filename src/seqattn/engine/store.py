"""Where the scheduler keeps its requests' sequences: a small interface
(:class:`SequenceStore`) over a runner's cache, and its paged version
(:class:`PagedStore`, a :class:`~seqattn.integrations.hf.PagedCausalLM`'s descriptor and
prefix cache). The head-wise version is :class:`~.headwise_store.HeadwiseStore`.

A store answers the scheduler's questions in pages (what a request needs to start, what
a step's rows need, how much of a prompt chunk fits), holds each request's sequence from
:meth:`~SequenceStore.start` to :meth:`~SequenceStore.release`, and runs a step's rows
through its runner (:meth:`~SequenceStore.forward`): the one place where the runners'
calls differ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

import numpy as np
import torch

from ..page_table import pages_for
from .request import Request

if TYPE_CHECKING:
    from ..integrations.hf import PagedCausalLM

Row = tuple[Request, int]  # a request and the tokens it feeds in one step


class SequenceStore(Protocol):
    """What the scheduler and the engine ask of a runner's cache."""

    prefix_cached: bool  # whether a request may start from pages another one computed
    presses: bool  # whether requests may bring press settings (a head-wise cache)
    # whether forward() takes decode rows fed from the device beside host rows (prompt
    # chunks): then any step, not only a pure decode step, may run before the last
    # samples are read
    mixed_ahead: bool

    @property
    def available_pages_count(self) -> int: ...

    @property
    def num_pages(self) -> int: ...

    @property
    def page_size(self) -> int: ...

    @property
    def usable_pages(self) -> int:
        """Pages requests may hold at most (the pool less what the runner keeps)."""
        ...

    def pages_to_hold(self, num_tokens: int) -> int:
        """Pages a sequence of ``num_tokens`` tokens, every one kept, holds."""
        ...

    def start(self, request: Request) -> int:
        """Start ``request``'s sequence; the tokens whose KV it already holds."""
        ...

    def pages_to_start(self, tokens: np.ndarray) -> int:
        """Free pages starting a sequence of ``tokens`` (``[n]`` int64) takes."""
        ...

    def pages_needed(self, seq_ids: list[int], lens: list[int]) -> int:
        """Free pages ``lens[b]`` more tokens of sequence ``seq_ids[b]`` take."""
        ...

    def pages_to_decode(self, seq_ids: list[int]) -> int:
        """Free pages one more token for each of ``seq_ids`` (a decode step) takes."""
        ...

    def chunk_room(self, request: Request, n: int, free: int) -> int:
        """Tokens of a prompt chunk of at most ``n`` that fit ``free`` pages."""
        ...

    def allocate(self, decode: list[Request], prefill: list[tuple[int, int]], fed: int) -> None:
        """Take the pages of a step's decode rows and ``(id, tokens)`` prefill rows; the
        first ``fed`` decode rows' tokens are on the device, not yet known here."""
        ...

    def undo(self, request: Request) -> bool:
        """After a failed step: give back what it took, so that the sequence holds
        ``request.computed`` tokens again; False if it was released instead."""
        ...

    def release(self, seq_ids: list[int]) -> None: ...

    def launched(self, seq_ids: list[int], fed: list[int]) -> None:
        """A step of ``seq_ids`` ran; ``fed``: the tokens its first ``len(fed)`` rows
        took from the device (known now)."""
        ...

    def forward(self, rows: list[Row], decode: int, fed: Optional[torch.Tensor]) -> torch.Tensor:
        """The runner's logits for ``rows``, the first ``decode`` of them decode rows:
        ``[len(rows), vocab]``. ``fed``: None, or the inputs of the first ``k`` rows
        (decode rows), int64 ``[k]`` on the device; the other rows' are on the host."""
        ...


class PagedStore:
    """A :class:`PagedCausalLM`'s sequences: its descriptor (one page list per sequence,
    the prefix cache) and its pool, as the engine used them before stores existed."""

    prefix_cached = True
    presses = False  # every token kept: no press settings
    mixed_ahead = True

    def __init__(self, runner: PagedCausalLM) -> None:
        self.runner = runner
        self.descriptor = runner.descriptor
        self.pool = runner.cache
        self.page_size = self.pool.page_size
        self.num_pages = self.pool.num_pages

    @property
    def available_pages_count(self) -> int:
        return self.pool.available_pages_count

    @property
    def usable_pages(self) -> int:
        return self.num_pages - self.runner.reserved_pages  # a CUDA-graph scratch page

    def pages_to_hold(self, num_tokens: int) -> int:
        return int(pages_for(num_tokens, self.page_size))

    def start(self, request: Request) -> int:
        return self.descriptor.start_sequence(request.id, request.token_ids())

    def pages_to_start(self, tokens: np.ndarray) -> int:
        return self.descriptor.pages_to_start(tokens)  # less its prefix-cache hit

    def pages_needed(self, seq_ids: list[int], lens: list[int]) -> int:
        return self.descriptor.pages_needed(seq_ids, lens)

    def pages_to_decode(self, seq_ids: list[int]) -> int:
        table = self.descriptor.table  # one count over the lengths; slots are memoized
        return table.pages_to_grow_by_one(table.slots(seq_ids))

    def chunk_room(self, request: Request, n: int, free: int) -> int:
        # the room left in its last page, then whole pages
        return min(n, -request.computed % self.page_size + free * self.page_size)

    def allocate(self, decode: list[Request], prefill: list[tuple[int, int]], fed: int) -> None:
        # the tokens of the rows fed from the device reach the prefix cache once read
        # (see launched)
        if fed:
            self.descriptor.allocate_decoding([r.id for r in decode[:fed]])
        if fed < len(decode):
            host = decode[fed:]
            self.descriptor.allocate_decoding([r.id for r in host], [r.last_token for r in host])
        if prefill:
            self.descriptor.allocate([i for i, _ in prefill], [n for _, n in prefill])

    def undo(self, request: Request) -> bool:
        desc = self.descriptor
        held = desc.seq_len(request.id) if request.id in desc else 0
        if held > request.computed:
            desc.truncate(request.id, request.computed)
        return True

    def release(self, seq_ids: list[int]) -> None:
        self.descriptor.release(seq_ids)

    def launched(self, seq_ids: list[int], fed: list[int]) -> None:
        # every token the rows hold has its KV now: full pages join the prefix cache
        if fed:
            self.descriptor.record_decode_tokens(seq_ids[: len(fed)], fed)
        self.descriptor.commit(seq_ids)

    def forward(self, rows: list[Row], decode: int, fed: Optional[torch.Tensor]) -> torch.Tensor:
        ids = [r.id for r, _ in rows]
        k = 0 if fed is None else fed.shape[0]
        if k == len(rows):
            return self.runner.decode(ids, fed)  # type: ignore[arg-type]
        if decode == len(rows) and not k:
            return self.runner.decode(ids, [r.last_token for r, _ in rows])
        return self.runner.forward(ids, [r.next_inputs(n) for r, n in rows[k:]], fed=fed)
