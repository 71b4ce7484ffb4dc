"""Moving one long sequence's KV between two GPUs: seqattn against the link's own rate.

Two ranks, one GPU each (NCCL; ``NCCL_NVLS_ENABLE=0``). Rank 0 holds one sequence of
``--tokens`` tokens (default 16,384) with random KV in a cache shaped like an 8B Llama's
(32 layers, 8 KV heads, head_dim 128, bf16, page 16: 2 GiB). Side by side in one run,
each timed with CUDA events on the receiver, warm-up then the median of ``--iters``:

- **seqattn**: ``send_sequence`` on rank 0, ``recv_sequence`` on rank 1: the header and
  the receiver's check and allocation, the pages gathered, sent in chunks of layers,
  received and scattered into the receiver's own pages (the import included);
- **raw NCCL**: ``dist.send`` / ``dist.recv`` of one contiguous tensor of the same bytes,
  what the link itself moves.

Two placements of the pages, a row each: *consecutive* (a fresh pool on both sides)
and *scattered* (the sender's free list shuffled first, seeded; the receiver's after
its first import is sorted again by the releases). Both travel the same way (gathered
into a ring of buffers, scattered from it); a move of one page shows what the header
and the reply alone cost. The received KV is checked bit for bit against
the sent. A markdown table is printed last; a row's ratio is seqattn's rate over the
raw one.

    torchrun --nproc-per-node 2 benchmarks/bench_migration.py
    python benchmarks/bench_migration.py              # spawns the two ranks itself
    python benchmarks/bench_migration.py --device cpu --tokens 256 --layers 2  # smoke (gloo)
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seqattn import CacheDescriptor, PagedKVCacheManager, migration_p2p
from seqattn.migration import export_sequence
from seqattn.migration_p2p import recv_sequence, send_sequence

SENDER, RECEIVER = 0, 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8, help="KV heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="cuda (NCCL, 2 GPUs) or cpu (gloo); default: cuda if 2")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--chunk-mib", type=int, default=migration_p2p.CHUNK_BYTES // 2**20,
                        help="pages travel in chunks of whole layers of about this")  # fmt: skip
    parser.add_argument("--pages", choices=("consecutive", "scattered", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args(argv)
    if args.device is None:
        two = torch.cuda.is_available() and torch.cuda.device_count() >= 2
        args.device = "cuda" if two else "cpu"
    if args.quick:
        args.warmup, args.iters = 1, 3
    return args


class Timer:
    """Seconds of a call, by CUDA events on a GPU, by the clock on a CPU; both ranks
    start together (a barrier, then an idle device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], None]) -> float:
        dist.barrier()
        if self.device.type != "cuda":
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        torch.cuda.synchronize(self.device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3


def make_cache(args: argparse.Namespace, device: torch.device, scattered: bool) -> CacheDescriptor:
    """An empty cache for the sequence (plus slack); ``scattered``: its free list
    shuffled (seeded), so that no two of a sequence's pages are likely neighbours."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pages = -(-args.tokens // args.page_size) + 8
    cache = PagedKVCacheManager(pages, args.page_size, args.heads, args.head_dim, dtype, device,
                                num_layers=args.layers)  # fmt: skip
    desc = CacheDescriptor(cache)
    if scattered:
        ids = [10_000 + i for i in range(pages)]
        desc.allocate(ids, [1] * pages)  # one page each
        for i in torch.randperm(pages, generator=torch.Generator().manual_seed(0)).tolist():
            desc.release([ids[i]])  # one by one: the free list takes this order
    return desc


def run(rank: int, args: argparse.Namespace, device: torch.device) -> None:
    migration_p2p.CHUNK_BYTES = args.chunk_mib * 2**20
    kinds = ("consecutive", "scattered") if args.pages == "both" else (args.pages,)
    rows = [move_one(rank, args, device, kind) for kind in kinds]
    if rank == RECEIVER:
        report(args, device, rows)


def move_one(rank: int, args: argparse.Namespace, device: torch.device, kind: str) -> tuple:
    """One placement's timings (on the receiver: its name, bytes, runs, times)."""
    desc = make_cache(args, device, scattered=kind == "scattered")
    cache = desc.cache_manager
    peer = RECEIVER if rank == SENDER else SENDER
    if rank == SENDER:
        desc.allocate([0], [args.tokens])
        cache.kv_data.normal_(generator=torch.Generator(device=device).manual_seed(0))
    nbytes = -(-args.tokens // args.page_size) * args.layers * cache.kv_data[0, 0].nbytes
    raw = torch.empty(nbytes, dtype=torch.uint8, device=device)
    timer, times = Timer(device), {"seqattn": [], "raw": []}
    last = args.warmup + args.iters
    for i in range(last):

        def move(i: int = i) -> None:
            if rank == SENDER:
                send_sequence(desc, 0, peer)
            else:
                recv_sequence(desc, 1_000_000 + i, peer)

        def link() -> None:
            (dist.send if rank == SENDER else dist.recv)(raw, peer)

        spent = {"seqattn": timer(move), "raw": timer(link)}
        if rank == RECEIVER and i + 1 < last:
            desc.release([1_000_000 + i])  # keep the last one, to check it
        if i >= args.warmup:
            for name, seconds in spent.items():
                times[name].append(seconds)
    seq_id = 0 if rank == SENDER else 1_000_000 + last - 1
    check(rank, desc, seq_id, peer)
    if kind == "consecutive":  # the fixed cost of a move
        times.update(probes(rank, args, desc, timer, peer))
    runs = 1 + int((np.diff(desc.page_indices(seq_id)) != 1).sum())
    return kind, nbytes, runs, times


def probes(rank: int, args: argparse.Namespace, desc: CacheDescriptor, timer: Timer,
           peer: int) -> dict[str, list[float]]:  # fmt: skip
    """A one-page sequence moved: the fixed cost of a move (control messages, allocation,
    the first and last copies)."""
    small = 3_000_000
    if rank == SENDER:
        desc.allocate([small], [args.page_size])
    found: list[float] = []

    def one_page(i: int) -> None:
        if rank == SENDER:
            send_sequence(desc, small, peer)
        else:
            recv_sequence(desc, small + 1 + i, peer)
            desc.release([small + 1 + i])

    for i in range(args.warmup + args.iters):
        spent = timer(lambda i=i: one_page(i))
        if i >= args.warmup:
            found.append(spent)
    return {"a one-page move": found}


def check(rank: int, desc: CacheDescriptor, seq_id: int, peer: int) -> None:
    """The receiver's copy equals the sender's KV, bit for bit."""
    if rank == SENDER:
        dist.send(export_sequence(desc, seq_id).pages.contiguous(), peer)
        return
    mine = export_sequence(desc, seq_id).pages
    theirs = torch.empty_like(mine)
    dist.recv(theirs, peer)
    assert torch.equal(mine, theirs), "the received KV differs from the sent"
    print("received KV identical to the sent (bit for bit)", flush=True)


def report(args: argparse.Namespace, device: torch.device, rows: list[tuple]) -> None:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dtype = "bf16" if device.type == "cuda" else "float32"
    backend = "NCCL" if device.type == "cuda" else "gloo"
    print(f"\nmoving one sequence of {args.tokens:,} tokens between two ranks ({where}, "
          f"{backend}; {args.layers} layers x {args.heads} KV heads x {args.head_dim}, {dtype}, "
          f"page {args.page_size}), median of {args.iters}; chunks of {args.chunk_mib} "
          "MiB\n")  # fmt: skip
    print("| pages (receiver's runs) | GiB | seqattn send/recv (import included) "
          "| raw send/recv, same bytes | ratio |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for kind, nbytes, runs, times in rows:
        ours, link = statistics.median(times["seqattn"]), statistics.median(times["raw"])
        print(f"| {kind} ({runs}) | {nbytes / 2**30:.2f} | {ours * 1e3:.2f} ms, "
              f"{nbytes / ours / 1e9:.1f} GB/s | {link * 1e3:.2f} ms, {nbytes / link / 1e9:.1f} "
              f"GB/s | {link / ours:.2f}x |", flush=True)  # fmt: skip
        extra = [f"{name} {statistics.median(t) * 1e3:.3f} ms" for name, t in times.items()
                 if name not in ("seqattn", "raw")]  # fmt: skip
        if extra:
            print(f"fixed cost: {'; '.join(extra)}")


def worker(rank: int, args: argparse.Namespace, init_method: str | None) -> None:
    cuda = args.device == "cuda"
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    options = dict(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=300))
    if init_method is not None:
        options.update(init_method=init_method, rank=rank, world_size=2)
    dist.init_process_group(**options)
    try:
        run(rank, args, device)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (NVLS)
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        print("bench_migration: needs two CUDA devices (or --device cpu); skipped")
        return
    if "RANK" in os.environ:  # under torchrun
        worker(int(os.environ["RANK"]), args, None)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, f"tcp://127.0.0.1:{port}"), nprocs=2)


if __name__ == "__main__":
    main()
