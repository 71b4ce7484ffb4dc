"""Where a decode step's GPU time goes: kernel time per kind, from torch.profiler.

Used by ``bench_generate.py`` and ``bench_tensor_parallel.py`` (``--profile``): after
the timed run, the engine decodes a full batch for a few steps under the profiler
(CUDA activity only; kernels replayed from CUDA graphs are recorded too), and each
kernel's time is summed by kind. The sum over kinds against the step's wall time says
how much of the step the GPU sat idle or overlapped (collectives run on their own
stream and can overlap compute).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

KINDS = (
    ("collective", ("nccl", "allreduce", "all_reduce", "one_shot", "two_shot", "symm")),
    # inductor's fused pointwise / reduction kernels (torch.compile), before the kinds
    # below: their names list the ops fused ("..._to_copy_..._paged_attention_...")
    ("fused (inductor)", ("triton_poi", "triton_per", "triton_red")),
    ("attention", ("flashinfer", "batchdecode", "batchprefill", "paged", "prefill", "decode")),
    (
        "matmul",
        ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "wgmma", "triton_tem"),
    ),
    ("copy", ("memcpy", "memset", "copy")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def kernel_breakdown(step: Callable[[], None], steps: int) -> dict:
    """Run ``step`` ``steps`` times under the profiler; per step: milliseconds of
    kernel time by kind, kernel launches, and the ten costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    count = 0
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.time_range.elapsed_us()
        by_kind[kind_of(event.name)] += us / steps / 1e3
        by_name[event.name[:90]] += us / steps / 1e3
        count += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:10]
    return dict(ms=dict(by_kind), kernels=count / steps, top=top)


def format_breakdown(title: str, found: dict, wall_ms: float) -> str:
    """A few lines: kernel ms per step by kind, against the step's wall time."""
    total = sum(found["ms"].values())
    parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(found["ms"].items(), key=lambda kv: -kv[1]))
    lines = [f"{title}: kernels {total:.2f} ms per step ({found['kernels']:.0f} launches) "
             f"against a {wall_ms:.2f} ms step: {parts}"]  # fmt: skip
    lines += [f"    {ms:7.3f} ms  {name}" for name, ms in found["top"]]
    return "\n".join(lines)
