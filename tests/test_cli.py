"""``seqattn demo``: runs, reports, says whether it matches transformers, and answers a
user's mistakes with a short message and exit status 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import seqattn
from seqattn.cli import (
    QUESTIONS,
    DemoError,
    attention_backend,
    build_parser,
    encode_question,
    main,
    resolve_model_path,
    sampling_params,
    token_agreement,
)

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 100}  # fmt: skip
# about 17 TB of weights: refused before anything is allocated
TOO_BIG = {**TINY, "hidden_size": 65536, "intermediate_size": 262144, "num_hidden_layers": 64,
           "num_attention_heads": 512, "num_key_value_heads": 512}  # fmt: skip


def test_demo_runs_and_matches_transformers(capsys) -> None:
    assert main(["demo", "--requests", "3", "--system-tokens", "40", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "prefix cache: hit rate" in out and "tokens/s" in out
    assert out.strip().splitlines()[-1].startswith("parity: identical")
    assert "\r" not in out + captured.err  # no progress-bar redraws when not a terminal


def test_demo_piped_output_has_no_redraws() -> None:
    argv = ["demo", "--requests", "2", "--system-tokens", "8", "--max-new-tokens", "3"]
    done = subprocess.run(
        [sys.executable, "-m", "seqattn", *argv], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "parity: identical" in done.stdout
    assert "\r" not in done.stdout + done.stderr


def test_demo_takes_a_config_file(tmp_path, capsys) -> None:
    config = {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "head_dim": 8,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 100}  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["demo", "--config", str(path), "--requests", "2", "--max-new-tokens", "4"]) == 0
    assert "qwen3" in capsys.readouterr().out


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"seqattn {seqattn.__version__}"


def test_every_option_has_help() -> None:
    parser = build_parser()
    demo = parser._subparsers._group_actions[0].choices["demo"]  # type: ignore[union-attr]
    assert demo.description
    options = [a for a in demo._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} >= {"config", "model", "device", "requests", "seed"}
    assert all(a.help for a in options)


def _config(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "config.json"
    path.write_text(text)
    return ["--config", str(path)]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("malformed", "not valid JSON"),
        ("negative heads", "num_attention_heads must be a positive integer, got -1"),
        ("string size", "expected int, got str"),
        ("no model_type", 'no "model_type"; seqattn runs llama, mistral, qwen2, qwen3'),
        ("unknown model_type", "model_type 'bogus' is not supported; seqattn runs llama"),
        ("unsupported family", "model_type 'gpt2' is not supported"),
        ("not an object", "expected a JSON object, got list"),
        ("too big", "GiB free on cpu"),
        ("missing file", "no such file"),
        ("empty model dir", "no model here"),
        ("model dir without weights", "config.json but no weights"),
        ("missing model", "no such file or directory"),
        ("model file not gguf", "expected a directory or a .gguf file"),
        ("fake gguf", "fake.gguf"),
    ],
)
def test_bad_files_give_one_clear_line(case, message, tmp_path, capsys) -> None:
    texts = {
        "malformed": '{"model_type": "llama", "hidden_size": 64,',
        "negative heads": json.dumps({**TINY, "num_attention_heads": -1}),
        "string size": json.dumps({**TINY, "num_attention_heads": "four"}),
        "no model_type": json.dumps({"hidden_size": 32}),
        "unknown model_type": json.dumps({"model_type": "bogus"}),
        "unsupported family": json.dumps({"model_type": "gpt2", "n_layer": 1}),
        "not an object": "[1, 2]",
        "too big": json.dumps(TOO_BIG),
    }
    if case in texts:
        args = _config(tmp_path, texts[case])
    elif case == "missing file":
        args = ["--config", str(tmp_path / "none.json")]
    elif case == "empty model dir":
        args = ["--model", str(tmp_path)]
    elif case == "model dir without weights":
        (tmp_path / "config.json").write_text(json.dumps(TINY))
        args = ["--model", str(tmp_path)]
    elif case == "missing model":
        args = ["--model", str(tmp_path / "none")]
    elif case == "model file not gguf":
        (tmp_path / "weights.bin").write_bytes(b"")
        args = ["--model", str(tmp_path / "weights.bin")]
    else:
        (tmp_path / "fake.gguf").write_bytes(b"not a gguf file")
        args = ["--model", str(tmp_path / "fake.gguf")]
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "bogus"], "unknown device 'bogus'; use cpu or cuda"),
        (["--device", "mps"], "device 'mps' is not supported"),
        (["--requests", "0"], "argument --requests: expected a positive integer, got 0"),
        (["--requests", "-2"], "expected a positive integer, got -2"),
        (["--requests", "two"], "expected a positive integer, got 'two'"),
        (["--system-tokens", "-1"], "expected an integer >= 0, got -1"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: expected a positive integer"),
        (["--seed", "-1"], "argument --seed: expected an integer >= 0"),
    ],
)
def test_bad_options_are_refused(args, message, capsys) -> None:
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cuda_without_cuda_is_refused(capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["demo", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_attention_backend_is_named() -> None:
    import torch

    # named, never "auto": the engine's CUDA graphs would ask for flashinfer without it
    assert attention_backend(torch.device("cpu")) == "torch"


def test_model_path_resolution(tmp_path) -> None:
    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"")
    assert resolve_model_path(gguf) == (tmp_path, "model.Q4_1.gguf")
    assert resolve_model_path(tmp_path) == (tmp_path, "model.Q4_1.gguf")
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(DemoError, match=r"several \.gguf files"):
        resolve_model_path(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve_model_path(tmp_path) == (tmp_path, None)  # an HF directory comes first


def test_sampling_params_stop_only_for_real_models() -> None:
    real, random = sampling_params(8, (2,)), sampling_params(8, ())
    assert real.stop_token_ids == (2,) and not real.ignore_eos
    assert random.stop_token_ids == () and random.ignore_eos


def test_token_agreement() -> None:
    assert token_agreement([[1, 2, 3]], [[1, 2, 3]]) == (3, 3, None)
    assert token_agreement([[1, 2, 3]], [[1, 5, 3]]) == (2, 3, 1)
    assert token_agreement([[1, 2, 3]], [[1, 2]]) == (2, 3, 2)
    assert token_agreement([[1, 2, 3], [4, 5]], [[9, 2, 3], [4, 5]]) == (4, 5, 0)


def test_demo_loads_real_weights_from_a_directory(tmp_path, capsys) -> None:
    import torch
    import transformers

    config = transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, sliding_window=16,
    )  # fmt: skip
    torch.manual_seed(3)
    transformers.MistralForCausalLM(config).save_pretrained(tmp_path)
    argv = ["demo", "--model", str(tmp_path), "--requests", "2", "--max-new-tokens", "5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mistral" in out and out.strip().splitlines()[-1].startswith("parity: identical")


def _chat_tokenizer() -> object:
    """A word-level tokenizer of the demo's questions, with a tiny chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w for q in QUESTIONS for w in pre_tokenizers.Whitespace().pre_tokenize_str(q)}
    # the template's markers are plain words, so the word-level splitting keeps them whole
    vocab = {t: i for i, t in enumerate(["<unk>", "<eos>", "USER", "BOT"])}
    for word, _ in sorted(words):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    template = ("{% for m in messages %}USER {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}BOT{% endif %}")  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", chat_template=template
    )


def test_demo_answers_chat_questions_and_stops_at_eos(tmp_path, capsys) -> None:
    """A model with a tokenizer gets chat prompts, and both the engine and HF generate
    stop at its EOS token (here the third token greedy decoding gives the first one)."""
    import torch
    import transformers

    tokenizer = _chat_tokenizer()
    config = transformers.LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(config).eval()
    prompt = torch.tensor([encode_question(tokenizer, QUESTIONS[0])])
    model.generation_config.eos_token_id = None
    mask = torch.ones_like(prompt)
    greedy = model.generate(prompt, attention_mask=mask, max_new_tokens=3, do_sample=False)
    model.generation_config.eos_token_id = int(greedy[0, -1])
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)  # type: ignore[attr-defined]

    argv = ["demo", "--model", str(tmp_path), "--requests", "2", "--max-new-tokens", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 chat requests" in out and f"> {QUESTIONS[0]}" in out
    tokens = int(out.split(" tokens in ")[0].split()[-1])
    assert tokens <= 3 + 8  # the first request stopped at its EOS, the third token
    assert out.strip().splitlines()[-1].startswith("parity: identical")


def torchrun_demo(ranks: int, *argv: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node ranks -m seqattn demo ...`` on the CPU."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", "-m", "seqattn", "demo", *argv]  # fmt: skip
    env = dict(__import__("os").environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_demo_under_torchrun_is_tensor_parallel(tmp_path) -> None:
    """Two gloo ranks: rank 0 alone prints, each rank's heads and pages are reported,
    and the tokens are transformers' own on the whole model (float32)."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY, "num_hidden_layers": 2}))
    done = torchrun_demo(2, "--config", str(config), "--requests", "3", "--max-new-tokens", "5")
    assert done.returncode == 0, done.stderr[:6000]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("seqattn demo: tensor-parallel over 2 ranks (gloo), llama")
    assert sum(line.startswith("seqattn demo") for line in lines) == 1  # rank 0 alone
    assert any(line.startswith("  rank 0: KV heads 0-0 of 2, query heads 2 of 4") for line in lines)
    assert any(line.startswith("  rank 1: KV heads 1-1 of 2") for line in lines)
    assert (
        lines[-1]
        == "parity: identical to transformers' greedy generate (15 of 15 tokens, every request)"
    )


def test_demo_under_torchrun_refuses_heads_that_do_not_split(tmp_path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY, "num_hidden_layers": 1}))
    done = torchrun_demo(3, "--config", str(config), "--requests", "1", "--max-new-tokens", "2")
    assert done.returncode != 0 and done.stdout == ""
    assert ("seqattn demo: error: tensor parallelism over 3 ranks needs whole heads on every "
            "rank") in done.stderr  # fmt: skip
    assert (
        "4 query and 2 KV heads do not divide by 3 (use a size that divides both, e.g. 2)"
        in done.stderr
    )
    assert "[rank0]: Traceback" not in done.stderr  # torchrun's own summary may follow
