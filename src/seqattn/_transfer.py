"""A step's small host arrays onto the GPU in one asynchronous copy (numpy in, torch out)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch


@functools.cache
def _cuda() -> bool:
    """Whether CUDA is there: asked once, not at every step's upload (each
    ``torch.cuda.is_available()`` asks the driver)."""
    return torch.cuda.is_available()


def upload(
    device: torch.device,
    to_device: list[np.ndarray],
    to_host: Sequence[np.ndarray] = (),
    dtype: torch.dtype = torch.int32,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``to_device`` as tensors on ``device`` and ``to_host`` as pinned host tensors.

    All of them share one pinned buffer, and the device part goes up in one
    non-blocking copy: a step pays one transfer, not one per layer and array, and
    never waits on the GPU (pageable memory could make the copy wait for the stream).
    The host part is pinned because flashinfer's ``plan()`` copies indptr and lengths
    to the GPU itself.

    Args:
        device: a CUDA device (or the CPU: then the "copy" is the buffer itself).
        to_device, to_host: 1-D numeric arrays whose values fit ``dtype``.
        dtype: of every returned tensor (int32: what flashinfer's index arrays are).

    Returns:
        ``(on_device, on_host)``, tensors in the order given, views of the two buffers.
    """
    arrays = [*to_device, *to_host]
    sizes = [a.size for a in arrays]
    split = sum(sizes[: len(to_device)])
    # unpinned without CUDA, so that tests run this path on a CPU
    buffer = torch.empty(sum(sizes), dtype=dtype, pin_memory=_cuda())
    np.concatenate(arrays, out=buffer.numpy(), casting="same_kind")
    # torch's pinned allocator keeps the buffer until this copy has landed, even if
    # the host tensors are dropped first
    on_device = buffer[:split].to(device, non_blocking=True).split(sizes[: len(to_device)])
    on_host = buffer[split:].split(sizes[len(to_device) :])
    return list(on_device), list(on_host)
