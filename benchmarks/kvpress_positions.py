"""The positions kvpress's presses keep, per layer and KV head, on given prompts (issue 17).

Runs in a virtual environment of its own, with kvpress and the transformers it accepts
(kvpress 0.5.5 pins ``transformers < 5.3``; seqattn's tests run a newer one), and does
not import seqattn. It reads the file ``bench_headwise_real.py --save-prompts`` writes
(the model, the prompts' token ids, the budgets and seqattn's press settings), prefills
each prompt under each kvpress press with the equivalent settings, and writes, per press,
budget, prompt, layer and KV head, the prompt positions the press kept::

    python3 -m venv /work/kvenv
    /work/kvenv/bin/pip install torch==2.13.0     # the CPU build; pinned, never unpinned
    echo torch==2.13.0 > constraints.txt          # kvpress's dependencies must keep it
    /work/kvenv/bin/pip install -c constraints.txt kvpress==0.5.5 "transformers<5.3" gguf accelerate
    /work/kvenv/bin/python benchmarks/kvpress_positions.py prompts.json kvpress.json

seqattn's settings map to kvpress's as: ``compression_ratio = 1 - budget``;
StreamingLLM ``sinks`` -> ``n_sink``; SnapKV ``window``/``kernel`` -> ``window_size``/
``kernel_size`` (average pooling, kvpress's only kind); AdaKV ``AdaKVPress(SnapKVPress(..),
alpha_safeguard)``; PyramidKV ``window_size``, ``kernel_size``, ``beta``. kvpress keeps
``int(n * (1 - compression_ratio))`` tokens per head (rounded down), seqattn
``ceil(budget * n)`` (rounded up): equal when ``budget * n`` is whole, which the prompts
of ``bench_headwise_real.py`` are built for (a multiple of 4 tokens). PyramidKV spreads
the budget over layers differently by design (seqattn's ``PyramidKVPress`` docstring:
kvpress counts the window inside each layer's share, rounds each layer, and falls back
to equal budgets when the top layer's share would be below the window).

How the kept positions are read (kvpress's ``BasePress.forward_hook`` calls the press's
``compress`` on each layer's cache right after the prefill's attention; this wraps it):
a press that prunes (StreamingLLM, SnapKV, PyramidKV: ``keys.gather`` of the top scores)
returns the kept keys themselves, each matched bit for bit to its row in the keys it was
given (rotated keys of distinct positions differ; a duplicate row is refused); AdaKV
returns the keys unchanged and sets ``module.masked_key_indices`` (the pruned (batch,
head, position) triples, masked in later attention): kept is their complement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def budget_key(budget: float) -> str:
    """A budget as a JSON key, as ``bench_headwise_real.py`` writes it."""
    return repr(float(budget))


def load(path: Path) -> Any:
    """The model, float32 on the CPU: a .gguf file, a directory with one, or an HF
    directory (seqattn's loader is not importable here: this venv lacks seqattn)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if path.is_file():
        path, kwargs["gguf_file"] = path.parent, path.name
    elif not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) != 1:
            sys.exit(f"{path}: expected one .gguf file, found {ggufs}")
        kwargs["gguf_file"] = ggufs[0]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    return model.eval()


def make_press(name: str, budget: float, settings: dict) -> Any:
    """kvpress's press for seqattn's ``name`` with seqattn's ``settings``."""
    import kvpress

    ratio = 1.0 - budget
    if name == "streamingllm":
        return kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=settings["sinks"])
    if settings.get("pooling", "avg") != "avg":
        sys.exit(f"{name}: kvpress pools by average only, got {settings['pooling']}")
    snap = dict(compression_ratio=ratio, window_size=settings["window"],
                kernel_size=settings["kernel"])  # fmt: skip
    if name == "snapkv":
        return kvpress.SnapKVPress(**snap)
    if name == "adakv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(**snap),
                                  alpha_safeguard=settings["alpha_safeguard"])  # fmt: skip
    if name == "pyramidkv":
        return kvpress.PyramidKVPress(**snap, beta=settings["beta"])
    sys.exit(f"no kvpress press for {name}")


def matched_rows(given: torch.Tensor, kept: torch.Tensor) -> list[int]:
    """For each row of ``kept`` ``[m, d]``, the index of the bit-identical row of
    ``given`` ``[n, d]``, sorted."""
    rows = {row.tobytes(): i for i, row in enumerate(given.contiguous().numpy())}
    if len(rows) != given.shape[0]:
        raise RuntimeError("two positions hold bit-identical keys: cannot tell them apart")
    return sorted(rows[row.tobytes()] for row in kept.contiguous().numpy())


def kept_positions(model: Any, press: Any, prompt: list[int]) -> list[list[list[int]]]:
    """Prefill ``prompt`` under ``press``; ``[layer][head]`` the positions each kept."""
    import kvpress
    from transformers import DynamicCache

    kept: dict[int, list[list[int]]] = {}
    compress = press.compress  # the bound method; the instance attribute below shadows it

    def capture(module, hidden_states, keys, values, attentions, kwargs):  # type: ignore[no-untyped-def]
        new_keys, new_values = compress(module, hidden_states, keys, values, attentions, kwargs)
        length = keys.shape[2]
        if isinstance(press, kvpress.AdaKVPress):  # masks instead of pruning
            batch, heads, positions = (t.cpu().numpy() for t in module.masked_key_indices)
            dropped = np.zeros((keys.shape[1], length), dtype=bool)
            dropped[heads[batch == 0], positions[batch == 0]] = True
            kept[module.layer_idx] = [np.flatnonzero(~row).tolist() for row in dropped]
        else:
            kept[module.layer_idx] = [matched_rows(keys[0, h].float(), new_keys[0, h].float())
                                      for h in range(keys.shape[1])]  # fmt: skip
        return new_keys, new_values

    press.compress = capture
    try:
        with torch.inference_mode(), press(model):
            model(torch.tensor([prompt]), past_key_values=DynamicCache())
    finally:
        del press.compress  # the class's method again
    return [kept[layer] for layer in range(model.config.num_hidden_layers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prompts", type=Path, help="bench_headwise_real.py --save-prompts")
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", type=Path, help="default: the one the prompts file names")
    parser.add_argument("--presses", help="a subset of the file's presses, comma-separated")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from importlib.metadata import version

    versions = {m: version(m) for m in ("kvpress", "transformers", "torch")}
    spec = json.loads(args.prompts.read_text())
    presses = spec["presses"]
    names = args.presses.split(",") if args.presses else list(presses)
    started = time.perf_counter()
    model = load(args.model or Path(spec["model"]))
    print(f"{versions}; model loaded in {time.perf_counter() - started:.1f} s")
    kept: dict[str, dict[str, list]] = {}
    for name in names:
        for budget in spec["budgets"]:
            start = time.perf_counter()
            runs = [kept_positions(model, make_press(name, budget, presses[name]), prompt)
                    for prompt in spec["prompts"]]  # fmt: skip
            kept.setdefault(name, {})[budget_key(budget)] = runs
            counts = sorted({len(h) for run in runs for layer in run for h in layer})
            print(
                f"{name} {budget:g}: {time.perf_counter() - start:.1f} s, kept per head "
                f"{counts[0]}..{counts[-1]}"
            )
    out = {**spec, "presses": {n: presses[n] for n in names}, "source": "kvpress",
           "versions": versions, "kept": kept}  # fmt: skip
    args.out.write_text(json.dumps(out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
