"""The GPU benchmarks' tiny CPU runs, so that they keep working between GPU sessions."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("script", ["bench_prefix_cascade.py"])
def test_benchmark_runs_on_the_cpu(script: str, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", [script, "--device", "cpu", "--quick"])
    runpy.run_path(f"benchmarks/{script}", run_name="__main__")
    out = capsys.readouterr().out
    assert "| prefix cache + cascade |" in out and "hit rate 66.7%" in out
    assert float(out.split("max |diff| ")[1].split()[0]) < 1e-5  # cascade == plain


def test_headwise_end_to_end_benchmark_runs_on_the_cpu(monkeypatch, capsys) -> None:
    """Both sides prefill, press and decode a tiny model; the head-wise side holds less."""
    pytest.importorskip("transformers")
    monkeypatch.setattr(sys, "argv", ["bench_headwise_e2e.py", "--device", "cpu", "--tiny"])
    monkeypatch.syspath_prepend("benchmarks")  # as a script run sees it: bench_tensor_parallel
    runpy.run_path("benchmarks/bench_headwise_e2e.py", run_name="__main__")
    out = capsys.readouterr().out
    assert "| full cache, eager |" in out and "| head-wise, AdaKV, eager |" in out
    kv = float(out.split("KV ")[-1].split("x")[0])
    assert 0 < kv < 0.5  # 25% budgets, pages rounded up per head


def test_headwise_real_benchmark_runs_tiny(tmp_path, monkeypatch, capsys) -> None:
    """The real-model benchmark on a random 2-layer Llama: a budget of 1.0 keeps every
    token, so those presses decode the full cache's tokens; then the kept positions it
    saved, given back as kvpress's, agree with themselves in every layer and head."""
    pytest.importorskip("transformers")
    saved = tmp_path / "positions.json"
    argv = ["bench_headwise_real.py", "--tiny", "--budgets", "1.0,0.25"]
    monkeypatch.setattr(sys, "argv", [*argv, "--save-positions", str(saved)])
    runpy.run_path("benchmarks/bench_headwise_real.py", run_name="__main__")
    out = capsys.readouterr().out
    table = out.split("| press | budget |")[1]  # the table comes last
    assert "| full cache | - | 100.0% (16/16) | 8.0 (8, 8) | 1.000x |" in table
    for press in ("streamingllm", "snapkv", "adakv"):  # PyramidKV's layers differ at 1.0
        assert f"| {press} | 1 | 100.0% (16/16) | 8.0 (8, 8) | 1.000x |" in table
        assert f"| {press} | 0.25 | " in table
    monkeypatch.setattr(sys, "argv", [*argv, "--kvpress", str(saved)])
    runpy.run_path("benchmarks/bench_headwise_real.py", run_name="__main__")
    rows = capsys.readouterr().out.split("| mean Jaccard |")[1].strip().splitlines()[1:]
    assert len(rows) == 9  # the full cache and 4 presses x 2 budgets
    for row in rows[1:]:  # 2 prompts x 2 layers x 2 KV heads
        assert row.endswith("| 100.0% (8/8) | 1.0000 |"), row


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


def test_generate_benchmark_compiles_on_the_cpu(monkeypatch, capsys) -> None:
    """``--compile``: the compiled engine's row beside the eager one, its compile time,
    and float32 tokens equal to HF's."""
    pytest.importorskip("transformers")
    import torch

    from seqattn.errors import MissingDependencyError
    from seqattn.integrations.compiled import check_compiler

    try:
        check_compiler(torch.device("cpu"))
    except MissingDependencyError as error:
        pytest.skip(f"inductor cannot compile here: {error}")
    torch._dynamo.reset()  # compiled code outlives runners: count this run's graphs only
    argv = ["bench_generate.py", "--device", "cpu", "--quick", "--tiny", "--requests", "4"]
    monkeypatch.setattr(sys, "argv", [*argv, "--prompt-len", "32", "--new-tokens", "8",
                                      "--compile", "--skip", "generate_batch"])  # fmt: skip
    monkeypatch.syspath_prepend("benchmarks")
    runpy.run_path("benchmarks/bench_generate.py", run_name="__main__")
    out = capsys.readouterr().out
    for path in ("seqattn engine, compiled", "seqattn engine, eager", "HF generate (sdpa)"):
        assert f"| {path} |" in out
    assert "seqattn engine, compiled: torch.compile " in out
    # prefill; all 4 requests decode together; q/k/v and gate/up of 2 layers per graph
    assert "graphs compiled: 2, projection groups made one matmul: 8 (mode default" in out
    compiled = "seqattn engine, compiled: tokens identical to HF generate: "
    assert f"{compiled}100.0%; earliest divergence: none" in out


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
    assert "TP=2: one all-reduce of [4, hidden] activations" in out


def test_migration_benchmark_runs_on_the_cpu() -> None:
    """Two gloo ranks spawned by the script (a subprocess: spawned ranks re-import it)."""
    root = Path(__file__).resolve().parents[1]
    argv = ["--device", "cpu", "--tokens", "100", "--layers", "2", "--quick"]
    run = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_migration.py"), *argv],
        capture_output=True, text=True, timeout=120, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root / "src")},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("received KV identical to the sent (bit for bit)") == 2
    assert "of 100 tokens between two ranks (cpu, gloo; 2 layers x 8 KV heads" in run.stdout
    assert "| consecutive (1) |" in run.stdout and "| scattered (" in run.stdout


def test_prefix_admission_benchmark_runs_on_the_cpu() -> None:
    """Both sides (this tree and the revision before the fast hit path) admit the same
    requests and hit the cache alike."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_prefix_admission.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=root,
    )  # fmt: skip
    if run.returncode != 0 and "not a git repository" in run.stderr + run.stdout:
        pytest.skip("needs the git history (the earlier revision)")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| hit 4096 + 64: start + allocate + commit (prompt a list) |" in run.stdout
    rates = run.stdout.split("hit rate: before ")[1].split(", after ")
    assert rates[0] == rates[1].strip()  # the same cache decisions on both sides
