"""Generation throughput: seqattn's engine against transformers' own generation, one process.

Workload (issue 8): a random-weight Llama (16 layers, hidden 2048, intermediate 5632,
32 query / 8 KV heads, vocab 32000), bf16; 64 requests of 512 random prompt tokens,
256 generated tokens each, greedy, no stop token. The same model weights and prompts go
through:

- seqattn: ``Engine`` over ``PagedCausalLM`` (flashinfer attention on the paged cache),
  four ways on CUDA: decode steps compiled by ``torch.compile`` and replayed from CUDA
  graphs, CUDA graphs of the eager forward, eager, all three on its fused Llama layers
  (``fused_layers``, :mod:`seqattn.integrations.hf_fused`) where not compiled, and eager
  on transformers' own layers (``--compile`` adds the compiled row on the CPU; ``--skip
  compile`` drops it on CUDA, ``--skip layers`` the last; the compile time is printed);
- HF ``generate_batch`` (continuous batching, ``attn_implementation="paged|sdpa"``);
- HF ``generate`` with sdpa (one left-padded batch).

For each: wall time, generated tokens/s, time to first token, and the ratio of seqattn
to it. Each seqattn row times ``--repeats`` generations (3 by default) on one engine
after its warm-up and reports the one of the median wall, every wall beside it: the
host's speed varies within a process, and the CUDA-graph steps wait for a slow host.
For scale beside the eager step: transformers' forward of the decode batch alone
(sdpa, one token per row, no cache), the model code that step runs too. The bandwidth
floor is the time to read the weights and every decode step's KV once at the copy
bandwidth measured in the same run. seqattn's tokens are compared with
HF ``generate``'s (the fraction of identical tokens and the first divergence). With random
bf16 weights the logits are nearly flat, so greedy paths split at near-ties (HF's own two
paths agree on a few percent of tokens); every path's tokens are therefore also judged by
HF's own forward with the path's tokens as input (teacher forcing): the share of tokens that
are that forward's top-1, and the largest gap between its top logit and the chosen token's.

``python benchmarks/bench_generate.py`` on a GPU; ``--quick`` shrinks the workload;
``--device cpu --quick --tiny`` is the CI smoke run of every path (a model of a few
hundred thousand parameters; on the CPU, ``generate_batch``'s cache is sized to the
workload, not to 60% of the free RAM as transformers sizes it by default).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any, Optional

import torch
from bench_attention import copy_bandwidth
from gpu_profile import format_breakdown, kernel_breakdown

from seqattn.cli import token_agreement
from seqattn.engine import Engine, SamplingParams
from seqattn.integrations.hf import PagedCausalLM
from seqattn.integrations.hf_attention import ATTENTION_NAME

MODEL = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
)  # fmt: skip
QUICK = dict(num_hidden_layers=4, hidden_size=512, intermediate_size=1408,
             num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
# a smoke test's model: every path runs in seconds and little memory on a CPU
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)  # fmt: skip


def build_model(args: argparse.Namespace) -> Any:
    import transformers

    config = dict(MODEL)
    if args.quick:
        config.update(QUICK)
    if args.tiny:
        config.update(TINY)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if args.device == "cuda" else torch.float32
    )  # fmt: skip
    with torch.device(args.device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(dtype)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_seqattn(
    model: Any, prompts: list[list[int]], args: argparse.Namespace, graphs: bool,
    compile: bool = False, backend: Optional[str] = None, inspect: bool = True,
    fused: Optional[bool] = None,
) -> dict:  # fmt: skip
    """``args.repeats`` timed runs of ``prompts`` through one engine (after a warm-up);
    the result is the run of the median wall, with every run's wall beside it. Then, if
    ``inspect``, its host syncs and kernel profile (:func:`inspect_run`; otherwise the
    caller calls it after every timed run: a torch.profiler session slows the eager
    steps of every later run in the process, by about 3 ms on an H200's host)."""
    page_size = 16
    per_request = -(-(args.prompt_len + args.new_tokens) // page_size) + 1
    runner = PagedCausalLM(model, num_pages=len(prompts) * per_request + 64, page_size=page_size,
                           backend=backend or args.backend, compile=compile,
                           compile_mode=getattr(args, "compile_mode", "default"),
                           fused_layers=fused)  # fmt: skip
    engine = Engine(runner, max_batch_size=len(prompts), max_step_tokens=args.step_tokens,
                    cuda_graphs=graphs)  # fmt: skip
    # warm-up at the run's shapes: kernels, GEMM plans, allocator caches, the compiled
    # decode and the CUDA graph of the full batch (enough new tokens that all requests
    # decode together)
    engine.generate(prompts, SamplingParams(max_new_tokens=8))
    runs = []
    for _ in range(getattr(args, "repeats", 1)):
        runner.descriptor.prefix_cache.clear()  # every run prefills its prompts
        runs.append(timed_run(engine, prompts, args))
    walls = [run["wall"] for run in runs]
    result = sorted(runs, key=lambda run: run["wall"])[(len(runs) - 1) // 2]
    compiled = runner.compiled
    compiling = (
        None
        if compiled is None
        else (compiled.compile_seconds, compiled.compiles, compiled.stacked_matmuls)
    )
    same = all(run["outputs"] == runs[0]["outputs"] for run in runs)
    result.update(walls=walls, compiling=compiling, engine=engine, graphs=graphs,
                  same_outputs=same)  # fmt: skip
    if inspect:
        inspect_run(result, prompts, args)
    return result


def timed_run(engine: Engine, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """One generation of ``prompts`` (``args.new_tokens`` each), timed on the host:
    its wall, the admission's share, each decode step's and the first steps' times."""
    params = SamplingParams(max_new_tokens=args.new_tokens)
    sync(args.device)
    steps_before = engine.stats.steps
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    admitted = time.perf_counter() - start
    decode_steps = []  # host wall time of steps that computed no prompt token
    first_steps = []  # the first steps' host wall times (prefill)
    while engine.has_work:
        computed, t0 = engine.stats.computed_prompt_tokens, time.perf_counter()
        engine.step()
        if len(first_steps) < 6:
            first_steps.append(time.perf_counter() - t0)
        if engine.stats.computed_prompt_tokens == computed:
            decode_steps.append(time.perf_counter() - t0)
    sync(args.device)
    wall = time.perf_counter() - start
    requests = [engine.requests[i] for i in ids]
    ttft = [r.first_token_time - r.arrival for r in requests]
    return dict(wall=wall, ttft=statistics.mean(ttft), outputs=[r.output for r in requests],
                steps=engine.stats.steps - steps_before,
                decode_step=statistics.median(decode_steps), first_steps=first_steps,
                ttft_max=max(ttft), admitted=admitted, decode_total=sum(decode_steps),
                decode_count=len(decode_steps))  # fmt: skip


def inspect_run(result: dict, prompts: list[list[int]], args: argparse.Namespace) -> None:
    """Add a run's host syncs and (``--profile``) kernel profile to ``result``, then
    free its engine's CUDA graphs (NCCL cannot tear down under captured graphs)."""
    engine = result.pop("engine")
    engine.runner.model.set_attn_implementation(ATTENTION_NAME)  # HF's rows set "sdpa"
    cuda = args.device == "cuda"
    result["syncs"] = count_syncs(engine, prompts, args) if cuda else None
    result["profile"] = None
    if getattr(args, "profile", False) and cuda:
        result["profile"] = profile_decode(engine, prompts, result["decode_step"], result["graphs"])
    engine.runner.disable_cuda_graphs()


def profile_decode(engine: Engine, prompts: list[list[int]], step_s: float, graphs: bool) -> str:
    """Kernel time by kind in 8 steady decode steps of the whole batch (after the
    timed run, so it perturbs no figure)."""
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=16)) for p in prompts]
    while any(not engine.requests[i].output for i in ids):
        engine.step()  # prefill
    engine.step()
    try:
        found = kernel_breakdown(engine.step, 8)
    finally:
        while engine.has_work:
            engine.step()
    runner = engine.runner
    how = " compiled" if runner.compiled is not None else (
        " fused layers" if runner.fused is not None else " transformers' layers"
    )  # fmt: skip
    title = f"decode step profile ({'CUDA graphs' if graphs else 'eager'}{how})"
    return format_breakdown(title, found, step_s * 1e3)


def count_syncs(engine: Engine, prompts: list[list[int]], args: argparse.Namespace) -> str:
    """Host syncs torch reports (sync debug mode) in a few steady decode steps."""
    import warnings

    ids = [engine.add_request(p[:64], SamplingParams(max_new_tokens=8)) for p in prompts]
    while any(not engine.requests[i].output for i in ids):
        engine.step()  # prefill, and the first decode steps
    steps, sources = 0, []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(4):
                engine.step()
                steps += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    while engine.has_work:
        engine.step()
    for w in caught:
        if "synchroniz" in str(w.message) and "prototype" not in str(w.message):
            sources.append(f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}")
    return f"{len(sources) / steps:.1f} per decode step ({'; '.join(sorted(set(sources)))})"


def run_hf_generate(model: Any, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """One left-padded batch through ``generate`` with sdpa."""
    model.set_attn_implementation("sdpa")
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=args.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                        device=args.device)  # fmt: skip

    def generate(n: int) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                  do_sample=False, eos_token_id=None)  # fmt: skip

    generate(2)  # warm-up
    ttft = timed(lambda: generate(1), args.device)[0]  # the batch's first tokens: one prefill
    wall, out = timed(lambda: generate(args.new_tokens), args.device)
    return dict(wall=wall, ttft=ttft, outputs=out[:, width:].tolist())


def run_hf_generate_batch(model: Any, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """transformers' continuous batching (``generate_batch``, paged attention); its own
    cache sizing (most of the free GPU memory) and defaults otherwise."""
    from transformers import GenerationConfig

    model.set_attn_implementation("paged|sdpa")
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False,
                              eos_token_id=-1, pad_token_id=0)  # fmt: skip
    batching = cpu_batching_config(prompts, args) if args.device == "cpu" else None

    def generate() -> dict:
        return model.generate_batch(inputs=prompts, generation_config=config,
                                    continuous_batching_config=batching,
                                    record_timestamps=True, progress_bar=False)  # fmt: skip

    model.generate_batch(inputs=prompts[:2], generation_config=config,
                         continuous_batching_config=batching)  # warm-up  # fmt: skip
    wall, outs = timed(generate, args.device)
    by_prompt = {tuple(o.prompt_ids): o for o in outs.values()}  # outs: in finishing order
    outputs = [by_prompt.get(tuple(p)) for p in prompts]
    if any(o is None or o.error is not None for o in outputs):
        raise RuntimeError(f"generate_batch lost requests: {[o and o.error for o in outputs][:4]}")
    ttft = statistics.mean(o.timestamps[0] - o.created_time for o in outputs)
    return dict(wall=wall, ttft=ttft, outputs=[list(o.generated_tokens) for o in outputs])


def cpu_batching_config(prompts: list[list[int]], args: argparse.Namespace) -> Any:
    """``generate_batch``'s cache sized to this workload: by default transformers gives its
    cache 60% of the free RAM on a CPU (gigabytes, for a few hundred tokens)."""
    from transformers import ContinuousBatchingConfig

    page = 64
    per_request = -(-(args.prompt_len + args.new_tokens) // page)
    return ContinuousBatchingConfig(page_size=page, num_blocks=len(prompts) * per_request,
                                    max_batch_tokens=len(prompts) * args.prompt_len)  # fmt: skip


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def model_forward_alone(model: Any, args: argparse.Namespace, repeats: int = 20) -> float:
    """Seconds of one transformers forward (sdpa) over the decode batch alone: ``requests``
    rows of one token each, no cache and so no attention over earlier tokens. The eager
    engine's step runs this model code too: the difference is the cache's attention,
    sampling and seqattn's bookkeeping."""
    model.set_attn_implementation("sdpa")
    ids = torch.zeros(args.requests, 1, dtype=torch.long, device=args.device)
    positions = torch.full_like(ids, args.prompt_len)

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=ids, position_ids=positions, use_cache=False)

    forward()  # warm-up
    seconds, _ = timed(lambda: [forward() for _ in range(repeats)], args.device)
    return seconds / repeats


def floor_seconds(model: Any, args: argparse.Namespace, copy_bw: float, batch: int) -> float:
    """Reading the weights and each decode step's KV once, at the copy bandwidth."""
    config = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = config.num_hidden_layers * config.num_key_value_heads * head_dim * 2 * 2
    kv_tokens = sum(batch * (args.prompt_len + t) for t in range(args.new_tokens))
    return (args.new_tokens * weight_bytes + kv_tokens * per_token) / copy_bw


def teacher_forced(
    model: Any, prompts: list[list[int]], outputs: list[list[int]], device: str
) -> tuple[float, float]:
    """HF's own forward (sdpa, no cache) over each prompt followed by the generated tokens:
    ``(share of generated tokens that are its top-1, largest top logit - chosen logit)``."""
    model.set_attn_implementation("sdpa")
    top1 = total = 0
    gap = 0.0
    for start in range(0, len(prompts), 8):  # batches of 8: logits stay a few hundred MB
        batch = outputs[start : start + 8]
        rows = [p + o[:-1] for p, o in zip(prompts[start : start + 8], batch, strict=True)]
        chosen = torch.tensor(batch, device=device)  # [b, new] int64
        with torch.inference_mode():
            logits = model(torch.tensor(rows, device=device), use_cache=False,
                           logits_to_keep=chosen.shape[1]).logits.float()  # fmt: skip
        best = logits.max(dim=-1).values  # [b, new]
        picked = logits.gather(-1, chosen[..., None])[..., 0]
        top1 += int((picked == best).sum())
        total += chosen.numel()
        gap = max(gap, float((best - picked).max()))
    return top1 / total, gap


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[float, Optional[int]]:
    """Fraction of ``theirs``' tokens that ``ours`` repeats, and the earliest divergence."""
    same, total, first = token_agreement(theirs, ours)
    return same / total, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="8 requests, a 4-layer model")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 512-token-vocab model")
    parser.add_argument("--requests", type=int, help="default 64 (--quick: 8)")
    parser.add_argument("--prompt-len", type=int, help="default 512 (--quick: 64)")
    parser.add_argument("--new-tokens", type=int, help="default 256 (--quick: 32)")
    parser.add_argument("--step-tokens", type=int, default=8192, help="engine token budget")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated: compile,graphs,layers,generate_batch,generate",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also the compiled decode on the CPU (always on CUDA)",
    )
    parser.add_argument("--compile-mode", default="default",
                        help="default or max-autotune-no-cudagraphs")  # fmt: skip
    parser.add_argument("--dtype", help="model dtype (default bf16 on cuda, float32 on cpu)")
    parser.add_argument("--backend", default="auto", help="seqattn attention: auto, torch")
    parser.add_argument(
        "--flashinfer-graphs",
        action="store_true",
        help="also the compiled run with flashinfer's decode in the graphs (by default "
        "they decode with seqattn's Triton kernel where it serves)",
    )
    parser.add_argument("--profile", action="store_true", help="kernel time by kind per step")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per seqattn row (the table: the median)"
    )
    args = parser.parse_args()
    # --quick picks smaller sizes; sizes given explicitly win (they were once overridden)
    defaults = (8, 64, 32) if args.quick else (64, 512, 256)
    for name, default in zip(("requests", "prompt_len", "new_tokens"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    model = build_model(args)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, model.config.vocab_size, (args.requests, args.prompt_len),
                            generator=gen).tolist()  # fmt: skip
    copy_bw = copy_bandwidth() if args.device == "cuda" else float("nan")
    results = {}
    skip = set(args.skip.split(","))
    graphs = args.device == "cuda" and "graphs" not in skip
    ours = dict(inspect=False)  # syncs and profiles after every timed run (run_seqattn)
    if (args.device == "cuda" or args.compile) and "compile" not in skip:
        label = "seqattn engine, compiled + CUDA graphs" if graphs else "seqattn engine, compiled"
        results[label] = run_seqattn(model, prompts, args, graphs=graphs, compile=True, **ours)
        if args.flashinfer_graphs and graphs:
            results[f"{label}, flashinfer decode"] = run_seqattn(
                model, prompts, args, graphs=graphs, compile=True, backend="flashinfer", **ours
            )
    if graphs:
        results["seqattn engine, CUDA graphs"] = run_seqattn(model, prompts, args, True, **ours)
    results["seqattn engine, eager"] = run_seqattn(model, prompts, args, graphs=False, **ours)
    if args.device == "cuda" and "layers" not in skip:  # eager by transformers' module code
        results["seqattn engine, eager, transformers' layers"] = run_seqattn(
            model, prompts, args, graphs=False, fused=False, **ours
        )
    if "generate_batch" not in skip:
        results["HF generate_batch (paged|sdpa)"] = run_hf_generate_batch(model, prompts, args)
    if "generate" not in skip:
        results["HF generate (sdpa)"] = run_hf_generate(model, prompts, args)
    alone = model_forward_alone(model, args)  # before any profiler session slows the host
    for r in results.values():
        if "engine" in r:
            inspect_run(r, prompts, args)
    report(model, prompts, args, results, copy_bw, alone)


def report(model: Any, prompts: list[list[int]], args: argparse.Namespace, results: dict,
           copy_bw: float, alone: float) -> None:  # fmt: skip
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    tokens = args.requests * args.new_tokens
    floor = floor_seconds(model, args, copy_bw, args.requests)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    config = model.config
    print(f"\n{name}; Llama {params:.2f}B params, {config.num_hidden_layers} layers, "
          f"{model.dtype}; {args.requests} requests x {args.prompt_len} prompt tokens, "
          f"{args.new_tokens} generated each, greedy")  # fmt: skip
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)")
    ours = next(iter(results.values()))  # the speed-ups below are against the first row
    reached = ", ".join(f"{floor / r['wall']:.1%} ({label.removeprefix('seqattn engine, ')})"
                        for label, r in results.items() if label.startswith("seqattn"))  # fmt: skip
    print(f"bandwidth floor: {floor:.2f} s, {tokens / floor:,.0f} tok/s; seqattn reaches "
          f"{reached} of it ({ours['steps']} engine steps)")  # fmt: skip
    per_step = floor / args.new_tokens
    for r in results.values():
        if r.get("profile"):
            print(r["profile"])
    for label, r in results.items():
        if r.get("compiling"):
            seconds, count, stacked = r["compiling"]
            print(f"{label}: torch.compile {seconds:.1f} s, graphs compiled: {count}, "
                  f"projection groups made one matmul: {stacked} (mode {args.compile_mode}; "
                  "inductor's cache: TORCHINDUCTOR_CACHE_DIR)")  # fmt: skip
    for label, r in results.items():
        if "decode_step" in r:
            print(
                f"{label}: median decode step {r['decode_step'] * 1e3:.2f} ms (floor "
                f"{per_step * 1e3:.2f} ms); host syncs: {r['syncs'] or 'not checked'}; "
                f"TTFT max {r['ttft_max']:.3f} s; first steps ms: "
                f"{', '.join(f'{t * 1e3:.1f}' for t in r['first_steps'])}"
            )
            print(
                f"{label}: wall {r['wall'] * 1e3:.1f} ms = admission {r['admitted'] * 1e3:.1f}"
                f" + {r['decode_count']} decode steps {r['decode_total'] * 1e3:.1f} (mean "
                f"{r['decode_total'] / max(r['decode_count'], 1) * 1e3:.3f}) + the rest "
                f"{(r['wall'] - r['admitted'] - r['decode_total']) * 1e3:.1f} (steps with "
                "prompt tokens, the final sync)"
            )
            print(f"{label}: walls of {len(r['walls'])} runs (the table: the median): "
                  f"{', '.join(f'{w:.3f}' for w in r['walls'])} s; their tokens "
                  f"{'identical' if r['same_outputs'] else 'DIFFER'}")  # fmt: skip
    print(f"transformers' forward of the decode batch alone (sdpa, {args.requests} rows of "
          f"one token, no cache): {alone * 1e3:.2f} ms")  # fmt: skip
    if "HF generate (sdpa)" in results:
        reference = results["HF generate (sdpa)"]["outputs"]
        for label, r in results.items():
            if "decode_step" in r:
                same, first = agreement(r["outputs"], reference)
                where = "none" if first is None else f"at token {first}"
                print(
                    f"{label}: tokens identical to HF generate: {same:.1%}; "
                    f"earliest divergence: {where}"
                )
        batch = results.get("HF generate_batch (paged|sdpa)")
        if batch is not None:  # how far HF's two paths agree with each other, for scale
            same, first = agreement(batch["outputs"], reference)
            print(f"(HF generate_batch vs HF generate: {same:.1%} identical)")
    for label, r in results.items():
        top1, gap = teacher_forced(model, prompts, r["outputs"], args.device)
        print(f"{label}: HF forward on its tokens: top-1 {top1:.1%}; largest gap to the "
              f"top logit {gap:.3f}")  # fmt: skip
    print("\n| path | wall s | generated tok/s | TTFT s | seqattn speed-up |")
    print("|---|---:|---:|---:|---:|")
    for label, r in results.items():
        print(f"| {label} | {r['wall']:.2f} | {tokens / r['wall']:,.0f} | {r['ttft']:.3f} "
              f"| {r['wall'] / ours['wall']:.1f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
