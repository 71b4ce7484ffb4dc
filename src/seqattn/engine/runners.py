"""The runners an :class:`~seqattn.engine.Engine` drives, and how it sets one up: its
sequence store, compiled decode and CUDA graphs.

- :class:`~seqattn.integrations.hf.PagedCausalLM`: a paged cache with prefix caching
  (:class:`~.store.PagedStore`); compiled decode and CUDA-graph decode where it can.
- :class:`~seqattn.integrations.hf_headwise.HeadwiseCausalLM`: a head-wise cache, a press
  per request (:class:`~.headwise_store.HeadwiseStore`); never compiled; CUDA-graph
  decode where triton serves the cache, for steps in which no press runs (a press
  changes page lists and lengths inside a step, which a captured graph cannot follow).
"""

from __future__ import annotations

from typing import Optional, Union

from ..errors import ArgumentTypeError, InvalidArgumentError
from ..integrations.hf import PagedCausalLM
from ..integrations.hf_headwise import HeadwiseCausalLM
from .headwise_store import HeadwiseStore
from .store import PagedStore, SequenceStore

Runner = Union[PagedCausalLM, HeadwiseCausalLM]


def store_for(runner: object) -> SequenceStore:
    """The store of ``runner``'s sequences (ArgumentTypeError for any other object)."""
    if isinstance(runner, PagedCausalLM):
        return PagedStore(runner)
    if isinstance(runner, HeadwiseCausalLM):
        return HeadwiseStore(runner)
    raise ArgumentTypeError(  # a module's repr spans many lines: its type says it
        f"runner must be a PagedCausalLM (PagedCausalLM(model, num_pages=...)) or a "
        f"HeadwiseCausalLM, got a {type(runner).__name__}"
    )


def check_compile(runner: Runner, compile: Optional[bool]) -> None:
    """Refuse ``compile=True`` for a runner that only runs eagerly (InvalidArgumentError)."""
    if compile and isinstance(runner, HeadwiseCausalLM):
        raise InvalidArgumentError("a HeadwiseCausalLM runs eagerly: compile=True needs a "
                                   "PagedCausalLM")  # fmt: skip


def set_compile(runner: Runner, compile: Optional[bool]) -> None:
    """Compile the runner's decode (True), run it eagerly (False), or leave it (None).

    Raises:
        MissingDependencyError: where inductor has no compiler; the runner is as it was.
    """
    if not isinstance(runner, PagedCausalLM):
        return  # always eager (check_compile refused True)
    if compile:
        runner.enable_compile(runner.compiled.mode if runner.compiled else "default")
    elif compile is not None:
        runner.disable_compile()


def set_cuda_graphs(runner: Runner, wanted: bool, max_batch_size: int, num_pages: int) -> bool:
    """Turn the runner's CUDA-graph decode on (one graph per batch-size bucket) or off;
    whether it is on."""
    if not wanted:
        runner.disable_cuda_graphs()
        return False
    # a decoding request holds a page of its own: more than the pool's pages never
    # decode together, and a bucket's buffers are sized by its batch
    largest = min(max_batch_size, num_pages)
    buckets = tuple(1 << i for i in range((largest - 1).bit_length() + 1))
    return runner.enable_cuda_graphs(buckets)
