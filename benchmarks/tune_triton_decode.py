"""Time the Triton decode kernel's launch settings against flashinfer on one layer.

The default shape is one layer of ``bench_headwise.py``'s head-wise step: B=16
sequences x 8 KV heads as 128 single-KV-head requests of 4 query heads each (GQA 32/8),
head_dim 128, fp16, page 16, each holding about a quarter of a 16k context (lognormal
lengths around 4,096, sigma ``--sigma``, seeded; bench_headwise's budgets are skewed as
sigma 1), the rows' pages interleaved in the pool as a compressed cache leaves them
(``--contiguous``: each row's in one run). ``--generate`` is one layer of
``bench_generate.py``'s decode instead: 64 requests x 8 KV heads, head_dim 64, bf16,
640 tokens each (the middle of 512 + 256). For every combination of
``PAGES_PER_BLOCK``, ``WAVES``, ``MIN_BLOCKS``, ``NUM_WARPS`` and ``NUM_STAGES``
(:class:`~seqattn.attention.triton_decode.TritonDecodeBackend`) the kernel's run is
timed as the engine runs it, in a CUDA graph of fixed buffers (both sides; CUDA events
around a replay of 10 runs, median of ``--reps``), and checked against flashinfer's
output; the table lists the fastest first, with the KV read rate.

    python benchmarks/tune_triton_decode.py [--rows 128] [--tokens 4096] [--generate]

Needs CUDA, triton and flashinfer; elsewhere it says so and exits.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import numpy as np
import torch

from seqattn import CacheDescriptor, PagedAttention, PagedKVCacheManager
from seqattn.attention.cuda_graph import capture
from seqattn.attention.triton_decode import TritonDecodeBackend, triton_or_none


def timed(attention: PagedAttention, step, q: torch.Tensor, reps: int, burst: int = 10):
    """``(output, median milliseconds)`` of one layer's decode by ``attention`` (built
    with ``cuda_graph_batch_sizes``): ``burst`` runs captured in one CUDA graph, so no
    launch's host time is counted, as in the engine's graphs; CUDA events per replay."""
    attention.plan(step, cuda_graph=True)
    out = attention.run(q, 0)
    graph = capture(lambda: [attention.run(q, 0, out=out) for _ in range(burst)])
    times = []
    for _ in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / burst)
    attention.close()
    return out, statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=128, help="single-KV-head requests")
    parser.add_argument("--tokens", type=int, default=4096, help="median tokens per row")
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--sigma", type=float, default=1.0, help="lognormal spread of lengths")
    parser.add_argument("--kv-heads", type=int, default=1, help="KV heads per request")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument(
        "--generate",
        action="store_true",
        help="bench_generate's decode: 64 x 8 KV heads, d64, bf16, 640 tokens",
    )
    parser.add_argument(
        "--contiguous",
        action="store_true",
        help="each row's pages in one run (default: rows' pages interleave)",
    )
    parser.add_argument("--layout", choices=("NHD", "HND"), default="NHD")
    parser.add_argument("--warps", default="4,8", help="NUM_WARPS values to sweep")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    if args.generate:
        args.rows, args.kv_heads, args.head_dim, args.dtype = 64, 8, 64, "bfloat16"
        args.tokens, args.sigma = 640, 0.0
    if not torch.cuda.is_available() or triton_or_none() is None:
        print("tune_triton_decode: needs CUDA and triton; skipped")
        return
    rng = np.random.default_rng(0)
    lens = np.clip(rng.lognormal(np.log(args.tokens), args.sigma, args.rows), 16, 8 * args.tokens)
    lens = lens.astype(np.int64).tolist()
    pages = sum(-(-n // 16) for n in lens) + 8
    dtype, dim, heads = getattr(torch, args.dtype), args.head_dim, args.kv_heads
    cache = PagedKVCacheManager(pages, 16, heads, dim, dtype, "cuda", args.layout)
    cache.kv_data.normal_(generator=torch.Generator("cuda").manual_seed(0))
    desc = CacheDescriptor(cache)
    ids = list(range(args.rows))
    if args.contiguous:
        desc.allocate(ids, lens)
    else:  # a page to each growing row in turn: rows' pages interleave in the pool
        left = dict(zip(ids, lens, strict=True))
        while left:
            grow = list(left)
            desc.allocate(grow, [min(16, left[i]) for i in grow])
            left = {i: n - 16 for i, n in left.items() if n > 16}
    step = desc.pack_for_flashinfer(ids, [1] * args.rows, device="cuda")
    q = torch.randn(args.rows, heads * args.group, dim, dtype=dtype, device="cuda")
    kv_bytes = sum(lens) * 2 * heads * dim * dtype.itemsize

    def graphed(backend: str) -> PagedAttention:
        return PagedAttention(cache, heads * args.group, backend=backend,
                              cuda_graph_batch_sizes=(args.rows,))  # fmt: skip

    want, flashinfer_ms = timed(graphed("flashinfer"), step, q, args.reps)
    rows = []
    warp_counts = [int(w) for w in args.warps.split(",")]
    grid = itertools.product((2, 4, 8), (8, 32), (1, 2, 4), warp_counts, (2, 3))
    for pages_per_block, waves, min_blocks, warps, stages in grid:
        settings = dict(PAGES_PER_BLOCK=pages_per_block, WAVES=waves, MIN_BLOCKS=min_blocks,
                        NUM_WARPS=warps, NUM_STAGES=stages)  # fmt: skip
        for name, value in settings.items():
            setattr(TritonDecodeBackend, name, value)
        attention = graphed("triton")
        splits = attention.graphs._buckets[args.rows].splits  # type: ignore[union-attr]
        try:
            got, ms = timed(attention, step, q, args.reps)
        except Exception as error:  # a setting the compiler refuses (shared memory)
            print(f"{settings}: {type(error).__name__}: {str(error)[:120]}")
            continue
        diff = (got.float() - want.float()).abs().max().item()
        rows.append((ms, settings, splits, diff))
    rows.sort(key=lambda row: row[0])
    name = torch.cuda.get_device_name()
    print(f"\n{name}; {args.rows} requests x {heads} KV x {args.group} query heads, head_dim "
          f"{dim}, {args.dtype}, {args.layout}, page 16, {sum(lens):,} tokens "
          f"({kv_bytes / 2**30:.2f} GiB of KV)")  # fmt: skip
    print(f"flashinfer: {flashinfer_ms:.3f} ms, {kv_bytes / flashinfer_ms / 1e6:.0f} GB/s\n")
    print("| pages per block | waves | min blocks | warps | stages | splits | ms | GB/s "
          "| x flashinfer | max diff |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ms, s, splits, diff in rows[:12]:
        print(f"| {s['PAGES_PER_BLOCK']} | {s['WAVES']} | {s['MIN_BLOCKS']} | {s['NUM_WARPS']} "
              f"| {s['NUM_STAGES']} | {splits} | {ms:.3f} | {kv_bytes / ms / 1e6:.0f} "
              f"| {ms / flashinfer_ms:.2f}x | {diff:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
