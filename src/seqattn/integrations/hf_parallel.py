"""transformers models sharded by transformers' own tensor parallelism (its ``tp_plan``),
as :class:`~seqattn.integrations.hf.PagedCausalLM` runs them.

transformers shards each attention layer by columns: rank ``r`` of ``N`` computes query
heads ``[r * H / N, (r + 1) * H / N)`` and KV heads ``[r * K / N, (r + 1) * K / N)``, the
output projection and the MLP's down projection all-reduce, and the language-model head
gathers the logits, so every rank ends a forward with the same logits. A rank's cache
therefore holds ``K / N`` KV heads. The projections split evenly only into whole heads
when ``N`` divides both ``H`` and ``K``: transformers does not replicate KV heads when
``N`` exceeds ``K`` (its column split would cut a head in two), and neither does seqattn;
such a size is refused before anything is loaded or allocated.

Example (a group of one rank: the model loads whole)::

    >>> import tempfile, torch, torch.distributed as dist
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    >>> path = tempfile.mkdtemp()
    >>> LlamaForCausalLM(config).save_pretrained(path)
    >>> model = load_tensor_parallel(path, dtype=torch.float32)
    >>> model_ranks(model, torch.device("cpu")) is None   # one rank: nothing sharded
    True
    >>> check_heads(config, 4)
    Traceback (most recent call last):
    ...
    seqattn.errors.InvalidArgumentError: tensor parallelism over 4 ranks needs whole heads ...
    >>> dist.destroy_process_group()
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..errors import InvalidArgumentError, MissingDependencyError
from ..parallel import RankGroup


def check_heads(config: Any, size: int) -> None:
    """Raise InvalidArgumentError unless ``size`` ranks each get whole query and KV
    heads of ``config`` (``size`` divides both counts)."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % size or kv_heads % size:
        raise InvalidArgumentError(
            f"tensor parallelism over {size} ranks needs whole heads on every rank, as "
            f"transformers' tp_plan splits the q/k/v projections evenly by columns: "
            f"{heads} query and {kv_heads} KV heads do not divide by {size} (use a size "
            f"that divides both, e.g. {_largest_divisor(heads, kv_heads, size)})"
        )


def _largest_divisor(heads: int, kv_heads: int, size: int) -> int:
    """The largest tensor-parallel size up to ``size`` that divides both counts."""
    return max(n for n in range(1, size + 1) if heads % n == 0 and kv_heads % n == 0)


def model_ranks(model: Any, device: torch.device) -> Optional[RankGroup]:
    """The tensor-parallel group ``model`` was sharded over by transformers; None for a
    model loaded whole (no ``tp_plan``, or a group of one).

    Raises:
        InvalidArgumentError: the group does not split the heads into whole heads per
            rank, or its backend cannot run collectives on ``device``.
    """
    size = getattr(model, "tp_size", None) or 1
    if size == 1:
        return None
    mesh = getattr(model, "_device_mesh", None)  # transformers keeps the mesh it sharded on
    if mesh is None:
        group = dist.group.WORLD
    elif mesh.mesh_dim_names and "tp" in mesh.mesh_dim_names:
        group = mesh.get_group("tp")
    else:
        group = mesh.get_group()
    check_heads(model.config, size)
    return RankGroup(group, device)


def load_tensor_parallel(path: Any, *, dtype: torch.dtype, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(path)`` sharded over every rank of the
    default process group by the model's own ``tp_plan`` (run under ``torchrun``; each
    rank's weights land on ``cuda:LOCAL_RANK``, or the CPU without CUDA; a group of one,
    or no group, loads the model whole there). The head counts are checked against the
    world size before any weight is read.

    Raises:
        InvalidArgumentError: the world size does not split the heads evenly.
        MissingDependencyError: sharded, and ``accelerate`` is not installed
            (transformers' tensor-parallel loading needs it).
    """
    import transformers

    size = dist.get_world_size() if dist.is_initialized() else 1
    if size > 1 and importlib.util.find_spec("accelerate") is None:
        raise MissingDependencyError(
            "transformers loads a model sharded by its tp_plan only with accelerate: "
            "pip install accelerate (or seqattn[hf])"
        )
    config = transformers.AutoConfig.from_pretrained(path, **kwargs)
    check_heads(config, size)
    if size == 1:  # transformers' own device choice for a sharded model, by hand
        local = int(os.environ.get("LOCAL_RANK", 0))
        cuda = torch.device("cuda", local)
        plan: dict[str, Any] = {"device_map": cuda} if torch.cuda.is_available() else {}
    else:
        try:  # transformers >= 5.17 takes the plan in a DistributedConfig
            from transformers.distributed import DistributedConfig

            plan = {"distributed_config": DistributedConfig(tp_size=size)}
        except ImportError:
            plan = {"tp_plan": "auto"}
    load = transformers.AutoModelForCausalLM.from_pretrained
    return load(path, dtype=dtype, **plan, **kwargs).eval()


def sharded_linears(model: Any) -> list[tuple[torch.nn.Module, str, Any]]:
    """``(module, name, dtensor)`` for each DTensor parameter of an ``nn.Linear`` in
    ``model`` (the layers transformers' tensor parallelism shards); empty for a model
    loaded whole."""
    is_dtensor = _dtensor_check()
    return [
        (module, name, param)
        for module in model.modules()
        if isinstance(module, torch.nn.Linear)
        for name, param in module._parameters.items()
        if is_dtensor(param)
    ]


@contextmanager
def linears_on_local_shards(shards: list[tuple[torch.nn.Module, str, Any]]) -> Iterator[None]:
    """Give the linear layers of :func:`sharded_linears` their rank's shard itself (a
    plain tensor) for the duration, as transformers does per layer around a forward
    without gradients; the DTensors are put back after.

    For dynamo, which then sees plain weights: graph passes can read and re-home them
    (:mod:`.fused_linears`; the DTensors hold the same shard objects, so they see it
    too), where a DTensor whose shard shares a storage cannot be traced (torch 2.13's
    fake tensors fail on it).
    """
    for module, name, param in shards:
        module._parameters[name] = param._local_tensor
    try:
        yield
    finally:
        for module, name, param in shards:
            module._parameters[name] = param


def _dtensor_check() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        try:  # torch < 2.5 kept it private
            from torch.distributed._tensor import DTensor  # type: ignore[no-redef]
        except ImportError:  # torch built without distributed: nothing is sharded
            return lambda value: False
    return lambda value: isinstance(value, DTensor)
