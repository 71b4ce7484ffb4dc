"""A step's small index arrays onto the GPU in one copy (numpy in, torch out)."""

from __future__ import annotations

import numpy as np
import torch


def upload(
    device: torch.device, to_device: list[np.ndarray], to_host: list[np.ndarray]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``to_device`` as int32 tensors on ``device`` and ``to_host`` as int32 pinned host tensors.

    All of them share one pinned buffer, and the device part goes up in one
    non-blocking copy: a step pays one transfer, not one per layer and array, and
    never waits on the GPU (pageable memory could make the copy wait for the stream).
    The host part is pinned because flashinfer's ``plan()`` copies indptr and lengths
    to the GPU itself.

    Args:
        device: a CUDA device (or the CPU, in tests).
        to_device, to_host: 1-D integer arrays whose values fit int32.

    Returns:
        ``(on_device, on_host)``, tensors in the order given, views of the two buffers.
    """
    arrays = [*to_device, *to_host]
    sizes = [a.size for a in arrays]
    split = sum(sizes[: len(to_device)])
    # unpinned without CUDA, so that tests run this path on a CPU
    buffer = torch.empty(sum(sizes), dtype=torch.int32, pin_memory=torch.cuda.is_available())
    np.concatenate(arrays, out=buffer.numpy(), casting="same_kind")
    # torch's pinned allocator keeps the buffer until this copy has landed, even if
    # the host tensors are dropped first
    on_device = buffer[:split].to(device, non_blocking=True).split(sizes[: len(to_device)])
    on_host = buffer[split:].split(sizes[len(to_device) :])
    return list(on_device), list(on_host)
