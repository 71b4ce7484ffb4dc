"""Launching a Triton kernel without binding its arguments anew on every call.

``kernel[grid](*args)`` binds and specializes every argument, hashes the result and looks
the compiled kernel up before it launches: on an H200's host about 27 us of a 40 us
launch of the decode kernel, more than the kernel itself runs in an eager decode
step. :class:`DirectLaunch` keys the compiled kernel by what Triton specializes on (each
tensor's dtype and 16-byte alignment, each integer's value, the constants, the launch
options and the device) and calls its launcher directly once that key was seen: 13 us
on the same host. A new key goes through ``kernel[grid]`` once, which compiles (or
finds) and launches the kernel and hands back the compiled one.

The direct call is the one ``JITFunction.run`` makes in Triton 3.4 to 3.6 (every bound
argument, constants included, after the launch metadata and hooks). Elsewhere, or while
a launch hook is set (a profiler's), every launch goes through ``kernel[grid]``.

Programmatic dependent launch (Hopper and later, Triton 3.4 and later): a kernel launched
with ``pdl=True`` may start while the kernel before it in the stream still runs, and must
wait for it (``tl.extra.cuda.gdc_wait()``, :func:`.triton_kernels.pdl_start`) before it
touches memory that kernel may write or read. A chain of such kernels hides each
launch's latency behind the one before: on an H200 a 0.85B Llama's decode step of 64
rows (the fused layers' CUDA graph, replayed back to back) took 1.148 and 1.174 ms
against 1.263 and 1.262 ms with cuBLAS's GEMMs and plain launches.
"""

from __future__ import annotations

import os
from typing import Any

import torch

#: Triton versions whose launcher takes the call :meth:`DirectLaunch.__call__` makes
DIRECT_VERSIONS = ((3, 4), (3, 5), (3, 6))
#: set to "0" to launch every kernel plainly (no programmatic dependent launches)
PDL_VARIABLE = "SEQATTN_PDL"
_programmatic: dict[int, bool] = {}


class DirectLaunch:
    """One ``@triton.jit`` kernel's launches, each compiled variant called directly.

    Args:
        kernel: the ``@triton.jit`` function.

    Example (on a CUDA machine with triton)::

        launch = DirectLaunch(my_kernel)
        launch((blocks,), (x, y, n), (BLOCK,), num_warps=4, num_stages=2)
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._compiled: dict[tuple[Any, ...], Any] = {}
        self._triton = _direct_triton()

    def __call__(
        self,
        grid: tuple[int, int, int],
        args: tuple[Any, ...],
        constants: tuple[Any, ...],
        *,
        num_warps: int,
        num_stages: int,
        fp_fusion: bool = True,
        pdl: bool = False,
    ) -> None:
        """Launch on ``grid``: ``args`` are the kernel's runtime arguments (tensors,
        integers, floats) and ``constants`` its ``tl.constexpr`` ones after them, all in
        the order of its signature. ``fp_fusion=False`` compiles without fusing a
        multiply and an add into one rounding (Triton's ``enable_fp_fusion``);
        ``pdl=True`` launches it as a programmatic dependent launch (only where
        :func:`programmatic` said so, and only a kernel that waits first)."""
        options: dict[str, Any] = dict(
            num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=fp_fusion
        )
        if pdl:
            options["launch_pdl"] = True
        triton = self._triton
        if triton is None or _hooked(triton):
            self.kernel[grid](*args, *constants, **options)
            return
        device = triton.runtime.driver.active.get_current_device()
        key = _key(args, constants, options, device)
        compiled = self._compiled.get(key)
        if compiled is None:  # Triton binds, compiles or finds it, and launches it
            compiled = self.kernel[grid](*args, *constants, **options)
            self._compiled[key] = compiled
            return
        stream = triton.runtime.driver.active.get_current_stream(device)
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *constants)  # fmt: skip


def programmatic(device: torch.device) -> bool:
    """Whether kernels on the CUDA ``device`` launch as programmatic dependent launches:
    compute capability 9.0 or later, a Triton whose launcher does them (3.4 to 3.6), and
    ``SEQATTN_PDL`` not "0" (asked once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _programmatic:
        _programmatic[index] = (
            os.environ.get(PDL_VARIABLE, "1") != "0"
            and _direct_triton() is not None
            and torch.cuda.get_device_capability(index)[0] >= 9
        )
    return _programmatic[index]


def next_power_of_2(n: int) -> int:
    """The least power of two >= ``n`` (Triton's blocks are powers of two)."""
    return 1 << max(0, (n - 1).bit_length())


def _key(
    args: tuple[Any, ...], constants: tuple[Any, ...], options: dict[str, Any], device: int
) -> tuple[Any, ...]:
    """What Triton specializes a launch on: tensors by dtype and 16-byte alignment,
    integers and booleans by value (it specializes 1 and multiples of 16), floats not;
    the launch options (warps, stages, fp fusion) and the device."""
    parts: list[Any] = [*options.values(), device, constants]
    for arg in args:
        if isinstance(arg, torch.Tensor):
            parts.append(arg.dtype)
            parts.append(arg.data_ptr() % 16 == 0)
        elif not isinstance(arg, float):
            parts.append(arg)
    return tuple(parts)


def _hooked(triton: Any) -> bool:
    """Whether a launch hook is set (Triton 3.6 holds them in chains, 3.4 as callables)."""
    runtime = triton.knobs.runtime
    hooks = (runtime.launch_enter_hook, runtime.launch_exit_hook)
    return any(getattr(hook, "calls", hook) for hook in hooks)


def _direct_triton() -> Any:
    """The ``triton`` module where its launcher takes the direct call, else None."""
    import triton

    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    return triton if version in DIRECT_VERSIONS else None
