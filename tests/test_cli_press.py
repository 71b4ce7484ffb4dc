"""``seqattn demo --press NAME --budget FRACTION``: the demo's requests on head-wise
caches, its memory against a full cache, parity with the masked full-cache reference,
and one-line refusals of a bad press or budget (exit status 2, no traceback)."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("transformers")

from seqattn import InvalidArgumentError
from seqattn.cli import main
from seqattn.headwise.press_names import PRESSES, make_press

SMALL = ["--requests", "3", "--system-tokens", "24", "--max-new-tokens", "5"]


def test_demo_with_a_press_reports_memory_and_matches_the_reference(capsys) -> None:
    assert main(["demo", *SMALL, "--press", "streamingllm", "--budget", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "streamingllm press keeping 0.3 of each prompt" in out
    held, full = map(float, re.search(r"([\d.]+) MiB held, where a full cache would hold "
                                      r"([\d.]+) MiB", out).groups())  # fmt: skip
    assert 0 < held < full
    assert "pages: 0 held" in out  # every request's pages went back
    assert (
        out.strip()
        .splitlines()[-1]
        .startswith("parity: identical to the masked full-cache reference (15 of 15 tokens")
    )


def test_demo_with_a_press_takes_a_config_file(tmp_path, capsys) -> None:
    config = {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "head_dim": 8,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 100}  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    argv = ["demo", "--config", str(path), *SMALL, "--press", "StreamingLLM", "--budget", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "qwen3" in out and "parity: identical" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--press", "nope", "--budget", "0.5"], "unknown press 'nope', choose from streamingllm"),
        (["--press", "streamingllm"], "--press needs --budget"),
        (["--budget", "0.5"], "--budget needs --press"),
        (["--press", "streamingllm", "--budget", "0"], "fraction in (0, 1], got '0'"),
        (["--press", "streamingllm", "--budget", "1.5"], "got '1.5'"),
        (["--press", "streamingllm", "--budget", "-0.2"], "got '-0.2'"),
        (["--press", "streamingllm", "--budget", "half"], "got 'half'"),
        (["--press", "streamingllm", "--budget", "nan"], "got 'nan'"),
    ],
)
def test_bad_press_options_give_one_line(args, message, capsys) -> None:
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_every_press_is_made_by_name() -> None:
    kinds = {name: type(make_press(name.upper())).__name__ for name in PRESSES}
    assert kinds == {"streamingllm": "StreamingLLMPress", "snapkv": "SnapKVPress",
                     "adakv": "AdaKVPress", "pyramidkv": "PyramidKVPress"}  # fmt: skip
    with pytest.raises(
        InvalidArgumentError, match="unknown press 'h2o', choose from streamingllm, snapkv"
    ):
        make_press("h2o")
    with pytest.raises(TypeError, match="string"):
        make_press(None)
