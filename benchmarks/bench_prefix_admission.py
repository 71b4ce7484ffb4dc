"""Prefix-hit admission: what starting a request that hits the prefix cache costs on the
host, this seqattn against an earlier one (a git revision), side by side.

Scenarios (CPU; page size 16; the seed API's calls an engine makes to admit a request):

- ``hit 4096 + 64``: the cache holds a committed 4,096-token prefix; a request brings it
  and 64 tokens of its own: ``start_sequence`` (matches 256 cached pages) + ``allocate``
  (its own tokens) + ``commit`` (publishes its full pages). Its ``release`` is not timed.
  The median of many admissions, each on the same warm cache; the prompt a list of ints
  (each checked to be an int and packed to int64: about 75 us for 4,160 Python objects;
  140 us before ``_checks._pack_plain_ints``), or an int64 array.
- ``1000 over 100 x 2k``: 1,000 requests over 100 distinct 2,048-token prefixes (random
  order, seeded), each with 32 tokens of its own, in a pool too small for all prefixes
  (LRU eviction under pressure): start + allocate + commit + release per request; the
  mean per request, and the hit rate.

Each side runs in its own process: the current tree from ``src/``, the earlier revision
from ``git archive REV src`` in a temporary directory (``--before``, default the last
commit before the vectorized hit path). Both sides run the same calls; the table prints
both and their ratio.

    python benchmarks/bench_prefix_admission.py            # about 30 s
    python benchmarks/bench_prefix_admission.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BEFORE = "c8d0aaa"  # the last commit before the vectorized hit path
PAGE = 16


def admission(seqattn, repeats: int, as_array: bool = False) -> float:
    """Median microseconds of one 4,096 + 64 admission on a warm cache; the prompt a
    list of ints, or (``as_array``) an int64 numpy array made before the clock starts."""
    import numpy as np
    import torch

    cache = seqattn.PagedKVCacheManager(2048, PAGE, 1, 8, torch.float16, "cpu")
    desc = seqattn.CacheDescriptor(cache, prefix_caching=True)
    prefix = list(range(1000, 1000 + 4096))
    desc.start_sequence(0, prefix)
    desc.allocate([0], [len(prefix)])
    desc.commit([0])  # the prefix is cached (and held by sequence 0)
    times = []
    for i in range(repeats):
        tokens = prefix + [100_000 + 64 * i + j for j in range(64)]  # new each time
        if as_array:
            tokens = np.array(tokens, dtype=np.int64)
        gc.disable()
        start = time.perf_counter_ns()
        cached = desc.start_sequence(1, tokens)
        desc.allocate([1], [len(tokens) - cached])
        desc.commit([1])
        elapsed = time.perf_counter_ns() - start
        gc.enable()
        assert cached == 4096, cached
        desc.release([1])
        times.append(elapsed / 1e3)
    return statistics.median(times[len(times) // 10 :])


def churn(seqattn, requests: int) -> tuple[float, float]:
    """Mean microseconds per request of the 1,000-request workload, and its hit rate."""
    import torch

    rng = random.Random(0)
    prefixes = [[rng.randrange(3, 30000) for _ in range(2048)] for _ in range(100)]
    cache = seqattn.PagedKVCacheManager(4096, PAGE, 1, 8, torch.float16, "cpu")
    desc = seqattn.CacheDescriptor(cache, prefix_caching=True)
    order = [rng.randrange(100) for _ in range(requests)]
    own = [[rng.randrange(3, 30000) for _ in range(32)] for _ in range(requests)]
    gc.disable()
    start = time.perf_counter_ns()
    for i, p in enumerate(order):
        tokens = prefixes[p] + own[i]
        cached = desc.start_sequence(i, tokens)
        desc.allocate([i], [len(tokens) - cached])
        desc.commit([i])
        desc.release([i])
    elapsed = time.perf_counter_ns() - start
    gc.enable()
    return elapsed / 1e3 / requests, desc.prefix_stats.hit_rate


def side(args: argparse.Namespace) -> None:
    """One side's figures, as JSON on stdout (run with that side's ``src`` on the path)."""
    import seqattn

    repeats, requests = (50, 100) if args.quick else (400, 1000)
    hit = admission(seqattn, repeats)
    hit_array = admission(seqattn, repeats, as_array=True)
    per_request, hit_rate = churn(seqattn, requests)
    print(json.dumps(dict(hit=hit, hit_array=hit_array, churn=per_request, hit_rate=hit_rate)))


def run_side(src: Path, quick: bool) -> dict:
    command = [sys.executable, __file__, "--side", *(["--quick"] if quick else [])]
    done = subprocess.run(command, env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default=BEFORE, help="the git revision to compare with")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    parser.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return side(args)
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(root), "archive", args.before, "src"],
                                 capture_output=True, check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        before = run_side(Path(tmp) / "src", args.quick)
    after = run_side(root / "src", args.quick)
    print(f"prefix-hit admission on the host ({'quick' if args.quick else 'full'} run); "
          f"before = {args.before}")  # fmt: skip
    print("\n| scenario | before | after | speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| hit 4096 + 64: start + allocate + commit (prompt a list) | {before['hit']:.1f} us"
          f" | {after['hit']:.1f} us | {before['hit'] / after['hit']:.2f}x |")  # fmt: skip
    old, new = before["hit_array"], after["hit_array"]
    print(f"| the same, prompt an int64 numpy array | {old:.1f} us | {new:.1f} us | "
          f"{old / new:.2f}x |")  # fmt: skip
    print(f"| 1000 over 100 x 2k prefixes, LRU: per request | {before['churn']:.1f} us | "
          f"{after['churn']:.1f} us | {before['churn'] / after['churn']:.2f}x |")  # fmt: skip
    print(f"hit rate: before {before['hit_rate']:.1%}, after {after['hit_rate']:.1%}")


if __name__ == "__main__":
    main()
