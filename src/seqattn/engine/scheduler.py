"""Which requests run at each step, and how many tokens each feeds: the waiting and
running queues, admission, each step's rows and their pages, preemption, and the end
of finished requests. The scheduler runs no model and reads no sampled token: the
engine does (:class:`~seqattn.engine.Engine`)."""

from __future__ import annotations

from collections import deque
from typing import Optional

from attrs import define

from ..errors import NoPageError
from .request import Request, Status
from .stats import EngineStats, Preemption
from .store import Row, SequenceStore

__all__ = ["Row", "Scheduled", "Scheduler"]

_Choice = tuple[Request, int, int]  # a row's request, the tokens it feeds, its pending


@define(slots=True, frozen=True)
class Scheduled:
    """One step's rows as scheduled, and what follows from them, worked out once.

    Attributes:
        rows: ``(request, tokens fed)``: decode rows first (one token each; those fed
            from the device first of all), then prefill chunks.
        decode: how many of ``rows`` are decode rows.
        fed: how many of them (the first) take the last step's sample, on the device,
            not yet read.
        ready: the indices of the rows whose inputs are all in after the step (every
            decode row, and each chunk that ends its prompt): the rows sampled.
        prompt_tokens: the prompt tokens the rows feed (a chunk's tokens, or a decode
            row's when it is its prompt's last).
    """

    rows: list[Row]
    decode: int
    fed: int
    ready: list[int]
    prompt_tokens: int

    @classmethod
    def of(cls, chosen: list[_Choice], decode: int) -> Scheduled:
        """The step of ``chosen`` rows, the first ``decode`` of them decode rows."""
        rows = [(request, n) for request, n, _ in chosen]
        chunks = chosen[decode:]
        ready = [*range(decode), *(decode + i for i, (_, n, p) in enumerate(chunks) if n == p)]
        fed = fresh = 0  # decode rows fed from the device; those feeding a prompt's last
        for request, _, _ in chosen[:decode]:
            if request.unread:
                fed += 1
            elif not request.output:
                fresh += 1
        return cls(rows, decode, fed, ready, fresh + sum(n for _, n, _ in chunks))


class Scheduler:
    """Queues requests, admits them while their pages fit, and plans each step.

    Admission: the first waiting request starts once its prompt's pages
    (:meth:`~.store.SequenceStore.pages_to_start`: on a paged cache less its prefix-cache
    hit, on a head-wise one its whole prompt in every layer and head) fit
    beside what the running requests need for their next step (their pending tokens: a
    decode token, or the rest of a prompt); the requests behind it wait their turn. With
    nothing running it starts regardless, so that pages held outside the engine surface
    as a ``NoPageError`` instead of an endless wait. A request that could share full
    pages a running request has not computed yet waits until it has (it then reads them
    from the prefix cache); the requests behind it go first. The scheduler holds pages
    only through its :class:`~.store.SequenceStore`.

    Each step: decode rows first (one token each), then prefill chunks within the token
    budget, cut to the pages left. Only when the decode rows do not fit, or no row can
    run at all, is the newest running request preempted: its pages go back (on a paged
    cache its full pages stay in the prefix cache) and it waits, first in line, to restart from its
    prompt plus what it generated so far. Each preemption is recorded
    (:attr:`preemption_log`).

    Args:
        store: the runner's sequences and page counts (:class:`~.store.PagedStore`,
            :class:`~.headwise_store.HeadwiseStore`).
        stats: the engine's counters (preemptions are counted here).
        max_batch_size: running requests at most.
        max_step_tokens: tokens one step may feed.
    """

    def __init__(
        self,
        store: SequenceStore,
        stats: EngineStats,
        *,
        max_batch_size: int,
        max_step_tokens: int,
    ) -> None:
        self.store = store
        self.page_size = store.page_size
        self.num_pages = store.num_pages
        self.stats = stats
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemption_log: list[Preemption] = []

    def add(self, request: Request) -> None:
        """Queue a new request last."""
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        """Whether requests wait or run."""
        return bool(self.waiting or self.running)

    def can_decode_ahead(self) -> bool:
        """Whether the next step can run before the host knows the last samples: on a
        store that takes decode rows from the device beside prompt chunks, always (a
        step short of pages reads them first: :meth:`schedule`); otherwise when every
        running request decodes and no waiting one could be admitted."""
        if self.store.mixed_ahead:
            return True
        admissible = self.waiting and len(self.running) < self.max_batch_size
        return not admissible and all(r.unread for r in self.running)

    # ----------------------------------------------------------------- admission
    def admit(self) -> None:
        """Start waiting requests, in order, while their pages fit (see the class)."""
        held = []
        reserved = None  # pages the running requests' pending tokens take: summed once
        computing = None  # running requests with full pages to compute, by first page
        try:
            while self.waiting and len(self.running) < self.max_batch_size:
                request = self.waiting[0]
                if self.store.prefix_cached:
                    if computing is None:
                        computing = {}
                        for other in self.running:
                            self._index_computing(computing, other)
                    if self._prefix_in_flight(request, computing):
                        held.append(self.waiting.popleft())
                        continue
                if self.running:
                    if reserved is None:
                        reserved = self._pages([(r, r.pending) for r in self.running])
                    if not self._fits(request, reserved):
                        break
                computed = self.store.start(request)
                self.waiting.popleft()  # only once it is started: an error leaves it queued
                request.computed, request.status = computed, Status.RUNNING
                self.running.append(request)
                if reserved is not None:  # each sequence's growth is its own: add it
                    reserved += self._pages([(request, request.pending)])
                if computing is not None:
                    self._index_computing(computing, request)
        finally:
            self.waiting.extendleft(reversed(held))

    def _fits(self, request: Request, reserved: int) -> bool:
        """Whether starting ``request`` leaves the running requests the ``reserved``
        pages of their pending tokens."""
        start = self.store.pages_to_start(request.token_ids())
        return reserved + start <= self.store.available_pages_count

    def _first_page(self, request: Request) -> tuple[int, ...]:
        """The tokens of the request's first page (fewer if it holds fewer)."""
        ps = self.page_size
        return tuple(request.prompt[:ps] if len(request.prompt) >= ps else request.tokens[:ps])

    def _index_computing(self, index: dict[tuple[int, ...], list[Request]], other: Request) -> None:
        """Add running ``other`` to ``index`` (by its first page) if it has a full page of
        known tokens left to compute: only such a request can hold pages in flight."""
        known = len(other.prompt) + len(other.output)
        if known // self.page_size * self.page_size > other.computed:
            index.setdefault(self._first_page(other), []).append(other)

    def _prefix_in_flight(
        self, request: Request, computing: dict[tuple[int, ...], list[Request]]
    ) -> bool:
        """Whether a running request is computing full pages that ``request`` could share
        (``computing``: :meth:`_index_computing`'s index; a request can share pages only
        with one whose first page is its own)."""
        ps = self.page_size
        length = len(request.prompt) + len(request.output)
        if length - 1 < ps:
            return False  # its last token is always computed: no full page to share
        tokens: Optional[list[int]] = None  # built only if a running request computes pages
        for other in computing.get(self._first_page(request), ()):
            known = len(other.prompt) + len(other.output)
            limit = min(length - 1, known) // ps  # pages the cache could give
            if limit * ps <= other.computed:
                continue  # nothing left to compute that could be shared
            tokens = request.tokens if tokens is None else tokens
            # the pages compared lie in their prompt, unless it is shorter: no list built
            theirs = other.prompt if limit * ps <= len(other.prompt) else other.tokens
            shared = 0
            while shared < limit and (
                tokens[shared * ps : (shared + 1) * ps] == theirs[shared * ps : (shared + 1) * ps]
            ):
                shared += 1
            if shared * ps > other.computed:
                return True
        return False

    # ---------------------------------------------------------------------- steps
    def schedule(self, can_preempt: bool) -> Optional[Scheduled]:
        """The next step's rows, with their pages allocated.

        When the running requests are short of pages: None if not ``can_preempt`` (the
        engine then reads its unread samples, which may finish requests, and asks
        again); otherwise the newest running request is preempted until they fit.

        Raises:
            NoPageError: the one running request cannot grow (pages are held outside
                the engine); nothing was allocated.
        """
        while True:
            step, need = self._rows()
            if not need:
                break
            if not can_preempt:
                return None
            if len(self.running) == 1:
                raise NoPageError(
                    f"request {self.running[0].id} alone needs {need} more pages for its "
                    f"next step, but {self.store.available_pages_count} of the pool's "
                    f"{self.num_pages} are available; give the engine more pages"
                )
            self._preempt(need)
        self._allocate(step)
        return step

    def _wanted(self) -> list[_Choice]:
        """Decode rows first (one token each; those whose input is an unread sample
        first of all), then prefill chunks within the budget; each with its request's
        pending tokens (a property: read once per step)."""
        fed: list[tuple[Request, int]] = []
        decode: list[tuple[Request, int]] = []
        chunks: list[tuple[Request, int]] = []
        for request in self.running:
            pending = request.to_run
            if not pending:
                continue  # its last token is sampled already
            (chunks if pending > 1 else fed if request.unread else decode).append(
                (request, pending)
            )
        budget = self.max_step_tokens
        wanted = []
        for request, pending in fed + decode + chunks:
            n = min(pending, budget)
            if n == 0:
                break
            wanted.append((request, n, pending))
            budget -= n
        return wanted

    def _rows(self) -> tuple[Scheduled, int]:
        """The rows that fit the pages available, and 0; or, when the decode rows do not
        fit or no row fits, the rows wanted and the pages they need."""
        wanted = self._wanted()
        split = next((i for i, (_, _, pending) in enumerate(wanted) if pending > 1), len(wanted))
        decode, prefill = wanted[:split], wanted[split:]
        free = self.store.available_pages_count
        used = self._decode_pages(decode)
        if used <= free:
            chosen = decode + self._fitting_chunks(prefill, free - used)
            if chosen or not wanted:
                return Scheduled.of(chosen, split), 0
        need = used + sum(self._pages([(r, n)]) for r, n, _ in prefill)
        return Scheduled.of(wanted, split), need

    def _fitting_chunks(self, prefill: list[_Choice], free: int) -> list[_Choice]:
        """Prefill rows cut to ``free`` pages (and the room left in their last pages)."""
        chosen = []
        for request, n, pending in prefill:
            n = self.store.chunk_room(request, n, free)
            pages = self._pages([(request, n)]) if n else free + 1
            if pages <= free:
                chosen.append((request, n, pending))
                free -= pages
        return chosen

    def _pages(self, rows: list[Row]) -> int:
        """Free pages that allocating ``rows`` would take."""
        if not rows:
            return 0
        return self.store.pages_needed([r.id for r, _ in rows], [n for _, n in rows])

    def _decode_pages(self, decode: list[_Choice]) -> int:
        """Free pages that one more token for each of the ``decode`` rows takes."""
        if not decode:
            return 0
        return self.store.pages_to_decode([r.id for r, _, _ in decode])

    def _allocate(self, step: Scheduled) -> None:
        """Allocate the rows' pages; if that raises, nothing stays allocated."""
        rows = step.rows
        decode = [r for r, _ in rows[: step.decode]]
        prefill = [(r.id, n) for r, n in rows[step.decode :]]
        try:
            self.store.allocate(decode, prefill, step.fed)
        except BaseException:
            self.undo(rows)
            raise

    def _preempt(self, need: int) -> None:
        """Give the newest running request's pages back; it restarts later from its
        tokens so far. ``need``: the pages the step's rows lacked room for."""
        request = self.running.pop()
        available = self.store.available_pages_count
        self.store.release([request.id])
        request.status, request.computed = Status.WAITING, 0
        request.preemptions += 1
        self.stats.preemptions += 1
        self.preemption_log.append(Preemption(self.stats.steps, request.id, need, available))
        self.waiting.appendleft(request)

    # ------------------------------------------------------------ after a launch
    def launched(self, requests: list[Request], fed: int) -> None:
        """Tell the cache about a launched step's rows: the tokens its first ``fed`` rows
        took from the device (known once read) and that every token they hold has its
        KV now."""
        ids, tokens = [], []  # the live rows; the tokens of those fed from the device
        for i, request in enumerate(requests):
            if request.status is Status.RUNNING:
                ids.append(request.id)
                if i < fed:
                    tokens.append(request.output[-1])
        self.store.launched(ids, tokens)

    def undo(self, rows: list[Row]) -> None:
        """Give back what a failed step allocated: each row's sequence again holds the
        tokens whose KV it has (``request.computed``). A sequence the store cannot keep
        (a head-wise one the model's forward left half-written) is released instead, and
        its request waits, first in line, to be recomputed as after a preemption (not
        counted as one)."""
        lost = [request for request, _ in rows if not self.store.undo(request)]
        for request in reversed(lost):
            self.running.remove(request)
            request.status, request.computed = Status.WAITING, 0
            self.waiting.appendleft(request)

    def release(self, finished: list[Request]) -> None:
        """End finished requests (a row sampled ahead may still run on their pages: the
        pages' next users write them later in stream order)."""
        if finished:
            self.store.release([r.id for r in finished])
            done = {r.id for r in finished}
            self.running = [r for r in self.running if r.id not in done]
