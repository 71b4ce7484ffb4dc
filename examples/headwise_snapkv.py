"""SnapKV + AdaKV compression on head-wise paged caches, checked against dense attention.

A toy model (random projections with RoPE; each layer reads the same hidden states)
prefills two prompts, scores every prompt token per KV head with SnapKV (attention from
the last ``window`` prompt tokens), keeps a per-layer budget (PyramidKV-like: more in
the first layers, 25% on average) spread over heads AdaKV-style, compresses, and
decodes. Each model step does its page bookkeeping for every layer at once
(``begin_step``, ``plan_step``); the forward pass then writes and attends layer by
layer, and compresses each layer right after its prefill attention. Each decode step is
compared with dense float64 attention over the full, never-compressed history with the
dropped tokens masked out by their true positions.

Run: python examples/headwise_snapkv.py [--prompt 300] [--decode 8]
"""

from __future__ import annotations

import argparse
import math
from typing import Optional

import torch

from seqattn.headwise import HeadwiseAttention, HeadwiseKVCache, adakv_select, snapkv_scores

LAYERS, HQ, HKV, D, PS = 4, 8, 2, 64, 16
WINDOW = 8


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[n, heads, D]`` at ``positions`` ``[n]``."""
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    angle = (positions.double()[:, None] * freq)[:, None, :].to(x.device)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class ToyModel:
    """Per layer: q, k, v projections of hidden states ``[n, 64]``; keys rotated once."""

    def __init__(self, device: str, dtype: torch.dtype) -> None:
        gen = torch.Generator().manual_seed(0)
        self.w = [
            [torch.randn(64, h * D, generator=gen) / 8 for h in (HQ, HKV, HKV)]
            for _ in range(LAYERS)
        ]
        self.device, self.dtype = device, dtype

    def qkv(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor):
        """``q [n, HQ, D]``, ``k, v [n, HKV, D]`` (q and k rotated) in the cache dtype."""
        wq, wk, wv = self.w[layer]
        q = rope((hidden @ wq).view(-1, HQ, D), positions)
        k = rope((hidden @ wk).view(-1, HKV, D), positions)
        v = (hidden @ wv).view(-1, HKV, D)
        return [t.to(self.device, self.dtype) for t in (q, k, v)]


def dense(q, keys, values, mask) -> torch.Tensor:
    """Causal attention of the newest ``len(q)`` positions, dropped tokens masked, float64."""
    n, group = keys.shape[0], HQ // HKV
    logits = torch.einsum("qhd,khd->hqk", q.double(), keys.double().repeat_interleave(group, 1))
    query_pos = torch.arange(n - q.shape[0], n)[:, None]
    visible = mask.repeat_interleave(group, 0)[:, None, :] & (torch.arange(n) <= query_pos)
    weights = (logits / math.sqrt(D)).masked_fill(~visible, -math.inf).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, values.double().repeat_interleave(group, 1))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", type=int, default=300, help="tokens of the first prompt")
    parser.add_argument("--decode", type=int, default=8, help="decode steps")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = ToyModel(device, dtype)
    ids, prompt_lens = [0, 1], [args.prompt, args.prompt + 37]
    cache = HeadwiseKVCache(4096, PS, LAYERS, HKV, D, dtype, device)
    attn = HeadwiseAttention(cache, HQ)
    cache.add_sequences(ids)
    gen = torch.Generator().manual_seed(1)
    # the full history, for the reference: keys/values per (sequence, layer), and masks
    history = {(s, layer): [] for s in ids for layer in range(LAYERS)}

    # 1. prefill both prompts in every layer, then SnapKV scores + AdaKV per layer
    hidden = torch.randn(sum(prompt_lens), 64, generator=gen)
    positions = torch.cat([torch.arange(n) for n in prompt_lens])
    step = cache.begin_step(ids, prompt_lens)  # pages of every layer, at once
    attn.plan_step(step)
    for layer in range(LAYERS):
        q, k, v = model.qkv(layer, hidden, positions)
        cache.write(step, layer, k, v)
        attn.run(q, layer)  # the prompt's own attention, as a model would need it
        budget_fraction = 0.4 - 0.3 * layer / (LAYERS - 1)  # PyramidKV: 40% .. 10%
        start = 0
        for seq, n in zip(ids, prompt_lens, strict=True):
            rows = slice(start, start + n)
            history[seq, layer] = [k[rows].double().cpu(), v[rows].double().cpu()]
            scores = snapkv_scores(q[rows][-WINDOW:], k[rows])
            budget = max(int(budget_fraction * n), 2 * WINDOW) * HKV  # over the layer's heads
            keep = adakv_select(scores, budget, window=WINDOW, min_per_head=WINDOW // 2)
            cache.compress(layer, seq, keep)
            mask = torch.zeros(HKV, n, dtype=torch.bool)
            for h, kept in enumerate(keep):
                mask[h, torch.as_tensor(kept)] = True
            history[seq, layer].append(mask)
            start += n
    first, last = cache.head_lens(0, 0).tolist(), cache.head_lens(LAYERS - 1, 0).tolist()
    print(f"sequence 0 keeps per KV head {first} of {prompt_lens[0]} tokens in layer 0, {last} "
          f"in layer {LAYERS - 1}")  # fmt: skip

    # 2. decode: new tokens at each sequence's true next position, every head keeps them
    worst = 0.0
    for _ in range(args.decode):
        hidden = torch.randn(len(ids), 64, generator=gen)
        positions = torch.tensor([cache.seq_len(s) for s in ids])
        step = cache.begin_step(ids)  # one token each, in every layer
        attn.plan_step(step)
        for layer in range(LAYERS):
            q, k, v = model.qkv(layer, hidden, positions)
            cache.write(step, layer, k, v)
            out = attn.run(q, layer)
            for row, seq in enumerate(ids):
                keys, values, mask = history[seq, layer]
                keys = torch.cat([keys, k[row : row + 1].double().cpu()])
                values = torch.cat([values, v[row : row + 1].double().cpu()])
                mask = torch.cat([mask, torch.ones(HKV, 1, dtype=torch.bool)], dim=1)
                history[seq, layer] = [keys, values, mask]
                ref = dense(q[row : row + 1].cpu(), keys, values, mask)
                worst = max(worst, (out[row].double().cpu() - ref[0]).abs().max().item())
    print(f"decode ({attn.backend}) vs dense attention with dropped tokens masked: "
          f"max |diff| = {worst:.1e}")  # fmt: skip

    # 3. memory: pages per layer and head, and against a full cache
    print("pages held per layer (rows) and KV head (columns):", cache.pages_held().tolist())
    full, held = cache.full_cache_bytes(), cache.memory_bytes()
    print(f"memory: {held / 2**20:.2f} MiB held vs {full / 2**20:.2f} MiB for a full cache "
          f"({held / full:.2f}x, {cache.bytes_saved() / 2**20:.2f} MiB saved)")  # fmt: skip
    cache.release(ids)
    assert cache.available_pages_count == 4096


if __name__ == "__main__":
    main()
