"""Model steps through ``torch.compile``: seqattn's append + attention as one custom op.

Inductor fuses the model's many small kernels (RMSNorm's mean/pow/mul, rotary, SiLU *
mul, residual adds, copies) into a few, but it must not trace into seqattn's Python:
page tables, plans and flashinfer wrappers are host-side state. So the attention of one
layer is one opaque operator, ``torch.ops.seqattn.paged_attention``, that takes tensors
and ints only; its body finds the step's planned attention through a module-level
"current step" that :class:`CompiledDecode` sets around each forward (one forward at a
time per process: it is not thread-safe, nor is a CUDA-graph capture).

What is compiled: two forwards. Decode steps (one new token per sequence) have the
batch dimension dynamic, so one compiled graph serves every batch size from 2 up
(inductor specializes size 1, a second graph), and CUDA graphs capture the compiled
forward per batch bucket as they capture the eager one. Prefill and mixed steps (any
rows per sequence) have the row and sequence counts dynamic: one more graph (and one
for a single sequence), run without CUDA graphs, keeping the logits of each
sequence's last row only.

Off by default (``PagedCausalLM(compile=True)`` or ``Engine(compile=True)`` turn it on):
the compile costs seconds to minutes in the first steps of every process, and on
the CPU it gains nothing measurable (a tiny model's step is host-bound, a larger one's
matmul-bound), and on an H200 the default is faster: a 0.85B Llama's CUDA graph of a
64-row decode step, replayed back to back, took 1.15-1.17 ms for seqattn's fused Llama
layers (:mod:`.hf_fused`, the default where not compiled: its GEMMs and other kernels
chained by programmatic dependent launches) against 1.24 ms compiled, in one process
(2.64 ms for graphs of transformers' layers, an earlier run;
``benchmarks/bench_generate.py`` prints them side by side).

Each graph is rewritten before inductor compiles it: the projections that read one
input (q/k/v, gate/up) become one matmul over their weights, re-homed as consecutive
views of one buffer (:mod:`.fused_linears`). While a compiled forward runs, the model's
backward hooks are hidden (dynamo breaks a graph at each module that has one; no
backward runs here) and tensor-parallel linear layers hold their rank's plain shard
instead of the DTensor (:func:`.hf_parallel.linears_on_local_shards`), so a sharded
model compiles whole too, its all-reduces traced as functional collectives.

Compile time is paid in the first step of each graph (tens of seconds for a
billion-parameter model; see :attr:`CompiledDecode.compile_seconds`). Inductor keeps
compiled kernels and graphs on disk (its FX graph and AOTAutograd caches, on by
default, in ``TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_<user>``): a
second process with the same model shapes, torch and seqattn versions skips most of
it (dynamo's tracing still runs). ``torch.compiler.save_cache_artifacts()`` /
``load_cache_artifacts()`` carry those caches to another machine.
"""

from __future__ import annotations

import itertools
import sys
import time
import types
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Optional

import torch

from .._checks import exact_bool, shown
from ..errors import ArgumentTypeError, InvalidArgumentError, MissingDependencyError, SeqAttnError
from .fused_linears import stack_sibling_linears
from .hf_parallel import linears_on_local_shards, sharded_linears

if TYPE_CHECKING:
    from .hf_attention import StepContext

OP_NAME = "seqattn::paged_attention"
# modes whose inductor makes no CUDA graphs of its own: seqattn captures the compiled
# forward itself, per batch bucket, with the attention planned into fixed buffers
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


class _Current:
    """The forward now running: its attention context and the KV storage it writes."""

    context: Optional[StepContext] = None
    kv_data: Optional[torch.Tensor] = None


_current = _Current()


@contextmanager
def current_step(context: StepContext, kv_data: torch.Tensor) -> Iterator[None]:
    """Make ``context`` the step that ``seqattn::paged_attention`` calls attend in."""
    if _current.context is not None:
        raise SeqAttnError("a compiled seqattn forward is already running (one at a time)")
    _current.context, _current.kv_data = context, kv_data
    try:
        yield
    finally:
        _current.context = _current.kv_data = None


@torch.library.custom_op(OP_NAME, mutates_args=("kv_cache",))
def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    sliding_window: Optional[int],
    scaling: Optional[float],
) -> torch.Tensor:
    """Append one layer's new K/V to the paged cache and attend, for the current step.

    Args:
        q: ``shape: [rows, num_qo_heads, head_dim]``, the model's dtype, rotated.
        k, v: ``shape: [rows, num_kv_heads, head_dim]``, this step's new tokens.
        kv_cache: the cache's whole storage (``PagedKVCacheManager.kv_data``,
            ``[num_layers, num_pages, 2, ...]``), written in place: declared so that the
            compiler orders the writes, and passed whole, not as the layer's view,
            because views of one storage as graph inputs, one of them written, make
            AOTAutograd rebuild them from a synthetic base every call.
        layer: the layer's index.
        sliding_window, scaling: as transformers passes them to an attention function.

    Returns:
        ``shape: [rows, num_qo_heads, head_dim]``, the dtype of ``q``.
    """
    context, kv_data = _current.context, _current.kv_data
    if context is None or kv_data is None:
        raise SeqAttnError(
            f"{OP_NAME} runs inside PagedCausalLM's compiled decode (it needs the step's "
            "planned attention); call the model through PagedCausalLM"
        )
    if kv_cache.data_ptr() != kv_data.data_ptr():
        # a copy: the writes below would land in the cache and then be overwritten by
        # the copy written back; refuse instead of losing them
        raise SeqAttnError(f"{OP_NAME} was given a copy of the KV cache, not the cache itself")
    return context.attend_rows(layer, q, k, v, scaling, sliding_window)


@paged_attention.register_fake
def _paged_attention_shape(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    sliding_window: Optional[int],
    scaling: Optional[float],
) -> torch.Tensor:
    del k, v, kv_cache, layer, sliding_window, scaling  # the output is shaped like q
    return torch.empty_like(q)


def compiled_attention(
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    scaling: Optional[float],
    sliding_window: Optional[int],
) -> torch.Tensor:
    """The attention function's route in a compiled forward (traced by the compiler:
    the layout changes fuse with rotary, the op stays opaque).

    Args:
        query: ``[1, num_qo_heads, rows, head_dim]``; key, value:
            ``[1, num_kv_heads, rows, head_dim]``, as transformers passes them.

    Returns:
        ``[1, rows, num_qo_heads, head_dim]``.
    """
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    out = torch.ops.seqattn.paged_attention(q, k, v, kv_cache, layer, sliding_window, scaling)
    return out.unsqueeze(0)


class CompiledDecode:
    """A model's forward compiled by ``torch.compile`` (inductor): decode steps
    (:meth:`decode`, batch dimension dynamic) and prefill or mixed steps
    (:meth:`prefill`, rows and sequences dynamic).

    Each instance compiles copies of :func:`decode_forward` and :func:`rows_forward` of
    its own, so that runners
    made one after another in a process (tests, benchmarks) do not share dynamo's state:
    it stops compiling a code object after ``torch._dynamo.config.recompile_limit`` (8)
    variants, running it eagerly from then on, and it makes a size or float that
    differed between two calls of a frame symbolic in the next compile (another model's
    head_dim or scale would). Graphs identical to earlier ones come from inductor's
    caches, in seconds.

    Which modules have backward hooks to hide, and which linear layers are
    tensor-parallel shards, is read from the model once, here: hooks registered later
    would break the graph again.

    Args:
        model: the ``*ForCausalLM``, already on seqattn's attention.
        kv_data: the cache's storage, ``PagedKVCacheManager.kv_data``.
        mode: one of :data:`COMPILE_MODES`.

    Attributes:
        compiles: graphs inductor compiled so far (a recompile adds one).
        compile_seconds: wall time of the calls that compiled (tracing, inductor, and
            the first run of the graph).
        stacked_matmuls: groups of projections on one input (q/k/v, gate/up) made one
            matmul, over all graphs compiled so far.
    """

    def __init__(self, model: Any, kv_data: torch.Tensor, mode: str) -> None:
        from torch._inductor import list_mode_options

        self.model = model
        self.kv_data = kv_data
        self.mode = mode
        self.options = {**list_mode_options(mode), **_combo_options(kv_data.device)}
        self.compiles = 0
        self.compile_seconds = 0.0
        self.stacked_matmuls = 0
        self._hooked = [m for m in model.modules() if m._backward_hooks or m._backward_pre_hooks]
        self._shards = sharded_linears(model)
        self._compiled = torch.compile(own_code(decode_forward), backend=self._inductor)
        self._compiled_rows = torch.compile(own_code(rows_forward), backend=self._inductor)

    def _inductor(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        """inductor with the mode's options, on the graph with projections that share
        an input stacked into one matmul (:mod:`.fused_linears`), counting what it
        compiles and fuses."""
        self.compiles += 1
        stacking = stack_sibling_linears(graph, example_inputs)
        self.stacked_matmuls += stacking.groups
        kept = [example_inputs[i] for i in stacking.kept]
        inputs = [*kept, *_static_fakes(stacking.added, example_inputs)]
        compiled = torch._inductor.compile(stacking.graph, inputs, options=self.options)
        if not stacking.groups:
            return compiled
        return lambda *args: compiled(*stacking.inputs(args))

    def __call__(
        self, context: StepContext, input_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``[rows, vocab_size]`` of a decode step.

        Args:
            context: the step's attention (planned per variant, or for every layer).
            input_ids, position_ids: ``shape: [1, rows], dtype: torch.int64``, on the
                model's device; tensors made under inference mode (torch guards on a
                tensor's dispatch keys: a normal tensor would compile another graph).
        """
        _mark_rows(input_ids, 1)
        _mark_rows(position_ids, 1)
        return self._run(context, self._compiled, input_ids, position_ids)

    def decode(
        self, context: StepContext, tokens: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """As calling it, from a step's ``[rows]`` tokens and positions of any integer
        dtype and origin: they are copied into fresh int64 ``[1, rows]`` tensors (packed
        steps hand over int32 views of one shared buffer, at offsets that change)."""
        return self(context, *_int64_rows(tokens, positions))

    def prefill(
        self,
        context: StepContext,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        last_rows: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ``[len(last_rows), vocab_size]`` of a step of any rows per sequence
        (prompt chunks, mixed with decode rows): those of rows ``last_rows``.

        Args:
            context: the step's attention.
            tokens, positions: ``[rows]`` integers on the model's device (copied, as in
                :meth:`decode`); rows and sequences are both dynamic dimensions.
            last_rows: ``[sequences]`` integers, each sequence's last new row.
        """
        ids, where = _int64_rows(tokens, positions)
        with torch.inference_mode():
            keep = last_rows.to(torch.long, copy=True)
        for tensor, dim in ((ids, 1), (where, 1), (keep, 0)):
            _mark_rows(tensor, dim)
        return self._run(context, self._compiled_rows, ids, where, keep)

    def _run(self, context: StepContext, compiled: Any, *inputs: torch.Tensor) -> torch.Tensor:
        """Call ``compiled(model, ids, positions, kv_cache, *rest)`` in ``context``,
        adding the wall time of a call that compiled to :attr:`compile_seconds`."""
        compiles, start = self.compiles, time.perf_counter()
        with (
            current_step(context, self.kv_data),
            backward_hooks_off(self._hooked),
            linears_on_local_shards(self._shards),
        ):
            logits = compiled(self.model, *inputs[:2], self.kv_data, *inputs[2:])
        if self.compiles != compiles:
            self.compile_seconds += time.perf_counter() - start
        return logits  # type: ignore[no-any-return]


def _combo_options(device: torch.device) -> dict[str, bool]:
    """Inductor's combo kernels on CUDA: independent small kernels of a layer (rotary of
    q and of k, the copies of q, k, v into the attention op's layout) become one launch.
    On an H200 the 0.85B Llama's decode step lost 33 of 245 launches and 0.11 ms of its
    1.42 ms of kernels. Triton-only (the CPU's C++ kernels have no such pass), and absent
    from older inductors."""
    if device.type != "cuda" or not hasattr(torch._inductor.config, "combo_kernels"):
        return {}
    return {"combo_kernels": True}


def _int64_rows(tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Fresh int64 ``[1, rows]`` copies of a step's tokens and positions, made under
    inference mode (as the compiled graphs' guards expect)."""
    with torch.inference_mode():
        return tuple(t.to(torch.long, copy=True)[None] for t in (tokens, positions))


def _static_fakes(tensors: list[torch.Tensor], example_inputs: list[Any]) -> list[Any]:
    """``tensors`` as fake tensors of static shape in the mode dynamo traced in.

    AOTAutograd fakes a real input that dynamo did not trace with a fresh symbol per
    size when shapes are dynamic; such a symbol has no source in the user's frame, and
    torch 2.11's guard building fails on it ("sources must not be empty for symbol").
    """
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode(example_inputs)
    if mode is None:
        return list(tensors)
    return [mode.from_tensor(t, static_shapes=True) for t in tensors]


@contextmanager
def backward_hooks_off(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Hide ``modules``' backward hooks for the duration (they are put back after).

    A forward under no_grad never runs a backward hook, but a module that has one wraps
    its call in a ``BackwardHook`` all the same, and dynamo breaks the graph there
    ("Module-level backwards hooks require compiled autograd"). transformers 5.17's
    tensor parallelism gives Qwen3's sharded ``q_norm``/``k_norm`` such a hook (to sum
    their gradients across ranks): every layer's forward broke into pieces.
    """
    saved = [(m, m._backward_hooks, m._backward_pre_hooks) for m in modules]
    for module, _, _ in saved:
        module._backward_hooks, module._backward_pre_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        for module, hooks, pre_hooks in saved:
            module._backward_hooks, module._backward_pre_hooks = hooks, pre_hooks


def _mark_rows(tensor: torch.Tensor, dim: int) -> None:
    """Make ``dim`` dynamic, unless it is 1: size 1 is its own graph whatever is marked."""
    if tensor.shape[dim] > 1:
        torch._dynamo.mark_dynamic(tensor, dim)


def decode_forward(
    model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor, kv_cache: torch.Tensor
) -> torch.Tensor:
    """What is compiled: the model's forward over a decode step, logits
    ``[rows, vocab_size]``; every row is its sequence's last, so all are kept."""
    return model(  # type: ignore[no-any-return]
        input_ids=input_ids, position_ids=position_ids, use_cache=False,
        logits_to_keep=0, seqattn_kv=kv_cache,
    ).logits[0]  # fmt: skip


def rows_forward(
    model: Any,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    kv_cache: torch.Tensor,
    last_rows: torch.Tensor,
) -> torch.Tensor:
    """What is compiled for prefill and mixed steps: the logits of rows ``last_rows``
    (each sequence's last new token), ``[len(last_rows), vocab_size]``."""
    return model(  # type: ignore[no-any-return]
        input_ids=input_ids, position_ids=position_ids, use_cache=False,
        logits_to_keep=last_rows, seqattn_kv=kv_cache,
    ).logits[0]  # fmt: skip


def own_code(function: types.FunctionType) -> types.FunctionType:
    """A copy of ``function`` with a code object and a name of its own: dynamo keeps
    compiled code per code object, and what it learned of a frame's shapes (automatic
    dynamic: a size or float attribute that changed becomes symbolic) per file, line
    and name; a runner must not learn from another runner's model."""
    name = f"{function.__name__}_{next(_COPIES)}"
    names = {"co_name": name}
    if sys.version_info >= (3, 11):  # code objects know their qualified name since 3.11
        names["co_qualname"] = name
    code = function.__code__.replace(**names)  # type: ignore[arg-type]
    return types.FunctionType(code, function.__globals__, name, function.__defaults__,
                              function.__closure__)  # fmt: skip


_COPIES = itertools.count()


def checked_compile(compile: object, mode: object, device: torch.device) -> Optional[str]:
    """The compile mode a runner asked for (None: eager), after checking the arguments
    and that inductor can build kernels on ``device``.

    Raises:
        ArgumentTypeError: ``compile`` not a bool, ``mode`` not a str.
        InvalidArgumentError: a mode not in :data:`COMPILE_MODES` (``"reduce-overhead"``
            and ``"max-autotune"`` make CUDA graphs of their own, which seqattn's graphs
            already are).
        MissingDependencyError: no C++ compiler (CPU) or no triton (CUDA) for inductor.
    """
    wanted = exact_bool(compile, "compile")
    if not isinstance(mode, str):
        raise ArgumentTypeError(f"compile_mode must be one of {COMPILE_MODES}, got {shown(mode)}")
    if mode not in COMPILE_MODES:
        raise InvalidArgumentError(
            f"compile_mode must be one of {COMPILE_MODES} (modes that make no CUDA graphs of "
            f"their own: seqattn captures the compiled decode itself), got {mode!r}"
        )
    if not wanted:
        return None
    check_compiler(device)
    return mode


def check_compiler(device: torch.device) -> None:
    """Raise MissingDependencyError unless inductor can build kernels for ``device``: a
    C++ compiler for the CPU, triton for CUDA (found, not yet run: a broken toolchain
    still fails at the first compile)."""
    detail = ""
    try:
        if device.type == "cuda":
            from torch.utils._triton import has_triton

            missing, found = "triton (pip install triton, matching your torch)", has_triton()
        else:
            from torch._inductor.cpp_builder import get_cpp_compiler

            missing = "a C++ compiler (g++ or clang++; the CXX variable names another)"
            found = bool(get_cpp_compiler())  # raises when it finds none
    except Exception as error:  # private helpers: whatever they raise means "not usable"
        found, detail = False, f" ({error})"
    if not found:
        raise MissingDependencyError(
            f"compile=True needs {missing} for torch.compile on {device.type}{detail}; "
            "or run with compile=False"
        )
