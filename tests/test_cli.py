"""``seqattn demo``: runs, reports, and says whether it matches transformers."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from seqattn.cli import main, token_agreement


def test_demo_runs_and_matches_transformers(capsys) -> None:
    assert main(["demo", "--requests", "3", "--system-tokens", "40", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "prefix cache: hit rate" in out and "tokens/s" in out
    assert out.strip().splitlines()[-1].startswith("parity: identical")


def test_demo_takes_a_config_file(tmp_path, capsys) -> None:
    config = {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "head_dim": 8,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 100}  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["demo", "--config", str(path), "--requests", "2", "--max-new-tokens", "4"]) == 0
    assert "qwen3" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/dir"], "no such directory"),
        (["--config", "/no/such/config.json"], "no such file"),
    ],
)
def test_demo_errors_are_clear(args, message, capsys) -> None:
    assert main(["demo", *args]) == 2
    assert message in capsys.readouterr().err


def test_unsupported_architecture(tmp_path, capsys) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    assert main(["demo", "--config", str(path)]) == 2
    assert "not supported" in capsys.readouterr().err


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
