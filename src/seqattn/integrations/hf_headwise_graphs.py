"""Decode steps of a :class:`~.hf_headwise.HeadwiseCausalLM` replayed from CUDA graphs.

One graph per bucket of batch sizes captures the whole model forward of a decode step,
every layer's append and attention through :class:`~seqattn.headwise.graph.HeadwiseGraphs`
(the Triton decode kernel, which reads every layer's page table on the device). Before
each replay one upload carries the step's page tables of all layers, and one more its
tokens and positions. Each layer's queries are also copied, inside the graph, to a
static buffer; after the replay the sequences tracked by a query window
(:mod:`.query_window`) take them from there in one indexed copy per window length (the
rings themselves may move when they grow, so the graph cannot write them).

A step in which a press runs is not replayed: it changes page lists mid-step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from .._transfer import upload
from ..attention.cuda_graph import bucket_sizes, capture
from ..attention.triton_decode import check_triton
from ..errors import InvalidArgumentError
from ..headwise import HeadwiseAttention, HeadwiseStep
from ..headwise.graph import HeadwiseGraphs
from .query_window import QueryWindows, WindowRows


class HeadwiseGraphContext:
    """The attention of a captured decode forward (``seqattn_step`` of the model call).

    Args:
        graphs: the prepared buffers.
        queries: ``[num_layers, bucket, num_qo_heads, head_dim]``, static: each layer's
            rotated queries are copied here.
    """

    def __init__(self, graphs: HeadwiseGraphs, queries: torch.Tensor) -> None:
        self.graphs, self.queries = graphs, queries

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """Write and attend one layer; ``[1, bucket, num_qo_heads, head_dim]``."""
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
        self.graphs.write(layer, k, v)
        self.queries[layer].copy_(q)
        return self.graphs.run(q, layer).unsqueeze(0)


class HeadwiseDecodeGraphs:
    """The captured decode forwards of one runner, one per bucket, with static inputs.

    Args:
        model: the runner's model (already on the ``"seqattn_headwise"`` attention).
        graphs: the buckets' buffers.
        windows: the runner's query rings.
    """

    def __init__(self, model: Any, graphs: HeadwiseGraphs, windows: QueryWindows) -> None:
        self.model, self.graphs, self.windows = model, graphs, windows
        # per bucket: graph, input ids, position ids, logits, queries, kept rows: all
        # static, and all kept, as the graph reads them by address
        self.captured: dict[int, tuple[Any, ...]] = {}

    def takes(self, lens: np.ndarray) -> bool:
        """Whether a step of ``lens`` new tokens per sequence replays a graph: one token
        each, and no more sequences than the largest bucket."""
        return int(lens.sum()) == lens.size <= self.graphs.batch_sizes[-1]

    def replay(
        self,
        step: HeadwiseStep,
        tokens: Any,
        positions: np.ndarray,
        window_rows: WindowRows,
    ) -> torch.Tensor:
        """The logits ``[n, vocab]`` of a decode ``step`` of ``n`` sequences.

        Args:
            step: from ``begin_step`` (one token per sequence, every layer).
            tokens: ``[n]`` int64: a host array or a tensor on the device.
            positions: ``[n]`` int64 host: each new token's position.
            window_rows: where the step's queries go in the rings.
        """
        n = len(step.seq_ids)
        bucket = self.graphs.prepare(step)
        if bucket not in self.captured:
            self.captured[bucket] = self._capture(bucket)
        graph, input_ids, position_ids, logits, queries, _ = self.captured[bucket]
        on_host = not isinstance(tokens, torch.Tensor)
        arrays = [tokens, positions] if on_host else [positions]
        inputs = upload(input_ids.device, arrays, dtype=torch.int64)[0]
        # padding rows keep whatever valid token and position they last held
        input_ids[0, :n].copy_(inputs[0] if on_host else tokens)
        position_ids[0, :n].copy_(inputs[-1])
        graph.replay()
        if window_rows.per_window:
            self.windows.record_layers(window_rows, queries)
        return logits[:n].clone()  # the next replay overwrites the static logits

    def _capture(self, bucket: int) -> tuple[Any, ...]:
        cache = self.graphs.cache
        device = cache.device
        input_ids = torch.zeros(1, bucket, dtype=torch.long, device=device)
        position_ids = torch.zeros(1, bucket, dtype=torch.long, device=device)
        rows = torch.arange(bucket, device=device)  # the graph reads these by address
        queries = torch.zeros(cache.num_layers, bucket, self.graphs.num_qo_heads,
                              cache.head_dim, dtype=cache.dtype, device=device)  # fmt: skip
        context = HeadwiseGraphContext(self.graphs, queries)
        outputs: list[torch.Tensor] = []

        def forward() -> None:
            with torch.inference_mode():
                outputs.append(self.model(
                    input_ids=input_ids, position_ids=position_ids, use_cache=False,
                    logits_to_keep=rows, seqattn_step=context,
                ).logits[0])  # fmt: skip

        graph = capture(forward)
        return graph, input_ids, position_ids, outputs[-1], queries, rows

    def close(self) -> None:
        """Drop the graphs and give their scratch page back."""
        torch.cuda.synchronize(self.graphs.cache.device)  # no replay may still read them
        self.captured.clear()
        self.graphs.close()


def decode_graphs(
    current: Optional[HeadwiseDecodeGraphs],
    model: Any,
    attention: HeadwiseAttention,
    windows: QueryWindows,
    batch_sizes: Sequence[int],
    sm_scale: float,
) -> Optional[HeadwiseDecodeGraphs]:
    """A runner's graphs for ``batch_sizes``: ``current`` if it has those buckets, else
    new ones (``current`` closed); None, with ``current`` closed, where the cache cannot
    take the Triton kernel (not CUDA, not float16/bfloat16, no triton).

    Raises:
        ArgumentTypeError, InvalidArgumentError: bad ``batch_sizes`` (``current`` kept).
    """
    cache = attention.cache
    sizes = bucket_sizes(batch_sizes, "batch_sizes")
    try:
        check_triton(cache.storage)
    except InvalidArgumentError:
        if current is not None:
            current.close()
        return None
    if current is not None and current.graphs.batch_sizes == sizes:
        return current
    if current is not None:
        current.close()
    graphs = HeadwiseGraphs(cache, attention.num_qo_heads, sizes, sm_scale=sm_scale)
    return HeadwiseDecodeGraphs(model, graphs, windows)
