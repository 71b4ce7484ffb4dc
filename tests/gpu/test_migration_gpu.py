"""Moving a sequence's KV on GPUs: export/import on one device and across two, and
send/recv between two ranks over NCCL (one GPU each), bit for bit."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from seqattn import CacheDescriptor, PagedKVCacheManager
from seqattn.migration import export_sequence, import_sequence
from tests import migration_ranks

pytestmark = pytest.mark.gpu
two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs"
)


def filled(device: str, dtype: torch.dtype, length: int, layout: str = "NHD") -> CacheDescriptor:
    cache = PagedKVCacheManager(256, 16, 8, 128, dtype, device, layout, num_layers=4)
    desc = CacheDescriptor(cache)
    desc.allocate([1], [length])
    cache.kv_data.view(torch.uint8).random_(generator=torch.Generator(device).manual_seed(0))
    return desc


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("length", [1, 16, 17, 1000])
def test_export_import_on_one_gpu_is_bit_identical(dtype: torch.dtype, length: int) -> None:
    src = filled("cuda", dtype, length)
    dst = filled("cuda", dtype, 5, layout="HND")
    kv = export_sequence(src, 1)
    assert kv.pages.device == src.cache_manager.device
    import_sequence(dst, 2, kv)
    back = export_sequence(dst, 2).pages.transpose(-3, -2)
    assert torch.equal(back.view(torch.uint8), kv.pages.view(torch.uint8))


@two_gpus
def test_import_into_a_cache_on_another_gpu() -> None:
    src = filled("cuda:0", torch.bfloat16, 333)
    dst = filled("cuda:1", torch.bfloat16, 7)
    kv = export_sequence(src, 1)
    import_sequence(dst, 2, kv)  # dst's own sequence 1 stays
    back = export_sequence(dst, 2).pages
    assert back.device == torch.device("cuda", 1)
    # bit for bit: the random bits hold NaNs, which equal nothing as numbers
    assert torch.equal(back.cpu().view(torch.uint8), kv.pages.cpu().view(torch.uint8))


@two_gpus
def test_send_recv_over_nccl(tmp_path) -> None:
    """The CPU test's scenarios (tests/migration_ranks.py) over NCCL, one GPU per rank."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast
    port = migration_ranks.free_port()
    mp.spawn(migration_ranks.run, args=(port, str(tmp_path), "nccl"), nprocs=2)
    sent, received = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for seq_id in [*migration_ranks.LENGTHS, migration_ranks.PLAIN]:
        skip = 2 if seq_id == 6 else 0  # the receiver's prefix cache held those
        got = received["pages"][seq_id].transpose(-3, -2)[:, skip:]
        assert torch.equal(got, sent["pages"][seq_id][:, skip:])
    assert torch.equal(received["fp8"], sent["fp8"])
    for scenario in ("no_pages", "unknown", "live", "shape"):
        assert sent[scenario]["error"] == received[scenario]["error"] is not None
        assert sent[scenario]["unchanged"] and received[scenario]["unchanged"]
    for scenario in migration_ranks.STREAMED:  # refused after the pages went unasked
        assert received[scenario]["error"] is not None and sent[scenario]["error"] is not None
        assert sent[scenario]["unchanged"] and received[scenario]["unchanged"]
    assert torch.equal(received["chunked"].transpose(-3, -2), sent["chunked"])  # after them
