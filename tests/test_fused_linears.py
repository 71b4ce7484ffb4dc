"""Projections on one input stacked into one matmul (integrations/fused_linears.py), on
FX graphs traced here: the outputs equal the unfused graph's, the weights are re-homed
as consecutive views of one buffer (no memory added, values unchanged), a second pass
reads that buffer again, and groups that cannot be stacked are left exactly as they
were."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqattn.integrations.fused_linears import stack_sibling_linears


class Projections(torch.nn.Module):
    """q/k/v on ``x`` (k and v narrower, as with grouped-query attention), and one
    more linear on another input."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = torch.nn.Linear(16, 8, bias=bias)
        self.k = torch.nn.Linear(16, 4, bias=bias)
        self.v = torch.nn.Linear(16, 4, bias=bias)
        self.o = torch.nn.Linear(8, 16, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (F.linear(x, m.weight, m.bias) for m in (self.q, self.k, self.v))
        return F.linear(q * k.sum(-1, keepdim=True) + v.mean(), self.o.weight, self.o.bias)


def traced(module: torch.nn.Module) -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(module)


def storage_bytes(module: torch.nn.Module) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for p in module.parameters()}  # fmt: skip
    return sum(storages.values())


def test_stacked_graph_equals_the_original_and_costs_no_memory() -> None:
    for bias in (False, True):
        module = Projections(bias)
        x = torch.randn(5, 16)
        expected, before = module(x), storage_bytes(module)
        values = {name: p.detach().clone() for name, p in module.named_parameters()}
        graph = traced(module)
        stacking = stack_sibling_linears(graph, [x])
        assert stacking.groups == 1 and stacking.kept == [0]
        assert [tuple(t.shape) for t in stacking.added] == [(16, 16)] + [(16,)] * bias
        torch.testing.assert_close(stacking.graph(*stacking.inputs([x])), expected)
        linears = [n for n in stacking.graph.graph.nodes if n.target is torch._C._nn.linear]
        assert len(linears) == 2  # the stacked q/k/v and o
        # the same Parameters, same values, now back to back in the stacked weight
        assert storage_bytes(module) == before
        for name, p in module.named_parameters():
            assert torch.equal(p, values[name]), name
        q, k, v = (module.q.weight, module.k.weight, module.v.weight)
        assert k.data_ptr() == q.data_ptr() + q.nbytes
        assert v.data_ptr() == k.data_ptr() + k.nbytes
        assert module.o.weight.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()
        # the graph given is untouched (dynamo reads it after its backend returns)
        assert sum(n.target is F.linear for n in graph.graph.nodes) == 4
        torch.testing.assert_close(graph(x), expected)


def test_a_second_pass_reads_the_stacked_weight_again() -> None:
    module = Projections()
    x = torch.randn(3, 16)
    first = stack_sibling_linears(traced(module), [x])
    pointer = module.q.weight.data_ptr()
    second = stack_sibling_linears(traced(module), [x])
    assert second.groups == 1
    assert module.q.weight.data_ptr() == pointer  # not copied again
    assert second.added[0].data_ptr() == first.added[0].data_ptr() == pointer
    torch.testing.assert_close(second.graph(*second.inputs([x])), module(x))


def test_groups_that_cannot_be_stacked_are_left_as_they_were() -> None:
    x = torch.randn(3, 16)
    twice = Projections()  # one weight given twice
    twice.v.weight = twice.k.weight
    mixed = Projections()  # weights of two dtypes
    mixed.v.to(torch.float64)
    for module in (twice, mixed):
        pointers = [p.data_ptr() for p in module.parameters()]
        graph = traced(module)
        stacking = stack_sibling_linears(graph, [x])
        assert stacking.groups == 0 and stacking.added == [] and stacking.kept == [0]
        assert stacking.graph is graph
        assert [p.data_ptr() for p in module.parameters()] == pointers


def test_a_weight_viewing_a_larger_storage_is_copied_out_of_it() -> None:
    """As a tensor-parallel shard loaded as a view of the whole weight: the stacked
    copy holds the shard alone, and what it viewed is left as it was."""
    module = Projections()
    whole = torch.randn(8, 16)
    module.k.weight.data = whole[4:]
    x = torch.randn(3, 16)
    expected = module(x)
    stacking = stack_sibling_linears(traced(module), [x])
    assert stacking.groups == 1
    assert module.k.weight.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr()
    assert torch.equal(module.k.weight, whole[4:])
    torch.testing.assert_close(stacking.graph(*stacking.inputs([x])), expected)
