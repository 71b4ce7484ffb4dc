"""One rank of tests/test_tensor_parallel.py, run by ``torchrun --nproc-per-node 2``
(float32; gloo on the CPU, or NCCL and one GPU per rank with ``SEQATTN_TP_DEVICE=cuda``,
attention in torch): serves the same requests on a tensor-parallel engine, then
provokes each error a group refuses, and writes what happened to ``DIR/rank<r>.json``.

Usage: ``torchrun --standalone --nproc-per-node 2 tests/tensor_parallel_worker.py DIR``,
where ``DIR`` holds the models the test saved (``DIR/<family>``, ``DIR/one_kv_head``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROMPTS = [list(range(5, 18)), [*range(5, 15), 40, 41], [7, 8, 9, 10, 11], [100, 3]]
FAMILIES = ("llama", "qwen3")
DEVICE = os.environ.get("SEQATTN_TP_DEVICE", "cpu")


def serve(
    model: Any, num_pages: int, seed: int = 0, temperature: float = 0.0, compile: bool = False
) -> dict:
    """Tokens, preemptions and prefix hits of the prompts on one engine."""
    from seqattn.engine import Engine, SamplingParams
    from seqattn.integrations.hf import PagedCausalLM

    runner = PagedCausalLM(model, num_pages=num_pages, page_size=4, backend="torch",
                           check_ranks=True, compile=compile)  # fmt: skip
    engine = Engine(runner, max_step_tokens=8, seed=seed)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True, temperature=temperature)
    outputs = engine.generate(PROMPTS, params)
    stats = runner.descriptor.prefix_stats
    result = dict(outputs=outputs, preemptions=engine.stats.preemptions,
                  hit_tokens=stats.hit_tokens, kv_heads=runner.cache.num_heads)  # fmt: skip
    if runner.compiled is not None:
        from torch._dynamo.utils import counters

        breaks = sum(counters["graph_break"].values())
        result.update(compiles=runner.compiled.compiles, graph_breaks=breaks,
                      stacked=runner.compiled.stacked_matmuls)  # fmt: skip
    return result


def refusal(call: Callable[[], Any]) -> list[str]:
    """``[error type, message]`` of what ``call`` raised (``["none", ""]`` if nothing)."""
    try:
        call()
    except Exception as error:  # the test asserts the type
        return [type(error).__name__, str(error)]
    return ["none", ""]


def main(models: Path) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from seqattn import MissingDependencyError
    from seqattn.integrations.hf import PagedCausalLM
    from seqattn.integrations.hf_parallel import load_tensor_parallel
    from seqattn.parallel import RankGroup

    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    rank, result = dist.get_rank(), {}
    for family in FAMILIES:
        model = load_tensor_parallel(models / family, dtype=torch.float32)
        result[family] = [serve(model, pages) for pages in (64, 14)]
    # decode steps through torch.compile, transformers' all-reduces inside the graph
    try:
        result["compiled"] = serve(model, 64, compile=True)
    except MissingDependencyError as error:  # inductor has no compiler here
        result["compiled"] = {"skipped": str(error)}
    # sampling: each rank seeds its own generator differently; rank 0's samples rule
    result["sampled"] = serve(model, 64, seed=rank, temperature=1.0)["outputs"]
    result["pages_differ"] = refusal(lambda: PagedCausalLM(model, num_pages=64 + rank))
    runner = PagedCausalLM(model, num_pages=32, page_size=4, backend="torch", check_ranks=True)
    runner.descriptor.allocate([0], [2])
    runner.forward([0], [[1, 2]])  # step 1: the ranks agree
    runner.descriptor.allocate([1], [3 + rank])  # rank 1 strays: one token more
    free = runner.cache.allocator.free_pages_count
    result["diverged"] = refusal(lambda: runner.forward([1], [[4, 5, 6]]))
    result["pages_kept"] = free == runner.cache.allocator.free_pages_count
    one_kv = models / "one_kv_head"
    result["load_uneven"] = refusal(lambda: load_tensor_parallel(one_kv, dtype=torch.float32))
    uneven = AutoModelForCausalLM.from_pretrained(one_kv, tp_plan="auto", dtype=torch.float32)
    result["run_uneven"] = refusal(lambda: PagedCausalLM(uneven, num_pages=8))
    other = torch.device("cpu" if DEVICE == "cuda" else "cuda")  # the backend cannot serve
    result["wrong_backend"] = refusal(lambda: RankGroup(dist.group.WORLD, other))
    (models / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # no rank leaves while another still works
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
