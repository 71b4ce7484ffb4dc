"""A small generation engine on seqattn's public API: continuous batching with chunked
prefill, prefix caching and preemption.

Three parts: the :class:`~seqattn.engine.scheduler.Scheduler` chooses each step's rows
and holds their pages (through the runner's :class:`~seqattn.engine.store.SequenceStore`),
the :class:`Engine` (here) launches the runner on them, reads the sampled tokens back and
finishes requests, and the runner runs the model: a
:class:`~seqattn.integrations.hf.PagedCausalLM` (paged cache, prefix caching), or a
:class:`~seqattn.integrations.hf_headwise.HeadwiseCausalLM` (head-wise cache, a press
per request: ``add_request(..., press=, budget=, compress_every=)``; see
:mod:`~seqattn.engine.headwise_store` for its admission and preemption).

Each :meth:`Engine.step` runs one forward over a batch that mixes decode tokens (one per
running request) and prefill chunks (up to a token budget), samples the next token of
every request whose inputs are all in, and finishes requests on a stop token, the
model's end-of-sequence token (``generation_config.eos_token_id``, as transformers'
``generate``; ``SamplingParams.ignore_eos`` turns it off) or at ``max_new_tokens``.
A waiting request is admitted once its pages fit beside the running requests' next
step; when the running requests grow short of pages, the newest is preempted: its pages
go back (on a paged cache its full pages stay in the prefix cache) and it is recomputed
later from its prompt plus what it generated so far.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Optional

import numpy as np
import torch

from .._checks import INT64_MAX, INT64_MIN, exact_bool, exact_int, shown
from .._transfer import upload
from ..errors import ArgumentTypeError
from ..integrations.press_requests import PressRequest
from .intake import check_params, checked_compression, checked_prompt, eos_token_ids
from .request import Request, Status
from .runners import Runner, check_compile, set_compile, set_cuda_graphs, store_for
from .sampling import SamplingParams, sample
from .scheduler import Row, Scheduled, Scheduler
from .stats import EngineStats
from .store import PagedStore

__all__ = ["Engine", "EngineStats"]


def on_device(device: torch.device, index: np.ndarray) -> torch.Tensor:
    """An index array as a long tensor on ``device``."""
    return upload(device, [index], dtype=torch.long)[0][0]


class _Landing:
    """Where a step's samples land on the host: a buffer (pinned on CUDA) of ``[size]``
    int64 and the event of their copy, made once and reused."""

    def __init__(self, device: torch.device, size: int) -> None:
        cuda = device.type == "cuda"
        self.buffer = torch.empty(size, dtype=torch.long, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None


class _Landings:
    """Two landings taken in turn: at most two steps' samples are unread at once (the
    step just launched and the one before), and no step allocates a buffer or an event."""

    def __init__(self, device: torch.device, size: int) -> None:
        self.device, self.size = device, size
        self._pair: list[Optional[_Landing]] = [None, None]

    def take(self, size: int, unread: Optional[_Launched]) -> _Landing:
        """A landing for ``size`` samples other than the ``unread`` step's."""
        free = 1 if unread is not None and unread.landing is self._pair[0] else 0
        landing = self._pair[free]
        if landing is None or landing.buffer.shape[0] < size:
            landing = self._pair[free] = _Landing(self.device, max(size, self.size))
        return landing


class _Launched:
    """A launched step: its rows, and the tokens sampled for its ready rows, on the
    device and on their way to the host (into ``landing``)."""

    def __init__(
        self,
        rows: list[Request],
        requests: list[Request],
        tokens: torch.Tensor,
        fed: int,
        landing: _Landing,
    ) -> None:
        self.rows = rows
        self.requests = requests  # the rows that were sampled, in ``tokens`` order
        self.tokens = tokens
        self.fed = fed  # its first rows whose inputs were the previous step's samples
        self.landing = landing
        self._host = landing.buffer[: tokens.shape[0]]
        self._host.copy_(tokens, non_blocking=True)
        if landing.event is not None:
            landing.event.record()

    def tokens_of(self, requests: list[Request]) -> torch.Tensor:
        """The samples of ``requests`` (each one of this step's), in their order, on the
        device: ``[len(requests)]`` int64."""
        if requests == self.requests:  # by identity: a Request defines no __eq__
            return self.tokens  # the steady state: the same batch again
        where = {r.id: i for i, r in enumerate(self.requests)}
        index = np.array([where[r.id] for r in requests], dtype=np.int64)
        return self.tokens[on_device(self.tokens.device, index)]

    def advance(self, rows: list[Row], prompt_tokens: int, stats: EngineStats) -> None:
        """Advance the step's requests (``rows``: each with the tokens it fed) and the
        engine's ``stats`` by this launch."""
        for request, n in rows:
            request.computed += n
        for request in self.requests:
            request.unread += 1
        stats.steps += 1
        stats.decoded_ahead += self.fed > 0
        stats.computed_prompt_tokens += prompt_tokens

    def host_tokens(self) -> list[int]:
        """The sampled tokens (waits for their copy, and so for the step, to finish)."""
        if self.landing.event is not None:
            self.landing.event.synchronize()
        return self._host.tolist()


class Engine:
    """Serve generation requests with a :class:`PagedCausalLM` or a
    :class:`HeadwiseCausalLM` (a press per request).

    Args:
        runner: the model on seqattn's cache (paged, or head-wise: then without prefix
            caching, CUDA graphs or compiling; see :mod:`~seqattn.engine.runners`).
        max_batch_size: running requests at most.
        max_step_tokens: tokens one forward may process (prefill chunks are cut to fit).
        seed: seeds the sampler's generator (sampling is reproducible for a seed).
        cuda_graphs: replay decode steps from CUDA graphs, one per batch-size bucket
            (powers of two up to ``max_batch_size``, or up to the pool's page count if
            that is smaller: no more requests can decode at once), where the runner can:
            CUDA, flashinfer, one attention variant for all layers; for a
            HeadwiseCausalLM, CUDA, triton and a float16/bfloat16 model, and only for
            steps in which no press runs (a press changes pages mid-step); ignored
            otherwise.
        compile: decode through ``torch.compile`` (True), eagerly (False), or as the
            runner was built (None, the default; ``PagedCausalLM`` compiles only when
            asked). CUDA graphs then replay the compiled forward; the first decode step
            of each compiled graph pays the compile (``runner.compile_seconds``).

    Requests end at a stop token of their :class:`SamplingParams`, at the model's
    end-of-sequence token(s) (``runner.model.generation_config.eos_token_id``, read here
    once; the token is kept, as transformers' ``generate`` keeps it) unless the params
    say ``ignore_eos``, or at ``max_new_tokens``.

    Every public call checks its arguments before it changes anything: bad input raises
    a :class:`~seqattn.errors.SeqAttnError` that is also the matching builtin
    (``ArgumentTypeError`` is a TypeError, ``InvalidArgumentError`` and
    ``InvalidLengthError`` are ValueErrors), and leaves the queues, the cache and the
    stats as they were.

    Raises:
        ArgumentTypeError: ``runner`` is neither runner, a setting of the
            wrong type (``max_batch_size=1.5``, ``seed="0"``, ``cuda_graphs=1``,
            ``compile="yes"``), or an end-of-sequence id in the model's generation
            config that is not an integer.
        InvalidArgumentError: ``max_batch_size`` or ``max_step_tokens`` < 1, a seed
            outside torch's range ``[-2**63, 2**64)``, ``compile=True`` for a
            HeadwiseCausalLM.
        MissingDependencyError: ``compile=True`` where inductor has no compiler (a C++
            compiler on the CPU, triton on CUDA); the runner is left as it was.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from seqattn.engine import Engine, SamplingParams
        >>> from seqattn.integrations.hf import PagedCausalLM
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> engine = Engine(PagedCausalLM(LlamaForCausalLM(config).eval(), num_pages=64,
        ...                               page_size=4))
        >>> params = SamplingParams(max_new_tokens=4, ignore_eos=True)  # random weights
        >>> outputs = engine.generate([[1, 2, 3], [1, 2, 3, 4, 5]], params)
        >>> [len(o) for o in outputs]
        [4, 4]
    """

    def __init__(
        self,
        runner: Runner,
        *,
        max_batch_size: int = 64,
        max_step_tokens: int = 512,
        seed: int = 0,
        cuda_graphs: bool = True,
        compile: Optional[bool] = None,
    ) -> None:
        store = store_for(runner)
        max_batch_size = exact_int(max_batch_size, "max_batch_size", low=1, high=INT64_MAX)
        max_step_tokens = exact_int(max_step_tokens, "max_step_tokens", low=1, high=INT64_MAX)
        seed = exact_int(seed, "seed", low=INT64_MIN, high=2**64 - 1)  # torch's range
        cuda_graphs = exact_bool(cuda_graphs, "cuda_graphs")
        compile = exact_bool(compile, "compile", optional=True)
        check_compile(runner, compile)
        self.eos_token_ids = eos_token_ids(runner.model)
        set_compile(runner, compile)  # first: it raises when inductor has no compiler
        self.runner, self.store = runner, store
        self.descriptor = store.descriptor if isinstance(store, PagedStore) else None
        self.device = runner.device
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.requests: dict[int, Request] = {}
        self.stats = EngineStats()
        self.scheduler = Scheduler(store, self.stats, max_batch_size=max_batch_size,
                                   max_step_tokens=max_step_tokens)  # fmt: skip
        self._next_id = 0
        self._sampled: Optional[_Launched] = None  # the last step, its samples unread
        self._landings = _Landings(self.device, max_batch_size)  # the samples' on the host
        self._finished: list[Request] = []  # finished since step() last returned
        self.cuda_graphs = set_cuda_graphs(runner, cuda_graphs, max_batch_size, store.num_pages)

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        press: object = None,
        budget: object = None,
        compress_every: object = None,
    ) -> int:
        """Queue a request; returns its id. Nothing is queued unless every check passes.

        Args:
            prompt: ``[prompt_len]`` token ids, ``prompt_len >= 1``, each in
                ``[0, vocab_size)``: a list, tuple, numpy array or tensor of integers.
            params: how the request generates.
            press, budget, compress_every: its KV compression on a HeadwiseCausalLM, as
                ``HeadwiseCausalLM.add_sequences`` takes them (a ``Press`` and a budget:
                tokens per head, an int, or a fraction of the length, a float in (0, 1];
                press again every ``compress_every`` decode steps). None: keep every token.

        Raises:
            ArgumentTypeError: ``params`` is not a :class:`SamplingParams`, or the prompt
                is not a 1-D sequence of integers; a press that is not a ``Press``.
            InvalidArgumentError, InvalidLengthError: bad press settings (a press without
                a budget, a budget of 0 or 1.5, ``compress_every=0``), or any on a
                PagedCausalLM.
            InvalidLengthError: an empty prompt.
            InvalidArgumentError: a token id outside the model's vocabulary (which on a
                GPU would end the process with a device-side assert), or a request that
                can never fit the pool: its prompt and ``max_new_tokens`` need more pages
                than the pool has, less the pages the runner keeps for itself (a
                CUDA-graph scratch page). A ValueError rather than a ``NoPageError``:
                ``NoPageError`` says "not now, free pages and retry", and no retry
                could ever serve this request.
        """
        tokens = checked_prompt(prompt, params, self.runner.vocab_size, self.store, "prompt")
        return self._queue(tokens, params, checked_compression(self.store, press, budget,
                                                               compress_every))  # fmt: skip

    @property
    def has_work(self) -> bool:
        """Whether requests are queued or running, or a step's samples are unread."""
        return self.scheduler.has_work or self._sampled is not None

    @property
    def waiting(self) -> deque[Request]:
        """Requests not holding pages (new or preempted), in admission order."""
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        """Requests holding a sequence in the cache, oldest first."""
        return self.scheduler.running

    def generate(
        self,
        prompts: Iterable[Sequence[int]],
        params: SamplingParams,
        *,
        press: object = None,
        budget: object = None,
        compress_every: object = None,
    ) -> list[list[int]]:
        """Run ``prompts`` to completion; their generated tokens, in order.

        ``press``, ``budget``, ``compress_every``: for every prompt, as
        :meth:`add_request`. Every prompt and setting is checked before any is queued:
        a bad one raises and queues none. If a step raises (see :meth:`step`),
        the error propagates and the queued requests stay in the engine, which
        :meth:`step` can go on serving.
        """
        check_params(params)
        compression = checked_compression(self.store, press, budget, compress_every)
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
            raise ArgumentTypeError(f"prompts must be a list of prompts, got {shown(prompts)}")
        vocab = self.runner.vocab_size
        checked = [checked_prompt(p, params, vocab, self.store, f"prompts[{i}]")
                   for i, p in enumerate(prompts)]  # fmt: skip
        ids = [self._queue(tokens, params, compression) for tokens in checked]
        while self.has_work:
            self.step()
        return [self.requests[i].output for i in ids]

    def _queue(
        self, tokens: np.ndarray, params: SamplingParams, compression: Optional[PressRequest]
    ) -> int:
        """Queue a request of checked ``tokens`` and press settings; returns its id."""
        request = Request(self._next_id, tokens, params, self.eos_token_ids, compression)
        request.arrival = time.perf_counter()
        self._next_id += 1
        self.requests[request.id] = request
        self.scheduler.add(request)
        self.stats.prompt_tokens += len(request.prompt)
        return request.id

    # ---------------------------------------------------------------------- step
    def step(self) -> list[Request]:
        """One forward over the next batch; returns the requests that finished.

        The host reads a step's sampled tokens only after it has launched the next one,
        so steps do not wait for the GPU: while the previous step's samples are still on
        the device, the decode rows take their inputs from there (prompt chunks beside
        them come from the host). A request whose previous token turns out to be a stop
        token thus runs one extra row, whose token is dropped. A step short of pages
        reads them first (finished requests free theirs before any is preempted); so
        does, on a head-wise runner, a step with prompt chunks or an admission.

        If the step raises (the model's forward, the sampler, an allocation), it is undone
        before the error propagates: the pages allocated for it go back, no token is
        sampled, and the queues, the running list and the cache's sequences agree as
        before the call (requests finished by tokens read before the error are returned
        by the next call). Calling :meth:`step` again retries the step.

        Raises:
            NoPageError: the one running request cannot grow because pages are held
                outside the engine (pinned prefixes, sequences allocated on the
                descriptor directly); nothing was allocated. Requests that could never
                fit the pool are refused earlier, by :meth:`add_request`.
        """
        if self._sampled is not None and not self.scheduler.can_decode_ahead():
            self._read_sampled()
        self.scheduler.admit()
        step = self._schedule()
        launched = self._launch(step) if step.rows else None
        if self._sampled is not None:  # decoded ahead: now read what the last step sampled
            self._read_sampled()
        if launched is not None:  # the tokens it fed from the device are known only now
            self.scheduler.launched(launched.rows, launched.fed)
            self._sampled = launched
        finished, self._finished = self._finished, []
        return finished

    def _schedule(self) -> Scheduled:
        """The next step's rows, their pages allocated; when they are short of pages,
        the unread samples are read first (requests that finish free theirs) before
        the scheduler preempts."""
        while True:
            step = self.scheduler.schedule(can_preempt=self._sampled is None)
            if step is not None:
                return step
            self._read_sampled()

    def _launch(self, step: Scheduled) -> _Launched:
        """Run the model on the step's rows and sample (on the device) every row that is
        ready.

        Requests and stats change only once the forward and the sampler have run; if
        either raises, the rows' allocations are undone first.
        """
        rows, ready = step.rows, step.ready
        requests = [r for r, _ in rows]
        ready_requests = requests if len(ready) == len(rows) else [requests[i] for i in ready]
        try:
            logits = self._forward(step, requests)
            if len(ready) < len(requests):  # some rows were prefill chunks: no token yet
                logits = logits[on_device(self.device, np.array(ready, dtype=np.int64))]
            tokens = sample(logits, [r.params for r in ready_requests], self.generator)
            ranks = getattr(self.runner, "ranks", None)  # a HeadwiseCausalLM has none
            if ranks is not None:  # tensor-parallel: every rank takes rank 0's
                ranks.broadcast(tokens)
            landing = self._landings.take(tokens.shape[0], self._sampled)
            launched = _Launched(requests, ready_requests, tokens, step.fed, landing)
        except BaseException:
            self.scheduler.undo(rows)
            raise
        launched.advance(rows, step.prompt_tokens, self.stats)
        return launched

    def _forward(self, step: Scheduled, requests: list[Request]) -> torch.Tensor:
        """The model's logits for the step's rows (whose requests are ``requests``):
        ``[len(rows), vocab_size]``; the first ``step.fed`` rows' inputs are the previous
        step's samples, still on the device."""
        fed = None
        if step.fed:
            assert self._sampled is not None
            fed = self._sampled.tokens_of(requests[: step.fed])
        return self.store.forward(step.rows, step.decode, fed)  # the runner's calls

    def _read_sampled(self) -> None:
        """Bring the last launched step's tokens to the host and finish requests."""
        sampled, self._sampled = self._sampled, None
        assert sampled is not None
        now, finished = None, []
        for request, token in zip(sampled.requests, sampled.host_tokens(), strict=True):
            request.unread -= 1
            if request.status is Status.FINISHED:
                continue  # a row run ahead after its stop token: dropped
            request.output.append(token)
            if request.first_token_time is None:
                request.first_token_time = now = now or time.perf_counter()
            self.stats.generated_tokens += 1
            if request.finish_if_done():
                finished.append(request)
        self.scheduler.release(finished)
        self._finished += finished
