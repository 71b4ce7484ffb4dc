"""``seqattn demo`` under ``torchrun --nproc-per-node N``: the demo's model, sharded over
the N ranks by transformers' tensor parallelism, served by one engine per rank.

Every rank builds or loads the whole model as the one-process demo does; rank 0 writes
it to a temporary directory and every rank loads its shard from there with the model's
``tp_plan`` (so the ranks must share a file system: one node; an HF directory given with
``--model`` is loaded sharded directly, on any number of nodes that can read it).
Rank 0 keeps the whole model for the parity check; only rank 0 prints. Each rank runs
on ``cuda:LOCAL_RANK`` with NCCL for ``--device cuda``, on the CPU with gloo otherwise.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import redirect_stdout
from typing import Any, Optional

import torch
import torch.distributed as dist

from .errors import SeqAttnError
from .integrations.hf_parallel import check_heads, load_tensor_parallel


class DemoRanks:
    """This process's place in a ``torchrun`` launch: rank, world size, device."""

    def __init__(self, device: torch.device) -> None:
        self.rank = int(os.environ["RANK"])
        self.size = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", self.rank))
        if device.type == "cuda":
            count = torch.cuda.device_count()
            if local >= count:
                raise SeqAttnError(
                    f"rank {self.rank} wants cuda:{local}, but this machine has {count} "
                    f"GPU(s): launch at most {count} ranks per node"
                )
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(self.backend)
        self._quiet = None if self.rank == 0 else open(os.devnull, "w")  # noqa: SIM115

    @staticmethod
    def launched() -> bool:
        """Whether ``torchrun`` started this process as one of several ranks."""
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ

    def quiet(self) -> Any:
        """A context in which only rank 0's prints reach stdout."""
        return redirect_stdout(self._quiet or sys.stdout)

    def shard(self, model: Any, directory: Optional[Any]) -> Any:
        """``model``'s shard on this rank: loaded from ``directory`` (HF weights), or from
        a temporary copy of ``model`` that rank 0 writes (transformers saves on rank 0
        alone) and every rank reads: the ranks must share a file system (one node)."""
        check_heads(model.config, self.size)
        if directory is not None:
            return load_tensor_parallel(directory, dtype=model.dtype)
        where = [tempfile.mkdtemp(prefix="seqattn-demo-") if self.rank == 0 else None]
        dist.broadcast_object_list(where, src=0)
        try:
            model.save_pretrained(where[0])
            dist.barrier()  # written before any rank reads
            sharded = load_tensor_parallel(where[0], dtype=model.dtype)
            dist.barrier()  # read before rank 0 removes it
        finally:
            if self.rank == 0:
                shutil.rmtree(str(where[0]), ignore_errors=True)
        sharded.generation_config = model.generation_config
        return sharded

    def report(self, runner: Any) -> None:
        """Each rank's KV heads and pages, printed by rank 0."""
        cache, config = runner.cache, runner.config
        heads = runner.ranks.shard(config.num_key_value_heads)
        free = cache.allocator.free_pages_count
        line = (f"  rank {self.rank}: KV heads {heads.start}-{heads.stop - 1} of "
                f"{config.num_key_value_heads}, query heads {runner.num_qo_heads} of "
                f"{config.num_attention_heads}; pages {cache.num_pages - free} held, {free} "
                f"free of {cache.num_pages} ({cache.device})")  # fmt: skip
        lines: list[Optional[str]] = [None] * self.size
        dist.all_gather_object(lines, line)
        print("\n".join(str(text) for text in lines))

    def close(self, finished: bool) -> None:
        """Leave the group: once every rank is done (rank 0's parity check takes
        longest), or at once after an error, when the others may never arrive."""
        if dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()
        if self._quiet is not None:
            self._quiet.close()
