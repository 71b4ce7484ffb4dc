"""Disaggregated serving: rank 0 prefills, rank 1 decodes.

Rank 0 prefills a few prompts on a tiny random Llama (seeded: both ranks build the same
weights) through :class:`PagedCausalLM`, samples each prompt's first token, ships every
sequence's KV to rank 1 (``seqattn.migration_p2p.send_sequence``) with that token, and
releases it. Rank 1 receives them (``recv_sequence``: its own pages, checked before any
page travels), decodes greedily, and checks its tokens against a single-process run:
prefill and decode in one ``PagedCausalLM``.

Run (NCCL with one GPU per rank where there are two; gloo on the CPU otherwise)::

    torchrun --nproc-per-node 2 examples/disaggregated_serving.py
    python examples/disaggregated_serving.py --spawn    # two processes spawned here
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from seqattn.integrations.hf import PagedCausalLM
from seqattn.migration_p2p import recv_sequence, send_sequence

PREFILL, DECODE = 0, 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spawn", action="store_true", help="spawn the two ranks here")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens rank 1 decodes")
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU even with GPUs")
    return parser.parse_args(argv)


def build(device: torch.device) -> PagedCausalLM:
    """The same tiny random Llama on every rank (same seed), on seqattn's cache."""
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    return PagedCausalLM(model, num_pages=128, page_size=16, prefix_caching=True)


def prompts() -> dict[int, list[int]]:
    """Sequence id -> prompt (a shared head, so the prefix cache has work too)."""
    gen = torch.Generator().manual_seed(1)
    head = torch.randint(0, 256, (20,), generator=gen).tolist()
    lengths = {11: 5, 12: 23, 13: 40, 14: 64}
    return {i: head + torch.randint(0, 256, (n,), generator=gen).tolist()
            for i, n in lengths.items()}  # fmt: skip


def prefill(runner: PagedCausalLM, batch: dict[int, list[int]]) -> list[int]:
    """Prefill every prompt in one step; each one's greedy first token."""
    ids, desc = list(batch), runner.descriptor
    cached = [desc.start_sequence(i, batch[i]) for i in ids]
    rows = [batch[i][c:] for i, c in zip(ids, cached, strict=True)]
    desc.allocate(ids, [len(row) for row in rows])
    logits = runner.forward(ids, rows)
    desc.commit(ids)  # their full pages may serve later prompts
    return logits.argmax(-1).tolist()


def decode(runner: PagedCausalLM, ids: list[int], first: list[int], n: int) -> list[list[int]]:
    """``n`` greedy tokens per sequence (the first one included), as rows per sequence."""
    desc, tokens, out = runner.descriptor, first, [first]
    for _ in range(n - 1):
        desc.allocate_decoding(ids, token_ids=tokens)
        tokens = runner.decode(ids, tokens).argmax(-1).tolist()
        desc.commit(ids)
        out.append(tokens)
    return [list(row) for row in zip(*out, strict=True)]


def serve(rank: int, device: torch.device, new_tokens: int) -> None:
    runner, batch = build(device), prompts()
    ids = list(batch)
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    if rank == PREFILL:
        first = prefill(runner, batch)
        for seq_id in ids:
            send_sequence(runner.descriptor, seq_id, DECODE)
        dist.send(torch.tensor(first, device=comm), DECODE)
        runner.descriptor.release(ids)  # moved: rank 1 holds them now
        print(f"rank 0: prefilled {len(ids)} prompts and shipped their KV", flush=True)
        return
    for seq_id in ids:
        recv_sequence(runner.descriptor, seq_id, PREFILL)
    first = torch.empty(len(ids), dtype=torch.int64, device=comm)
    dist.recv(first, PREFILL)
    tokens = decode(runner, ids, first.tolist(), new_tokens)
    alone = build(device)  # the reference: prefill and decode in one process
    expected = decode(alone, ids, prefill(alone, batch), new_tokens)
    for seq_id, row in zip(ids, tokens, strict=True):
        print(f"rank 1: sequence {seq_id} ({len(batch[seq_id])} prompt tokens): {row}")
    total = len(ids) * new_tokens
    assert tokens == expected, f"rank 1's tokens differ from a single-process run: {expected}"
    print(f"rank 1: all {total} tokens identical to a single-process run", flush=True)


def worker(rank: int, args: argparse.Namespace, init_method: str | None) -> None:
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= 2 and not args.cpu
    local = int(os.environ.get("LOCAL_RANK", rank))  # torchrun's; spawn: the rank
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    options = dict(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    if init_method is not None:
        options.update(init_method=init_method, rank=rank, world_size=2)
    dist.init_process_group(**options)
    try:
        serve(rank, device, args.new_tokens)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (NVLS)
    if not args.spawn:  # under torchrun: rank and rendezvous from its environment
        worker(int(os.environ["RANK"]), args, None)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, f"tcp://127.0.0.1:{port}"), nprocs=2)


if __name__ == "__main__":
    main()
