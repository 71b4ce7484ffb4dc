"""``seqattn demo``: serve a batch of requests behind a shared system prompt and check the
tokens against transformers' own greedy ``generate``.

With no arguments it runs on the CPU with a small seeded random-weight Llama-style model
(no download). ``--config PATH`` takes an HF ``config.json`` (random weights),
``--model DIR`` loads real weights from a local directory, ``--device cuda`` runs
flashinfer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import SeqAttnError

DEMO_CONFIG = dict(
    model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1024,
)  # fmt: skip


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="seqattn", description="seqattn command line")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help=__doc__.splitlines()[0] if __doc__ else None)
    source = demo.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="an HF config.json (random weights)")
    source.add_argument("--model", type=Path, help="a local directory with HF weights")
    demo.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    demo.add_argument("--requests", type=int, default=8)
    demo.add_argument("--system-tokens", type=int, default=96)
    demo.add_argument("--max-new-tokens", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        return run_demo(args)
    except (SeqAttnError, FileNotFoundError) as error:
        print(f"seqattn demo: {error}", file=sys.stderr)
        return 2


def run_demo(args: argparse.Namespace) -> int:
    from .engine import Engine, SamplingParams
    from .integrations.hf import PagedCausalLM

    device = torch.device(args.device)
    model = load_model(args, device)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    system = torch.randint(3, vocab, (args.system_tokens,), generator=gen).tolist()
    prompts = [
        system + torch.randint(3, vocab, (8 + 4 * i,), generator=gen).tolist()
        for i in range(args.requests)
    ]
    page_size = 16
    per_request = -(-(len(prompts[-1]) + args.max_new_tokens) // page_size)
    runner = PagedCausalLM(model, num_pages=args.requests * per_request + 8, page_size=page_size)
    engine = Engine(runner, max_step_tokens=256)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    print(f"seqattn demo: {describe(model)} on {device} ({runner.attention_for(-1, None).backend}"
          f" attention), {args.requests} requests sharing a {args.system_tokens}-token "
          f"system prompt, {args.max_new_tokens} new tokens each")  # fmt: skip
    outputs, seconds = serve(engine, prompts, params)
    report(engine, outputs, seconds)
    return check_parity(model, prompts, outputs, args.max_new_tokens)


def load_model(args: argparse.Namespace, device: torch.device) -> Any:
    """The model: random weights from the demo config or ``--config``, or ``--model``."""
    import transformers

    from .integrations.hf import check_supported

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.model is not None:
        if not args.model.is_dir():
            raise FileNotFoundError(f"--model {args.model}: no such directory")
        config = transformers.AutoConfig.from_pretrained(args.model)
        check_supported(config)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        config = config_from(args.config)
        check_supported(config)
        torch.manual_seed(args.seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.to(device).eval()  # type: ignore[arg-type]  # transformers types .to oddly


def config_from(path: Optional[Path]) -> Any:
    import transformers

    if path is None:
        values = dict(DEMO_CONFIG)
    else:
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        values = json.loads(path.read_text())
    model_type = str(values.pop("model_type", "")) or None
    if model_type is None:
        raise SeqAttnError(f"{path}: a config.json names its model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except ValueError as error:
        raise SeqAttnError(f"unknown model_type {model_type!r}: {error}") from None


def describe(model: Any) -> str:
    config = model.config
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return (f"{config.model_type} ({params:.1f}M parameters, {config.num_hidden_layers} layers, "
            f"{config.num_attention_heads}/{config.num_key_value_heads} heads)")  # fmt: skip


def serve(engine: Any, prompts: list[list[int]], params: Any) -> tuple[list[list[int]], float]:
    """All requests through the engine, with a progress bar; (outputs, seconds).

    They arrive together: the engine computes the shared system prompt once, for the
    first, and starts the others from the prefix cache once it is there."""
    total = len(prompts) * params.max_new_tokens
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_work:
        engine.step()
        done = engine.stats.generated_tokens
        bar = "#" * (30 * done // total)
        print(f"\r  generating [{bar:<30}] {done}/{total} tokens", end="", flush=True)
    print()
    return [engine.requests[i].output for i in ids], time.perf_counter() - start


def report(engine: Any, outputs: list[list[int]], seconds: float) -> None:
    cache = engine.runner.cache
    stats = engine.descriptor.prefix_stats
    tokens = sum(len(o) for o in outputs)
    print(f"  {tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s, "
          f"{engine.stats.steps} steps, {engine.stats.preemptions} preemptions")  # fmt: skip
    print(f"  pages: {cache.num_pages - cache.allocator.free_pages_count} held "
          f"({stats.cached_pages} cached for reuse), {cache.allocator.free_pages_count} free "
          f"of {cache.num_pages}")  # fmt: skip
    print(f"  prefix cache: hit rate {stats.hit_rate:.1%} ({stats.hit_tokens} of "
          f"{stats.lookup_tokens} prompt tokens), {engine.stats.computed_prompt_tokens} "
          f"prompt tokens computed")  # fmt: skip


def check_parity(model: Any, prompts: list[list[int]], outputs: list[list[int]], n: int) -> int:
    """Compare with transformers' greedy generate (eager attention); 0 when equal."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    references = []
    try:
        for prompt in prompts:
            ids = torch.tensor([prompt], device=model.device)
            with torch.inference_mode():
                ref = model.generate(ids, max_new_tokens=n, do_sample=False)[0, len(prompt) :]
            references.append(ref.tolist())
    finally:
        model.set_attn_implementation(previous)
    same, total, first = token_agreement(references, outputs)
    if first is None:
        print(f"parity: identical to transformers' greedy generate ({total} of {total} "
              "tokens, every request)")  # fmt: skip
        return 0
    print(f"parity: differs from transformers' greedy generate: {same} of {total} tokens "
          f"equal; first divergence at token {first}")  # fmt: skip
    return 1 if model.dtype == torch.float32 else 0


def token_agreement(
    references: list[list[int]], outputs: list[list[int]]
) -> tuple[int, int, Optional[int]]:
    """Per request, reference tokens against generated ones: ``(tokens equal, reference
    tokens, earliest position where any request differs or ends early)``; the position
    is None when every request is identical."""
    same = total = 0
    first: Optional[int] = None
    for reference, output in zip(references, outputs, strict=True):
        equal = [a == b for a, b in zip(reference, output, strict=False)]
        same, total = same + sum(equal), total + len(reference)
        if not all(equal) or len(reference) != len(output):
            where = equal.index(False) if not all(equal) else len(equal)
            first = where if first is None else min(first, where)
    return same, total, first


if __name__ == "__main__":
    sys.exit(main())
