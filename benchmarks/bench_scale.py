"""Does seqattn's per-step bookkeeping grow with the pool? A small pool against a huge one.

The same decode step (``allocate_decoding`` + ``pack_for_flashinfer`` on a batch of 256
sequences of ~2048 tokens, page 16) runs in two descriptors: one whose pool holds just
that batch, and one with 1,000,000 pages and 10,000 live sequences (the batch among
them). Prints microseconds per step for both, their ratio, and the bytes of bookkeeping
arrays per page and per sequence in the large one. CPU only.

Run: ``python benchmarks/bench_scale.py``
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from seqattn import CacheDescriptor, PagedKVCacheManager

PAGE_SIZE, BATCH, LENGTH, STEPS = 16, 256, 2048, 400


def descriptor(num_pages: int, live: int) -> tuple[CacheDescriptor, list[int]]:
    """A pool of ``num_pages`` with ``live`` sequences; the first BATCH form the decode batch."""
    cache = PagedKVCacheManager(num_pages, PAGE_SIZE, 1, 1, torch.float16, "cpu")
    desc = CacheDescriptor(cache)
    rng = np.random.default_rng(0)
    batch = list(range(BATCH))
    desc.allocate(batch, (LENGTH + rng.integers(0, PAGE_SIZE, BATCH)).tolist())
    others = list(range(BATCH, live))
    if others:  # fill most of the rest of the pool
        free_tokens = (num_pages - desc.cache_manager.allocator.num_pages // 50) * PAGE_SIZE
        per_seq = max(1, free_tokens // len(others) - PAGE_SIZE)
        desc.allocate(others, rng.integers(per_seq // 2, per_seq, len(others)).tolist())
    return desc, batch


def step_micros(runs: list[tuple[CacheDescriptor, list[int]]], rounds: int = 8) -> list[float]:
    """Median microseconds per decode step of each descriptor, in alternating rounds."""
    times: list[list[int]] = [[] for _ in runs]
    for _ in range(rounds):
        for (desc, ids), out in zip(runs, times, strict=True):
            for i in range(STEPS // rounds + 5):
                t0 = time.perf_counter_ns()
                desc.allocate_decoding(ids)
                desc.pack_for_flashinfer(ids)
                if i >= 5:  # the first steps of a round warm the caches up again
                    out.append(time.perf_counter_ns() - t0)
    return [statistics.median(t) / 1e3 for t in times]


def bookkeeping_bytes(desc: CacheDescriptor) -> int:
    """Bytes held by the numpy arrays of the pool and the page table."""
    arrays = [*vars(desc.cache_manager.allocator).values(), *vars(desc.table).values()]
    return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))


def main() -> None:
    pages_small = BATCH * ((LENGTH + PAGE_SIZE + STEPS + 40) // PAGE_SIZE + 1)
    small, small_ids = descriptor(pages_small, BATCH)
    large, large_ids = descriptor(1_000_000, 10_000)
    used = large.cache_manager.num_pages - large.cache_manager.available_pages_count
    t_small, t_large = step_micros([(small, small_ids), (large, large_ids)])
    nbytes = bookkeeping_bytes(large)
    print(f"large pool: 1,000,000 pages ({used:,} held), {len(large):,} live sequences")
    print("| pool | live sequences | us per decode step (B=256) |")
    print("|---|---:|---:|")
    print(f"| {pages_small:,} pages | {len(small):,} | {t_small:.1f} |")
    print(f"| 1,000,000 pages | {len(large):,} | {t_large:.1f} |")
    print(f"large / small: {t_large / t_small:.2f}x")
    print(f"bookkeeping arrays in the large pool: {nbytes / 2**20:.1f} MiB "
          f"({nbytes / 1_000_000:.1f} bytes per page, all structures included)")  # fmt: skip
    large.check_integrity()


if __name__ == "__main__":
    main()
