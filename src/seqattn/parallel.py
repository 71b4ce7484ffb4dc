"""The ranks that run one model together, over torch.distributed.

Under tensor parallelism every rank holds a share of each layer's heads and the pages
of those heads, and runs the same bookkeeping: the same schedule, the same page ids,
the same prefix-cache decisions. Nothing here moves KV: the ranks agree by construction
(the same calls in the same order) and this module only keeps them honest. It checks,
once, that every rank was built alike; it broadcasts rank 0's sampled tokens, so that
sampling cannot drift; and, on request, it compares a fingerprint of each step's page
table across the ranks (one all-reduce of two integers) and names the first step where
they differ.

Example (one process stands for a group of one):
    >>> import torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> ranks = RankGroup(dist.group.WORLD, torch.device("cpu"))
    >>> ranks.check_same({"num_pages": 64, "page_size": 16})
    >>> ranks.check_step(step_fingerprint([0, 1], np.array([5, 3]), np.arange(3)))
    >>> ranks.shard(8)                     # the KV heads this rank holds, of 8
    range(0, 8)
    >>> dist.destroy_process_group()
"""

from __future__ import annotations

import zlib
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .errors import InvalidArgumentError, RankMismatchError

__all__ = ["RankGroup", "step_fingerprint"]

# the backend each device type's collectives need (what torch.distributed documents)
BACKEND_FOR_DEVICE = {"cuda": "nccl", "cpu": "gloo"}


class RankGroup:
    """One tensor-parallel group of ranks, as this rank sees it.

    Args:
        group: the torch.distributed process group of the model's tensor-parallel mesh.
        device: where this rank's weights and cache live (``cuda:N`` or ``cpu``).

    Raises:
        InvalidArgumentError: the group's backend cannot run collectives on ``device``
            (``gloo`` for a CUDA model, ``nccl`` for a CPU one).
    """

    def __init__(self, group: Any, device: torch.device) -> None:
        self.group = group
        self.device = device
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.backend = str(dist.get_backend(group))
        self.source = dist.get_global_rank(group, 0)  # rank 0 of the group, globally
        self.steps = 0  # steps fingerprinted so far: the step an error names
        self._check_backend()

    def _check_backend(self) -> None:
        """Refuse a backend that cannot move this device's tensors."""
        wanted = BACKEND_FOR_DEVICE.get(self.device.type)
        # a group may name one backend per device type: "cpu:gloo,cuda:nccl"
        names = {part.split(":")[-1] for part in self.backend.split(",")}
        if wanted is not None and wanted not in names:
            raise InvalidArgumentError(
                f"the model is on {self.device}, but its process group uses {self.backend!r}: "
                f"tensor parallelism on {self.device.type} needs {wanted!r} "
                f"(torch.distributed.init_process_group({wanted!r}))"
            )

    def shard(self, count: int) -> range:
        """The items of ``count`` (heads) this rank holds: an even, contiguous share,
        as transformers' column-wise sharding splits a projection's outputs."""
        share = count // self.size
        return range(self.rank * share, (self.rank + 1) * share)

    def check_same(self, settings: dict[str, Any]) -> None:
        """Raise RankMismatchError on every rank unless all ranks pass equal
        ``settings`` (picklable values: sizes, flags, the model's config)."""
        everyone: list[Optional[dict[str, Any]]] = [None] * self.size
        dist.all_gather_object(everyone, settings, group=self.group)
        first = everyone[0] or {}
        for rank, theirs in enumerate(everyone[1:], start=1):
            theirs = theirs or {}
            keys = sorted(first.keys() | theirs.keys())
            differ = [k for k in keys if first.get(k) != theirs.get(k)]
            if differ:
                shown = ", ".join(f"{k}: {first.get(k)} vs {theirs.get(k)}" for k in differ[:4])
                raise RankMismatchError(
                    f"tensor-parallel ranks were built differently: rank 0 and rank {rank} "
                    f"differ in {shown}; every rank must build the same model and cache"
                )

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Overwrite ``tensor`` (contiguous, on the device) with rank 0's, in place."""
        dist.broadcast(tensor, src=self.source, group=self.group)

    def check_step(self, fingerprint: int) -> None:
        """Raise RankMismatchError on every rank unless all ranks hand in the same
        ``fingerprint`` for this step (one all-reduce: the maximum of ``f`` and ``-f``)."""
        self.steps += 1
        value = torch.tensor([fingerprint, -fingerprint], dtype=torch.int64)
        if "nccl" in self.backend:  # nccl reduces device tensors only
            value = value.to(self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        high, low = int(value[0]), -int(value[1])
        if high != low:
            raise RankMismatchError(
                f"tensor-parallel ranks diverged at step {self.steps}: their page tables "
                f"differ (fingerprints from {low} to {high}; this rank's {fingerprint}). "
                "Every rank must make the same calls in the same order"
            )


def step_fingerprint(seq_ids: list[int], lengths: np.ndarray, page_ids: np.ndarray) -> int:
    """A 32-bit checksum of one step's page table: its sequence ids, their lengths and
    their page ids in order (``[total_pages]`` integers). Equal on ranks that agree."""
    checksum = zlib.crc32(np.asarray(seq_ids, dtype=np.int64).tobytes())
    checksum = zlib.crc32(np.ascontiguousarray(lengths, dtype=np.int64).tobytes(), checksum)
    return zlib.crc32(np.ascontiguousarray(page_ids, dtype=np.int64).tobytes(), checksum)
