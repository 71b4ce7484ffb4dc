"""``seqattn demo --press NAME --budget FRACTION``: the demo's requests served on
head-wise caches (:class:`~seqattn.integrations.hf_headwise.HeadwiseCausalLM`), each
request's KV compressed by the named press when its prompt ends, then checked against
the masked full-cache reference that keeps the same positions
(:mod:`seqattn.integrations.hf_reference`).

Prompts are prefilled in steps of up to ``STEP_TOKENS`` tokens (a long prompt in
chunks), then every request decodes greedily, one token per step, until its
``max_new_tokens`` or a stop token; a finished request's pages go back at once.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import deque
from typing import Any, Optional

import torch
from attrs import define, field

from .engine import SamplingParams
from .errors import InvalidArgumentError
from .headwise.press import Press
from .headwise.press_names import PRESSES, make_press
from .integrations.hf_headwise import HeadwiseCausalLM
from .integrations.hf_reference import Compression, masked_reference_logits
from .page_table import pages_for

STEP_TOKENS = 256  # prompt tokens per prefill step, as the engine's max_step_tokens
PAGE_SIZE = 16  # as the demo's paged cache


def add_press_options(demo: argparse.ArgumentParser) -> None:
    """``--press`` and ``--budget`` on the demo's parser (checked by :func:`press_option`)."""
    demo.add_argument("--press", metavar="NAME", help="serve on head-wise caches, each "
                      "request's KV compressed after its prompt by this press "
                      f"({', '.join(PRESSES)}); needs --budget")  # fmt: skip
    demo.add_argument("--budget", metavar="FRACTION", help="with --press: the share of each "
                      "prompt a KV head keeps on average, in (0, 1]")  # fmt: skip


def press_option(args: argparse.Namespace) -> Optional[tuple[Press, float]]:
    """The press and budget the options ask for, None without ``--press``; one-line
    errors (InvalidArgumentError) for a missing half, an unknown press or a budget
    outside ``(0, 1]``, before any model is loaded."""
    if args.press is None and args.budget is None:
        return None
    if args.press is None or args.budget is None:
        given, missing = ("--press", "--budget") if args.budget is None else ("--budget", "--press")
        raise InvalidArgumentError(f"{given} needs {missing} (e.g. --press streamingllm "
                                   "--budget 0.5)")  # fmt: skip
    try:
        budget = float(args.budget)
    except ValueError:
        budget = math.nan
    if not 0.0 < budget <= 1.0:  # NaN fails too
        raise InvalidArgumentError(f"--budget must be a fraction in (0, 1], got {args.budget!r}")
    return make_press(args.press), budget


@define
class PressedRun:
    """What a pressed run produced: per request its output tokens and its compressions
    (``(length, held[layer][head])``, for the reference)."""

    outputs: list[list[int]]
    compressions: list[list[Compression]]
    peak_bytes: tuple[int, int] = field(default=(0, 0))  # held, and a full cache's, at peak


def serve_pressed(model: Any, prompts: list[list[int]], params: SamplingParams, press: Press,
                  budget: float, backend: str) -> PressedRun:  # fmt: skip
    """Serve every prompt greedily on a head-wise runner; print the run's figures."""
    config, n = model.config, params.max_new_tokens
    heads = config.num_hidden_layers * config.num_key_value_heads  # a page list each
    pages = len(prompts) * heads * pages_for(max(map(len, prompts)) + n, PAGE_SIZE) + 8
    runner = HeadwiseCausalLM(model, num_pages=pages, page_size=PAGE_SIZE, backend=backend)
    ids = list(range(len(prompts)))
    runner.add_sequences(ids, press=press, budget=budget)
    run = PressedRun([[] for _ in ids], [[] for _ in ids])
    start, steps = time.perf_counter(), 0
    for seq_id, token in _prefill(runner, prompts, run).items():
        run.outputs[seq_id].append(token)
    stops = set() if params.ignore_eos else set(params.stop_token_ids)
    active = [s for s in ids if len(run.outputs[s]) < n and run.outputs[s][-1] not in stops]
    runner.release([s for s in ids if s not in active])
    while active:
        logits = runner.decode(active, [run.outputs[s][-1] for s in active])
        steps += 1
        _record(runner, run)
        for seq_id, token in zip(active, logits.argmax(-1).tolist(), strict=True):
            run.outputs[seq_id].append(token)
        done = [s for s in active if len(run.outputs[s]) >= n or run.outputs[s][-1] in stops]
        runner.release(done)
        active = [s for s in active if s not in done]
    seconds, tokens = time.perf_counter() - start, sum(map(len, run.outputs))
    held, full = run.peak_bytes
    print(f"  {tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s, "
          f"{steps} decode steps (head-wise cache, no prefix sharing)")  # fmt: skip
    print(f"  KV memory at its peak: {held / 2**20:.2f} MiB held, where a full cache would "
          f"hold {full / 2**20:.2f} MiB ({held / max(full, 1):.0%}; "
          f"{(full - held) / 2**20:.2f} MiB saved)")  # fmt: skip
    free = runner.cache.available_pages_count
    print(f"  pages: {pages - free} held, {free} free of {pages} after the last request")
    return run


def _prefill(runner: HeadwiseCausalLM, prompts: list[list[int]], run: PressedRun) -> dict[int, int]:
    """Prefill every prompt in steps of at most ``STEP_TOKENS`` tokens; each one's first
    output token (greedy)."""
    queue, done, first = deque(range(len(prompts))), [0] * len(prompts), {}
    while queue:
        batch, rows, ends, room = [], [], [], STEP_TOKENS
        while queue and room:
            seq_id = queue[0]
            take = min(room, len(prompts[seq_id]) - done[seq_id])
            rows.append(prompts[seq_id][done[seq_id] : done[seq_id] + take])
            done[seq_id] += take
            room -= take
            batch.append(seq_id)
            ends.append(done[seq_id] == len(prompts[seq_id]))
            if ends[-1]:
                queue.popleft()
        logits = runner.forward(batch, rows, ends_prompt=ends)
        _record(runner, run)
        first.update((s, int(logits[b].argmax())) for b, s in enumerate(batch) if ends[b])
    return first


def _record(runner: HeadwiseCausalLM, run: PressedRun) -> None:
    """After a step: the compressions it ran, and the memory held against a full cache."""
    for seq_id in runner.last_compressed:
        run.compressions[seq_id].append((runner.seq_len(seq_id), runner.held_positions(seq_id)))
    held, full = runner.cache.memory_bytes(), runner.cache.full_cache_bytes()
    if held >= run.peak_bytes[0]:
        run.peak_bytes = (held, full)


def check_press_parity(model: Any, prompts: list[list[int]], run: PressedRun) -> int:
    """Print how the outputs compare with the reference that masks what each head
    dropped (teacher-forced on the run's own tokens); 1 if they differ in float32."""
    from .cli import token_agreement  # the demo's own comparison (cli imports this module)

    references = []
    for prompt, output, compressions in zip(prompts, run.outputs, run.compressions, strict=True):
        logits = masked_reference_logits(model, prompt + output[:-1], compressions)
        references.append(logits[len(prompt) - 1 :].argmax(-1).tolist())
    same, total, first = token_agreement(references, run.outputs)
    if first is None:
        print(f"parity: identical to the masked full-cache reference ({total} of {total} "
              "tokens, every request: transformers' own forward with each head's dropped "
              "positions masked)")  # fmt: skip
        return 0
    print(f"parity: differs from the masked full-cache reference: {same} of {total} tokens "
          f"equal; first divergence at token {first}")  # fmt: skip
    return 1 if next(model.parameters()).dtype == torch.float32 else 0
