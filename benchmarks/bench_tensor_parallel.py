"""Tensor-parallel serving: seqattn's engine on two GPUs (TP=2) against one (TP=1).

Workload (issue 16): a random-weight Llama of 8.0B parameters (32 layers, hidden 4096,
intermediate 14336, 32 query / 8 KV heads, vocab 128256), bf16; 64 requests of 512
random prompt tokens, 256 generated each, greedy. The weights are saved once (seeded)
and loaded by transformers' ``tp_plan`` in both runs, so both serve the same model:
TP=1 in one process on GPU 0, TP=2 in two processes under ``torchrun`` (NCCL, NVLink
multicast off). Each run serves the requests twice (a warm-up at the run's shapes that
also captures the CUDA graphs, then the timed run) and reports the wall time, generated
tokens/s, the median decode step and TTFT; its tokens are judged by transformers' own
forward over them (sdpa, the same sharded weights: teacher forcing, as
``bench_generate.py`` does): the share that is that forward's top-1.

``python benchmarks/bench_tensor_parallel.py`` on a machine with two GPUs;
``--device cpu --tiny`` is the CPU smoke run (gloo, float32, a 2-layer model).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MODEL_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)  # fmt: skip


def save_model(args: argparse.Namespace) -> Path:
    """The seeded random model's checkpoint (written once; reused if already there)."""
    import transformers

    path = Path(args.model_dir or tempfile.gettempdir()) / f"seqattn-tp-{args.size}"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**(TINY if args.tiny else MODEL_8B))
    with torch.device("cuda" if args.device == "cuda" else "cpu"):
        model = transformers.LlamaForCausalLM(config).to(dtype_of(args))
    model.save_pretrained(path)
    del model
    return path


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.device == "cuda" else torch.float32


def worker(args: argparse.Namespace) -> None:
    """One rank of one run: load the shards, serve twice, judge, and (rank 0) write
    the figures to ``args.out``."""
    import torch.distributed as dist
    from bench_generate import run_seqattn, teacher_forced

    from seqattn.integrations.hf_parallel import load_tensor_parallel

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    t0 = time.perf_counter()
    model = load_tensor_parallel(args.model, dtype=dtype_of(args))
    model.generation_config.eos_token_id = None
    loaded = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, model.config.vocab_size, (args.requests, args.prompt_len),
                            generator=gen).tolist()  # fmt: skip
    graphs = args.device == "cuda" and not args.no_graphs
    result = run_seqattn(model, prompts, args, graphs=graphs, compile=args.compile)
    top1, gap = teacher_forced(model, prompts, result["outputs"], args.device)
    hidden, dtype = model.config.hidden_size, dtype_of(args)
    reduce_us = all_reduce_us(torch.empty(args.requests, hidden, dtype=dtype), args.device)
    reduce_graph = {}
    if args.device == "cuda" and dist.get_world_size() > 1:
        reduce_graph = all_reduce_in_graphs(
            args.requests, hidden, dtype, 2 * model.config.num_hidden_layers + 1
        )
    collectives = 2 * model.config.num_hidden_layers + 1  # o_proj, down_proj; the LM head
    del model
    gc.collect()  # the runner's graphs (reference cycles) go before the process group
    if dist.get_rank() == 0:
        memory = torch.cuda.max_memory_allocated() / 2**30 if graphs else float("nan")
        figures = dict(wall=result["wall"], decode_step=result["decode_step"],
                       ttft=result["ttft"], steps=result["steps"], top1=top1, gap=gap,
                       load_s=loaded, memory_gib=memory, syncs=result["syncs"],
                       outputs=result["outputs"], graphs=graphs, reduce_us=reduce_us,
                       collectives=collectives, profile=result["profile"],
                       reduce_graph=reduce_graph, compiling=result["compiling"])  # fmt: skip
        Path(args.out).write_text(json.dumps(figures))
    dist.barrier()  # no rank leaves while another still works
    dist.destroy_process_group()


def all_reduce_us(x: torch.Tensor, device: str, repeats: int = 50) -> float:
    """Median microseconds of one all-reduce of ``x`` (a decode step's activations, the
    size each row-parallel layer reduces) over the group: what a layer's collective
    costs inside the step, outside any graph."""
    import torch.distributed as dist

    x = x.to(device).zero_()
    times = []
    for _ in range(repeats + 5):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dist.all_reduce(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append((time.perf_counter() - t0) * 1e6)
    return sorted(times[5:])[repeats // 2]


def all_reduce_in_graphs(rows: int, hidden: int, dtype: torch.dtype, count: int) -> dict:
    """Microseconds per all-reduce of ``[rows, hidden]`` when a decode step's ``count``
    of them are captured in one CUDA graph, by NCCL and by torch's symmetric-memory
    kernels (one-shot: each rank reads the others' buffers over NVLink; two-shot:
    reduce-scatter then all-gather), each checked against NCCL's sum."""
    import torch.distributed as dist

    group = dist.group.WORLD
    x = torch.randn(rows, hidden, dtype=dtype, device="cuda") / 8
    expected = x.clone()
    dist.all_reduce(expected)
    ways: dict[str, Any] = {"nccl": lambda t: dist.all_reduce(t)}
    found: dict[str, Any] = {}
    try:
        import torch.distributed._symmetric_memory as symm_mem

        buffer = symm_mem.empty(rows, hidden, dtype=dtype, device="cuda")
        symm_mem.rendezvous(buffer, group.group_name)
        ops, name = torch.ops.symm_mem, group.group_name

        def one_shot(t: torch.Tensor) -> None:
            ops.one_shot_all_reduce_out(buffer.copy_(t), "sum", name, t)

        def two_shot(t: torch.Tensor) -> None:
            ops.two_shot_all_reduce_(buffer.copy_(t), "sum", name)
            t.copy_(buffer)

        ways.update({"symm one-shot": one_shot, "symm two-shot": two_shot})
    except Exception as error:  # an older torch, or no P2P: say so, keep NCCL's figure
        found["symm"] = f"unavailable: {type(error).__name__}: {str(error)[:160]}"
    for label, reduce in ways.items():
        try:
            found[label] = graph_us(reduce, x, expected, count)
        except Exception as error:
            found[label] = f"failed: {type(error).__name__}: {str(error)[:160]}"
    return found


def graph_us(reduce: Any, x: torch.Tensor, expected: torch.Tensor, count: int) -> Any:
    """Median microseconds per call of ``reduce`` over ``count`` calls in one graph,
    and whether its result equals ``expected``."""
    work = x.clone()
    reduce(work)  # eager once: lazy initialization, and the check
    same = bool(torch.allclose(work.float(), expected.float(), atol=1e-2, rtol=1e-2))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            reduce(work.copy_(x))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(count):
            reduce(work)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / count)
    del graph
    return dict(us=sorted(times)[10], correct=same)


def launch(args: argparse.Namespace, model: Path, ranks: int) -> dict[str, Any]:
    """One run under ``torchrun --nproc-per-node ranks``; rank 0's figures. A run with
    CUDA graphs that fails or hangs is run again without them (and says so)."""
    try:
        return launch_once(args, model, ranks, graphs=not args.no_graphs)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        if args.no_graphs or args.device != "cuda":
            raise
        print(f"TP={ranks} with CUDA graphs failed ({type(error).__name__}); again eager",
              flush=True)  # fmt: skip
        return launch_once(args, model, ranks, graphs=False)


def launch_once(args: argparse.Namespace, model: Path, ranks: int, graphs: bool) -> dict:
    """One run under ``torchrun``, as :func:`launch`."""
    out = Path(tempfile.mkdtemp()) / "figures.json"
    here = Path(__file__).parent
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               PYTHONPATH=os.pathsep.join([str(here), str(here.parent / "src"),
                                           os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    sizes = [f"--requests={args.requests}", f"--prompt-len={args.prompt_len}",
             f"--new-tokens={args.new_tokens}", f"--step-tokens={args.step_tokens}"]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", __file__, "--worker", "--model", str(model),
               "--out", str(out), "--device", args.device, "--backend", args.backend,
               *sizes, *([] if graphs else ["--no-graphs"]),
               *(["--compile"] if args.compile else []),
               *(["--profile"] if args.profile else [])]  # fmt: skip
    run = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        status = run.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)  # torchrun and its ranks
        if not out.is_file():
            raise
        hung = "hung leaving the process group after NCCL ran in CUDA graphs (pytorch#115388)"
        print(f"TP={ranks}: its ranks {hung}, after writing their figures; killed", flush=True)
        status = 0
    if status != 0:
        raise subprocess.CalledProcessError(status, command)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke run)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--step-tokens", type=int, default=8192, help="engine token budget")
    parser.add_argument("--backend", default="auto", help="seqattn attention: auto, torch")
    parser.add_argument("--ranks", default="1,2", help="the runs' rank counts")
    parser.add_argument("--no-graphs", action="store_true", help="decode eagerly")
    parser.add_argument("--compile", action="store_true", help="decode through torch.compile")
    parser.add_argument("--profile", action="store_true", help="kernel time by kind per step")
    parser.add_argument("--timeout", type=float, default=420, help="seconds a run may take")
    parser.add_argument("--model-dir", help="where the checkpoint goes (default: the temp dir)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.quick, args.tiny = False, args.tiny  # what bench_generate's helpers read
    if args.worker:
        return worker(args)
    args.size = "tiny" if args.tiny else "8b"
    t0 = time.perf_counter()
    model = save_model(args)
    print(f"checkpoint {model} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    runs = {n: launch(args, model, n) for n in map(int, args.ranks.split(","))}
    report(args, runs)


def report(args: argparse.Namespace, runs: dict[int, dict[str, Any]]) -> None:
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    tokens = args.requests * args.new_tokens
    base = runs[min(runs)]
    print(f"\n{name} x {max(runs)}; Llama {args.size}, {dtype_of(args)}; {args.requests} "
          f"requests x {args.prompt_len} prompt tokens, {args.new_tokens} generated each, "
          f"greedy; decode {'compiled' if args.compile else 'not compiled'}")  # fmt: skip
    for ranks, r in runs.items():
        same = sum(a == b for x, y in zip(r["outputs"], base["outputs"], strict=True)
                   for a, b in zip(x, y, strict=True))  # fmt: skip
        print(f"TP={ranks}: weights loaded in {r['load_s']:.1f} s; peak GPU memory "
              f"{r['memory_gib']:.1f} GiB per rank; host syncs {r['syncs']}; tokens equal "
              f"to TP={min(runs)}: {same / tokens:.1%}; HF forward on its tokens: top-1 "
              f"{r['top1']:.1%}, largest gap {r['gap']:.3f}")  # fmt: skip
        if ranks > 1:  # how much of a decode step the collectives alone would take
            total = r["reduce_us"] * r["collectives"] / 1e3
            step = r["decode_step"] * 1e3
            print(f"TP={ranks}: one all-reduce of [{args.requests}, hidden] activations "
                  f"{r['reduce_us']:.1f} us (eager, outside graphs); {r['collectives']} per "
                  f"decode step: {total:.2f} ms of the {step:.2f} ms step")  # fmt: skip
            for way, got in r.get("reduce_graph", {}).items():
                print(f"TP={ranks}: all-reduce in a CUDA graph of {r['collectives']}, {way}: {got}")
        if r.get("compiling"):
            seconds, count, stacked = r["compiling"]
            print(f"TP={ranks}: torch.compile {seconds:.1f} s, graphs compiled: {count}, "
                  f"projection groups made one matmul: {stacked}")  # fmt: skip
        if r.get("profile"):
            print(f"TP={ranks} {r['profile']}")
    print("\n| run | CUDA graphs | wall s | generated tok/s | median decode step ms | "
          "TTFT s | decode step speed-up |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for ranks, r in runs.items():
        print(f"| TP={ranks} | {'yes' if r['graphs'] else 'no'} | {r['wall']:.2f} | "
              f"{tokens / r['wall']:,.0f} | {r['decode_step'] * 1e3:.2f} | {r['ttft']:.3f} | "
              f"{base['decode_step'] / r['decode_step']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
