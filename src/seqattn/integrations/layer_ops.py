"""A Llama decoder layer's small operations, each one launch on CUDA.

transformers' module code runs RMSNorm as seven torch ops, the rotary embedding of the
queries and keys as about ten and the MLP's ``silu(gate) * up`` as two: in an eager
decode step each is a kernel launch, and the host, not the GPU, sets the pace. These
functions do the same arithmetic in one Triton launch each (through
:class:`~seqattn.attention.triton_launch.DirectLaunch`) on CUDA tensors, and by the same
chain of torch ops elsewhere (the CPU, or without triton), so both paths can be tested
against transformers' modules. :func:`linear` runs a decode step's projections (at most
64 rows) as a Triton GEMM on GPUs that chain launches (compute capability 9.0 and
later, see :mod:`seqattn.attention.triton_launch`): these kernels and seqattn's decode
attention then each start while the one before still runs, which cuBLAS's GEMMs
between them would not allow.

They round where the modules round: every product and sum of the rotary embedding in
the tensors' dtype, RMSNorm's normalized rows to the dtype before the weight
multiplies them, silu before the product; the kernels fuse no multiply and add into one
rounding. The rotary embedding and ``silu(gate) * up`` are then bit for bit the
modules' (checked on an H200 in bf16, fp16 and fp32). RMSNorm sums its squares in
another order than torch's mean: in bf16 its output was the modules' at a 2,048 width,
in fp16 and fp32 a value may land a rounding step off.

Example::

    >>> import torch
    >>> x = torch.randn(3, 8)
    >>> normed, summed = rms_norm(x, torch.ones(8), 1e-6)
    >>> torch.allclose(normed, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    True
    >>> silu_mul(torch.cat([x, x], dim=1)).shape
    torch.Size([3, 8])
"""

from __future__ import annotations

from typing import Optional

import torch

from ..attention.triton_decode import multiprocessors, triton_or_none
from ..attention.triton_launch import DirectLaunch, next_power_of_2, programmatic

_kernels: Optional[tuple[DirectLaunch, DirectLaunch, DirectLaunch, DirectLaunch]] = None
#: the widest row RMSNorm's kernel takes in one program
MAX_NORM_WIDTH = 16384
SILU_BLOCK = 1024
# values of one row a rotary program takes (its heads x head_dim): one program per (row,
# head) of one warp took 192 us for 8,192 rows of 48 x 64 on an H200, 3x inductor's
ROTARY_BLOCK = 1024
#: the most rows :func:`linear` runs by its Triton GEMM (one block of rows; more go to
#: cuBLAS, where the weights are read once per many rows anyway)
LINEAR_MAX_ROWS = 64


def on_triton(x: torch.Tensor) -> bool:
    """Whether ``x``'s operations here run as Triton kernels: a CUDA tensor of a float
    dtype Triton computes, where triton is installed."""
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and triton_or_none() is not None
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Llama RMSNorm of ``residual + x`` (or of ``x``).

    Args:
        x: ``[rows, hidden]``, unit stride in ``hidden``.
        weight: ``[hidden]``, ``x``'s dtype.
        eps: added to the mean square.
        residual: optional ``[rows, hidden]``, ``x``'s dtype: the decoder's residual
            stream, which ``x`` (a block's output) is added to first.

    Returns:
        ``(normed, summed)``, both ``[rows, hidden]`` in ``x``'s dtype: the norm's output
        and its input (``residual + x``, or ``x`` itself).
    """
    rows, width = x.shape
    if not on_triton(x) or width > MAX_NORM_WIDTH or x.stride(1) != 1:
        summed = x if residual is None else residual + x
        h = summed.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(summed.dtype), summed
    normed = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    summed = x if residual is None else torch.empty_like(normed)
    res = x if residual is None else residual
    block, pdl = next_power_of_2(width), programmatic(x.device)
    kernels()[0](
        (rows, 1, 1),
        (x, res, weight, normed, summed, width, float(eps), x.stride(0), res.stride(0),
         normed.stride(0), summed.stride(0)),
        (residual is not None, block, pdl),
        num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16, num_stages=1,
        fp_fusion=False, pdl=pdl,
    )  # fmt: skip
    return normed, summed


def rotary_split(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries and keys of stacked projections rotated as transformers'
    ``apply_rotary_pos_emb`` (``rotate_half`` convention), and the values.

    Args:
        qkv: ``[rows, (num_heads + 2 * num_kv_heads) * head_dim]``: each row's query,
            key and value heads side by side, unit stride in the last dim.
        cos, sin: ``[rows, head_dim]``, ``qkv``'s dtype (transformers' rotary module's
            output for the rows' positions), unit stride in the last dim.
        num_heads, num_kv_heads, head_dim: the attention's shape (``head_dim`` even).

    Returns:
        ``(q, k, v)``: ``[rows, num_heads, head_dim]`` and ``[rows, num_kv_heads,
        head_dim]`` twice, contiguous, ``qkv``'s dtype.
    """
    rows = qkv.shape[0]
    q_end, k_end = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    if not on_triton(qkv) or qkv.stride(1) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        cos, sin = cos[:, None], sin[:, None]
        q = qkv[:, :q_end].view(rows, num_heads, head_dim)
        k = qkv[:, q_end:k_end].view(rows, num_kv_heads, head_dim)
        v = qkv[:, k_end:].view(rows, num_kv_heads, head_dim)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v.contiguous()
    q = torch.empty(rows, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(rows, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    heads, block_d = num_heads + 2 * num_kv_heads, next_power_of_2(head_dim)
    block_h = min(next_power_of_2(heads), max(1, ROTARY_BLOCK // block_d))
    pdl = programmatic(qkv.device)
    kernels()[1](
        (rows, -(-heads // block_h), 1),
        (qkv, cos, sin, q, k, v, qkv.stride(0), cos.stride(0), sin.stride(0)),
        (num_heads, num_kv_heads, head_dim, block_h, block_d, pdl),
        num_warps=4, num_stages=1, fp_fusion=False, pdl=pdl,
    )  # fmt: skip
    return q, k, v


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` of ``x``'s last dim halves ``[x1, x2]``, as transformers' Llama."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of stacked projections ``gate_up = [gate | up]``
    (``[rows, 2 * n]``, unit stride in the last dim) -> ``[rows, n]``, its dtype."""
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    if not on_triton(gate_up) or gate_up.stride(1) != 1:
        return torch.nn.functional.silu(gate_up[:, :n]) * gate_up[:, n:]
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    pdl = programmatic(gate_up.device)
    kernels()[2](
        (rows, -(-n // SILU_BLOCK), 1), (gate_up, out, n, gate_up.stride(0), out.stride(0)),
        (SILU_BLOCK, pdl), num_warps=4, num_stages=1, fp_fusion=False, pdl=pdl,
    )  # fmt: skip
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight, bias)``; a decode step's few rows (at most
    :data:`LINEAR_MAX_ROWS`, fp16 or bf16, where
    :func:`~seqattn.attention.triton_launch.programmatic` holds) by a Triton GEMM
    launched in the chain of the layer's other kernels, so its launch hides behind the
    kernel before it. It sums each output in float32 in another order than cuBLAS:
    equal to rounding.

    Args:
        x: ``[rows, in_features]``.
        weight: ``[out_features, in_features]``, ``x``'s dtype and device.
        bias: optional ``[out_features]``, ``x``'s dtype.

    Returns:
        ``[rows, out_features]``, ``x``'s dtype.
    """
    rows, k = x.shape
    n = weight.shape[0]
    if (
        rows > LINEAR_MAX_ROWS
        or x.dtype not in (torch.float16, torch.bfloat16)
        or not on_triton(x)
        or not programmatic(x.device)
        or x.stride(1) != 1
        or weight.stride(1) != 1
    ):
        return torch.nn.functional.linear(x, weight, bias)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    block_n, block_k, stages = linear_blocks(n, multiprocessors(x.device))
    kernels()[3](
        (-(-n // block_n), 1, 1),
        (x, weight, weight if bias is None else bias, out, rows, n, k, x.stride(0),
         weight.stride(0), out.stride(0)),
        (max(16, next_power_of_2(rows)), block_n, block_k, bias is not None, True),
        num_warps=4, num_stages=stages, pdl=True,
    )  # fmt: skip
    return out


def linear_blocks(n: int, sm_count: int) -> tuple[int, int, int]:
    """``(outputs, inputs, pipeline stages)`` a program of :func:`linear` takes: the
    widest block of outputs that still gives two thirds of the multiprocessors a program
    (a program streams its weight rows over the whole input; no split of the input, so
    no second pass), inputs per loop iteration, stages within shared memory. On an H200
    (64 rows, bf16) these were the best or within 4% of the best tried for a 0.85B
    Llama's four projections."""
    block_n = 128
    while block_n > 16 and -(-n // block_n) * 3 < sm_count * 2:
        block_n //= 2
    return block_n, 256 if block_n == 16 else 128, 6 if block_n == 32 else 4


def kernels() -> tuple[DirectLaunch, DirectLaunch, DirectLaunch, DirectLaunch]:
    """``(rms_norm, rotary_split, silu_mul, linear)`` behind their launchers; imported on
    first use."""
    global _kernels
    if _kernels is None:
        from . import layer_kernels as k

        _kernels = (DirectLaunch(k.rms_norm), DirectLaunch(k.rotary_split),
                    DirectLaunch(k.silu_mul), DirectLaunch(k.linear))  # fmt: skip
    return _kernels
