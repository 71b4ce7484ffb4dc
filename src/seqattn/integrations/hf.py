"""HuggingFace transformers decoder models on seqattn's paged cache and attention:
:class:`PagedCausalLM` runs a model's forward over one step (the attention function it
registers lives in :mod:`.hf_attention`). No model code is forked; the steps that are not
compiled of a transformers Llama, Mistral or Qwen2 run :class:`.hf_fused.FusedLlama` by
default on CUDA (the same arithmetic from the same parameters in fewer launches;
``fused_layers``).

A step's batch is flattened into one row: ``input_ids`` and ``position_ids`` of shape
``[1, num_new_tokens]``, rows grouped by sequence; ``use_cache=False`` (the paged cache
is the cache) and no attention mask (each sequence's own pages are its context). Sliding
windows (Mistral, Qwen2/3 ``layer_types``) become flashinfer's ``window_left``.

Tensor parallelism: a model loaded with transformers' ``tp_plan`` (e.g. by
:func:`~seqattn.integrations.hf_parallel.load_tensor_parallel` under ``torchrun``) runs
as it is: this rank's cache holds its share of the KV heads
(``ranks.shard(num_key_value_heads)``), and every rank must make the same calls in the
same order, as :class:`~seqattn.engine.Engine` does (it broadcasts rank 0's samples).
Every rank is checked to be built alike before any page is allocated.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch

from .._checks import INT64_MAX, exact_bool, exact_int
from .._flashinfer import flashinfer_or_none
from .._transfer import upload
from ..attention import PagedAttention
from ..attention.triton_decode import decode_backend
from ..descriptor import CacheDescriptor
from ..packed_data import FlashInferPackedData
from ..parallel import step_fingerprint
from ..storage import PagedKVCacheManager
from .compiled import CompiledDecode, checked_compile
from .hf_attention import ATTENTION_NAME, StepContext, register
from .hf_checks import (
    attention_variants,
    check_backend,
    check_model,
    checked_decode,
    checked_forward,
    head_dim_of,
)
from .hf_fused import FusedLlama, fused_wanted, uncompiled_logits
from .hf_parallel import model_ranks


class _DecodeGraphs:
    """Decode steps replayed from CUDA graphs: the runner's one attention variant with
    buckets, and per bucket a captured forward with its static inputs and logits."""

    def __init__(self, runner: PagedCausalLM, attention: PagedAttention, plan: dict) -> None:
        self.runner = runner
        self.attention = attention
        self.plan_options = plan  # window_left, sm_scale of the model's one variant
        # per bucket: graph, static input ids, kept rows, logits (the graph reads the
        # tensors by address: they must live as long as it does)
        self.captured: dict[int, tuple[Any, ...]] = {}

    def replay(self, step: FlashInferPackedData, tokens: torch.Tensor) -> torch.Tensor:
        """The logits of a decode ``step`` whose ``[n]`` input tokens are on the device
        (``step`` packed on the host: its tables go up in the plan's one copy)."""
        runner, n = self.runner, step.batch_size
        bucket = self.attention.plan(step, cuda_graph=True, q_dtype=runner.cache.dtype,
                                     **self.plan_options)  # fmt: skip
        if bucket not in self.captured:
            self.captured[bucket] = self._capture(bucket)
        graph, input_ids, _, logits = self.captured[bucket]
        input_ids[0, :n].copy_(tokens)  # padding rows keep whatever valid token they held
        graph.replay()
        return logits[:n]

    def _capture(self, bucket: int) -> tuple[Any, ...]:
        runner, device = self.runner, self.runner.device
        input_ids = torch.zeros(1, bucket, dtype=torch.long, device=device)
        # the bucket's positions, which every plan rewrites in place: read in the graph
        positions = self.attention.graph_positions()
        rows = torch.arange(bucket, device=device)  # the graph reads these by address
        context = StepContext(None, planned=self.attention)
        outputs: list[torch.Tensor] = []
        compiled = runner.compiled  # the graph replays whichever forward it captured

        def forward() -> None:
            with torch.inference_mode():
                position_ids = positions.long()[None]
                if compiled is not None:
                    outputs.append(compiled(context, input_ids, position_ids))
                    return
                outputs.append(uncompiled_logits(runner.model, runner.fused, input_ids[0],
                                                 position_ids[0], context, rows))  # fmt: skip

        graph = self.attention.capture(forward)
        return graph, input_ids, rows, outputs[-1]  # replays write the last

    def forget(self) -> None:
        """Drop the captured graphs (the buckets' buffers stay)."""
        torch.cuda.synchronize(self.runner.device)  # no replay may still read what is freed
        self.captured.clear()

    def close(self) -> None:
        self.forget()
        self.attention.close()


class PagedCausalLM:
    """A transformers causal LM whose KV cache and attention are seqattn's.

    Args:
        model: a ``*ForCausalLM`` of a supported family (Llama, Mistral, Qwen2, Qwen3);
            it is switched to the ``"seqattn"`` attention implementation.
        num_pages: pages in the KV pool.
        page_size: tokens per page.
        prefix_caching: share cached prompt prefixes between sequences.
        backend: as :class:`PagedAttention`: ``"auto"`` (on CUDA Triton's decode where it
            serves, flashinfer otherwise), ``"flashinfer"``, ``"triton"``, ``"torch"``.
        check_ranks: for a model sharded by transformers' tensor parallelism, compare a
            fingerprint of every step's page table across the ranks (one all-reduce of
            two integers per step) and raise :class:`~seqattn.errors.RankMismatchError`
            naming the first step where they differ.
        compile: run steps through ``torch.compile`` (inductor; off by default, see
            :mod:`.compiled`), seqattn's append + attention as the custom op
            ``seqattn::paged_attention``: a graph for decode steps, one for prefill and
            mixed steps, compiled at their first steps (:attr:`compile_seconds`).
        compile_mode: ``"default"`` or ``"max-autotune-no-cudagraphs"``.
        fused_layers: run steps that are not compiled (eager, or captured in CUDA graphs)
            by :class:`~.hf_fused.FusedLlama`, nine launches a decoder layer against
            transformers' forty: None where it serves the model on Triton kernels (an
            unsharded Llama, Mistral or Qwen2 on CUDA), True wherever it serves the model
            (on the CPU by torch ops), False never. Steps while a module has a hook do not.

    Raises:
        ArgumentTypeError: ``model`` is not a torch module with a config, or an argument
            of the wrong type (``num_pages=2.5``, ``backend=None``, ``fused_layers=1``).
        InvalidArgumentError: an unsupported model family, a model without a language
            model head (e.g. ``LlamaModel``), a size < 1, an unknown backend or compile
            mode, ``fused_layers=True`` for a model it does not serve; sharded: a rank
            count that does not divide the heads, or a process group whose backend
            cannot run collectives on the model's device.
        MissingDependencyError: ``compile=True`` without a C++ compiler (CPU) or triton
            (CUDA) for inductor.
        RankMismatchError: sharded, and the ranks were built differently (model config,
            pages, page size, dtype, flags).
        Every check runs before the model is switched to seqattn's attention.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from seqattn.integrations.hf import PagedCausalLM
        >>> config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> runner = PagedCausalLM(LlamaForCausalLM(config).eval(), num_pages=32, page_size=4)
        >>> runner.descriptor.allocate([0, 1], [5, 3])
        >>> logits = runner.forward([0, 1], [[1, 2, 3, 4, 5], [6, 7, 8]])
        >>> logits.shape                     # the last position of each sequence
        torch.Size([2, 64])
    """

    def __init__(
        self,
        model: Any,
        *,
        num_pages: int,
        page_size: int = 16,
        prefix_caching: bool = True,
        backend: str = "auto",
        check_ranks: bool = False,
        compile: bool = False,
        compile_mode: str = "default",
        fused_layers: Optional[bool] = None,
    ) -> None:
        check_model(model)
        param = next(model.parameters())
        self.ranks = model_ranks(model, param.device)  # None unless sharded
        if self.ranks is not None:  # a collective: before anything one rank could refuse
            settings = dict(num_pages=num_pages, page_size=page_size, backend=backend,
                            prefix_caching=prefix_caching, check_ranks=check_ranks,
                            compile=compile, compile_mode=compile_mode,
                            fused_layers=fused_layers)  # fmt: skip
            self.ranks.check_same(rank_settings(model, **settings))
        num_pages = exact_int(num_pages, "num_pages", low=1, high=INT64_MAX)
        page_size = exact_int(page_size, "page_size", low=1, high=INT64_MAX)
        prefix_caching = bool(exact_bool(prefix_caching, "prefix_caching"))
        self.check_ranks = bool(exact_bool(check_ranks, "check_ranks"))
        check_backend(backend)
        mode = checked_compile(compile, compile_mode, param.device)
        fused = fused_wanted(fused_layers, model, self.ranks is not None, param.device)
        config = model.config
        size = 1 if self.ranks is None else self.ranks.size
        heads = config.num_attention_heads
        head_dim = head_dim_of(config)
        self.num_qo_heads = heads // size  # this rank's share: what each layer's q_proj makes
        # the pool first: if its sizes are refused, the model is still as it came
        self.cache = PagedKVCacheManager(
            num_pages, page_size, config.num_key_value_heads // size, head_dim, param.dtype,
            param.device, num_layers=config.num_hidden_layers,
        )  # fmt: skip
        register()
        model.set_attn_implementation(ATTENTION_NAME)
        self.model = model
        self.config = config
        # the ids the embedding takes: what every token passed in is checked against
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.descriptor = CacheDescriptor(self.cache, prefix_caching=prefix_caching)
        self.backend = backend
        self._attention: dict[tuple[int, Optional[float]], PagedAttention] = {}
        self._graphs: Optional[_DecodeGraphs] = None
        # steps through torch.compile (None: eager); see .compiled
        self.compiled = None if mode is None else CompiledDecode(model, self.cache.kv_data, mode)
        # steps not compiled run by fused operations where they serve (None: transformers')
        self.fused = FusedLlama(model) if fused else None

    @property
    def device(self) -> torch.device:
        return self.cache.device

    @property
    def reserved_pages(self) -> int:
        """Pages of the pool the runner holds for itself: the scratch page that padded
        CUDA-graph decode rows write into, while graphs are on; 0 otherwise."""
        return 0 if self._graphs is None else 1

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling decode steps so far (0.0 when not compiling)."""
        return 0.0 if self.compiled is None else self.compiled.compile_seconds

    def enable_compile(self, mode: str = "default") -> None:
        """Compile decode steps from now on (as ``compile=True``); CUDA graphs captured
        so far are dropped, to be captured again with the compiled forward. Checked as
        the constructor checks ``compile_mode``; nothing changes if that raises."""
        checked = str(checked_compile(True, mode, self.device))
        if self.compiled is None or self.compiled.mode != checked:
            if self._graphs is not None:
                self._graphs.forget()  # they replay the other forward
            self.compiled = CompiledDecode(self.model, self.cache.kv_data, checked)

    def disable_compile(self) -> None:
        """Run decode steps eagerly from now on (graphs captured so far are dropped)."""
        if self.compiled is not None and self._graphs is not None:
            self._graphs.forget()
        self.compiled = None

    def attention_for(self, window: int, scaling: Optional[float]) -> PagedAttention:
        """The attention object of one (window, scale) variant, made once."""
        key = (window, scaling)
        if key not in self._attention:
            backend = runner_backend(self.backend, window, self.cache)
            workspace = first_workspace(self._attention)
            self._attention[key] = PagedAttention(
                self.cache, self.num_qo_heads, backend=backend, workspace=workspace
            )
        return self._attention[key]

    @torch.inference_mode()
    def forward(
        self, seq_ids: list[int], tokens: list[list[int]], *, fed: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Run the model on each sequence's new tokens; logits of each one's last token.

        The tokens must be allocated already (``descriptor.allocate`` /
        ``allocate_decoding``): they are the newest ``len(tokens[i])`` of sequence
        ``seq_ids[i]``, at positions ``seq_len - len(tokens[i]) ..``.

        Args:
            seq_ids: live sequences, each once, ``[batch]`` integers.
            tokens: one non-empty row of token ids per sequence, each ``[n_i]``
                integers in ``[0, vocab_size)`` (lists, numpy arrays or tensors; checked
                on the host, before the model runs).
            fed: the first ``k`` sequences' one new token each, int64 ``[k]`` on the
                model's device, ``0 < k < len(seq_ids)`` (a step's samples not yet read:
                decode rows beside prompt chunks); ``tokens`` then holds the other rows.

        Returns:
            ``shape: [len(seq_ids), vocab_size]``, the model's dtype, on its device.

        Raises:
            ArgumentTypeError: ids or tokens that are not integers, ``tokens`` not a
                sequence of rows, ``fed`` not a tensor.
            InvalidArgumentError: a token id outside the vocabulary.
            InvalidLengthError: no sequence, a row count other than ``len(seq_ids) - k``,
                an empty row or one longer than its sequence (not allocated), a bad ``k``.
            TensorSpecError: ``fed`` not int64 on the model's device.
            DuplicateSequenceError: an id listed twice.
            UnknownSequenceError: an id that is not live.
        """
        seq_ids, lens, flat = checked_forward(
            self.descriptor, seq_ids, tokens, fed, self.vocab_size, self.device
        )
        return self._run(seq_ids, lens, flat, fed=fed)

    @torch.inference_mode()
    def decode(self, seq_ids: list[int], tokens: Union[list[int], torch.Tensor]) -> torch.Tensor:
        """One decode step: one new (allocated) token per sequence.

        Replayed from a CUDA graph when :meth:`enable_cuda_graphs` is on and the batch
        fits a bucket; run eagerly otherwise.

        Args:
            seq_ids: live sequences, each once, each grown by one token
                (``allocate_decoding``).
            tokens: their new tokens, ``[len(seq_ids)]``: a list, numpy array or CPU
                tensor of integers in ``[0, vocab_size)`` (checked on the host), or an
                int64 tensor on the model's device (e.g. the previous step's samples).
                A device tensor's dtype, shape and device are checked, but not its
                values: reading them back would make the host wait for the GPU, which
                is what decoding from the device's own samples avoids. An id outside
                the vocabulary there is the caller's bug (on CUDA a device-side assert).

        Returns:
            ``shape: [len(seq_ids), vocab_size]``: the logits of each new token.

        Raises:
            ArgumentTypeError: ids or host tokens that are not integers.
            TensorSpecError: a device tensor that is not int64 ``[len(seq_ids)]`` on the
                model's device.
            InvalidArgumentError: a host token id outside the vocabulary.
            InvalidLengthError: no sequence, a token count other than ``len(seq_ids)``,
                or an empty sequence.
            DuplicateSequenceError, UnknownSequenceError: as :meth:`forward`.
        """
        seq_ids, ones, tokens = checked_decode(
            self.descriptor, seq_ids, tokens, self.vocab_size, self.device
        )
        return self._run(seq_ids, ones, tokens, decode=True)

    def _run(
        self,
        seq_ids: list[int],
        lens: np.ndarray,
        tokens: Union[np.ndarray, torch.Tensor],
        decode: bool = False,
        fed: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The forward of one flat row of new tokens (``[sum(lens)]``, on the host or the
        device; after the ``fed`` ones): the step is packed once, host tokens with it."""
        on_host = not isinstance(tokens, torch.Tensor)
        if decode and len(seq_ids) <= self.graph_batch_limit():
            # packed on the host: the graph's plan sends its tables up in one copy
            step = self.descriptor.pack_for_flashinfer(seq_ids, lens)
            self._check_ranks(seq_ids, step)
            assert self._graphs is not None
            if on_host:
                tokens = upload(self.device, [tokens])[0][0]  # type: ignore[list-item]
            return self._graphs.replay(step, tokens)  # type: ignore[arg-type]
        step = self.descriptor.pack_for_flashinfer(
            seq_ids, lens, device=self.device, inputs=[tokens] if on_host else ()
        )
        input_ids = step.inputs[0] if on_host else tokens
        if fed is not None:
            input_ids = torch.cat([fed, input_ids])  # type: ignore[list-item]
        self._check_ranks(seq_ids, step)
        context = StepContext(step, self.attention_for)
        if self.compiled is not None:
            if decode:
                return self.compiled.decode(context, input_ids, step.append_positions)  # type: ignore[arg-type]
            return self.compiled.prefill(context, input_ids, step.append_positions, step.last_rows)  # type: ignore[arg-type]
        return uncompiled_logits(self.model, self.fused, input_ids, step.append_positions,  # type: ignore[arg-type]
                                 context, step.last_rows)  # fmt: skip

    def _check_ranks(self, seq_ids: list[int], step: FlashInferPackedData) -> None:
        """Tensor-parallel, when asked: every rank runs the same step (ids, lengths, pages)."""
        if self.check_ranks and self.ranks is not None:
            pages = self.descriptor.table.pages_of_slots(step.stamp.slots)  # type: ignore[union-attr]
            self.ranks.check_step(step_fingerprint(seq_ids, step.kv_seq_lens.numpy(), pages))  # type: ignore[union-attr]

    # --------------------------------------------------------------- CUDA graphs
    def enable_cuda_graphs(self, batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> bool:
        """Replay decode steps from CUDA graphs (one per batch-size bucket, captured on
        first use). Needs flashinfer and one attention variant for all layers (one
        window); returns whether graphs are on. Calling it again with the same buckets
        keeps the graphs captured so far; other buckets replace them. Without flashinfer
        (``backend="auto"`` on a CUDA machine where it does not import) graphs stay off.
        They decode by the Triton kernel where it serves (:func:`runner_backend`)."""
        variants = attention_variants(self.model)
        usable = self.device.type == "cuda" and self.backend != "torch"
        if not usable or len(variants) != 1 or flashinfer_or_none() is None:
            self.disable_cuda_graphs()
            return False
        current = self._graphs
        if current is not None and current.attention.graphs.batch_sizes == sorted(set(batch_sizes)):  # type: ignore[union-attr]
            return True
        # graphs captured on the old buckets' buffers must never replay with new plans
        self.disable_cuda_graphs()
        window, scaling = variants.pop()
        attention = PagedAttention(
            self.cache, self.num_qo_heads, backend=runner_backend(self.backend, window, self.cache),
            cuda_graph_batch_sizes=batch_sizes, workspace=first_workspace(self._attention),
        )  # fmt: skip
        self._attention[(window, scaling)] = attention  # eager steps plan the same object
        self._graphs = _DecodeGraphs(self, attention, dict(window_left=window, sm_scale=scaling))
        return True

    def disable_cuda_graphs(self) -> None:
        """Decode eagerly from now on; frees the captured graphs, their buffers and
        their scratch page. A tensor-parallel runner's graphs hold NCCL collectives:
        call this before ``torch.distributed.destroy_process_group``, which otherwise
        can wait forever for them (pytorch#115388)."""
        if self._graphs is not None:
            self._graphs.close()
            self._attention = {k: a for k, a in self._attention.items() if a.graphs is None}
            self._graphs = None

    def graph_batch_limit(self) -> int:
        """The largest decode batch a graph takes (0: graphs off)."""
        graphs = None if self._graphs is None else self._graphs.attention.graphs
        return 0 if graphs is None else graphs.batch_sizes[-1]


def first_workspace(attentions: dict[Any, PagedAttention]) -> Optional[torch.Tensor]:
    """flashinfer's workspace of a runner's first attention object (layers run one at a
    time: one workspace serves all), or None before the first."""
    first = next(iter(attentions.values()), None)
    return None if first is None else first.workspace


def runner_backend(backend: str, window: int, cache: PagedKVCacheManager) -> str:
    """The attention backend of a runner's ``backend`` for one window: where flashinfer
    serves the cache, decode steps run on the Triton kernel if it serves them
    (:func:`~seqattn.attention.triton_decode.decode_backend`)."""
    if backend != "torch" and cache.device.type == "cuda" and flashinfer_or_none() is not None:
        return decode_backend(backend, window, cache)
    return backend


def rank_settings(model: Any, **settings: Any) -> dict[str, str]:
    """What must be equal on every rank of a sharded model, as text: each entry of its
    config (less the path it was read from), its dtype, and the runner's settings."""
    config = {f"config.{k}": v for k, v in model.config.to_dict().items() if k[0] != "_"}
    dtype = next(model.parameters()).dtype
    return {k: repr(v) for k, v in {**config, "dtype": dtype, **settings}.items()}
