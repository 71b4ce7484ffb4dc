"""HuggingFace transformers decoder models on seqattn's paged cache and attention.

transformers (5.x) looks an attention function up by ``config._attn_implementation``
and calls it per layer with the layer's rotated queries and keys and the new values;
every keyword given to the model's forward reaches it. seqattn registers one such
function (``"seqattn"``): it appends the keys and values to the paged cache and runs
:class:`PagedAttention` over each sequence's pages. No model code is forked.

A step's batch is flattened into one row: ``input_ids`` and ``position_ids`` of shape
``[1, num_new_tokens]``, rows grouped by sequence; ``use_cache=False`` (the paged cache
is the cache) and no attention mask (each sequence's own pages are its context). Sliding
windows (Mistral, Qwen2/3 ``layer_types``) become flashinfer's ``window_left``.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch

from .._arrays import concat_ranges
from .._checks import INT64_MAX, exact_bool, exact_int, id_list, int_array, shown
from .._flashinfer import flashinfer_or_none
from .._transfer import upload
from ..attention import CUDAGraphDecodeAttention, PagedAttention
from ..attention.paged_attention import BACKENDS
from ..descriptor import CacheDescriptor
from ..errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    InvalidLengthError,
    SeqAttnError,
    TensorSpecError,
)
from ..packed_data import FlashInferPackedData
from ..page_table import check_distinct
from ..storage import PagedKVCacheManager

ATTENTION_NAME = "seqattn"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def register() -> None:
    """Make ``attn_implementation="seqattn"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)


def paged_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    sliding_window: Optional[int] = None,
    seqattn_step: Optional[_LayerCall] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface, backed by the step's paged cache.

    Args:
        query: ``[1, num_qo_heads, num_new_tokens, head_dim]``, rotated.
        key, value: ``[1, num_kv_heads, num_new_tokens, head_dim]``, this step's tokens.
        seqattn_step: the step's context (passed as a model kwarg by PagedCausalLM).

    Returns:
        ``([1, num_new_tokens, num_qo_heads, head_dim], None)``.
    """
    del attention_mask, dropout, kwargs  # masks come from the page tables; inference only
    if seqattn_step is None:
        raise SeqAttnError(
            "the 'seqattn' attention runs inside PagedCausalLM.forward (it needs the step's "
            "page tables); call the model through seqattn.integrations.hf.PagedCausalLM"
        )
    return seqattn_step.attend(module.layer_idx, query, key, value, scaling, sliding_window), None


class _LayerCall:
    """Where the registered attention function hands a layer's call: the new K/V go to
    the cache, then the queries attend."""

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: Optional[float],
        sliding_window: Optional[int],
    ) -> torch.Tensor:
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
        # HF's window W: a query at p sees keys in (p - W, p]; flashinfer's window_left
        # counts the keys left of the query: W - 1
        window = -1 if sliding_window is None else int(sliding_window) - 1
        return self.append_and_run(layer, q, k, v, window, scaling).unsqueeze(0)

    def append_and_run(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: int,
        scaling: Optional[float],
    ) -> torch.Tensor:
        """``q [tokens, qo_heads, head_dim]``, ``k``/``v [tokens, kv_heads, head_dim]``
        -> the attention output shaped like ``q``."""
        raise NotImplementedError


class StepContext(_LayerCall):
    """One eager forward's batch: where each layer's new K/V go and how attention is
    planned."""

    def __init__(self, runner: PagedCausalLM, packed: FlashInferPackedData) -> None:
        self.runner = runner
        self.packed = packed
        self._planned: dict[tuple[int, Optional[float]], PagedAttention] = {}

    def append_and_run(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: int,
        scaling: Optional[float],
    ) -> torch.Tensor:
        self.runner.cache.append_kv(k, v, self.packed, layer=layer)
        out = self._attention(window, scaling, q.dtype).run(q, layer)
        assert isinstance(out, torch.Tensor)
        return out

    def _attention(
        self, window: int, scaling: Optional[float], dtype: torch.dtype
    ) -> PagedAttention:
        """Planned once per step for each (window, scale) the model's layers use."""
        planned = self._planned.get((window, scaling))
        if planned is None:
            planned = self.runner.attention_for(window, scaling)
            planned.plan(self.packed, window_left=window, sm_scale=scaling, q_dtype=dtype)
            self._planned[(window, scaling)] = planned
        return planned


class GraphStepContext(_LayerCall):
    """Attention inside a captured decode step: the planned bucket's fixed buffers."""

    def __init__(self, decode: CUDAGraphDecodeAttention) -> None:
        self.decode = decode

    def append_and_run(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: int,
        scaling: Optional[float],
    ) -> torch.Tensor:
        del window, scaling  # one variant for all layers, planned per step (_replay)
        self.decode.append_kv(k, v, layer)
        return self.decode.run(q, layer)


class _CapturedStep:
    """A decode step of one bucket: its graph and static inputs and logits."""

    def __init__(self, runner: PagedCausalLM, bucket: int, decode: CUDAGraphDecodeAttention):
        device = runner.device
        self.input_ids = torch.zeros(1, bucket, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(1, bucket, dtype=torch.long, device=device)
        # the graph reads these by address: they must live as long as the graph does
        self.rows = torch.arange(bucket, device=device)
        context = GraphStepContext(decode)
        outputs: list[torch.Tensor] = []

        def forward() -> None:
            with torch.inference_mode():
                outputs.append(runner.model(
                    input_ids=self.input_ids, position_ids=self.position_ids, use_cache=False,
                    logits_to_keep=self.rows, seqattn_step=context,
                ).logits[0])  # fmt: skip

        self.graph = decode.capture(forward)
        self.logits = outputs[-1]  # the captured call's output: replays write it


class PagedCausalLM:
    """A transformers causal LM whose KV cache and attention are seqattn's.

    Args:
        model: a ``*ForCausalLM`` of a supported family (Llama, Mistral, Qwen2, Qwen3);
            it is switched to the ``"seqattn"`` attention implementation.
        num_pages: pages in the KV pool.
        page_size: tokens per page.
        prefix_caching: share cached prompt prefixes between sequences.
        backend: attention backend, as :class:`PagedAttention`: ``"auto"`` (flashinfer on
            CUDA), ``"flashinfer"`` or ``"torch"``.

    Raises:
        ArgumentTypeError: ``model`` is not a torch module with a config, or an argument
            of the wrong type (``num_pages=2.5``, ``prefix_caching=1``, ``backend=None``).
        InvalidArgumentError: an unsupported model family, a model without a language
            model head (e.g. ``LlamaModel``), a size < 1, or an unknown backend.
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
    ) -> None:
        check_model(model)
        num_pages = exact_int(num_pages, "num_pages", low=1, high=INT64_MAX)
        page_size = exact_int(page_size, "page_size", low=1, high=INT64_MAX)
        prefix_caching = bool(exact_bool(prefix_caching, "prefix_caching"))
        check_backend(backend)
        config = model.config
        param = next(model.parameters())
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        # the pool first: if its sizes are refused, the model is still as it came
        self.cache = PagedKVCacheManager(
            num_pages, page_size, config.num_key_value_heads, head_dim, param.dtype,
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
        self._graph_decode: Optional[CUDAGraphDecodeAttention] = None
        self._graphs: dict[int, _CapturedStep] = {}
        self._graph_plan: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return self.cache.device

    @property
    def reserved_pages(self) -> int:
        """Pages of the pool the runner holds for itself: the scratch page that padded
        CUDA-graph decode rows write into, while graphs are on; 0 otherwise."""
        return 0 if self._graph_decode is None else 1

    def attention_for(self, window: int, scaling: Optional[float]) -> PagedAttention:
        """The attention object of one (window, scale) variant, made once."""
        key = (window, scaling)
        if key not in self._attention:
            heads = self.config.num_attention_heads
            first = next(iter(self._attention.values()), None)  # layers run one at a time:
            workspace = None if first is None else first.workspace  # one workspace serves all
            self._attention[key] = PagedAttention(
                self.cache, heads, backend=self.backend, workspace=workspace
            )
        return self._attention[key]

    @torch.inference_mode()
    def forward(self, seq_ids: list[int], tokens: list[list[int]]) -> torch.Tensor:
        """Run the model on each sequence's new tokens; logits of each one's last token.

        The tokens must be allocated already (``descriptor.allocate`` /
        ``allocate_decoding``): they are the newest ``len(tokens[i])`` of sequence
        ``seq_ids[i]``, at positions ``seq_len - len(tokens[i]) ..``.

        Args:
            seq_ids: live sequences, each once, ``[batch]`` integers.
            tokens: one non-empty row of token ids per sequence, each ``[n_i]``
                integers in ``[0, vocab_size)`` (lists, numpy arrays or tensors; checked
                on the host, before the model runs).

        Returns:
            ``shape: [len(seq_ids), vocab_size]``, the model's dtype, on its device.

        Raises:
            ArgumentTypeError: ids or tokens that are not integers, or ``tokens`` not a
                sequence of rows.
            InvalidArgumentError: a token id outside the vocabulary.
            InvalidLengthError: no sequence, a row count other than ``len(seq_ids)``, an
                empty row, or a row longer than its sequence (not allocated).
            DuplicateSequenceError: an id listed twice.
            UnknownSequenceError: an id that is not live.
        """
        seq_ids = self._batch_ids(seq_ids)
        rows = self._token_rows(tokens, len(seq_ids))
        lens = np.array([row.size for row in rows], dtype=np.int64)
        ends = self.descriptor.seq_lens(seq_ids).astype(np.int64)
        self._check_allocated(seq_ids, ends, lens)
        flat = np.concatenate(rows)
        # tokens, positions and each sequence's last row go up in one asynchronous copy
        inputs = self._upload(flat, concat_ranges(ends - lens, lens), np.cumsum(lens) - 1)
        return self._run(seq_ids, lens, inputs[0], inputs[1], inputs[2])

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
        seq_ids = self._batch_ids(seq_ids)
        n = len(seq_ids)
        if isinstance(tokens, torch.Tensor) and tokens.device.type != "cpu":
            self._check_device_tokens(tokens, n)
        else:
            tokens = self._token_row(tokens, "tokens")
            if tokens.size != n:
                raise InvalidLengthError(f"pass one token per sequence ({n}), got {tokens.size}")
        lens = self.descriptor.seq_lens(seq_ids).astype(np.int64)
        self._check_allocated(seq_ids, lens, np.ones(n, np.int64))
        positions = lens - 1
        if 0 < n <= self.graph_batch_limit():
            return self._replay(seq_ids, tokens, positions)
        if isinstance(tokens, torch.Tensor):
            positions_t, rows = self._upload(positions, np.arange(n))
            return self._run(seq_ids, np.ones(n, np.int64), tokens, positions_t, rows)
        inputs = self._upload(np.asarray(tokens, dtype=np.int64), positions, np.arange(n))
        return self._run(seq_ids, np.ones(n, np.int64), *inputs)

    def _run(
        self,
        seq_ids: list[int],
        lens: np.ndarray,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        last_rows: torch.Tensor,
    ) -> torch.Tensor:
        """The eager forward of one flat row of new tokens (tensors on the model's device)."""
        packed = self.descriptor.pack_for_flashinfer(seq_ids, lens.tolist(), device=self.device)
        output = self.model(
            input_ids=tokens[None], position_ids=positions[None], use_cache=False,
            logits_to_keep=last_rows, seqattn_step=StepContext(self, packed),
        )  # fmt: skip
        return output.logits[0]

    # --------------------------------------------------------------------- checks
    def _batch_ids(self, seq_ids: object) -> list[int]:
        """A step's sequence ids: integers, at least one, none twice."""
        ids = id_list(seq_ids, "seq_ids")
        if not ids:
            raise InvalidLengthError("a forward needs at least one sequence, got none")
        check_distinct(ids)
        return ids

    def _token_row(self, tokens: object, what: str) -> np.ndarray:
        """``[n]`` int64 token ids, each inside the model's vocabulary."""
        row = int_array(tokens, what)
        if row.size and (int(row.min()) < 0 or int(row.max()) >= self.vocab_size):
            bad = row[(row < 0) | (row >= self.vocab_size)][:8].tolist()
            raise InvalidArgumentError(
                f"{what}: token ids must lie in [0, {self.vocab_size}) (the model's "
                f"vocabulary), got {bad}"
            )
        return row

    def _token_rows(self, tokens: Any, n: int) -> list[np.ndarray]:
        """One non-empty checked row per sequence."""
        if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
            raise ArgumentTypeError(
                f"tokens must be one sequence of token ids per sequence, got {shown(tokens)}"
            )
        rows = [self._token_row(row, f"tokens[{i}]") for i, row in enumerate(tokens)]
        if len(rows) != n:
            raise InvalidLengthError(f"pass one token row per sequence ({n}), got {len(rows)}")
        empty = [i for i, row in enumerate(rows) if row.size == 0]
        if empty:
            raise InvalidLengthError(f"every token row needs a token; rows {empty[:8]} are empty")
        return rows

    def _check_device_tokens(self, tokens: torch.Tensor, n: int) -> None:
        """dtype, shape and device of tokens on the device (values stay unread)."""
        device, where = self.device, tokens.device
        index_ok = None in (where.index, device.index) or where.index == device.index
        same = where.type == device.type and index_ok
        if tokens.dtype != torch.int64 or tuple(tokens.shape) != (n,) or not same:
            raise TensorSpecError(
                f"tokens on the device must be torch.int64 of shape [{n}] on {device}, got "
                f"{tokens.dtype} of shape {list(tokens.shape)} on {tokens.device}"
            )

    def _check_allocated(self, seq_ids: list[int], lens: np.ndarray, new: np.ndarray) -> None:
        """Each sequence already holds its new tokens (allocated before the forward)."""
        short = np.flatnonzero(lens < new)
        if short.size:
            i = int(short[0])
            raise InvalidLengthError(
                f"sequence {seq_ids[i]} holds {int(lens[i])} tokens, fewer than the "
                f"{int(new[i])} new ones passed: allocate them first"
            )

    def _upload(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """int64 host arrays on the model's device, through one pinned, non-blocking copy."""
        return upload(self.device, list(arrays), dtype=torch.int64)[0]

    # --------------------------------------------------------------- CUDA graphs
    def enable_cuda_graphs(self, batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> bool:
        """Replay decode steps from CUDA graphs (one per batch-size bucket, captured on
        first use). Needs flashinfer and one attention variant for all layers (one
        window); returns whether graphs are on. Calling it again with the same buckets
        keeps the graphs captured so far; other buckets replace them. Without flashinfer
        (``backend="auto"`` on a CUDA machine where it does not import) graphs stay off."""
        variants = attention_variants(self.model)
        usable = self.device.type == "cuda" and self.backend != "torch"
        if not usable or len(variants) != 1 or flashinfer_or_none() is None:
            self.disable_cuda_graphs()
            return False
        current = self._graph_decode
        if current is not None and current.batch_sizes == sorted(set(batch_sizes)):
            return True
        # graphs captured on the old buckets' buffers must never replay with new plans
        self.disable_cuda_graphs()
        window, scaling = variants.pop()
        heads = self.config.num_attention_heads
        self._graph_decode = CUDAGraphDecodeAttention(self.cache, heads, batch_sizes=batch_sizes)
        self._graph_plan = dict(window_left=window, sm_scale=scaling)
        return True

    def disable_cuda_graphs(self) -> None:
        """Decode eagerly from now on; frees the captured graphs, their buffers and
        their scratch page."""
        if self._graph_decode is None:
            return
        torch.cuda.synchronize(self.device)  # no replay may still read what is freed
        self._graphs.clear()
        self._graph_decode.close()
        self._graph_decode = None

    def graph_batch_limit(self) -> int:
        """The largest decode batch a graph takes (0: graphs off)."""
        decode = self._graph_decode
        return 0 if decode is None else decode.batch_sizes[-1]

    def _replay(
        self,
        seq_ids: list[int],
        tokens: Union[list[int], torch.Tensor],
        positions: np.ndarray,
    ) -> torch.Tensor:
        """A decode step replayed from its bucket's graph (captured on first use)."""
        decode = self._graph_decode
        assert decode is not None
        n = len(seq_ids)
        packed = self.descriptor.pack_for_flashinfer(seq_ids, [1] * n, device=self.device)
        bucket = decode.plan(packed, q_dtype=self.cache.dtype, **self._graph_plan)
        step = self._graphs.get(bucket)
        if step is None:
            step = self._graphs[bucket] = _CapturedStep(self, bucket, decode)
        # padding rows read position 0 and whatever valid token id their row holds
        padded = np.zeros(bucket, dtype=np.int64)
        padded[:n] = positions
        if isinstance(tokens, torch.Tensor):
            step.input_ids[0, :n].copy_(tokens)
            (position_ids,) = self._upload(padded)
        else:
            ids, position_ids = self._upload(np.asarray(tokens, dtype=np.int64), padded)
            step.input_ids[0, :n].copy_(ids)
        step.position_ids[0].copy_(position_ids)
        step.graph.replay()
        return step.logits[:n]


def attention_variants(model: Any) -> set[tuple[int, Optional[float]]]:
    """The (window_left, scale) pairs the model's attention layers use."""
    config = model.config
    variants: set[tuple[int, Optional[float]]] = set()
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "scaling"):
            window = getattr(module, "sliding_window", getattr(config, "sliding_window", None))
            variants.add((-1 if window is None else int(window) - 1, float(module.scaling)))
    return variants


def check_model(model: Any) -> None:
    """Raise unless ``model`` is a ``*ForCausalLM`` of a family seqattn runs.

    Raises:
        ArgumentTypeError: not a torch module with a ``config``.
        InvalidArgumentError: an unsupported family, no language-model head (a base
            model such as ``LlamaModel``), or no parameters.
    """
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        raise ArgumentTypeError(
            f"model must be a transformers *ForCausalLM (a torch module with a config), "
            f"got {shown(model)}"
        )
    check_supported(model.config)
    heads = getattr(model, "get_output_embeddings", None)
    if heads is None or heads() is None:
        raise InvalidArgumentError(
            f"model must be a *ForCausalLM with a language-model head; "
            f"{type(model).__name__} has none (a base model?)"
        )
    if next(model.parameters(), None) is None:
        raise InvalidArgumentError(f"model {type(model).__name__} has no parameters")


def check_backend(backend: object) -> None:
    """Raise unless ``backend`` names an attention backend."""
    if not isinstance(backend, str):
        raise ArgumentTypeError(f"backend must be one of {BACKENDS}, got {shown(backend)}")
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_supported(config: Any) -> None:
    """Raise InvalidArgumentError unless ``config`` is a decoder family seqattn runs
    (Llama-like attention)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgumentError(
            f"model type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
