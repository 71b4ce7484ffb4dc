"""HuggingFace transformers decoder models served on a head-wise paged KV cache, with a
KV-compression policy ("press") per request: :class:`HeadwiseCausalLM`.

Like :class:`~.hf.PagedCausalLM`, a step's batch is one flat row of new tokens
(``input_ids`` and ``position_ids`` of shape ``[1, num_new_tokens]``, grouped by
sequence) and the model runs unchanged, its attention switched to
``"seqattn_headwise"`` (:mod:`.hf_headwise_attention`). Unlike it, the cache is a
:class:`~seqattn.headwise.HeadwiseKVCache` (a page list per layer, sequence and KV
head, one pool for all), and each sequence may drop tokens head by head.

When a press runs (see :mod:`.press_requests`): after the last chunk of a prompt (the
caller marks it: ``forward(..., ends_prompt=True)``, the default) and, with
``compress_every=N``, every ``N`` decode steps after. It runs inside that step, on each
layer right after the layer's attention, so the step's own logits still see every
token the cache held when the step began. Kept tokens keep their positions; new tokens
take the sequence's next position (its logical length), as RoPE expects.

A press reads the rotated queries of the sequence's newest ``min(window, seq_len)``
tokens, every layer's kept in a small ring per sequence (:mod:`.query_window`), so a
prompt's last chunk may be shorter than the window and a decode step may press again.
Decode steps without a press may replay CUDA graphs (:mod:`.hf_headwise_graphs`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch

from .._checks import INT64_MAX, exact_bool, exact_int, id_list, shown
from ..errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    InvalidLengthError,
    UnknownSequenceError,
)
from ..headwise import HeadwiseAttention, HeadwiseKVCache
from .hf_checks import (
    attention_variants,
    batch_ids,
    check_backend,
    check_device_tokens,
    check_model,
    head_dim_of,
    token_rows,
)
from .hf_checks import decode_tokens as checked_decode_tokens
from .hf_headwise_attention import (
    HEADWISE_ATTENTION_NAME,
    HeadwiseStepContext,
    eager_forward,
    register_headwise,
)
from .hf_headwise_graphs import HeadwiseDecodeGraphs, decode_graphs
from .press_requests import (
    PressRequest,
    after_step,
    check_prompts_ended,
    compress_layer,
    press_request,
)
from .query_window import QueryWindows


class HeadwiseCausalLM:
    """A transformers causal LM on a head-wise paged KV cache, a press per request.

    Args:
        model: a ``*ForCausalLM`` of a supported family (Llama, Mistral, Qwen2, Qwen3)
            without sliding-window layers (head-wise attention counts held tokens, not
            positions); it is switched to the ``"seqattn_headwise"`` attention.
        num_pages: pages in the pool all layers and heads share; a page holds
            ``page_size`` tokens of one KV head of one layer.
        page_size: tokens per page.
        backend: ``"auto"`` (flashinfer on CUDA, torch elsewhere), ``"flashinfer"`` or
            ``"torch"``, as :class:`~seqattn.headwise.HeadwiseAttention`.

    Attributes:
        cache: the :class:`~seqattn.headwise.HeadwiseKVCache` (lengths, positions each
            head holds, memory: ``memory_bytes()`` against ``full_cache_bytes()``).
        requests: each live sequence's :class:`~.press_requests.PressRequest`.
        last_compressed: the sequences the last forward/decode compressed.

    A sequence starts with :meth:`add_sequences` (its press and budget), prefills with
    :meth:`forward` (one call, or chunks: ``ends_prompt=False`` on all but the last),
    generates with :meth:`decode` and ends with :meth:`release`. Every call checks its
    arguments before it changes anything. An error inside the model's forward (a
    press that raises, a device error) leaves that step's sequences unusable; the other
    sequences go on, and :meth:`release` frees the failed ones. Decode steps may replay
    CUDA graphs (:meth:`enable_cuda_graphs`); tensor-parallel models are not supported.

    Raises:
        ArgumentTypeError: as :class:`~.hf.PagedCausalLM` (a model that is not a torch
            module with a config, a setting of the wrong type).
        InvalidArgumentError: an unsupported model family, a model without a head, a
            size < 1, an unknown backend, a sliding-window model, a tensor-parallel one.
        Every check runs before the model is switched to the head-wise attention.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from seqattn.headwise.press import StreamingLLMPress
        >>> config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> runner = HeadwiseCausalLM(LlamaForCausalLM(config).eval(), num_pages=64, page_size=4)
        >>> runner.add_sequences([0], press=StreamingLLMPress(sinks=2), budget=0.5)
        >>> logits = runner.forward([0], [list(range(1, 13))])  # 12 tokens, pressed to 6
        >>> logits.shape, runner.cache.head_lens(0, 0).tolist(), runner.seq_len(0)
        (torch.Size([1, 64]), [6, 6], 12)
        >>> logits = runner.decode([0], logits.argmax(-1))      # the next token: position 12
        >>> runner.cache.head_positions(0, 0, head=1).tolist()
        [0, 1, 8, 9, 10, 11, 12]
        >>> runner.release([0]); runner.cache.available_pages_count
        64
    """

    def __init__(
        self, model: Any, *, num_pages: int, page_size: int = 16, backend: str = "auto"
    ) -> None:
        check_model(model)
        num_pages = exact_int(num_pages, "num_pages", low=1, high=INT64_MAX)
        page_size = exact_int(page_size, "page_size", low=1, high=INT64_MAX)
        check_backend(backend)
        self.scale = single_scale(model)
        param, config = next(model.parameters()), model.config
        heads = config.num_attention_heads
        head_dim = head_dim_of(config)
        layers = config.num_hidden_layers
        # cache and attention first: if either is refused, the model is still as it came
        self.cache = HeadwiseKVCache(num_pages, page_size, layers, config.num_key_value_heads,
                                     head_dim, param.dtype, param.device)  # fmt: skip
        self.attention = HeadwiseAttention(self.cache, heads, backend=backend)
        register_headwise()
        model.set_attn_implementation(HEADWISE_ATTENTION_NAME)
        self.model, self.config = model, config
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.windows = QueryWindows(layers, heads, head_dim, param.dtype, param.device)
        self.requests: dict[int, PressRequest] = {}
        self.last_compressed: tuple[int, ...] = ()
        self._failed: set[int] = set()  # sequences of a step that raised mid-forward
        self._graphs: Optional[HeadwiseDecodeGraphs] = None

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def seq_len(self, seq_id: int) -> int:
        """A sequence's logical length: every token it was given, kept or not."""
        return self.cache.seq_len(seq_id)

    def held_positions(self, seq_id: int) -> list[list[np.ndarray]]:
        """The positions each KV head holds, ``[layer][head]`` increasing int64 arrays."""
        heads = range(self.cache.num_kv_heads)
        return [[self.cache.head_positions(layer, seq_id, h) for h in heads]
                for layer in range(self.cache.num_layers)]  # fmt: skip

    # ------------------------------------------------------------------ sequences
    def add_sequences(
        self,
        seq_ids: Sequence[int],
        *,
        press: Any = None,
        budget: Union[int, float, None] = None,
        compress_every: Union[int, None] = None,
    ) -> None:
        """Start empty sequences that share one press setting.

        Args:
            seq_ids: new ids.
            press: a :class:`~seqattn.headwise.press.Press`, or None to keep every token.
            budget: with a press (and only then): tokens per KV head on average over the
                model, an ``int`` >= 1, or a ``float`` in ``(0, 1]``: that fraction of
                the sequence's logical length when the press runs.
            compress_every: with a press: press again every this many decode steps
                after the prompt's; None: only when a prompt ends.

        Raises:
            ArgumentTypeError, InvalidArgumentError, InvalidLengthError: bad settings
            (a press without a budget, a budget of 0 or 1.5, ``compress_every=0``).
            SequenceExistsError, DuplicateSequenceError: an id live or given twice.
            Nothing changed.
        """
        ids = id_list(seq_ids)
        settings = press_request(press, budget, compress_every)
        self.cache.add_sequences(ids)
        for seq_id in ids:
            self.requests[seq_id] = PressRequest(settings.press, settings.budget,
                                                 settings.compress_every)  # fmt: skip
            if settings.window:
                self.windows.track(seq_id, settings.window)

    def release(self, seq_ids: Sequence[int]) -> None:
        """End sequences; their pages (every layer and head) go back to the pool.

        Raises:
            UnknownSequenceError, DuplicateSequenceError: an id not live or given twice.
        """
        ids = id_list(seq_ids)
        self.cache.release(ids)
        for seq_id in ids:
            del self.requests[seq_id]
            self.windows.forget(seq_id)
            self._failed.discard(seq_id)

    # ---------------------------------------------------------------------- steps
    def forward(
        self, seq_ids: Sequence[int], tokens: Any, *, ends_prompt: Any = True
    ) -> torch.Tensor:
        """Prefill: run each sequence's next prompt tokens; logits of each one's last.

        Args:
            seq_ids: live sequences, each once, ``[batch]`` integers.
            tokens: one non-empty row of token ids per sequence, ``[n_i]`` integers in
                ``[0, vocab_size)`` (lists, numpy arrays or tensors): they take positions
                ``seq_len .. seq_len + n_i - 1``.
            ends_prompt: whether this call ends each sequence's prompt (a bool for all,
                or one per sequence). A sequence whose prompt ends is pressed inside this
                call and may decode afterwards; ``False`` leaves the prompt open for the
                next chunk. A later forward (say a new user turn) opens a prompt again.

        Returns:
            ``shape: [len(seq_ids), vocab_size]``, the model's dtype, on its device.

        Raises:
            ArgumentTypeError: ids, tokens or ``ends_prompt`` of the wrong type.
            InvalidArgumentError: a token id outside the vocabulary; a sequence whose
                earlier step failed.
            InvalidLengthError: no sequence, a row count other than ``len(seq_ids)``, an
                empty row, an ``ends_prompt`` list of another length.
            DuplicateSequenceError, UnknownSequenceError: an id twice, or not live.
            NoPageError: the pool lacks pages for the tokens in every layer and head.
            Nothing changed.
        """
        return self.step([], [], seq_ids, tokens, ends_prompt=ends_prompt)

    def decode(self, seq_ids: Sequence[int], tokens: Any) -> torch.Tensor:
        """One decode step: one new token per sequence, at its next position.

        Args:
            seq_ids: live sequences whose prompt has ended, each once.
            tokens: their new tokens, ``[len(seq_ids)]``: a list, numpy array or CPU
                tensor of integers in ``[0, vocab_size)`` (checked), or an int64 tensor
                on the model's device (dtype, shape and device checked, values not).

        Returns:
            ``shape: [len(seq_ids), vocab_size]``: the logits of each new token.

        Raises:
            InvalidArgumentError: a sequence whose prompt is still open (its last
                forward passed ``ends_prompt=False``) or that has none yet. The rest as
                :meth:`forward` (TensorSpecError for a bad device tensor). Nothing changed.
        """
        return self.step(seq_ids, tokens, [], [])

    @torch.inference_mode()
    def step(
        self,
        decode_ids: Sequence[int],
        decode_tokens: Any,
        prompt_ids: Sequence[int],
        prompt_tokens: Any,
        *,
        ends_prompt: Any = True,
    ) -> torch.Tensor:
        """:meth:`decode` of ``decode_ids`` and :meth:`forward` of ``prompt_ids`` in one
        model call (an engine's mixed step). Decode rows count towards
        ``compress_every`` (and press when it is due); a prompt row whose
        ``ends_prompt`` flag is set presses its sequence.

        Args:
            decode_ids, decode_tokens: ``[d]`` ids (maybe none) and tokens, as :meth:`decode`.
            prompt_ids, prompt_tokens: ``[p]`` ids (maybe none, none in ``decode_ids``)
                and rows, and ``ends_prompt`` (a bool, or ``[p]``), as :meth:`forward`.

        Returns:
            ``shape: [d + p, vocab_size]``: the logits of each sequence's last new
            token, decode rows first, in the order given.

        Raises:
            As :meth:`forward` and :meth:`decode` (InvalidLengthError: no id at all).
            Nothing changed.
        """
        dec_ids, pre_ids = id_list(decode_ids, "decode_ids"), id_list(prompt_ids, "prompt_ids")
        ids = live_ids(dec_ids + pre_ids, self.requests, self._failed)
        d = len(dec_ids)
        if isinstance(decode_tokens, torch.Tensor) and decode_tokens.device.type != "cpu":
            check_device_tokens(decode_tokens, d, self.device)
            dec = decode_tokens
        else:
            dec = checked_decode_tokens(decode_tokens, d, self.vocab_size) if d else _NO_TOKENS
        rows = token_rows(prompt_tokens, len(pre_ids), self.vocab_size) if pre_ids else []
        ends = ends_flags(ends_prompt, len(pre_ids))
        check_prompts_ended(self.requests, dec_ids)
        pressed = [s for s in dec_ids if self.requests[s].compresses_in_decode()]
        pressed += [s for s, e in zip(pre_ids, ends, strict=True) if e and self.requests[s].press]
        lens = np.array([1] * d + [row.size for row in rows], dtype=np.int64)
        logits = self._run(ids, lens, _joined(dec, rows, self.device), pressed)
        after_step(self.requests, dec_ids, dict(zip(pre_ids, ends, strict=True)), pressed)
        return logits

    @property
    def failed(self) -> frozenset[int]:
        """Sequences of a step that raised mid-forward: refused until released."""
        return frozenset(self._failed)

    def _run(
        self,
        ids: list[int],
        lens: np.ndarray,
        tokens: Union[np.ndarray, torch.Tensor],
        pressed: list[int],
    ) -> torch.Tensor:
        """One forward of ``lens[b]`` new tokens per sequence (a flat ``[sum(lens)]`` row,
        on the host or the device); presses ``pressed`` after each layer's attention. A
        decode step without a press replays a CUDA graph when graphs are on."""
        starts = np.array([self.cache.seq_len(s) for s in ids], dtype=np.int64)
        new_lens = dict(zip(ids, (starts + lens).tolist(), strict=True))
        budgets = {s: self.requests[s].tokens_per_head(new_lens[s]) for s in pressed}
        rows = self.windows.step_rows(ids, starts, lens)
        replay = self._graphs is not None and not pressed and self._graphs.takes(lens)
        # NoPageError and co.: nothing changed (a replay uploads its tables itself)
        step = self.cache.begin_step(ids, lens, on_device=not replay)
        context = HeadwiseStepContext(self.cache, self.attention, step, self.windows, rows,
                                      lambda layer: self._press(layer, budgets))  # fmt: skip
        self.last_compressed = ()
        try:
            if replay:
                logits = self._graphs.replay(step, tokens, starts, rows)  # type: ignore[union-attr]
            else:
                logits = eager_forward(self.model, context, tokens, starts, lens, self.scale)
        except BaseException:
            self._failed.update(ids)  # refused from now on, until released
            context.abandon()
            raise
        self.last_compressed = tuple(pressed)
        return logits

    # --------------------------------------------------------------- CUDA graphs
    def enable_cuda_graphs(self, batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> bool:
        """Replay decode steps without a press from CUDA graphs, one per batch-size
        bucket (captured on first use; attention by the Triton decode kernel). Needs a
        CUDA model in float16/bfloat16 with a power-of-two head size and triton;
        returns whether graphs are on. The same buckets again keep the graphs."""
        self._graphs = decode_graphs(self._graphs, self.model, self.attention, self.windows,
                                     batch_sizes, self.scale)  # fmt: skip
        return self._graphs is not None

    def disable_cuda_graphs(self) -> None:
        """Decode eagerly from now on; frees the graphs and their scratch page."""
        if self._graphs is not None:
            self._graphs.close()
            self._graphs = None

    @property
    def reserved_pages(self) -> int:
        """Pages of the pool no sequence can take: the scratch page of CUDA graphs."""
        return 0 if self._graphs is None else 1

    def _press(self, layer: int, budgets: dict[int, int]) -> None:
        for seq_id, budget in budgets.items():
            request = self.requests[seq_id]
            compress_layer(self.cache, self.windows, layer, seq_id, request, budget, self.scale)


_NO_TOKENS = np.zeros(0, dtype=np.int64)


def live_ids(seq_ids: object, live: Collection[int], failed: set[int]) -> list[int]:
    """A step's ids: integers, at least one, none twice, each ``live`` and not ``failed``."""
    ids = batch_ids(seq_ids)
    unknown = [s for s in ids if s not in live]
    if unknown:
        raise UnknownSequenceError(
            f"sequences {unknown[:8]} are not live in this runner; add_sequences first"
        )
    stuck = sorted(failed.intersection(ids))
    if stuck:
        raise InvalidArgumentError(
            f"sequences {stuck[:8]} were in a step that failed inside the model's "
            "forward and hold a half-written step: release them"
        )
    return ids


def _joined(
    decode: Union[np.ndarray, torch.Tensor], rows: list[np.ndarray], device: torch.device
) -> Union[np.ndarray, torch.Tensor]:
    """A step's flat ``[sum(lens)]`` token row: the decode tokens, then each prompt row
    (on the device when the decode tokens are)."""
    if not rows:
        return decode
    if isinstance(decode, torch.Tensor):
        tail = torch.as_tensor(np.concatenate(rows), device=device)
        return torch.cat([decode.to(torch.int64), tail])
    return np.concatenate([decode, *rows])


def ends_flags(ends_prompt: object, n: int) -> list[bool]:
    """``ends_prompt`` as one bool per sequence (a bool, or a sequence of ``n`` bools)."""
    if isinstance(ends_prompt, (bool, np.bool_)):
        return [bool(ends_prompt)] * n
    if isinstance(ends_prompt, (str, bytes)) or not hasattr(ends_prompt, "__iter__"):
        raise ArgumentTypeError(
            f"ends_prompt must be a bool or one bool per sequence, got {shown(ends_prompt)}"
        )
    flags = [bool(exact_bool(f, f"ends_prompt[{i}]")) for i, f in enumerate(ends_prompt)]
    if len(flags) != n:
        raise InvalidLengthError(f"pass one ends_prompt flag per sequence ({n}), got {len(flags)}")
    return flags


def single_scale(model: Any) -> float:
    """The one softmax scale of the model's attention layers; InvalidArgumentError for a
    sliding-window layer or layers of different scales (one plan serves every layer)."""
    variants = attention_variants(model)
    windows = ", ".join(str(w + 1) for w in sorted({w for w, _ in variants if w != -1}))
    if windows:
        raise InvalidArgumentError(
            f"head-wise serving does not run sliding-window attention (this model has "
            f"windows of {windows} tokens): a compressed head's window would count held "
            "tokens, not positions"
        )
    scales = {s for _, s in variants}
    if len(scales) != 1:
        raise InvalidArgumentError(
            f"head-wise serving needs one softmax scale for every layer, got {sorted(scales)}"
        )
    return float(scales.pop())  # type: ignore[arg-type]
