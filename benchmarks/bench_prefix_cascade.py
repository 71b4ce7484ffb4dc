"""Prefix caching and cascade attention: 64 requests behind one 4,096-token system prompt.

Each request is the shared system prompt plus 64 private tokens (page 16, 32 query /
8 KV heads, head_dim 128, fp16, 32 layers). Side by side in one run:

- **no prefix cache**: every request prefills its whole prompt into its own pages, and
  decodes with plain paged attention;
- **prefix cache**: the first request prefills everything and commits; the others
  start from the cache (``start_sequence``) and prefill only their own 64 tokens;
  decode with plain attention (each row still reads the shared pages itself),
- **prefix cache + cascade**: the same cache, decode with cascade attention (the
  shared pages read once per step and layer, merged with each row's suffix).

It reports pages held, prompt tokens computed, prefill time, the decode step (host
bookkeeping + plan + 32 x (append_kv + attention)), the attention kernels alone (CUDA
events), and checks that cascade and plain outputs agree. A table is printed last.

``python benchmarks/bench_prefix_cascade.py`` on a GPU with flashinfer;
``--device cpu --quick`` runs a tiny version on the torch backend (a smoke test).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from seqattn import CacheDescriptor, PagedAttention, PagedKVCacheManager

HQ, HKV, D, PS = 32, 8, 128, 16


class Setup:
    """One cache and descriptor, with the requests prefilled (and decode steps to time)."""

    def __init__(self, args: argparse.Namespace, prefix_caching: bool, num_pages: int) -> None:
        self.args, self.device = args, torch.device(args.device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.cache = PagedKVCacheManager(
            num_pages, PS, HKV, D, self.dtype, self.device, num_layers=args.layers
        )
        self.desc = CacheDescriptor(self.cache, prefix_caching=prefix_caching)
        backend = "flashinfer" if self.device.type == "cuda" else "torch"
        self.attn = PagedAttention(self.cache, HQ, backend=backend)
        self.ids = list(range(args.requests))
        self.computed = 0  # prompt tokens whose KV this setup computed
        self.gen = torch.Generator(device=self.device).manual_seed(0)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device, dtype=self.dtype)

    def prefill(self, prompts: list[list[int]], per_step: int) -> float:
        """Prefill the requests ``per_step`` at a time (the first alone, so that its pages
        are cached before the others look); returns seconds."""
        sync(self.device)
        t0 = time.perf_counter()
        groups = [[0]] + [self.ids[i : i + per_step] for i in range(1, len(self.ids), per_step)]
        for ids in groups:
            new = [len(prompts[i]) - self.desc.start_sequence(i, prompts[i]) for i in ids]
            self.desc.allocate(ids, new)
            self.forward(ids, new, cascade=False)
            self.desc.commit(ids)
            self.computed += sum(new)
        sync(self.device)
        return time.perf_counter() - t0

    def forward(self, ids: list[int], new: list[int], *, cascade: bool) -> None:
        """Append random K/V for ``new`` tokens per request and attend, in every layer."""
        packed = self.desc.pack_for_flashinfer(ids, new, device=self.device, shared_prefix=cascade)
        self.attn.plan(packed, cascade=cascade)
        nnz = sum(new)
        q, k, v = self.randn(nnz, HQ, D), self.randn(nnz, HKV, D), self.randn(nnz, HKV, D)
        for layer in range(self.cache.num_layers):
            self.cache.append_kv(k, v, packed, layer=layer)
            self.attn.run(q, layer)

    def decode_step(self, cascade: bool) -> Callable[[], None]:
        def step() -> None:
            self.desc.allocate_decoding(self.ids, token_ids=[7] * len(self.ids))
            self.forward(self.ids, [1] * len(self.ids), cascade=cascade)
            self.desc.commit(self.ids)

        return step

    def graph_step(self, cascade: bool) -> Callable[[], None]:
        """A decode step whose 32 layers (append + attention) replay from a CUDA graph."""
        n = len(self.ids)
        dec = PagedAttention(self.cache, HQ, backend="flashinfer", cuda_graph_batch_sizes=(n,),
                             cascade_groups=1 if cascade else 0)  # fmt: skip
        q, k, v = self.randn(n, HQ, D), self.randn(n, HKV, D), self.randn(n, HKV, D)
        graphs: list[torch.cuda.CUDAGraph] = []

        def layers() -> None:
            for layer in range(self.cache.num_layers):
                dec.forward(q, k, v, layer)

        def step() -> None:
            self.desc.allocate_decoding(self.ids, token_ids=[7] * n)
            packed = self.desc.pack_for_flashinfer(
                self.ids, [1] * n, device=self.device, shared_prefix=cascade
            )
            dec.plan(packed, cuda_graph=True)
            if not graphs:
                graphs.append(dec.capture(layers))
            graphs[0].replay()
            self.desc.commit(self.ids)

        return step

    @property
    def pages_held(self) -> int:
        return self.cache.num_pages - self.cache.allocator.free_pages_count


def warm_up(args: argparse.Namespace, prompts: list[list[int]]) -> None:
    """Compile every kernel variant the run uses (flashinfer JITs them on first use)."""
    small = argparse.Namespace(**{**vars(args), "requests": 3, "layers": 1})
    short = [p[: 2 * PS] + p[-3:] for p in prompts[:3]]
    setup = Setup(small, prefix_caching=True, num_pages=64)
    setup.prefill(short, per_step=2)
    for cascade in (False, True):
        setup.decode_step(cascade)()
    sync(setup.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_step(step: Callable[[], None], n: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t0) / n


def kernel_ms(setup: Setup, cascade: bool, reps: int) -> tuple[float, torch.Tensor]:
    """Attention of all layers for the current batch (planned once), and layer 0's output."""
    ids = setup.ids
    packed = setup.desc.pack_for_flashinfer(ids, device=setup.device, shared_prefix=cascade)
    setup.attn.plan(packed, [1] * len(ids), cascade=cascade)
    q = torch.randn(len(ids), HQ, D, generator=torch.Generator(device=setup.device).manual_seed(1),
                    device=setup.device, dtype=setup.dtype)  # fmt: skip
    first = setup.attn.run(q, 0).float()
    times = []
    for _ in range(reps):
        sync(setup.device)
        t0 = time.perf_counter()
        for layer in range(setup.cache.num_layers):
            setup.attn.run(q, layer)
        sync(setup.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--system", type=int, default=4096, help="shared prompt tokens")
    parser.add_argument("--private", type=int, default=64, help="tokens of each request")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few steps")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.requests, args.system, args.private = 2, 4, 64, 8
    blocks, steps = (2, 2) if args.quick else (5, 8)
    gen = torch.Generator().manual_seed(0)
    system = torch.randint(0, 32000, (args.system,), generator=gen).tolist()
    prompts = [system + torch.randint(0, 32000, (args.private,), generator=gen).tolist()
               for _ in range(args.requests)]  # fmt: skip
    decode_room = 3 * (blocks + 1) * steps + 16  # the cached setup decodes three ways
    pages = args.requests * -(-(args.system + args.private + decode_room) // PS) + 16
    warm_up(args, prompts)
    plain = Setup(args, prefix_caching=False, num_pages=pages)
    own = args.requests * (-(-(args.private + decode_room) // PS) + 1)
    shared = Setup(args, prefix_caching=True, num_pages=-(-args.system // PS) + own + 16)
    prefill_s = {
        "plain": plain.prefill(prompts, per_step=8),
        "shared": shared.prefill(prompts, per_step=8),
    }
    held = {"plain": plain.pages_held, "shared": shared.pages_held}
    stats = shared.desc.prefix_stats
    runs = {
        "no prefix cache": plain.decode_step(cascade=False),
        "prefix cache": shared.decode_step(cascade=False),
        "prefix cache + cascade": shared.decode_step(cascade=True),
    }
    if plain.device.type == "cuda":
        runs["no prefix cache, CUDA graph"] = plain.graph_step(cascade=False)
        runs["prefix cache + cascade, CUDA graph"] = shared.graph_step(cascade=True)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for block in range(blocks + 1):  # block 0 warms up (JIT, allocator caches)
        for name, step in runs.items():
            t = per_step(step, steps, plain.device)
            if block:
                times[name].append(t * 1e3)
    step_ms = {name: statistics.median(t) for name, t in times.items()}
    reps = 3 if args.quick else 9
    kernels = {
        "no prefix cache": kernel_ms(plain, False, reps)[0],
        "prefix cache": kernel_ms(shared, False, reps)[0],
    }
    cascade_k, cascade_out = kernel_ms(shared, True, reps)
    kernels["prefix cache + cascade"] = cascade_k
    _, plain_out = kernel_ms(shared, False, 1)
    max_diff = (cascade_out - plain_out).abs().max().item()
    assert shared.attn.cascade is None  # the last plan was plain

    device = torch.cuda.get_device_name() if plain.device.type == "cuda" else "cpu"
    print(
        f"\n{device}; {args.requests} requests = {args.system} shared + {args.private} own "
        f"tokens; {args.layers} layers, {HQ}/{HKV} heads, head_dim {D}, {plain.dtype}, "
        f"page {PS}\n"
        f"prefix cache: {stats.lookups} lookups, hit rate {stats.hit_rate:.1%}, "
        f"{stats.hit_tokens} hit tokens; cascade vs plain output max |diff| {max_diff:.2e}\n"
    )
    total = sum(len(p) for p in prompts)
    print("| | pages held | prompt tokens computed | prefill s |")
    print("|---|---:|---:|---:|")
    print(f"| no prefix cache | {held['plain']} | {plain.computed} of {total} "
          f"| {prefill_s['plain']:.3f} |")  # fmt: skip
    print(f"| prefix cache | {held['shared']} ({held['shared'] / held['plain']:.3f}x) "
          f"| {shared.computed} of {total} ({1 - shared.computed / total:.1%} saved) "
          f"| {prefill_s['shared']:.3f} |\n")  # fmt: skip
    base_step, base_kernel = step_ms["no prefix cache"], kernels["no prefix cache"]
    print("| decode | step ms | vs no cache | attention kernels ms | vs no cache |")
    print("|---|---:|---:|---:|---:|")
    for name in runs:
        kernel = f"{kernels[name]:.3f} | {base_kernel / kernels[name]:.2f}x faster" if (
            name in kernels) else "- | -"  # fmt: skip
        print(f"| {name} | {step_ms[name]:.3f} | {base_step / step_ms[name]:.2f}x faster "
              f"| {kernel} |")  # fmt: skip
    graph = "no prefix cache, CUDA graph"
    if graph in step_ms:
        ratio = step_ms[graph] / step_ms["prefix cache + cascade, CUDA graph"]
        print(f"\nwith CUDA graphs on both sides, cascade decode is {ratio:.2f}x faster")


if __name__ == "__main__":
    main()
