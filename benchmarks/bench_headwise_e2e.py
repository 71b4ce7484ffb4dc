"""A model decoding on head-wise caches pressed by AdaKV, against the full paged cache.

Workload (issue 17): a random-weight Llama shaped like Llama-3-8B (32 layers, hidden
4096, 32 query / 8 KV heads, vocab 128256), bf16; 16 requests with 16k-token prompts,
prefilled in chunks, then 256 greedy decode steps of the whole batch. Two sides over the
same model and prompts, one after the other:

- **full cache**: ``PagedCausalLM`` (flashinfer), decode steps replayed from CUDA graphs;
- **head-wise, AdaKV**: ``HeadwiseCausalLM`` with ``AdaKVPress(SnapKVPress())`` at an
  average budget of ``--budget`` (25%) of each prompt per KV head, pressed when the
  prompt ends (prefill on flashinfer); decode steps replayed from CUDA graphs (the Triton
  decode kernel, every layer's page tables uploaded at once; no press runs in them), or
  eager with ``--no-graphs`` (``--backend triton`` for the Triton kernel eagerly).

Reported per side: generated tok/s over the decode steps, the mean decode step, KV
memory held after the prompts, how many 16k-token requests the GPU memory left after
the weights would hold at that per-request footprint, and the host syncs torch reports
(sync debug mode) in a few more decode steps. The two sides' greedy tokens are
compared for scale only (the head-wise side sees a quarter of the keys).

    python benchmarks/bench_headwise_e2e.py                 # one H200: a few minutes
    python benchmarks/bench_headwise_e2e.py --device cpu --tiny   # smoke run (torch)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from bench_tensor_parallel import MODEL_8B, TINY

from seqattn.headwise import AdaKVPress, SnapKVPress
from seqattn.integrations.hf import PagedCausalLM
from seqattn.integrations.hf_headwise import HeadwiseCausalLM

PAGE = 16


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke run)")
    parser.add_argument("--requests", type=int, default=None, help="default 16 (tiny: 3)")
    parser.add_argument("--context", type=int, default=None, help="default 16384 (tiny: 96)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 256 (tiny: 4)")
    parser.add_argument("--chunk", type=int, default=4096, help="prefill tokens per forward")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--backend", default="auto", help="head-wise attention: auto, triton")
    parser.add_argument("--no-graphs", action="store_true", help="head-wise decode eagerly")
    parser.add_argument("--profile", action="store_true",
                        help="head-wise side only: cProfile 8 decode steps")  # fmt: skip
    args = parser.parse_args()
    small = (3, 96, 4) if args.tiny else (16, 16384, 256)
    for name, value in zip(("requests", "context", "new_tokens"), small, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def build(args: argparse.Namespace) -> Any:
    import transformers

    torch.manual_seed(0)
    # the TP benchmark's 8B shape, with room for 16k-token positions
    shape = TINY if args.tiny else {**MODEL_8B, "max_position_embeddings": 32768}
    config = transformers.LlamaConfig(**shape)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def prefill(runner: Any, ids: list[int], prompts: list[list[int]], chunk: int) -> torch.Tensor:
    """Each prompt in chunks of ``chunk`` tokens, one request at a time (so a head-wise
    request holds its whole prompt only until its press); the last logits of each."""
    last = []
    for seq_id, prompt in zip(ids, prompts, strict=True):
        for start in range(0, len(prompt), chunk):
            rows = [prompt[start : start + chunk]]
            if isinstance(runner, PagedCausalLM):
                runner.descriptor.allocate([seq_id], [len(rows[0])])
                logits = runner.forward([seq_id], rows)
            else:
                ends = start + chunk >= len(prompt)
                logits = runner.forward([seq_id], rows, ends_prompt=ends)
        last.append(logits[0])
    return torch.stack(last)


def decode(runner: Any, ids: list[int], logits: torch.Tensor, steps: int, device: str) -> dict:
    """Greedy decode of the whole batch, each step's tokens fed to the next on the device
    (no host sync inside the loop); the tokens and the mean step over all but the first
    (which captures the CUDA graph), then the host syncs of 4 more steps."""
    tokens, out = logits.argmax(-1), []

    def step(tokens: torch.Tensor) -> torch.Tensor:
        if isinstance(runner, PagedCausalLM):
            runner.descriptor.allocate_decoding(ids)
        return runner.decode(ids, tokens).argmax(-1)

    tokens = step(tokens)  # the first step captures the CUDA graph: not timed
    out.append(tokens)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps - 1):
        tokens = step(tokens)
        out.append(tokens)
    sync(device)
    wall = (time.perf_counter() - start) * steps / max(steps - 1, 1)
    syncs = count_syncs(lambda: step(tokens), 4) if device == "cuda" else "not checked"
    return dict(tokens=torch.stack(out, 1).tolist(), step=wall / steps, wall=wall, syncs=syncs)


def profile(run: Any) -> None:
    """Where the host time of a few decode steps goes (after one untimed run)."""
    import cProfile
    import pstats

    run()
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def count_syncs(step: Any, steps: int) -> str:
    """Host syncs torch's sync debug mode reports over ``steps`` calls of ``step``."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sources = [f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}" for w in caught
               if "synchroniz" in str(w.message) and "prototype" not in str(w.message)]  # fmt: skip
    where = f" ({'; '.join(sorted(set(sources)))})" if sources else ""
    return f"{len(sources) / steps:.1f} per step{where}"


def side(args: argparse.Namespace, model: Any, prompts: list[list[int]], headwise: bool) -> dict:
    ids = list(range(len(prompts)))
    per_request = -(-(args.context + args.new_tokens + 4) // PAGE) + 1  # 4: counting syncs
    if headwise:
        layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
        kept = -(-int(args.budget * per_request * PAGE) // PAGE) + 2  # a head's pages, rounded
        # one prompt whole (a request is pressed when its prompt ends), the rest pressed
        pages = layers * heads * (per_request + len(prompts) * kept)
        runner: Any = HeadwiseCausalLM(model, num_pages=pages, page_size=PAGE,
                                       backend=args.backend)  # fmt: skip
        runner.add_sequences(ids, press=AdaKVPress(SnapKVPress()), budget=args.budget)
        graphs = not args.no_graphs and runner.enable_cuda_graphs((1, 2, 4, 8, 16, 32))
    else:
        runner = PagedCausalLM(model, num_pages=len(prompts) * per_request + 16, page_size=PAGE)
        graphs = runner.enable_cuda_graphs((1, 2, 4, 8, 16, 32))
    sync(args.device)
    start = time.perf_counter()
    logits = prefill(runner, ids, prompts, args.chunk)
    sync(args.device)
    prefill_s = time.perf_counter() - start
    held = kv_bytes(runner, ids)
    if args.profile:
        profile(lambda: decode(runner, ids, logits, 8, args.device))
    result = decode(runner, ids, logits, args.new_tokens, args.device)
    result.update(prefill_s=prefill_s, held=held, per_request=held / len(prompts),
                  graphs="CUDA graphs" if graphs else "eager")  # fmt: skip
    if headwise:
        runner.release(ids)
        runner.disable_cuda_graphs()
    else:
        runner.disable_cuda_graphs()
        runner.descriptor.release(ids)
    return result


def kv_bytes(runner: Any, ids: list[int]) -> int:
    """Bytes of KV the sequences hold now (the pages they hold)."""
    if isinstance(runner, HeadwiseCausalLM):
        return runner.cache.memory_bytes()
    cache = runner.cache
    page = cache.kv_data[0, 0].numel() * cache.kv_data.element_size() * cache.num_layers
    return sum(len(runner.descriptor.page_indices(i)) for i in ids) * page


def report(args: argparse.Namespace, model: Any, full: dict, pressed: dict) -> None:
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    tokens = args.requests * args.new_tokens
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    total = torch.cuda.get_device_properties(0).total_memory if args.device == "cuda" else 0
    spare = max(total - weights - 4 * 2**30, 0)  # 4 GiB for activations and workspaces
    same = sum(a == b for x, y in zip(full["tokens"], pressed["tokens"], strict=True)
               for a, b in zip(x, y, strict=True))  # fmt: skip
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(
        f"\n{name}; Llama {params:.2f}B, {model.config.num_hidden_layers} layers, "
        f"{model.dtype}; {args.requests} requests x {args.context} prompt tokens, "
        f"{args.new_tokens} decoded each; AdaKV (SnapKV scores) at {args.budget:.0%}, "
        f"head-wise backend {args.backend}; greedy tokens equal: {same / tokens:.1%}\n"
    )
    print("| side | prefill s | decode tok/s | decode step ms | KV held GiB | "
          "16k requests that fit | host syncs |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---|")
    fits = []
    for label, r in (("full cache", full), ("head-wise, AdaKV", pressed)):
        label = f"{label}, {r['graphs']}"
        fits.append(int(spare // max(r["per_request"], 1)) if spare else 0)
        print(f"| {label} | {r['prefill_s']:.1f} | {tokens / r['wall']:,.0f} | "
              f"{r['step'] * 1e3:.2f} | {r['held'] / 2**30:.2f} | {fits[-1]} | "
              f"{r['syncs']} |")  # fmt: skip
    print(
        f"\nhead-wise against full: decode step {pressed['step'] / full['step']:.2f}x, "
        f"KV {pressed['held'] / full['held']:.2f}x, requests that fit "
        f"{fits[1] / max(fits[0], 1):.2f}x"
    )


def main() -> None:
    args = parse()
    model = build(args)
    model.generation_config.eos_token_id = None
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, model.config.vocab_size, (args.requests, args.context),
                            generator=gen).tolist()  # fmt: skip
    if args.profile:
        side(args, model, prompts, headwise=True)
        return
    full = side(args, model, prompts, headwise=False)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    pressed = side(args, model, prompts, headwise=True)
    report(args, model, full, pressed)


if __name__ == "__main__":
    main()
