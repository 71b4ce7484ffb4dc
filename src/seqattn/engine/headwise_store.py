"""The engine's sequences on a head-wise cache, a press per request:
:class:`HeadwiseStore`, the :class:`~.store.SequenceStore` of a
:class:`~seqattn.integrations.hf_headwise.HeadwiseCausalLM`.

Pages: a token takes a slot in every KV head of every layer, so a sequence of n tokens,
every one kept, holds ``num_layers * num_kv_heads * ceil(n / page_size)`` pages. The
scheduler admits a request only when its whole prompt fits so (the press runs when the
prompt ends and gives pages back only then), and asks the cache
(:meth:`~seqattn.headwise.HeadwiseKVCache.pages_needed`) what each step's rows take,
since a pressed head fills its own last page.

No prefix cache: a press moves a head's tokens between its pages, so a full page does
not stay the KV of one run of tokens, and every request computes its prompt itself.

Preemption: a preempted request's sequence is released (every layer and head); it
restarts later from its prompt plus the tokens it generated so far, all of them one
new prompt, pressed once when that recompute ends (``compress_every`` counts its
decode steps from there again). Its KV afterwards is therefore
that of a request whose prompt was ``prompt + outputs``, not what it held before (a
press chooses from what it sees).

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from seqattn.engine import Engine, SamplingParams
    >>> from seqattn.headwise import SnapKVPress, StreamingLLMPress
    >>> from seqattn.integrations.hf_headwise import HeadwiseCausalLM
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    >>> engine = Engine(HeadwiseCausalLM(LlamaForCausalLM(config).eval(), num_pages=128,
    ...                                  page_size=4))
    >>> params = SamplingParams(max_new_tokens=4, ignore_eos=True)  # random weights
    >>> a = engine.add_request(list(range(1, 17)), params, press=SnapKVPress(window=4),
    ...                        budget=0.5)                          # half of each head
    >>> b = engine.add_request(list(range(3, 20)), params, press=StreamingLLMPress(sinks=2),
    ...                        budget=6, compress_every=2)          # 6 tokens a head
    >>> c = engine.add_request([5, 6, 7], params)                   # keeps every token
    >>> while engine.has_work:
    ...     finished = engine.step()
    >>> [len(engine.requests[i].output) for i in (a, b, c)]
    [4, 4, 4]
    >>> engine.runner.cache.available_pages_count                   # all given back
    128
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from ..page_table import pages_for
from .request import Request
from .store import Row

if TYPE_CHECKING:
    from ..integrations.hf_headwise import HeadwiseCausalLM


class HeadwiseStore:
    """A :class:`HeadwiseCausalLM`'s sequences, one per running request, each started
    with the request's press settings (``request.compression``).

    Pages are taken by the runner's step itself (``HeadwiseKVCache.begin_step``, all or
    nothing); the scheduler has checked beforehand that they fit.
    """

    prefix_cached = False
    presses = True  # each request's own press settings
    mixed_ahead = False  # the runner's step takes host tokens only

    def __init__(self, runner: HeadwiseCausalLM) -> None:
        self.runner = runner
        self.cache = runner.cache
        self.page_size = self.cache.page_size
        self.num_pages = self.cache.storage.num_pages
        self._rows = self.cache.num_layers * self.cache.num_kv_heads  # page lists per sequence
        # each running request's length when it started: the tokens before it are its
        # prompt (prompt + outputs after a preemption), those after it decode rows
        self._prompt_end: dict[int, int] = {}

    @property
    def available_pages_count(self) -> int:
        return self.cache.available_pages_count

    @property
    def usable_pages(self) -> int:
        return self.num_pages - self.runner.reserved_pages  # a CUDA-graph scratch page

    def pages_to_hold(self, num_tokens: int) -> int:
        return self._rows * int(pages_for(num_tokens, self.page_size))

    def start(self, request: Request) -> int:
        settings = request.compression
        if settings is None:
            self.runner.add_sequences([request.id])
        else:
            self.runner.add_sequences([request.id], press=settings.press,
                                      budget=settings.budget,
                                      compress_every=settings.compress_every)  # fmt: skip
        self._prompt_end[request.id] = len(request.prompt) + len(request.output)
        return 0  # no prefix cache

    def pages_to_start(self, tokens: np.ndarray) -> int:
        return self.pages_to_hold(len(tokens))  # the whole prompt, before its press

    def pages_needed(self, seq_ids: list[int], lens: list[int]) -> int:
        return self.cache.pages_needed(seq_ids, lens)

    def pages_to_decode(self, seq_ids: list[int]) -> int:
        return self.pages_needed(seq_ids, [1] * len(seq_ids))

    def chunk_room(self, request: Request, n: int, free: int) -> int:
        # the longest chunk that fits: pages grow with the chunk, so bisect
        low, high = 0, n
        while low < high:
            mid = (low + high + 1) // 2
            if self.cache.pages_needed([request.id], [mid]) <= free:
                low = mid
            else:
                high = mid - 1
        return low

    def allocate(self, decode: list[Request], prefill: list[tuple[int, int]], fed: int) -> None:
        pass  # the step takes its pages (see the class)

    def undo(self, request: Request) -> bool:
        if request.id not in self.runner.failed:
            return True  # the step was refused before it changed anything
        # the model's forward raised with the sequence half-written: give it back (the
        # scheduler requeues the request; it may have a sample not read yet, which its
        # recompute needs)
        self.release([request.id])
        return False

    def release(self, seq_ids: list[int]) -> None:
        self.runner.release(seq_ids)
        for seq_id in seq_ids:
            del self._prompt_end[seq_id]

    def launched(self, seq_ids: list[int], fed: list[int]) -> None:
        pass  # nothing to commit: no prefix cache

    def forward(self, rows: list[Row], decode: int, fed: Optional[torch.Tensor]) -> torch.Tensor:
        """One :meth:`HeadwiseCausalLM.step` of ``rows``: a row past its request's prompt
        is a decode row, the others prompt chunks (the last one, ``ends_prompt``,
        presses); the logits come back in the rows' order. (The scheduler's ``decode``
        count is not used: a prompt's last token alone is a decode row to it, a prompt row
        here.)"""
        del decode
        if fed is not None:  # not mixed_ahead: only whole decode steps are fed so
            return self.runner.decode([r.id for r, _ in rows], fed)
        past = [i for i, (r, _) in enumerate(rows) if r.computed >= self._prompt_end[r.id]]
        prompt = [i for i, (r, _) in enumerate(rows) if r.computed < self._prompt_end[r.id]]
        ends = [rows[i][0].computed + rows[i][1] == self._prompt_end[rows[i][0].id] for i in prompt]
        logits = self.runner.step(
            [rows[i][0].id for i in past], [rows[i][0].last_token for i in past],
            [rows[i][0].id for i in prompt], [rows[i][0].next_inputs(rows[i][1]) for i in prompt],
            ends_prompt=ends,
        )  # fmt: skip
        order = past + prompt
        if order == sorted(order):
            return logits
        back = torch.as_tensor(np.argsort(order), device=logits.device)
        return logits[back]
