"""Projections that read the same input, as one matmul in a compiled graph.

A decoder layer's query, key and value projections all read the normed hidden state,
and so do the MLP's gate and up projections. At decode batch sizes a matmul is bound
by reading its weight, yet small ones do not reach the copy rate: on an H200 at 64 rows
cuBLAS takes 18.0 us for a 0.85B Llama's three q/k/v GEMMs and 6.9 us for one GEMM over
the three weights stacked (gate/up: 20.8 against 16.5 us). This pass, run on the graph
dynamo traced before inductor compiles it, finds ``linear`` calls on one input and makes
them one call over the stacked weight, each old result a slice of the new one.

The stacked weight must not cost memory: the first time a group is fused its
parameters are copied into one buffer and re-homed as consecutive views of it
(``param.data = stacked[a:b]``: same Parameter objects, same values, so the eager
forward and ``state_dict`` see nothing change; the old storage is freed). A later
graph (or runner) on the same model finds the views consecutive and reads their
storage as the stacked weight again. A tensor that shared its storage with a weight
(not the same Parameter: tied weights are) would keep the old memory, and no longer
see writes to the weight; inference writes none. transformers' ``save_pretrained``
still saves the model, and it loads back equal (tested with transformers 5.24).

Groups are fused whose weights are plain tensors (no subclass: a tensor-parallel
model's DTensors are handed to the compiled forward as their plain shards, see
:func:`.hf_parallel.linears_on_local_shards`; torch 2.13 cannot fake DTensors whose
shards share a storage), each 2-D and contiguous, all of one dtype and device, with
biases on all or none.

Example::

    >>> import torch
    >>> class Two(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.q, self.k = torch.nn.Linear(8, 4), torch.nn.Linear(8, 2)
    ...     def forward(self, x):
    ...         linear = torch.nn.functional.linear
    ...         q = linear(x, self.q.weight, self.q.bias)
    ...         return q * 2, linear(x, self.k.weight, self.k.bias)
    >>> two = Two()
    >>> graph = torch.fx.symbolic_trace(two)   # weights as get_attr nodes here
    >>> x = torch.randn(3, 8)
    >>> before = two(x)
    >>> stacking = stack_sibling_linears(graph, [x])
    >>> stacking.groups, [tuple(t.shape) for t in stacking.added]  # q and k stacked, biases too
    (1, [(6, 8), (6,)])
    >>> after = stacking.graph(*stacking.inputs([x]))
    >>> # one matmul over the stacked weight may sum in another order: equal to rounding
    >>> all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(before, after))
    True
    >>> two.k.weight.data_ptr() == two.q.weight.data_ptr() + 4 * 8 * 4  # right after q's
    True
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx

LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)
PLAIN = (torch.Tensor, torch.nn.Parameter)


@dataclass
class Stacking:
    """What :func:`stack_sibling_linears` did to a graph, and how to call it now.

    Attributes:
        graph: the rewritten graph (the one given, if nothing was fused).
        groups: groups of linear calls made one matmul.
        kept: positions of the graph's old inputs it still takes (the fused weights'
            placeholders are gone).
        added: the stacked weights (and biases) it takes after them.
    """

    graph: torch.fx.GraphModule
    groups: int
    kept: list[int]
    added: list[torch.Tensor]

    def inputs(self, old_inputs: Sequence[Any]) -> list[Any]:
        """The rewritten graph's inputs, from what the old graph took."""
        return [*(old_inputs[i] for i in self.kept), *self.added]


def stack_sibling_linears(graph: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Stacking:
    """A copy of ``graph`` in which every group of 2+ ``linear`` calls on one input that
    can be stacked is one call and slices, its stacked weight (and bias) a new input.
    Call ``stacking.graph`` with ``stacking.inputs(old_inputs)``. ``graph`` itself is
    left as it was (dynamo reads its placeholders after the backend returns).

    Args:
        graph: a graph dynamo traced (or any FX graph); its weights are placeholders
            (``example_inputs`` holds their tensors, in placeholder order) or
            attributes of ``graph`` (``get_attr``).
        example_inputs: the graph's inputs, as dynamo hands them to a backend.
    """
    original = graph
    graph = _copy(graph)
    tensors = _input_tensors(graph, example_inputs)
    groups: dict[tuple[torch.fx.Node, bool], list[_Linear]] = defaultdict(list)
    for node in graph.graph.nodes:
        linear = _linear(node, tensors)
        if linear is not None:  # grouped by input, and by having a bias or not
            groups[(node.args[0], linear.bias is not None)].append(linear)  # type: ignore[index]
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    body = next(n for n in graph.graph.nodes if n.op != "placeholder")  # new inputs go before
    stacking = Stacking(graph, 0, list(range(len(placeholders))), [])
    for linears in groups.values():
        if len(linears) > 1 and _fuse(graph, linears, stacking, body):
            stacking.groups += 1
    if not stacking.groups:
        stacking.graph = original
        return stacking
    _erase_unread(graph.graph, list(tensors))  # the old weights, now read by nothing
    alive = set(graph.graph.nodes)
    stacking.kept = [i for i, n in enumerate(placeholders) if n in alive]
    graph.graph.lint()
    graph.recompile()
    return stacking


def _erase_unread(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> None:
    """Erase those of ``nodes`` (placeholders and ``get_attr``) that nothing reads."""
    for node in nodes:
        if not node.users:
            graph.erase_node(node)


def _copy(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule over a copy of ``graph``'s nodes (metadata shared, not copied),
    with what dynamo and AOTAutograd keep on the module and its placeholders."""
    nodes = torch.fx.Graph()
    new: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.graph.nodes:
        new[node] = nodes.node_copy(node, lambda n: new[n])
        if hasattr(node, "_dynamo_source"):
            new[node]._dynamo_source = node._dynamo_source  # type: ignore[attr-defined]
    copy = torch.fx.GraphModule(graph, nodes)
    copy.meta = dict(graph.meta)
    for name in ("_param_name_to_source",):
        if hasattr(graph, name):
            setattr(copy, name, getattr(graph, name))
    return copy


def _input_tensors(
    graph: torch.fx.GraphModule, example_inputs: Sequence[Any]
) -> dict[torch.fx.Node, torch.Tensor]:
    """The plain tensor behind each placeholder or ``get_attr`` node that has one."""
    tensors: dict[torch.fx.Node, torch.Tensor] = {}
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):  # not inputs of this graph: read none
        placeholders = []
    for node, value in zip(placeholders, example_inputs[: len(placeholders)], strict=True):
        if type(value) in PLAIN:
            tensors[node] = value
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            value = _attribute(graph, str(node.target))
            if type(value) in PLAIN:
                tensors[node] = value
    return tensors


def _attribute(root: Any, path: str) -> Any:
    for name in path.split("."):
        root = getattr(root, name, None)
    return root


@dataclass
class _Linear:
    """A ``linear(x, weight, bias)`` call whose weight (and bias) are input tensors."""

    node: torch.fx.Node
    weight: torch.Tensor
    bias: Optional[torch.Tensor]


def _linear(node: torch.fx.Node, tensors: dict[torch.fx.Node, torch.Tensor]) -> Optional[_Linear]:
    """``node`` as a :class:`_Linear` if it is a linear call whose weight (and bias) are
    plain input tensors that may be stacked; None for any other node."""
    if node.op != "call_function" or node.target not in LINEAR or node.kwargs:
        return None
    if len(node.args) not in (2, 3):
        return None
    weight = tensors.get(node.args[1])  # type: ignore[arg-type]
    bias_node = node.args[2] if len(node.args) == 3 else None
    bias = None if bias_node is None else tensors.get(bias_node)  # type: ignore[arg-type]
    if weight is None or weight.dim() != 2 or not weight.is_contiguous():
        return None
    if bias_node is not None and (bias is None or bias.dim() != 1):
        return None
    return _Linear(node, weight, bias)


def _fuse(
    graph: torch.fx.GraphModule, linears: list[_Linear], stacking: Stacking, body: torch.fx.Node
) -> bool:
    """Replace ``linears`` (calls on one input) by one call on their stacked weight (and
    bias), new placeholders (inserted before ``body``, the graph's first other node, so
    after every placeholder) appended to ``stacking.added``, and a slice each. False,
    graph untouched, if the group cannot be stacked."""
    nodes = [linear.node for linear in linears]
    weights = [linear.weight for linear in linears]
    biases = [linear.bias for linear in linears if linear.bias is not None]
    first = weights[0]
    if len({id(w) for w in weights}) < len(weights) or any(
        w.dtype != first.dtype or w.device != first.device or w.shape[1] != first.shape[1]
        for w in weights
    ):
        return False
    halves = [weights, biases] if biases else [weights]
    args = [nodes[0].args[0]]
    for half in halves:
        with graph.graph.inserting_before(body):
            added = graph.graph.placeholder(f"seqattn_stacked_{next(_NAMES)}")
        added._dynamo_source = None  # type: ignore[attr-defined]  # none in user code, as DDP's
        args.append(added)
        stacking.added.append(stacked_views(half))
    with graph.graph.inserting_before(nodes[0]):
        whole = graph.graph.call_function(nodes[0].target, tuple(args))  # type: ignore[arg-type]
    start = 0
    for node, weight in zip(nodes, weights, strict=True):
        with graph.graph.inserting_before(node):
            part = graph.graph.call_function(torch.narrow, (whole, -1, start, weight.shape[0]))
        node.replace_all_uses_with(part)
        graph.graph.erase_node(node)
        start += weight.shape[0]
    return True


_NAMES = itertools.count()


def stacked_views(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One tensor over ``tensors`` stacked along dim 0, sharing their memory: read from
    their storage if they already lie back to back in one, otherwise made by copying
    them into a new buffer and re-homing each as a view of it. The old storage is
    freed unless something else holds it (a tensor-parallel shard loaded as a view of
    the whole weight holds the whole: re-homing frees it)."""
    over = _back_to_back(tensors)
    if over is not None:
        return over
    with torch.no_grad(), torch.inference_mode(False):
        stacked = torch.cat([t.detach() for t in tensors])
        start = 0
        for tensor in tensors:
            tensor.data = stacked[start : start + tensor.shape[0]]
            start += tensor.shape[0]
    return stacked


def _back_to_back(tensors: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The stacked tensor over ``tensors`` if they are consecutive views of one storage
    (as :func:`stacked_views` leaves them), else None."""
    first = tensors[0]
    storage, offset = first.untyped_storage(), first.storage_offset()
    for tensor in tensors:
        if (
            tensor.untyped_storage().data_ptr() != storage.data_ptr()
            or tensor.storage_offset() != offset
            or not tensor.is_contiguous()
        ):
            return None
        offset += tensor.numel()
    rows = sum(t.shape[0] for t in tensors)
    shape, strides = (rows, *first.shape[1:]), first.stride()
    with torch.no_grad(), torch.inference_mode(False):
        over = first.detach().new_empty(0)
        return over.set_(storage, first.storage_offset(), shape, strides)
