"""A Llama-family forward by fused operations, for steps that are not compiled.

transformers' Llama decoder layer is about forty torch ops: in an eager decode step each
is a kernel launch that costs the host more than the GPU spends on it, so the step runs
at the pace of the Python above the kernels. :class:`FusedLlama` runs the same model from
the same parameters in nine launches a layer: RMSNorm with the residual add before it
(:func:`.layer_ops.rms_norm`), the query, key and value projections as one matmul over
their stacked weights (re-homed as views of one buffer, as the compiled path stacks
them, see :mod:`.fused_linears`), the rotary embedding and the head split in one launch
(:func:`.layer_ops.rotary_split`), seqattn's append and attention (the step's
:class:`~.hf_attention.StepContext`, as transformers' path calls it), the output
projection, RMSNorm again, gate and up projections stacked, ``silu(gate) * up``
(:func:`.layer_ops.silu_mul`) and the down projection. The embedding, transformers' own
rotary module (so every rope scaling it knows), the final norm and ``lm_head`` on the
kept rows frame them. The projections of a decode step's few rows run as a Triton GEMM
(:func:`.layer_ops.linear`) and, on Hopper GPUs, every launch of a layer is a
programmatic dependent launch: each kernel starts while the one before it still runs
and waits for it first, which hides the launches' latency (a 64-row step's CUDA graph
took 1.15-1.17 ms on an H200 against 1.26 ms with cuBLAS and plain launches).

It serves transformers' ``LlamaForCausalLM`` and the families built the same way,
``MistralForCausalLM`` and ``Qwen2ForCausalLM`` (biases on q/k/v; each layer's sliding
window passed to the attention as transformers' module passes it), made of their own
classes (not subclasses) with plain ``nn.Linear`` projections of plain tensors, all of
one dtype and device, and ``silu``. :meth:`FusedLlama.usable` hands a step back to
transformers' forward while the model is in training mode or any module has a hook (a
forward or pre-forward hook, accelerate's) or a forward of its own, so hooks always run.

Example::

    >>> import torch, transformers
    >>> from seqattn.integrations.hf_fused import FusedLlama
    >>> config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    ...     vocab_size=50)
    >>> model = transformers.LlamaForCausalLM(config).eval()
    >>> FusedLlama.refusal(model) is None
    True
    >>> FusedLlama.refusal(torch.nn.Linear(2, 2))
    'a transformers Llama, Mistral or Qwen2 causal LM (got Linear)'
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from attrs import define

from .._checks import exact_bool
from ..attention.triton_decode import triton_or_none
from ..errors import InvalidArgumentError, SeqAttnError
from .fused_linears import stacked_views
from .hf_attention import StepContext
from .hf_checks import sliding_window
from .layer_ops import linear, rms_norm, rotary_split, silu_mul


@define(slots=True, frozen=True)
class _Layer:
    """One decoder layer's parameters as :meth:`FusedLlama.forward` reads them."""

    index: int  # the attention's layer_idx: which cache layer it reads and writes
    input_norm: torch.Tensor
    qkv: tuple[torch.Tensor, Optional[torch.Tensor]]  # stacked weight, bias
    o: tuple[torch.Tensor, Optional[torch.Tensor]]
    post_norm: torch.Tensor
    gate_up: tuple[torch.Tensor, Optional[torch.Tensor]]
    down: tuple[torch.Tensor, Optional[torch.Tensor]]
    scaling: float
    window: Optional[int]  # the sliding_window transformers' module passes (None: none)
    stacked_from: tuple[tuple[torch.Tensor, int], ...]  # stacked parameters, their addresses


class FusedLlama:
    """A supported model's forward in fused launches (see the module's description).

    Args:
        model: a causal LM that :meth:`refusal` accepts (its sibling projections'
            weights are re-homed as views of stacked buffers: same values).
    """

    def __init__(self, model: Any) -> None:
        why = self.refusal(model)
        if why is not None:
            raise InvalidArgumentError(f"FusedLlama needs {why}")
        self.model = model
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.eps = float(model.model.norm.variance_epsilon)
        inner = model.model
        self.layers = [_layer(layer, config) for layer in inner.layers[: config.num_hidden_layers]]
        self.head_dim = inner.layers[0].self_attn.head_dim
        self._modules = list(model.modules())

    @staticmethod
    def refusal(model: Any) -> Optional[str]:
        """None if :class:`FusedLlama` serves ``model``, else what it would need."""
        family = families().get(type(model))
        if family is None:
            return f"a transformers Llama, Mistral or Qwen2 causal LM (got {type(model).__name__})"
        model_kind, layer_kind, attention_kind, mlp_kind, norm_kind = family
        config, inner = model.config, model.model
        layers = inner.layers[: config.num_hidden_layers]
        kinds = [(inner, model_kind), (inner.norm, norm_kind)]
        for layer in layers:
            kinds += [(layer, layer_kind), (layer.self_attn, attention_kind),
                      (layer.mlp, mlp_kind), (layer.input_layernorm, norm_kind),
                      (layer.post_attention_layernorm, norm_kind)]  # fmt: skip
        for module, kind in kinds:
            if type(module) is not kind:
                return f"transformers' {kind.__name__} (got {type(module).__name__})"
        for group in [(m.q_proj, m.k_proj, m.v_proj) for m in (x.self_attn for x in layers)] + [
            (m.gate_proj, m.up_proj) for m in (x.mlp for x in layers)
        ]:
            if len({linear.bias is None for linear in group}) > 1:
                return "sibling projections with biases on all or none"
        if getattr(config, "hidden_act", None) != "silu":
            return f"hidden_act 'silu' (got {getattr(config, 'hidden_act', None)!r})"
        if layers[0].self_attn.head_dim % 2:
            return f"an even head_dim (got {layers[0].self_attn.head_dim})"
        params = list(model.parameters())
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        if any(type(m) is not torch.nn.Linear for m in linears) or any(
            type(p.data) is not torch.Tensor
            or p.dtype != params[0].dtype
            or p.device != params[0].device
            for p in params
        ):
            return "plain nn.Linear layers of plain tensors, all of one dtype and device"
        return None

    def usable(self) -> bool:
        """Whether a step may run here now (else transformers' forward runs it): the
        model in eval mode, no module with a hook or a forward of its own."""
        if self.model.training or _global_hooks():
            return False
        for module in self._modules:
            if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
                return False
        return True

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        step: StepContext,
        kept_rows: torch.Tensor,
    ) -> torch.Tensor:
        """The logits of the step's kept rows.

        Args:
            input_ids: ``[rows]`` int64 token ids, on the model's device.
            positions: ``[rows]`` int64, each row's position in its sequence.
            step: the step's attention (appends each layer's keys and values, attends).
            kept_rows: ``[n]`` int64 row indices whose logits to return.

        Returns:
            ``[n, vocab_size]``, the model's dtype.
        """
        for layer in self.layers:  # before any layer writes the cache
            _check_stacked(layer)
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(hidden[None], position_ids=positions[None])
        cos, sin = cos[0], sin[0]
        rows, layers = hidden.shape[0], self.layers
        normed, residual = rms_norm(hidden, layers[0].input_norm, self.eps)
        for i, layer in enumerate(layers):
            q, k, v = rotary_split(linear(normed, *layer.qkv), cos, sin, self.num_heads,
                                   self.num_kv_heads, self.head_dim)  # fmt: skip
            attended = step.attend_rows(layer.index, q, k, v, layer.scaling, layer.window)
            out = linear(attended.reshape(rows, -1), *layer.o)
            normed, residual = rms_norm(out, layer.post_norm, self.eps, residual)
            out = linear(silu_mul(linear(normed, *layer.gate_up)), *layer.down)
            following = layers[i + 1].input_norm if i + 1 < len(layers) else inner.norm.weight
            normed, residual = rms_norm(out, following, self.eps, residual)
        return self.model.lm_head(normed[kept_rows])


def uncompiled_logits(
    model: Any,
    fused: Optional[FusedLlama],
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    step: StepContext,
    kept_rows: torch.Tensor,
) -> torch.Tensor:
    """The logits of a step's ``kept_rows`` when it is not compiled (eager, or captured in
    a CUDA graph): by ``fused`` where it may run now, else by transformers' forward of
    ``model``. Arguments as :meth:`FusedLlama.forward`."""
    if fused is not None and fused.usable():
        return fused.forward(input_ids, positions, step, kept_rows)
    return model(  # type: ignore[no-any-return]
        input_ids=input_ids[None], position_ids=positions[None], use_cache=False,
        logits_to_keep=kept_rows, seqattn_step=step,
    ).logits[0]  # fmt: skip


def _check_stacked(layer: _Layer) -> None:
    """Raise if a stacked weight or bias no longer lies over its parameters (the model
    was moved or converted after this was built)."""
    for param, address in layer.stacked_from:
        if param.data_ptr() != address:
            raise SeqAttnError(
                "the model's weights moved since its runner was built (a .to() or dtype "
                "change after PagedCausalLM was made): build a new runner"
            )


def _layer(layer: Any, config: Any) -> _Layer:
    """A decoder layer's parameters, its sibling projections stacked."""
    attn, mlp = layer.self_attn, layer.mlp
    siblings = ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj))
    stacked = []
    for group in siblings:
        biases = [m.bias for m in group]
        bias = None if any(b is None for b in biases) else stacked_views(biases)
        stacked.append((stacked_views([m.weight for m in group]), bias))
    return _Layer(
        index=attn.layer_idx, input_norm=layer.input_layernorm.weight,
        qkv=stacked[0], o=(attn.o_proj.weight, attn.o_proj.bias),
        post_norm=layer.post_attention_layernorm.weight, gate_up=stacked[1],
        down=(mlp.down_proj.weight, mlp.down_proj.bias), scaling=float(attn.scaling),
        window=sliding_window(attn, config),
        stacked_from=tuple(
            (param, param.data_ptr())
            for group in siblings
            for m in group
            for param in (m.weight, m.bias)
            if param is not None
        ),
    )  # fmt: skip


def families() -> dict[type, tuple[type, ...]]:
    """The causal LM classes served, each with its model, decoder layer, attention, MLP
    and RMSNorm classes (transformers' Llama and the families built the same way)."""
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.mistral import modeling_mistral as mistral
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    return {
        getattr(module, f"{name}ForCausalLM"): tuple(
            getattr(module, f"{name}{part}")
            for part in ("Model", "DecoderLayer", "Attention", "MLP", "RMSNorm")
        )
        for module, name in ((llama, "Llama"), (mistral, "Mistral"), (qwen2, "Qwen2"))
    }


def _global_hooks() -> bool:
    """Whether a forward hook is registered for every module."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def fused_wanted(setting: object, model: Any, sharded: bool, device: torch.device) -> bool:
    """Whether a runner's ``fused_layers`` setting (None, True or False, checked here)
    runs ``model`` by :class:`FusedLlama`: None where it serves the model and its
    operations are Triton kernels (CUDA), True wherever it serves the model (on the CPU
    by torch ops) and raises InvalidArgumentError where it does not; never sharded.
    Nothing is changed: the caller builds the :class:`FusedLlama` once every check passed."""
    wanted = exact_bool(setting, "fused_layers", optional=True)
    why = "a model that is not sharded" if sharded else FusedLlama.refusal(model)
    if why is not None and wanted:
        raise InvalidArgumentError(f"fused_layers=True needs {why}")
    if wanted is None:
        return why is None and device.type == "cuda" and triton_or_none() is not None
    return wanted
