"""The two ranks of tests/test_migration.py's distributed scenarios (gloo on the CPU;
tests/gpu/test_migration_gpu.py runs the same over NCCL, one GPU per rank).

Spawned by the test (``torch.multiprocessing``); each rank runs every scenario in order
and saves what it saw to ``<outdir>/rank<r>.pt``, which the test reads and asserts on.
A scenario's expected errors are recorded (their class and builtin), not raised.
Sequences prefilled from tokens move with their token ids (the receiver replies before
the pages); those only filled move without (the pages come first, then its status).
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist

from seqattn import CacheDescriptor, PagedKVCacheManager, SeqAttnError, migration, migration_p2p
from seqattn.migration import export_sequence
from seqattn.migration_p2p import recv_sequence, send_sequence

LAYERS, HEADS, HEAD_DIM, PS = 2, 2, 4, 4
LENGTHS = {1: 0, 2: 1, 3: 3, 4: 4, 5: 5, 6: 13}  # seq id -> length (page boundaries)
SHARED = 8  # sequence 6 shares its first 8 tokens (2 pages) with rank 1's sequence 100
PLAIN = 20  # a sequence allocated without token ids
CHUNKED_LAYERS = 6  # a cache whose pages travel in several chunks
# refusals of a move without token ids (its pages come unasked, in chunks)
STREAMED = ("streamed_no_pages", "streamed_live", "streamed_shape", "streamed_write",
            "streamed_index")  # fmt: skip
DEVICE = torch.device("cpu")  # each rank's, set by run()


def tokens_of(seq_id: int) -> list[int]:
    """Each sequence its own tokens (no two share a page's worth)."""
    return [(7 * i + 11 * seq_id) % 97 for i in range(LENGTHS[seq_id])]


def make(
    num_pages: int = 64,
    layout: str = "NHD",
    head_dim: int = HEAD_DIM,
    dtype: torch.dtype = torch.float32,
    layers: int = LAYERS,
) -> CacheDescriptor:
    cache = PagedKVCacheManager(
        num_pages, PS, HEADS, head_dim, dtype, DEVICE, layout, num_layers=layers
    )
    return CacheDescriptor(cache, prefix_caching=True, check_invariants=True)


def prefill(desc: CacheDescriptor, seq_id: int, tokens: list[int], seed: int) -> None:
    """Start ``seq_id`` from ``tokens`` with random KV for what is not cached; commit."""
    cached = desc.start_sequence(seq_id, tokens)
    fill(desc, seq_id, len(tokens) - cached, seed)
    desc.commit([seq_id])


def fill(desc: CacheDescriptor, seq_id: int, n: int, seed: int) -> None:
    """Allocate ``n`` more tokens of ``seq_id`` and append random K/V in every layer."""
    desc.allocate([seq_id], [n])
    cache = desc.cache_manager
    packed = desc.pack_for_flashinfer([seq_id], [n])
    gen = torch.Generator().manual_seed(seed)
    for layer in range(cache.num_layers):
        kv = torch.randn(2, n, cache.num_heads, cache.head_dim, generator=gen)
        # float8 caches quantize float32 on append
        k, v = kv.to(DEVICE, torch.float32 if cache.dtype.itemsize == 1 else cache.dtype)
        cache.append_kv(k, v, packed, layer=layer)


def state(desc: CacheDescriptor) -> tuple:
    """What a refused transfer must leave as it was."""
    alloc = desc.cache_manager.allocator
    seqs = {i: (desc.seq_len(i), desc.page_indices(i)) for i in desc.seq_ids}
    return alloc.refcount.tolist(), seqs, desc.cache_manager.kv_data.clone()


def same(a: tuple, b: tuple) -> bool:
    return a[:-1] == b[:-1] and torch.equal(a[-1], b[-1])


def refused(desc: CacheDescriptor, call: Callable[[], None]) -> dict[str, Any]:
    """Run a call expected to raise: the error's class and builtin, and whether
    ``desc`` is unchanged and consistent after it."""
    before = state(desc)
    try:
        call()
    except (SeqAttnError, RuntimeError) as error:
        desc.check_integrity()
        builtin = next(b for b in (TypeError, KeyError, IndexError, ValueError, RuntimeError,
                                   Exception) if isinstance(error, b))  # fmt: skip
        return dict(error=type(error).__name__, builtin=builtin.__name__,
                    message=str(error), unchanged=same(before, state(desc)))  # fmt: skip
    return dict(error=None)


def local_refusals(desc: CacheDescriptor, call: Callable[..., None]) -> list[str]:
    """Arguments a rank checks before it talks to its peer: bad ranks and groups."""
    bad = [(True, None), (1.0, None), (2, None), (-1, None), (dist.get_rank(), None), (1, "g")]
    seen = []
    for peer, group in bad:
        outcome = refused(desc, lambda p=peer, g=group: call(desc, 1, p, g))
        seen.append(f"{outcome['error']}/{outcome['builtin']}/{outcome['unchanged']}")
    return seen


def sender(outdir: Path) -> dict[str, Any]:
    desc = make()
    for seq_id in LENGTHS:
        prefill(desc, seq_id, tokens_of(seq_id), seed=seq_id)
    fill(desc, PLAIN, 9, seed=PLAIN)
    out: dict[str, Any] = {"pages": {}, "tokens": {}}
    out["local"] = local_refusals(desc, send_sequence)
    for seq_id in [*LENGTHS, PLAIN]:  # scenario 1: every sequence moves
        send_sequence(desc, seq_id, 1)
        kv = export_sequence(desc, seq_id)
        out["pages"][seq_id], out["tokens"][seq_id] = kv.pages.cpu(), kv.token_ids
    out["kept"] = sorted(desc.seq_ids)  # the sender keeps its sequences
    out["no_pages"] = refused(desc, lambda: send_sequence(desc, 6, 1))
    out["unknown"] = refused(desc, lambda: send_sequence(desc, 999, 1))
    out["live"] = refused(desc, lambda: send_sequence(desc, 3, 1))
    out["shape"] = refused(desc, lambda: send_sequence(desc, 3, 1))
    send_sequence(desc, 6, 1)  # after refusals the two sides are still in step
    fp8 = make(dtype=torch.float8_e4m3fn)  # travels as bytes
    fill(fp8, 1, 13, seed=8)
    send_sequence(fp8, 1, 1)
    out["fp8"] = export_sequence(fp8, 1).pages.view(torch.uint8).cpu()
    chunked = make(layers=CHUNKED_LAYERS)
    fill(chunked, 1, 13, seed=9)  # no token ids: its pages follow the header unasked
    for scenario in STREAMED:  # refused after the pages went: the stream stays in step
        out[scenario] = refused(chunked, lambda: in_chunks(lambda: send_sequence(chunked, 1, 1)))
    in_chunks(lambda: send_sequence(chunked, 1, 1))
    kv = export_sequence(chunked, 1)
    out["chunked"], out["chunked_tokens"] = kv.pages.cpu(), kv.token_ids
    return out


def in_chunks(call: Callable[[], None]) -> None:
    """``call`` with pages travelling in chunks of 2 layers of a 4-page sequence (one
    layer first and last: 1, 2, 2, 1 layers), as a long sequence's do."""
    layer_bytes = 4 * 2 * PS * HEADS * HEAD_DIM * 4  # 4 pages of K and V, float32
    with mock.patch.object(migration_p2p, "CHUNK_BYTES", 2 * layer_bytes):
        call()


def streamed_refusals(desc: CacheDescriptor) -> dict[str, Any]:
    """The receiving side of STREAMED, in order: too few pages, a live id, another
    head_dim, a write that fails (as on a lost device) after allocating, and a failure
    after allocating but before the first page is written."""
    small = make(num_pages=3, layers=CHUNKED_LAYERS)  # the sequence needs 4
    other = make(head_dim=2 * HEAD_DIM, layers=CHUNKED_LAYERS)
    fill(desc, 7, 1, seed=7)

    def move(into: CacheDescriptor, seq_id: int) -> dict[str, Any]:
        return refused(into, lambda: in_chunks(lambda: recv_sequence(into, seq_id, 0)))

    out = {"streamed_no_pages": move(small, 1), "streamed_live": move(desc, 7)}
    out["streamed_shape"] = move(other, 1)
    lost = RuntimeError("device lost")
    with mock.patch.object(migration_p2p, "write_sequence_pages", side_effect=lost):
        out["streamed_write"] = move(desc, 1)
    with mock.patch.object(migration, "page_index", side_effect=lost):  # before any page
        out["streamed_index"] = move(desc, 1)
    return out


def receiver(outdir: Path) -> dict[str, Any]:
    desc = make(layout="HND")  # the other layout: pages are converted on arrival
    prefill(desc, 100, [*tokens_of(6)[:SHARED], 1, 2, 3], seed=100)
    local = local_refusals(desc, recv_sequence)
    free_before = desc.cache_manager.available_pages_count
    for seq_id in [*LENGTHS, PLAIN]:
        recv_sequence(desc, 1000 + seq_id, 0)
    out: dict[str, Any] = {"pages": {}, "tokens": {}, "local": local}
    for seq_id in [*LENGTHS, PLAIN]:
        kv = export_sequence(desc, 1000 + seq_id)
        out["pages"][seq_id], out["tokens"][seq_id] = kv.pages.cpu(), kv.token_ids
    out["page_ids"] = {s: desc.page_indices(1000 + s) for s in [*LENGTHS, PLAIN]}
    out["cached_pages"] = desc.page_indices(100)  # sequence 6 shares the first two
    out["used"] = free_before - desc.cache_manager.available_pages_count
    out["hit"] = desc.pages_to_start(tokens_of(6))  # its own pages are cached now
    small = make(num_pages=2)
    out["no_pages"] = refused(small, lambda: recv_sequence(small, 1, 0))
    out["unknown"] = refused(desc, lambda: recv_sequence(desc, 1, 0))
    out["live"] = refused(desc, lambda: recv_sequence(desc, 1003, 0))
    other = make(head_dim=2 * HEAD_DIM)
    out["shape"] = refused(other, lambda: recv_sequence(other, 1, 0))
    recv_sequence(desc, 2006, 0)
    out["again"] = export_sequence(desc, 2006).pages.cpu()
    fp8 = make(dtype=torch.float8_e4m3fn)
    recv_sequence(fp8, 1, 0)
    out["fp8"] = export_sequence(fp8, 1).pages.view(torch.uint8).cpu()
    chunked = make(layout="HND", layers=CHUNKED_LAYERS)
    out.update(streamed_refusals(chunked))
    in_chunks(lambda: recv_sequence(chunked, 1, 0))
    out["chunked"] = export_sequence(chunked, 1).pages.cpu()
    return out


def free_port() -> int:
    """A TCP port nothing listens on now (for the group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(rank: int, port: int, outdir: str, backend: str = "gloo") -> None:
    """One rank: join the group, run its side of every scenario, save the results.
    ``backend="nccl"``: rank r's caches live on cuda:r."""
    global DEVICE
    if backend == "nccl":
        DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        out = (sender if rank == 0 else receiver)(Path(outdir))
        torch.save(out, Path(outdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
