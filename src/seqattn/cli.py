"""``seqattn demo``: serve requests behind a shared system prompt on seqattn's engine and
check every token against transformers' greedy ``generate`` (options: ``seqattn demo -h``).
A user's mistake (option, file, config, device) ends in one line on stderr and exit status
2, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch

from . import __version__
from ._flashinfer import flashinfer_or_none
from .cli_parallel import DemoRanks
from .cli_press import add_press_options, check_press_parity, press_option, serve_pressed
from .engine import Engine, SamplingParams
from .engine.intake import eos_token_ids
from .errors import SeqAttnError
from .integrations.hf import PagedCausalLM
from .integrations.hf_checks import SUPPORTED_MODEL_TYPES
from .page_table import pages_for

DEMO_CONFIG = dict(model_type="llama", hidden_size=256, intermediate_size=688,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=2048, max_position_embeddings=1024)  # fmt: skip
QUESTIONS = (  # what a real chat model is asked, one question per request (cycled past eight)
    "What is the capital of France?", "Name the three primary colors.",
    "How many legs does a spider have?", "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?", "What gas do plants take in from the air?",
    "What is the largest planet in our solar system?", "Translate 'thank you' into Spanish.",
)  # fmt: skip
SUPPORTED = ", ".join(SUPPORTED_MODEL_TYPES)
FIRST_PROMPT_TOKEN = 3  # random prompts avoid the ids that families keep for special tokens
PAGE_SIZE = 16


class DemoError(SeqAttnError):
    """A user's mistake the demo reports in one line (exit status 2)."""


def int_at_least(low: int, expected: str, text: str) -> int:
    """argparse type (through ``partial``): an integer >= ``low``, described as ``expected``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def device_arg(text: str) -> torch.device:
    """argparse type: ``cpu``, ``cuda`` or ``cuda:N``, refused unless usable here."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU found"
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available ({why}); use cpu")
    if device.type == "cuda" and (device.index or 0) >= (count := torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} GPU(s)")
    return device


def build_parser() -> argparse.ArgumentParser:
    """The ``seqattn`` command line: ``--version`` and the ``demo`` subcommand."""
    parser = argparse.ArgumentParser(prog="seqattn", description="seqattn: a sequence-level "
                                     "view of a paged KV cache.")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"seqattn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo",
        help="serve requests on seqattn's engine and check them against transformers",
        description="Serve requests on seqattn's engine (continuous batching, prefix caching, "
        "paged attention) and check every token against transformers' greedy generate. "
        "Without --config or --model: a small random-weight Llama on the CPU, no download.",
    )  # fmt: skip
    source = demo.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, metavar="JSON", help=f"an HF config.json "
                        f"({SUPPORTED}); the model gets random weights")  # fmt: skip
    source.add_argument("--model", type=Path, metavar="PATH",
                        help="real weights: an HF directory (config.json and *.safetensors), a "
                        ".gguf file or a directory with one (needs: pip install gguf "
                        "accelerate); with a tokenizer, it answers chat questions")  # fmt: skip
    demo.add_argument("--device", type=device_arg, default=torch.device("cpu"), help="cpu "
                      "(default) or cuda[:N] (flashinfer attention when installed)")  # fmt: skip
    positive = partial(int_at_least, 1, "a positive integer")
    non_negative = partial(int_at_least, 0, "an integer >= 0")
    demo.add_argument("--requests", type=positive, default=8, metavar="N",
                      help="requests served together (default: 8)")  # fmt: skip
    demo.add_argument("--system-tokens", type=non_negative, default=96, metavar="N",
                      help="random prompts: length of the system prompt all requests share "
                      "(default: 96; chat prompts use the chat template's)")  # fmt: skip
    demo.add_argument("--max-new-tokens", type=positive, default=32, metavar="N",
                      help="tokens to generate per request (default: 32); a real model stops "
                      "earlier at its end-of-sequence token")  # fmt: skip
    demo.add_argument("--seed", type=non_negative, default=0, metavar="N",
                      help="seed of the random weights and prompts (default: 0)")  # fmt: skip
    add_press_options(demo)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command line; the exit status (2 for a user's mistake)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error already printed
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return run_demo(args)
    except SeqAttnError as error:  # DemoError, or the library refusing what it was given
        rank = os.environ.get("RANK", "0") if DemoRanks.launched() else "0"
        who = "" if rank == "0" else f" (rank {rank})"
        print(f"seqattn demo{who}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seqattn demo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `seqattn demo | head`: the reader left; stop quietly
        # Python would report the pipe again when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def run_demo(args: argparse.Namespace) -> int:
    """The demo in this process, or as one rank of a ``torchrun`` launch of several."""
    args.pressing = press_option(args)  # refused here, before a model loads
    if args.pressing is not None and DemoRanks.launched():
        raise DemoError("--press serves in one process: run it without torchrun")
    if not DemoRanks.launched():
        return serve_demo(args, None)
    ranks = DemoRanks(args.device)
    args.device = ranks.device
    status = None
    try:
        with ranks.quiet():
            status = serve_demo(args, ranks)
        return status
    finally:
        ranks.close(finished=status is not None)


def serve_demo(args: argparse.Namespace, ranks: Optional[DemoRanks]) -> int:
    """Load the model (this rank's shard of it), serve the requests, report, and compare
    with HF ``generate`` on the whole model."""
    whole, tokenizer = load_model(args)
    model = whole if ranks is None else ranks.shard(whole, hf_directory(args))
    if ranks is not None and ranks.rank != 0:
        whole = None  # only rank 0 checks parity
    config, n = model.config, args.max_new_tokens
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
    if tokenizer is not None:
        prompts = [encode_question(tokenizer, q) for q in questions]
        requests = f"{args.requests} chat requests, up to {n} new tokens each"
    else:  # a shared random system prompt, then 8, 12, 16, ... random tokens per request
        gen = torch.Generator().manual_seed(args.seed)
        lengths = [args.system_tokens] + [8 + 4 * i for i in range(args.requests)]
        system, *own = [torch.randint(FIRST_PROMPT_TOKEN, config.vocab_size, (k,),
                                      generator=gen).tolist() for k in lengths]  # fmt: skip
        prompts = [system + tokens for tokens in own]
        requests = (f"{args.requests} requests sharing a {args.system_tokens}-token system "
                    f"prompt, {n} new tokens each")  # fmt: skip
    if args.pressing is not None:
        requests += f", {args.press} press keeping {args.budget} of each prompt per KV head"
    backend = attention_backend(args.device)
    params = sum(p.numel() for p in (model if whole is None else whole).parameters()) / 1e6
    where = "" if ranks is None else f"tensor-parallel over {ranks.size} ranks ({ranks.backend}), "
    print(f"seqattn demo: {where}{config.model_type} ({params:.1f}M parameters, "
          f"{config.num_hidden_layers} layers, {config.num_attention_heads}/"
          f"{config.num_key_value_heads} heads) on {args.device} ({backend} attention), "
          f"{requests}")  # fmt: skip
    if backend == "flashinfer":  # the first step would otherwise look hung
        print("  flashinfer compiles its kernels for this GPU on first use (cached afterwards):"
              " the first step can take a few minutes", flush=True)  # fmt: skip
    elif args.device.type == "cuda":
        print("  flashinfer is not installed, so attention runs in plain torch (pip install "
              "flashinfer-python, or a wheel for your torch and CUDA from flashinfer's install "
              "page)")  # fmt: skip
    # a real model stops at its end-of-sequence tokens, as HF generate does with it
    sampling = sampling_params(n, eos_token_ids(model) if args.model is not None else ())
    if args.pressing is not None:
        run = serve_pressed(model, prompts, sampling, *args.pressing, backend)
        outputs = run.outputs
    else:
        pages = len(prompts) * pages_for(max(len(p) for p in prompts) + n, PAGE_SIZE) + 8
        runner = PagedCausalLM(model, num_pages=pages, page_size=PAGE_SIZE, backend=backend)
        outputs = serve(Engine(runner, max_step_tokens=256), prompts, sampling)
    if ranks is not None:
        ranks.report(runner)
        runner.disable_cuda_graphs()  # before the process group goes: NCCL ran inside them
    if tokenizer is not None:  # each question and the model's answer, one line each
        for question, output in zip(questions, outputs, strict=True):
            answer = " ".join(tokenizer.decode(output, skip_special_tokens=True).split())
            print(f"  > {question}\n    {answer}")
    if args.pressing is not None:
        return check_press_parity(model, prompts, run)
    return 0 if whole is None else check_parity(whole, prompts, outputs, n)


def hf_directory(args: argparse.Namespace) -> Optional[Path]:
    """``--model``'s directory when it holds HF weights (not a .gguf file)."""
    if args.model is None:
        return None
    directory, gguf_file = resolve_model_path(args.model)
    return directory if gguf_file is None else None


def encode_question(tokenizer: Any, question: str) -> list[int]:
    """A user turn through the chat template (a plain Q/A prompt without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(f"Question: {question}\nAnswer:")["input_ids"])
    turn = [{"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])  # fmt: skip


def sampling_params(max_new_tokens: int, stop_ids: tuple[int, ...]) -> SamplingParams:
    """Greedy: stop at ``stop_ids`` (a real model's EOS), or with none, ignore EOS."""
    return SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=stop_ids,
                          ignore_eos=not stop_ids)  # fmt: skip


def attention_backend(device: torch.device) -> str:
    """flashinfer on CUDA where it imports, else torch: named rather than left to
    ``"auto"``, as the engine's CUDA graphs need flashinfer and would ask for it."""
    usable = device.type == "cuda" and flashinfer_or_none() is not None
    return "flashinfer" if usable else "torch"


def load_model(args: argparse.Namespace) -> tuple[Any, Optional[Any]]:
    """``(model, tokenizer or None)``, float32 on the CPU, bfloat16 on CUDA: real weights from
    ``--model``, else seeded random ones from ``--config`` or the demo config, refused beyond
    the memory free (a config's missing sizes take transformers' defaults: Llama 6.7B)."""
    import transformers

    if not sys.stderr.isatty():  # transformers' loading bars redraw with carriage returns
        transformers.utils.logging.disable_progress_bar()
    device, path = args.device, args.model or args.config
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    source = "the demo config" if path is None else str(path)
    if args.model is not None:
        directory, gguf_file = resolve_model_path(path)
        kwargs = {} if gguf_file is None else {"gguf_file": gguf_file}
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if gguf_file is not None and missing:  # transformers reads GGUF only with these two
            raise DemoError(f"{path}: loading a .gguf file needs {' and '.join(missing)}: "
                            f"pip install {' '.join(missing)}")  # fmt: skip
        if gguf_file is None:  # refuses bad JSON or an unsupported family by name
            read_config(directory / "config.json")
        config = _guarded(f"{path}: cannot read its config",
                          transformers.AutoConfig.from_pretrained, directory, **kwargs)  # fmt: skip
    else:
        values = dict(DEMO_CONFIG) if path is None else read_config(path)
        config = _guarded(f"{source}: invalid config", transformers.AutoConfig.for_model,
                          values.pop("model_type"), **values)  # fmt: skip
    check_config(source, getattr(config, "model_type", None), config)
    if args.model is not None:
        load = transformers.AutoModelForCausalLM.from_pretrained
        model = _guarded(f"{path}: cannot load the model", load, directory, dtype=dtype, **kwargs)
        tokenizer, generation = None, model.generation_config
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        if gguf_file is not None or any((directory / name).is_file() for name in names):
            with contextlib.suppress(Exception):  # without a usable one: random token prompts
                tokenizer = transformers.AutoTokenizer.from_pretrained(directory, **kwargs)
        if generation.pad_token_id is None:  # else generate() warns that it borrows the EOS id
            generation.pad_token_id = next(iter(eos_token_ids(model)), 0)
        return model.to(device).eval(), tokenizer
    build = transformers.AutoModelForCausalLM.from_config
    with torch.device("meta"):  # no memory: a shape check, and the size of the weights
        shell = _guarded(f"{source}: cannot build the model", build, config, dtype=dtype)
    need = sum(p.numel() * p.element_size() for p in shell.parameters())
    if device.type == "cuda":
        free: Optional[int] = torch.cuda.mem_get_info(device)[0]
    else:  # MemAvailable; None where unknown (a CPU without /proc/meminfo)
        meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").is_file() else ""
        kib = [int(s.split()[1]) for s in meminfo.splitlines() if s.startswith("MemAvailable:")]
        free = kib[0] * 1024 if kib else None
    if free is not None and need > free:
        params = sum(p.numel() for p in shell.parameters()) / 1e6
        raise DemoError(f"{source}: the model's {params:,.0f}M parameters take "
                        f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free "
                        f"on {device} (sizes a config leaves out take transformers' "
                        "defaults)")  # fmt: skip
    torch.manual_seed(args.seed)
    with device:  # built where it runs: the memory just checked, and no host copy first
        model = _guarded(f"{source}: cannot build the model", build, config, dtype=dtype)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.to(device).eval(), None


def read_config(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, whose ``model_type`` seqattn supports."""
    if not path.is_file():
        raise DemoError(f"{path}: no such file")
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError included
        what = "not valid JSON" if isinstance(error, json.JSONDecodeError) else "cannot read it"
        raise DemoError(f"{path}: {what} ({error})") from None
    if not isinstance(values, dict):
        raise DemoError(f"{path}: expected a JSON object, got {type(values).__name__}")
    check_config(str(path), values.get("model_type"))
    return values


def check_config(source: str, model_type: Any, config: Any = None) -> None:
    """Refuse a missing or unsupported ``model_type`` and, given ``config``, sizes the cache
    cannot be built from (transformers accepts some nonsense, e.g. a negative layer count)."""
    if model_type is None:
        raise DemoError(f'{source}: no "model_type"; seqattn runs {SUPPORTED}')
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise DemoError(f"{source}: model_type {model_type!r} is not supported; "
                        f"seqattn runs {SUPPORTED}")  # fmt: skip
    if config is None:
        return
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size"):  # fmt: skip
        value = getattr(config, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DemoError(f"{source}: {name} must be a positive integer, got {value!r}")
    if config.vocab_size <= FIRST_PROMPT_TOKEN:
        raise DemoError(f"{source}: vocab_size must exceed {FIRST_PROMPT_TOKEN}, "
                        f"got {config.vocab_size}")  # fmt: skip


def _guarded(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, transformers turning a user's file into a config or model:
    whatever it raises there means the file is wrong, and becomes a one-line DemoError."""
    try:
        return call(*args, **kwargs)
    except Exception as error:
        message = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, LookupError):  # its message is the bare key: say what it is
            message = f"{type(error).__name__} {message}"
        raise DemoError(f"{what}: {message}") from None


def resolve_model_path(path: Path) -> tuple[Path, Optional[str]]:
    """``(directory, gguf file name or None)`` for ``--model PATH``: a ``.gguf`` file, a
    directory with one, or (first) an HF directory with ``config.json`` and weights."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise DemoError(f"{path}: expected a directory or a .gguf file")
        return path.parent, path.name
    if not path.is_dir():
        raise DemoError(f"{path}: no such file or directory")
    if (path / "config.json").is_file():
        if not any(any(path.glob(p)) for p in ("*.safetensors", "pytorch_model*.bin")):
            raise DemoError(f"{path}: config.json but no weights (*.safetensors or "
                            "pytorch_model*.bin)")  # fmt: skip
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise DemoError(f"{path}: several .gguf files ({', '.join(ggufs)}); pass one of them")
    if not ggufs:
        raise DemoError(f"{path}: no model here (expected config.json with *.safetensors "
                        "weights, or a .gguf file)")  # fmt: skip
    return path, ggufs[0]


def serve(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Every request's output, served with a progress bar, then the engine's report. They
    arrive together: the shared system prompt is computed once, the others then hit it."""
    from tqdm import tqdm

    n, start = params.max_new_tokens, time.perf_counter()
    requests = [engine.requests[engine.add_request(p, params)] for p in prompts]
    # disable=None: no bar unless stderr is a terminal, so a piped log gets no redraws
    with tqdm(total=len(prompts) * n, desc="  generating", unit="tok", disable=None) as bar:
        while engine.has_work:
            engine.step()  # a request that stopped early counts as complete
            bar.update(sum(n if r.finish_reason else len(r.output) for r in requests) - bar.n)
    seconds, outputs = time.perf_counter() - start, [r.output for r in requests]
    cache, stats, counts = engine.runner.cache, engine.descriptor.prefix_stats, engine.stats
    free, tokens = cache.allocator.free_pages_count, sum(len(o) for o in outputs)
    print(f"  {tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s, "
          f"{counts.steps} steps, {counts.preemptions} preemptions")  # fmt: skip
    print(f"  pages: {cache.num_pages - free} held ({stats.cached_pages} cached for reuse), "
          f"{free} free of {cache.num_pages}")  # fmt: skip
    print(f"  prefix cache: hit rate {stats.hit_rate:.1%} ({stats.hit_tokens} of "
          f"{stats.lookup_tokens} prompt tokens), {counts.computed_prompt_tokens} "
          f"prompt tokens computed")  # fmt: skip
    return outputs


def check_parity(model: Any, prompts: list[list[int]], outputs: list[list[int]], n: int) -> int:
    """Print how the outputs compare with transformers' greedy generate (eager attention,
    the model's generation config: the same EOS tokens); 1 if they differ in float32."""
    model.set_attn_implementation("eager")  # the demo's last use of the model
    with torch.inference_mode():  # an explicit mask: a prompt may hold the pad (EOS) id
        ids = [torch.tensor([prompt], device=model.device) for prompt in prompts]
        references = [model.generate(i, attention_mask=torch.ones_like(i), do_sample=False,
                                     max_new_tokens=n)[0, i.shape[1] :].tolist()
                      for i in ids]  # fmt: skip
    same, total, first = token_agreement(references, outputs)
    if first is None:
        print(f"parity: identical to transformers' greedy generate ({total} of {total} "
              "tokens, every request)")  # fmt: skip
        return 0
    print(f"parity: differs from transformers' greedy generate: {same} of {total} tokens "
          f"equal; first divergence at token {first}")  # fmt: skip
    return 1 if model.dtype == torch.float32 else 0


def token_agreement(refs: list[list[int]], outs: list[list[int]]) -> tuple[int, int, Optional[int]]:
    """``(tokens equal, reference tokens, earliest position where any request differs or
    ends early, None when every request is identical)``, request by request."""
    pairs = list(zip(refs, outs, strict=True))
    same = sum(a == b for ref, out in pairs for a, b in zip(ref, out, strict=False))
    diverged = [next((i for i, (a, b) in enumerate(zip(ref, out, strict=False)) if a != b),
                     min(len(ref), len(out))) for ref, out in pairs if ref != out]  # fmt: skip
    return same, sum(len(ref) for ref, _ in pairs), min(diverged, default=None)


if __name__ == "__main__":
    sys.exit(main())
