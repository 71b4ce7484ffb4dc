"""The Triton kernels of :mod:`.layer_ops` (imported only where triton is: the CPU needs
none). Each rounds where transformers' module code rounds, so a bf16 or fp16 result is
the one its chain of torch ops gives (see :mod:`.layer_ops` for where they may differ)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..attention.triton_kernels import pdl_start


@triton.jit
def rms_norm(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n, eps, sx, sr, so, ss,
             RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """One row: ``out = w * (s * rsqrt(mean(s**2) + eps)).to(dtype)`` with ``s = x``, or,
    with ``RESIDUAL``, ``s = res + x`` (rounded to the dtype, stored to ``sum``)."""
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0)
    if RESIDUAL:
        r = tl.load(res_ptr + row * sr + cols, mask=mask, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(dtype)
        tl.store(sum_ptr + row * ss + cols, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / n
    normed = (xf * libdevice.rsqrt(variance + eps)).to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * so + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(dtype),
             mask=mask)  # fmt: skip


@triton.jit
def rotary_split(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, sqkv, scos, ssin,
                 HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """``BLOCK_H`` heads of one row of the stacked projections ``[q heads | k heads | v
    heads]``: query and key heads rotated (``x * cos + rotate_half(x) * sin``, each
    product and the sum rounded to the dtype), value heads copied; each to its own
    contiguous ``[rows, heads, D]`` output."""
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    half = D // 2
    mask = (head < HQ + 2 * HKV) & (d < D)
    dtype = q_ptr.dtype.element_ty
    src = qkv_ptr + row * sqkv + head * D
    x = tl.load(src + d, mask=mask, other=0.0)
    partner = tl.load(src + tl.where(d < half, d + half, d - half), mask=mask, other=0.0)
    rotated = tl.where(d < half, -partner, partner)
    cos = tl.load(cos_ptr + row * scos + d, mask=d < D, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + row * ssin + d, mask=d < D, other=0.0).to(tl.float32)
    a = (x.to(tl.float32) * cos).to(dtype)
    b = (rotated.to(tl.float32) * sin).to(dtype)
    x = tl.where(head < HQ + HKV, (a.to(tl.float32) + b.to(tl.float32)).to(dtype), x)
    tl.store(q_ptr + (row * HQ + head) * D + d, x, mask=mask & (head < HQ))
    is_k = (head >= HQ) & (head < HQ + HKV)
    tl.store(k_ptr + (row * HKV + head - HQ) * D + d, x, mask=mask & is_k)
    tl.store(v_ptr + (row * HKV + head - HQ - HKV) * D + d, x, mask=mask & (head >= HQ + HKV))


@triton.jit
def silu_mul(x_ptr, out_ptr, n, sx, so, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """``silu(gate) * up`` of one row's block, ``gate = x[:n]``, ``up = x[n:2n]``: silu as
    torch's (``g / (1 + exp(-g))`` in float32, rounded), then the product rounded."""
    pdl_start(PDL)
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * sx + n + cols, mask=mask, other=0.0)
    act = tl.math.div_rn(gate, 1.0 + libdevice.exp(-gate)).to(dtype)
    tl.store(out_ptr + row * so + cols, (act.to(tl.float32) * up.to(tl.float32)).to(dtype),
             mask=mask)  # fmt: skip


@triton.jit
def linear(x_ptr, w_ptr, b_ptr, y_ptr, rows, n, k, sx, sw, sy,
           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BIAS: tl.constexpr,
           PDL: tl.constexpr):  # fmt: skip
    """``y = x @ w.T (+ b)`` for ``BN`` outputs of all (at most ``BM``) rows, over the
    whole of ``k`` in float32, rounded once (after the bias)."""
    if PDL:  # x is the kernel before's output (loading weights before the wait gained
        tl.extra.cuda.gdc_wait()  # nothing measurable on an H200)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, k, BK):
        ks = k0 + rk
        xs = tl.load(x_ptr + rm[:, None] * sx + ks[None, :],
                     mask=(rm[:, None] < rows) & (ks[None, :] < k), other=0.0)  # fmt: skip
        ws = tl.load(w_ptr + rn[None, :].to(tl.int64) * sw + ks[:, None],
                     mask=(rn[None, :] < n) & (ks[:, None] < k), other=0.0)  # fmt: skip
        acc = tl.dot(xs, ws, acc)
    if PDL:  # the next kernel may launch once every program has read its weights
        tl.extra.cuda.gdc_launch_dependents()
    if BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * sy + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < rows) & (rn[None, :] < n))  # fmt: skip
