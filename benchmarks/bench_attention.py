"""seqattn's attention step against raw flashinfer with hand-built metadata, on one GPU.

For a 32-layer model (32 query / 8 KV heads, head_dim 128, fp16, page 16) this times:

- a decode step: seqattn does ``allocate_decoding`` + ``pack_for_flashinfer`` +
  ``PagedAttention.plan`` + per layer ``append_kv`` + ``run``; the peer builds the same
  CSR page table by hand with numpy (each sequence owns a fixed range of pages) and
  calls flashinfer's ``plan``, ``append_paged_kv_cache`` and ``run`` directly;
- a prefill step (chunks of new tokens over a cached prefix), likewise;
- attention kernels alone (32 ``run`` calls, CUDA events) to get the KV read rate,
  compared with the device's copy bandwidth measured in the same run.

Both sides share one KV storage tensor and run in alternating blocks of steps, so
clocks and caches treat them alike. Medians over blocks; a table is printed last.

Run on a GPU machine with flashinfer installed: ``python benchmarks/bench_attention.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from seqattn import (
    CacheDescriptor,
    PagedAttention,
    PagedKVCacheManager,
)

HQ, HKV, D, PS = 32, 8, 128, 16
DTYPE = torch.float16


def copy_bandwidth(gib: float = 2.0, reps: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * n * reps / (start.elapsed_time(end) / 1e3)


class RawFlashInfer:
    """The peer: flashinfer driven directly, with page tables built by hand."""

    def __init__(self, cache: PagedKVCacheManager, batch: int, max_pages_per_seq: int) -> None:
        import flashinfer

        self.fi, self.cache, self.batch = flashinfer, cache, batch
        self.max_pages = max_pages_per_seq
        workspace = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        self.lens = np.zeros(batch, dtype=np.int64)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """indptr and last_page_len (pinned host) and indices (GPU) for the current lengths."""
        counts = (self.lens + PS - 1) // PS
        indptr = np.zeros(self.batch + 1, dtype=np.int32)
        np.cumsum(counts, out=indptr[1:])
        base = np.arange(self.batch) * self.max_pages
        indices = np.repeat(base - indptr[:-1], counts) + np.arange(indptr[-1])
        last = (self.lens - (counts - 1) * PS).astype(np.int32)
        return (
            torch.from_numpy(indptr).pin_memory(),
            torch.from_numpy(indices.astype(np.int32)).pin_memory().to("cuda", non_blocking=True),
            torch.from_numpy(last).pin_memory(),
        )

    def step(self, new: int, q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor) -> None:
        """Append ``new`` tokens per sequence and attend, for every layer."""
        self.lens += new
        indptr, indices, last = self.tables()
        positions = (self.lens[:, None] - new + np.arange(new)).reshape(-1).astype(np.int32)
        batch_idx = np.repeat(np.arange(self.batch, dtype=np.int32), new)
        meta = torch.from_numpy(np.concatenate([batch_idx, positions])).pin_memory()
        meta = meta.to("cuda", non_blocking=True)
        nnz = positions.size
        heads = (HQ, HKV, D, PS)
        if new == 1:
            wrapper = self.decode
            wrapper.plan(indptr, indices, last, *heads, q_data_type=DTYPE)
        else:
            wrapper = self.prefill
            qo_indptr = torch.arange(0, nnz + 1, new, dtype=torch.int32)
            wrapper.plan(qo_indptr, indptr, indices, last, *heads, causal=True, q_data_type=DTYPE)
        indptr_gpu = indptr.to("cuda", non_blocking=True)
        last_gpu = last.to("cuda", non_blocking=True)
        for layer in range(self.cache.num_layers):
            kv_cache = self.cache.get_kv_cache(layer)
            self.fi.page.append_paged_kv_cache(
                kv[0], kv[1], meta[:nnz], meta[nnz:], kv_cache, indices, indptr_gpu, last_gpu
            )
            wrapper.run(q, kv_cache, out=out)


class SeqAttnSide:
    """seqattn: the same step through its public API."""

    def __init__(self, cache: PagedKVCacheManager, batch: int) -> None:
        self.cache, self.desc = cache, CacheDescriptor(cache)
        self.attn = PagedAttention(cache, HQ, backend="flashinfer")
        self.ids = list(range(batch))

    def start(self, lens: list[int]) -> None:
        self.desc.allocate(self.ids, lens)

    def step(self, new: int, q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor) -> None:
        if new == 1:
            self.desc.allocate_decoding(self.ids)
        else:
            self.desc.allocate(self.ids, [new] * len(self.ids))
        packed = self.desc.pack_for_flashinfer(self.ids, [new] * len(self.ids), device="cuda")
        self.attn.plan(packed)
        for layer in range(self.cache.num_layers):
            self.attn.forward(q, kv[0], kv[1], layer, out=out)

    def finish(self) -> None:
        self.desc.release(self.ids)


class SeqAttnGraphSide:
    """seqattn's decode step with the attention of all layers replayed from a CUDA graph."""

    def __init__(self, cache: PagedKVCacheManager, batch: int) -> None:
        self.cache, self.desc = cache, CacheDescriptor(cache)
        self.ids = list(range(batch))
        self.dec = PagedAttention(cache, HQ, backend="flashinfer", cuda_graph_batch_sizes=(batch,))
        self.q = torch.randn(batch, HQ, D, dtype=DTYPE, device="cuda")
        self.kv = torch.randn(2, batch, HKV, D, dtype=DTYPE, device="cuda")
        self.out = torch.empty(cache.num_layers, batch, HQ, D, dtype=DTYPE, device="cuda")
        self.graph: torch.cuda.CUDAGraph | None = None

    def layers(self) -> None:
        for layer in range(self.cache.num_layers):
            self.dec.forward(self.q, self.kv[0], self.kv[1], layer, out=self.out[layer])

    def step(self) -> None:
        self.desc.allocate_decoding(self.ids)
        packed = self.desc.pack_for_flashinfer(self.ids, [1] * len(self.ids), device="cuda")
        self.dec.plan(packed, cuda_graph=True)
        if self.graph is None:
            self.graph = self.dec.capture(self.layers)
        self.graph.replay()

    def finish(self) -> None:
        self.desc.release(self.ids)
        self.dec.close()


def time_steps(step: Callable[[], None], reset: Callable[[], None], n: int) -> float:
    """Wall time per step, steps back to back (the GPU or the CPU, whichever is slower)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
        reset()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def cpu_seconds(step: Callable[[], None], reset: Callable[[], None], n: int) -> float:
    """Median host time to issue one step (bookkeeping, plan, launches) on an idle GPU."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        reset()
    torch.cuda.synchronize()
    return statistics.median(times)


def kernel_seconds(
    runs: list[Callable[[int], None]], layers: int, reps: int = 7
) -> list[list[float]]:
    """Times of ``layers`` attention runs for each of ``runs``, by CUDA events, interleaved."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(reps):
        for run_layer, out in zip(runs, times, strict=True):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for layer in range(layers):
                run_layer(layer)
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
    return times


def scenario(cache, batch, length, new, blocks, steps_per_block, rollback) -> dict:
    """Alternate blocks of seqattn and raw steps; returns medians and kernel rates."""
    max_pages = -(-(length + blocks * steps_per_block * new + new) // PS)
    ours, raw = SeqAttnSide(cache, batch), RawFlashInfer(cache, batch, max_pages)
    ours.start([length] * batch)
    raw.lens[:] = length
    nnz = batch * new
    q = torch.randn(nnz, HQ, D, dtype=DTYPE, device="cuda")
    kv = torch.randn(2, nnz, HKV, D, dtype=DTYPE, device="cuda")
    out = torch.empty_like(q)

    def ours_step():
        ours.step(new, q, kv, out)

    def ours_reset():
        if rollback:  # prefill the same chunk again next step
            for i in ours.ids:
                ours.desc.truncate(i, length)

    def raw_step():
        raw.step(new, q, kv, out)

    def raw_reset():
        if rollback:
            raw.lens[:] = length

    ours_t, raw_t = [], []
    for block in range(blocks + 1):  # block 0 warms up (JIT, allocator caches)
        a = time_steps(ours_step, ours_reset, steps_per_block)
        b = time_steps(raw_step, raw_reset, steps_per_block)
        if block:
            ours_t.append(a)
            raw_t.append(b)
    ours_cpu = cpu_seconds(ours_step, ours_reset, steps_per_block)
    raw_cpu = cpu_seconds(raw_step, raw_reset, steps_per_block)
    # attention kernels alone, planned once for the current batch
    ours.step(new, q, kv, out)
    raw.step(new, q, kv, out)
    layers = cache.num_layers
    raw_wrapper = raw.decode if new == 1 else raw.prefill
    ours_times, raw_times = kernel_seconds(
        [
            lambda layer: ours.attn.run(q, layer, out=out),
            lambda layer: raw_wrapper.run(q, cache.get_kv_cache(layer), out=out),
        ],
        layers,
    )
    ours_k, raw_k = statistics.median(ours_times), statistics.median(raw_times)
    kv_tokens = int(ours.desc.seq_lens(ours.ids).sum())
    kv_bytes = kv_tokens * HKV * D * 2 * DTYPE.itemsize * layers
    ours.finish()
    graph_t = float("nan")
    if new == 1 and batch <= 64:  # the pool has room for a second copy of the batch
        graphed = SeqAttnGraphSide(cache, batch)
        graphed.desc.allocate(graphed.ids, [length] * batch)
        times = [time_steps(graphed.step, lambda: None, steps_per_block) for _ in range(blocks + 1)]
        graph_t = statistics.median(times[1:])
        graphed.finish()
    return dict(
        ours=statistics.median(ours_t), raw=statistics.median(raw_t),
        ours_cpu=ours_cpu, raw_cpu=raw_cpu, graph=graph_t,
        ours_kernel=ours_k, raw_kernel=raw_k, kv_bytes=kv_bytes,
        ours_kernel_reps=[round(t * 1e3, 3) for t in ours_times],
        raw_kernel_reps=[round(t * 1e3, 3) for t in raw_times],
    )  # fmt: skip


def profile_step(cache: PagedKVCacheManager, steps: int = 50) -> None:
    """Where seqattn's host time goes in a small decode step (the launch-bound regime)."""
    import cProfile
    import pstats

    ours = SeqAttnSide(cache, 1)
    ours.start([512])
    q = torch.randn(1, HQ, D, dtype=DTYPE, device="cuda")
    kv = torch.randn(2, 1, HKV, D, dtype=DTYPE, device="cuda")
    out = torch.empty_like(q)
    for _ in range(5):
        ours.step(1, q, kv, out)
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        ours.step(1, q, kv, out)
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
    ours.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="small sizes, few steps")
    parser.add_argument("--profile", action="store_true", help="cProfile seqattn's B=1 step")
    parser.add_argument("--cases", help="comma-separated indices of the cases to run")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    torch.cuda.empty_cache()  # give the copy buffers back before the KV pool
    cases = [  # (name, batch, length, new tokens per step, rollback)
        ("decode", 1, 512, 1, False),
        ("decode", 16, 1024, 1, False),
        ("decode", 64, 2048, 1, False),
        ("decode", 128, 4096, 1, False),
        ("prefill", 16, 1024, 512, True),
    ]
    if args.quick or args.profile:
        cases = [("decode", 8, 512, 1, False), ("prefill", 4, 256, 128, True)]
    if args.cases:
        cases = [cases[int(i)] for i in args.cases.split(",")]
    blocks, steps = (2, 3) if args.quick else (5, 8)
    need = max(b * -(-(n + blocks * steps * t + 2 * t + 64) // PS) for _, b, n, t, _ in cases)
    cache = PagedKVCacheManager(need + 64, PS, HKV, D, DTYPE, "cuda", num_layers=args.layers)
    if args.profile:
        profile_step(cache)
        return
    rows = []
    for name, batch, length, new, rollback in cases:
        r = scenario(cache, batch, length, new, blocks, steps, rollback)
        rows.append((name, batch, length, new, r))
        print(f"{name} B={batch} L={length}: {r}", flush=True)
    gib = cache.kv_data.numel() * cache.kv_data.element_size() / 2**30
    print(
        f"\n{device}; {args.layers} layers, {HQ}/{HKV} heads, head_dim {D}, fp16, page {PS}; "
        f"KV pool {gib:.1f} GiB; copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)\n"
    )
    print(
        "| step | B | L | new | seqattn ms | raw ms | ratio | CPU per step seqattn / raw ms "
        "| attn kernels seqattn / raw ms | KV read TB/s | of copy bw | seqattn + CUDA graph ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, batch, length, new, r in rows:
        rate = r["kv_bytes"] / r["ours_kernel"]
        read = f"{rate / 1e12:.2f} | {rate / copy_bw:.1%}" if new == 1 else "- | -"
        print(
            f"| {name} | {batch} | {length} | {new} | {r['ours'] * 1e3:.3f} | {r['raw'] * 1e3:.3f} "
            f"| {r['ours'] / r['raw']:.3f} | {r['ours_cpu'] * 1e3:.3f} / {r['raw_cpu'] * 1e3:.3f} "
            f"| {r['ours_kernel'] * 1e3:.3f} / {r['raw_kernel'] * 1e3:.3f} | {read} "
            f"| {r['graph'] * 1e3:.3f} |"
        )


if __name__ == "__main__":
    main()
