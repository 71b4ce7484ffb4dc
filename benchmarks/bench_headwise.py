"""Decode over head-wise paged caches against the full cache and against masking it.

Setup (defaults; the AdaKV regime): B=16 sequences of 16k tokens, 32 query / 8 KV
heads, head_dim 128, fp16, page 16, 4 layers. Each (layer, sequence) keeps per KV head a
budget averaging 25% of the context, skewed across heads like AdaKV's allocations: a
fixed-seed lognormal split (sigma 1), clipped to [min, context] with the excess handed to
the other heads. Kept tokens are a random subset per head (their choice does not change
the cost). Three ways to decode (the third with two kernels), side by side in one run,
on the same K/V:

(a) full cache: ``PagedAttention`` over a normal multi-head paged cache (no compression).
(b) masking the full cache: what kvpress does for head-wise budgets (AdaKV and friends):
    the full cache stays, and dropped keys are replaced by a "fake key" whose logit is
    ~ -inf for the step's queries, so attention runs at full length. Here the fake keys
    are written once, before timing, and (b) runs the same full-length flashinfer decode
    as (a): kvpress also rewrites them every step, so (b) is a *lower bound* on masking.
    Its output is checked to equal (c)'s, which shows the masks are the same.
(c) head-wise paged: ``HeadwiseKVCache`` + ``HeadwiseAttention``: only kept tokens,
    one page list per (layer, sequence, KV head), B x 8 single-KV-head requests per layer,
    through the step API: ``begin_step`` (every layer's bookkeeping, one upload) and
    ``plan_step`` once per step, then ``write`` + ``run`` per layer.
(d) the same with flashinfer's tensor-core decode kernel (``decode_use_tensor_cores``).
(e) the same with seqattn's Triton decode kernel (``backend="triton"``), which needs no
    host-side plan per layer (where triton is installed).

Measured: "attention" is the layers' ``run()`` calls after planning (CUDA events);
"decode step" is a whole step's attention side for every layer: bookkeeping, append of
the new token's K/V, plan and run, (1) synchronized after every step, and (2) back to
back: ``--burst`` steps launched without any sync, one sync at the end, time / steps
(what a decode loop without host syncs sees: host work overlaps the GPU's). Medians
over interleaved repetitions after warm-up; memory is the bytes of the pages each
holds. A table is printed last.

``--host-time`` (CPU): host time per decode step of (a) and (c) at the GPU run's batch
shape (context 1024, float32), with the attention and append kernels replaced by no-ops:
what is left is the bookkeeping, packing, layout mapping and the calls' own checks.

GPU: ``python benchmarks/bench_headwise.py [--layers 8] [--quick] [--burst 8]``.
CPU (tiny sizes, torch backend, a smoke test): ``python benchmarks/bench_headwise.py --device cpu``.
CPU host time: ``python benchmarks/bench_headwise.py --host-time [--profile]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from seqattn import CacheDescriptor, PagedAttention, PagedKVCacheManager
from seqattn.attention.cuda_graph import capture
from seqattn.attention.triton_decode import triton_or_none
from seqattn.headwise import HeadwiseAttention, HeadwiseKVCache
from seqattn.headwise.graph import HeadwiseGraphs

FAKE_KEY_NORM = 400.0  # |fake key|: logits of about -100 against the step's queries


@dataclass
class Config:
    batch: int
    context: int
    layers: int
    hq: int
    hkv: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    device: torch.device
    reps: int
    burst: int = 8
    mean_fraction: float = 0.25
    sigma: float = 1.0
    min_tokens: int = 32
    no_tensor_cores: bool = False  # (d) runs as (c): spares compiling that kernel

    @property
    def backend(self) -> str:
        return "flashinfer" if self.device.type == "cuda" else "torch"


def make_config(args: argparse.Namespace) -> Config:
    if args.host_time:  # the GPU run's batch shape with a short context, on the CPU
        cpu = torch.device("cpu")
        return Config(16, 1024, args.layers, 32, 8, 128, 16, torch.float32, cpu, reps=200)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":  # a smoke test: tiny, fp32, the torch backend
        return Config(2, 256, 2, 8, 2, 64, 16, torch.float32, device, reps=3, burst=2,
                      min_tokens=8)  # fmt: skip
    if args.quick:
        return Config(4, 4096, 2, 32, 8, 128, 16, torch.float16, device, reps=5, burst=args.burst)
    return Config(16, 16384, args.layers, 32, 8, 128, 16, torch.float16, device, reps=args.reps,
                  burst=args.burst)  # fmt: skip


# ----------------------------------------------------------------------------- budgets
def skewed_budgets(rng: np.random.Generator, cfg: Config) -> np.ndarray:
    """Tokens each KV head keeps, ``[hkv]`` int64, averaging ``mean_fraction * context``.

    A lognormal split clipped to ``[min_tokens, context]``; what clipping removes or adds
    is spread over the heads still inside the bounds (a few rounds of water-filling).
    """
    total = cfg.mean_fraction * cfg.context * cfg.hkv
    budgets = rng.lognormal(0.0, cfg.sigma, cfg.hkv)
    budgets *= total / budgets.sum()
    for _ in range(20):
        budgets = np.clip(budgets, cfg.min_tokens, cfg.context)
        free = (budgets > cfg.min_tokens) & (budgets < cfg.context)
        gap = total - budgets.sum()
        if abs(gap) < 1 or not free.any():
            break
        budgets[free] += gap * budgets[free] / budgets[free].sum()
    return np.clip(np.round(budgets), cfg.min_tokens, cfg.context).astype(np.int64)


def choose_keeps(cfg: Config, seed: int = 0) -> list[list[list[np.ndarray]]]:
    """``keeps[layer][seq][head]``: sorted kept token indices of the prompt."""
    rng = np.random.default_rng(seed)
    keeps = []
    for _ in range(cfg.layers):
        per_seq = []
        for _ in range(cfg.batch):
            budgets = skewed_budgets(rng, cfg)
            per_seq.append([np.sort(rng.permutation(cfg.context)[:b]) for b in budgets])
        keeps.append(per_seq)
    return keeps


# ------------------------------------------------------------------------------ sides
class Graphs:
    """A side's CUDA graphs by name, each captured on first use, then replayed."""

    def __init__(self) -> None:
        self.captured: dict[str, torch.cuda.CUDAGraph] = {}

    def replay(self, name: str, body: Callable[[], object]) -> None:
        if name not in self.captured:
            self.captured[name] = capture(body)
        self.captured[name].replay()


class FullCache:
    """(a) and (b): a multi-head paged cache with ``PagedAttention``, planned once per step;
    (f) with ``graphs``: every layer's append + attention replayed from one CUDA graph."""

    def __init__(self, cfg: Config, extra_tokens: int, share: Optional[FullCache] = None) -> None:
        self.owner = share is None  # a side with graphs shares the eager side's cache
        if share is None:
            pages_per_seq = -(-(cfg.context + extra_tokens) // cfg.page_size)
            self.cache = PagedKVCacheManager(
                cfg.batch * pages_per_seq + 1, cfg.page_size, cfg.hkv, cfg.head_dim,
                cfg.dtype, cfg.device, num_layers=cfg.layers,
            )  # fmt: skip
            self.desc = CacheDescriptor(self.cache)
            self.ids = list(range(cfg.batch))
            self.desc.allocate(self.ids, [cfg.context] * cfg.batch)
            self.prompt = self.desc.pack_for_flashinfer(self.ids, [cfg.context] * cfg.batch)
        else:
            self.cache, self.desc, self.ids = share.cache, share.desc, share.ids
        buckets = None if share is None else [cfg.batch]
        self.attn = PagedAttention(self.cache, cfg.hq, backend=cfg.backend,
                                   cuda_graph_batch_sizes=buckets)  # fmt: skip
        self.graphs: Optional[Graphs] = None if share is None else Graphs()
        self.out = torch.empty(cfg.layers, cfg.batch, cfg.hq, cfg.head_dim,
                               dtype=cfg.dtype, device=cfg.device)  # fmt: skip

    def prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.owner:
            self.cache.append_kv(k, v, self.prompt, layer=layer)

    def step(self, q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor) -> None:
        self.desc.allocate_decoding(self.ids)
        packed = self.desc.pack_for_flashinfer(self.ids, [1] * len(self.ids), device=self.device)
        if self.graphs is not None:
            self.attn.plan(packed, cuda_graph=True)
            self.graphs.replay("step", lambda: self._layers(q, k1, v1))
            return
        self.attn.plan(packed)
        for layer in range(self.cache.num_layers):
            self.cache.append_kv(k1, v1, packed, layer=layer)
            self.attn.run(q, layer, out=self.out[layer])

    def _layers(self, q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor) -> None:
        for layer in range(self.cache.num_layers):
            self.attn.forward(q, k1, v1, layer, out=self.out[layer])

    def ready(self) -> None:
        """Plan the eager attention again for what the sequences hold now (outside any
        timing): a side with graphs may have stepped the shared sequences since."""
        if self.graphs is None:
            packed = self.desc.pack_for_flashinfer(self.ids, device=self.device)
            self.attn.plan(packed, [1] * len(self.ids))  # the newest token as the query

    def kernels(self, q: torch.Tensor) -> None:
        if self.graphs is not None:
            self.graphs.replay("kernels", lambda: self._kernels(q))
            return
        self._kernels(q)

    def _kernels(self, q: torch.Tensor) -> None:
        for layer in range(self.cache.num_layers):
            self.attn.run(q, layer, out=self.out[layer])

    @property
    def device(self) -> Optional[torch.device]:
        return self.cache.device if self.cache.device.type == "cuda" else None

    def memory_bytes(self) -> int:
        page = self.cache.get_kv_cache(0)[0]  # K and V of one page, every head
        pages = sum(len(self.desc.page_indices(i)) for i in self.ids)
        return pages * page.numel() * page.element_size() * self.cache.num_layers

    def attentions(self) -> list[PagedAttention]:
        return [self.attn]


class Headwise:
    """(c) and (d): the head-wise cache, bookkeeping and plans once per step for all
    layers, then per layer the append kernel and attention."""

    def __init__(self, cfg: Config, keeps: list, extra_tokens: int, tensor_cores: bool,
                 backend: Optional[str] = None, graphs: bool = False) -> None:  # fmt: skip
        kept = sum(-(-k.size // cfg.page_size) for lay in keeps for seq in lay for k in seq)
        slack = cfg.layers * cfg.batch * cfg.hkv * (-(-extra_tokens // cfg.page_size) + 1)
        staging = cfg.hkv * -(-cfg.context // cfg.page_size)  # one prompt, uncompressed
        self.cache = HeadwiseKVCache(
            kept + slack + staging + 1, cfg.page_size, cfg.layers, cfg.hkv, cfg.head_dim,
            cfg.dtype, cfg.device,
        )  # fmt: skip
        self.attn = HeadwiseAttention(
            self.cache, cfg.hq, backend=backend or cfg.backend,
            decode_use_tensor_cores=tensor_cores,
        )  # fmt: skip
        self.graphs: Optional[Graphs] = None
        if graphs:  # (g): the Triton kernel over every layer's tables, uploaded at once
            self.graphs = Graphs()
            self.buffers = HeadwiseGraphs(self.cache, cfg.hq, [cfg.batch])
        self.ids = list(range(cfg.batch))
        self.cache.add_sequences(self.ids)
        self.keeps, self.context = keeps, cfg.context
        self.out = torch.empty(cfg.layers, cfg.batch, cfg.hq, cfg.head_dim,
                               dtype=cfg.dtype, device=cfg.device)  # fmt: skip

    def prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Each prompt in turn: append all of it, then keep the budgets (as SnapKV does
        right after prefill), so at most one full prompt is ever held."""
        n = self.context
        for seq in self.ids:
            rows = slice(seq * n, (seq + 1) * n)
            self.cache.append(layer, [seq], k[rows], v[rows], [n])
            self.cache.compress(layer, seq, self.keeps[layer][seq])

    def step(self, q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor) -> None:
        cache, attn = self.cache, self.attn
        step = cache.begin_step(self.ids, on_device=self.graphs is None)
        if self.graphs is not None:
            self.buffers.prepare(step)
            self.graphs.replay("step", lambda: self._graph_layers(q, k1, v1))
            return
        attn.plan_step(step)
        for layer in range(cache.num_layers):  # the model's forward pass
            cache.write(step, layer, k1, v1)
            attn.run(q, layer, out=self.out[layer])

    def _graph_kernels(self, q: torch.Tensor) -> None:
        for layer in range(self.cache.num_layers):
            self.buffers.run(q, layer, out=self.out[layer])

    def _graph_layers(self, q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor) -> None:
        for layer in range(self.cache.num_layers):
            self.buffers.write(layer, k1, v1)
            self.buffers.run(q, layer, out=self.out[layer])

    def ready(self) -> None:
        """Nothing to do: no other side changes this cache."""

    def kernels(self, q: torch.Tensor) -> None:
        if self.graphs is not None:
            self.graphs.replay("kernels", lambda: self._graph_kernels(q))
            return
        for layer in range(self.cache.num_layers):
            self.attn.run(q, layer, out=self.out[layer])

    def memory_bytes(self) -> int:
        return self.cache.memory_bytes()

    def attentions(self) -> list[PagedAttention]:
        return [self.attn.layer_attention(layer) for layer in range(self.cache.num_layers)]


# ---------------------------------------------------------------------------- masking
def fake_keys(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """Per (sequence, KV head), a key whose logit is very negative for all the head's
    queries (kvpress's idea): minus the normalized sum of the normalized queries.

    Args:
        q: the decode queries, ``[batch, hq, head_dim]``.

    Returns:
        ``[batch, hkv, head_dim]``, ``q``'s dtype.
    """
    batch, hq, dim = q.shape
    unit = torch.nn.functional.normalize(q.float().view(batch, hkv, hq // hkv, dim), dim=-1)
    direction = torch.nn.functional.normalize(unit.sum(dim=2), dim=-1)
    return (-FAKE_KEY_NORM * direction).to(q.dtype)


def masked(k: torch.Tensor, keeps: list[list[np.ndarray]], fake: torch.Tensor) -> torch.Tensor:
    """``k`` ``[batch * context, hkv, D]`` with every dropped key replaced by its fake key."""
    batch, hkv, _ = fake.shape
    context = k.shape[0] // batch
    keep = np.zeros((batch, context, hkv), dtype=bool)
    for seq, heads in enumerate(keeps):
        for h, kept in enumerate(heads):
            keep[seq, kept, h] = True
    mask = torch.from_numpy(keep).to(k.device)[..., None]
    return torch.where(mask, k.view(batch, context, hkv, -1), fake[:, None]).view_as(k)


# ----------------------------------------------------------------------------- timing
class Clock:
    """Seconds taken by ``fn``: CUDA events on a GPU (after a sync), else wall time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3


def interleaved(
    clock: Clock,
    fns: list[Callable[[], None]],
    reps: int,
    before: Optional[list[Callable[[], None]]] = None,
) -> list[float]:
    """Median seconds of each of ``fns``, run in turn ``reps`` times after one warm-up
    (each after its ``before``, untimed, when given)."""
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(reps + 1):
        for i, (fn, out) in enumerate(zip(fns, times, strict=True)):
            if before is not None:
                before[i]()
            t = clock(fn)
            if rep:
                out.append(t)
    return [statistics.median(t) for t in times]


# ------------------------------------------------------------------------------- main
Side = Union[FullCache, Headwise]
LABELS = [
    "full cache",
    "masked full cache (kvpress-style, lower bound)",
    "head-wise paged",
    "head-wise paged, tensor-core decode",
    "head-wise paged, Triton decode (no plan)",
    "full cache, CUDA graph",
    "head-wise paged, Triton decode, CUDA graph",
]


def build(cfg: Config, steps: int, host_time: bool) -> tuple[list[Side], torch.Tensor]:
    """The sides of :data:`LABELS` over the same prompts (for ``host_time`` the full
    cache and head-wise only: on the CPU the others do the same host work), and the
    decode queries."""
    gen = torch.Generator(device=cfg.device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=cfg.device).to(cfg.dtype)

    keeps = choose_keeps(cfg)
    sides: list[Side] = [FullCache(cfg, steps)]
    if not host_time:
        sides.append(FullCache(cfg, steps))
    sides.append(Headwise(cfg, keeps, steps, tensor_cores=False))
    if not host_time:
        sides.append(Headwise(cfg, keeps, steps, tensor_cores=not cfg.no_tensor_cores))
        if cfg.device.type == "cuda" and triton_or_none() is not None:
            sides.append(Headwise(cfg, keeps, steps, tensor_cores=False, backend="triton"))
            sides.append(FullCache(cfg, steps, share=sides[0]))  # memory: one more won't fit
            sides.append(Headwise(cfg, keeps, steps, False, backend="triton", graphs=True))
    q = randn(cfg.batch, cfg.hq, cfg.head_dim)
    fake = fake_keys(q, cfg.hkv)
    for layer in range(cfg.layers):
        shape = (cfg.batch * cfg.context, cfg.hkv, cfg.head_dim)
        k, v = randn(*shape), randn(*shape)
        for i, side in enumerate(sides):
            side.prefill(layer, masked(k, keeps[layer], fake) if i == 1 else k, v)
        del k, v
    return sides, q


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--burst", type=int, default=8, help="steps per back-to-back timing")
    parser.add_argument("--quick", action="store_true", help="GPU: B=4, 4k context, 2 layers")
    parser.add_argument("--device", help="cuda (default when available) or cpu (tiny sizes)")
    parser.add_argument("--profile", type=int, nargs="?", const=2, metavar="SIDE",
                        help="cProfile steps of one side (default 2: head-wise paged)")  # fmt: skip
    parser.add_argument(
        "--host-time", action="store_true", help="CPU: host time per step, kernels stubbed"
    )
    parser.add_argument("--no-tensor-cores", action="store_true",
                        help="(d) as (c): no tensor-core kernel to compile")  # fmt: skip
    args = parser.parse_args(argv)
    cfg = make_config(args)
    cfg.no_tensor_cores = args.no_tensor_cores
    torch.manual_seed(0)
    # one checked step, then warm-up + reps of one synchronized step and of one burst;
    # twice that for the full cache, which two sides share (eager and CUDA graph)
    steps = 2 * (1 + (cfg.reps + 1) * (1 + (0 if args.host_time else cfg.burst)))
    sides, q = build(cfg, steps, args.host_time)
    gen = torch.Generator(device=cfg.device).manual_seed(1)
    kv1 = torch.randn(2, cfg.batch, cfg.hkv, cfg.head_dim, generator=gen, device=cfg.device)
    k1, v1 = kv1.to(cfg.dtype).unbind(0)
    if args.host_time:
        host_time(cfg, sides, q, k1, v1, args.profile is not None)
        return

    for side in sides:  # one step each; (b), (c) and (d) must agree
        side.step(q, k1, v1)
    headwise = sides[2]
    if args.profile is not None:
        profile(lambda: sides[args.profile].step(q, k1, v1), cfg.device)
        return
    masked_out, full_out = sides[1].out.float(), sides[0].out.float()
    diff = max((masked_out - s.out.float()).abs().max().item() for s in sides[2:]
               if isinstance(s, Headwise))  # fmt: skip
    differs = (full_out - headwise.out.float()).abs().max().item()
    clock = Clock(cfg.device)
    kernel_t = interleaved(clock, [lambda s=s: s.kernels(q) for s in sides], cfg.reps,
                           [s.ready for s in sides])  # fmt: skip
    step_t = interleaved(clock, [lambda s=s: s.step(q, k1, v1) for s in sides], cfg.reps)

    def burst(side: Side) -> None:
        for _ in range(cfg.burst):
            side.step(q, k1, v1)

    burst_t = interleaved(clock, [lambda s=s: burst(s) for s in sides], cfg.reps)
    burst_t = [t / cfg.burst for t in burst_t]
    memory = [s.memory_bytes() for s in sides]
    report(cfg, kernel_t, step_t, burst_t, memory, diff, differs)


class NullKernels:
    """A ``PagedAttention`` backend that plans and runs nothing: what is left of a step
    is host work (and, on the CPU, the K/V append's torch scatter)."""

    name = "none"

    def plan(self, batch: object, q_dtype: torch.dtype) -> None:
        del batch, q_dtype

    def run(
        self, q: torch.Tensor, layer: int, return_lse: bool, out: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, None]:
        return (torch.empty_like(q) if out is None else out), None


def without_append_kernel(storage: PagedKVCacheManager) -> None:
    """Make ``storage.append_kv`` check its arguments as it does, but write nothing (on
    the CPU the write is a torch scatter of many small ops, where a GPU launches one
    kernel). Both sides pack their batches on the cache's device already."""

    def append_kv(keys, values, packed, append_indptr_cpu=None, *, layer=0) -> None:
        del packed, append_indptr_cpu
        storage.get_kv_cache(layer)
        storage.check_kv(keys, values)

    storage.append_kv = append_kv  # type: ignore[method-assign]


def host_time(cfg: Config, sides: list[Side], q, k1, v1, with_profile: bool) -> None:
    """Median host time of a decode step per side, attention and append kernels stubbed."""
    for side in sides:
        for attention in side.attentions():
            attention.impl = NullKernels()  # type: ignore[assignment]
        without_append_kernel(side.cache if isinstance(side, FullCache) else side.cache.storage)
    torch.set_num_threads(1)  # host work is single-threaded; spare the machine's noise
    if with_profile:
        profile(lambda: sides[1].step(q, k1, v1), cfg.device, steps=cfg.reps)
        return
    times = interleaved(Clock(cfg.device), [lambda s=s: s.step(q, k1, v1) for s in sides], cfg.reps)
    print(
        f"\nCPU host time per decode step, attention and append kernels stubbed; B={cfg.batch}, "
        f"{cfg.layers} layers, {cfg.hq}/{cfg.hkv} heads, head_dim {cfg.head_dim}, "
        f"{cfg.dtype}, page {cfg.page_size}, context {cfg.context}\n"
    )
    print("| method | host ms per step | per layer | x full |")
    print("|---|---:|---:|---:|")
    for label, t in zip([LABELS[0], LABELS[2]], times, strict=True):
        print(f"| {label} | {t * 1e3:.3f} | {t * 1e3 / cfg.layers:.3f} | {t / times[0]:.2f}x |")


def profile(step: Callable[[], None], device: torch.device, steps: int = 10) -> None:
    """Where a head-wise decode step's host time goes."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)


def report(cfg: Config, kernel_t, step_t, burst_t, memory, diff: float, differs: float) -> None:
    name = torch.cuda.get_device_name() if cfg.device.type == "cuda" else "CPU (smoke test)"
    held = memory[2] / memory[0]
    print(
        f"\n{name}; decode, B={cfg.batch}, context {cfg.context}, {cfg.layers} layers, "
        f"{cfg.hq}/{cfg.hkv} heads, head_dim {cfg.head_dim}, {cfg.dtype}, page {cfg.page_size}, "
        f"backend {cfg.backend}; budgets {cfg.mean_fraction:.0%} of the context on average, "
        f"lognormal sigma {cfg.sigma} across heads (pages held: {held:.3f}x the full cache); "
        f"back to back: {cfg.burst} steps per sync"
    )
    print(
        f"masked full cache vs head-wise outputs: max |diff| = {diff:.2e} "
        f"(full cache vs head-wise, for scale: {differs:.2e})\n"
    )
    print(f"| method | attention, {cfg.layers} layers, ms | x full | step, synced, ms | x full "
          "| step, back to back, ms | x full | KV memory MiB | x full |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, label in enumerate(LABELS[: len(memory)]):
        print(
            f"| {label} | {kernel_t[i] * 1e3:.3f} | {kernel_t[i] / kernel_t[0]:.2f}x "
            f"| {step_t[i] * 1e3:.3f} | {step_t[i] / step_t[0]:.2f}x "
            f"| {burst_t[i] * 1e3:.3f} | {burst_t[i] / burst_t[0]:.2f}x "
            f"| {memory[i] / 2**20:.1f} | {memory[i] / memory[0]:.2f}x |"
        )
    if len(memory) == len(LABELS):  # both with CUDA graphs
        print(
            f"\nhead-wise (Triton, CUDA graph) against the full cache with a CUDA graph: "
            f"attention {kernel_t[6] / kernel_t[5]:.2f}x, step synced "
            f"{step_t[6] / step_t[5]:.2f}x, back to back {burst_t[6] / burst_t[5]:.2f}x"
        )


if __name__ == "__main__":
    main()
