"""The GPU benchmarks' tiny CPU runs, so that they keep working between GPU sessions."""

from __future__ import annotations

import runpy
import sys

import pytest


@pytest.mark.parametrize("script", ["bench_prefix_cascade.py"])
def test_benchmark_runs_on_the_cpu(script: str, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", [script, "--device", "cpu", "--quick"])
    runpy.run_path(f"benchmarks/{script}", run_name="__main__")
    out = capsys.readouterr().out
    assert "| prefix cache + cascade |" in out and "hit rate 66.7%" in out
    assert float(out.split("max |diff| ")[1].split()[0]) < 1e-5  # cascade == plain


def test_headwise_benchmark_runs_on_the_cpu(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_headwise.py", "--device", "cpu"])
    runpy.run_path("benchmarks/bench_headwise.py", run_name="__main__")
    out = capsys.readouterr().out
    assert "| head-wise paged |" in out
    assert float(out.split("max |diff| = ")[1].split()[0]) < 1e-4  # masked == head-wise


def test_generate_benchmark_runs_on_the_cpu(monkeypatch, capsys) -> None:
    """A tiny model and workload (a few seconds, a few hundred MB): generate_batch's cache
    is sized to the workload, else transformers takes 60% of the free RAM for it."""
    pytest.importorskip("transformers")
    argv = ["bench_generate.py", "--device", "cpu", "--quick", "--tiny", "--requests", "4"]
    monkeypatch.setattr(sys, "argv", [*argv, "--prompt-len", "32", "--new-tokens", "8"])
    monkeypatch.syspath_prepend("benchmarks")  # as a script run sees it: bench_attention
    runpy.run_path("benchmarks/bench_generate.py", run_name="__main__")
    out = capsys.readouterr().out
    assert "4 requests x 32 prompt tokens, 8 generated each" in out  # the sizes asked for
    for path in ("seqattn engine, eager", "HF generate_batch (paged|sdpa)", "HF generate (sdpa)"):
        assert f"| {path} |" in out
    # float32: the engine's greedy tokens are HF's, and the benchmark says so
    assert "tokens identical to HF generate: 100.0%; earliest divergence: none" in out
    judged = out.split("eager: HF forward on its tokens: ")[1].split("\n")[0]
    assert judged == "top-1 100.0%; largest gap to the top logit 0.000"


def test_tensor_parallel_benchmark_runs_on_the_cpu(tmp_path, monkeypatch, capsys) -> None:
    """Two gloo ranks against one, a 2-layer model: float32 tokens agree across runs."""
    pytest.importorskip("transformers")
    argv = ["bench_tensor_parallel.py", "--device", "cpu", "--tiny", "--requests", "4"]
    monkeypatch.setattr(sys, "argv", [*argv, "--prompt-len", "32", "--new-tokens", "8",
                                      "--model-dir", str(tmp_path)])  # fmt: skip
    runpy.run_path("benchmarks/bench_tensor_parallel.py", run_name="__main__")
    out = capsys.readouterr().out
    assert "| TP=1 | no |" in out and "| TP=2 | no |" in out
    assert out.count("tokens equal to TP=1: 100.0%") == 2
    assert out.count("top-1 100.0%, largest gap 0.000") == 2
