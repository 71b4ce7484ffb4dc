"""Tensor parallelism on the CPU: two gloo ranks under ``torchrun`` serve the same
requests as one process, token for token (float32; Llama and Qwen3 with grouped KV
heads; prefix caching and preemption on), sample rank 0's tokens whatever their own
seeds, and refuse a group they cannot serve before any page is allocated.

The ranks run ``tests/tensor_parallel_worker.py`` once for the whole module (about
15 s); each test reads what they wrote. ``tests/gpu/test_tensor_parallel_gpu.py`` runs
the same checks over NCCL on two GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from seqattn.engine import Engine, SamplingParams  # noqa: E402
from seqattn.integrations.hf import PagedCausalLM  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from tensor_parallel_worker import FAMILIES, PROMPTS  # noqa: E402

CONFIGS = {"llama": "LlamaConfig", "qwen3": "Qwen3Config"}
MODELS = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def tiny(family: str, kv_heads: int = 2) -> torch.nn.Module:
    config = getattr(transformers, CONFIGS[family])(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=16, vocab_size=128, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    return getattr(transformers, MODELS[family])(config).eval()


def run_ranks(models: Path, device: str) -> list[dict]:
    """Save the models, run the two ranks on ``device``, and return their reports."""
    for family in FAMILIES:
        tiny(family).save_pretrained(models / family)
    tiny("llama", kv_heads=1).save_pretrained(models / "one_kv_head")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE)]),
               OMP_NUM_THREADS="1", SEQATTN_TP_DEVICE=device, NCCL_NVLS_ENABLE="0")  # fmt: skip
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # weights go where transformers finds a GPU
    worker = str(HERE / "tensor_parallel_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", worker, str(models)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((models / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """The saved models and what each of the two ranks reported."""
    models = tmp_path_factory.mktemp("tp")
    return models, run_ranks(models, "cpu")


def serve_whole(path: Path, num_pages: int, device: str = "cpu") -> tuple[list[list[int]], int]:
    """The prompts on one process, the model loaded whole."""
    load = transformers.AutoModelForCausalLM.from_pretrained
    model = load(path, dtype=torch.float32).to(device).eval()
    runner = PagedCausalLM(model, num_pages=num_pages, page_size=4, backend="torch")
    engine = Engine(runner, max_step_tokens=8)
    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, ignore_eos=True))
    return outputs, engine.stats.preemptions


def check_tokens(models: Path, reports: list[dict], family: str, device: str) -> None:
    """Both ranks served ``family``'s prompts as one process does, prefix hits and
    preemptions included."""
    for served, num_pages in zip(reports[0][family], (64, 14), strict=True):
        outputs, preemptions = serve_whole(models / family, num_pages, device)
        assert served["outputs"] == outputs
        assert served["preemptions"] == preemptions
        assert served["kv_heads"] == 1  # two KV heads over two ranks
    assert reports[0][family] == reports[1][family]  # same tokens, pages and hits
    roomy, tight = reports[0][family]
    assert roomy["hit_tokens"] > 0 and tight["preemptions"] > 0  # both paths ran


def check_refusals(reports: list[dict], wanted_backend: str) -> None:
    """Every rank refused each group it cannot serve, with the error that names why."""
    for report in reports:
        kind, message = report["pages_differ"]
        assert kind == "RankMismatchError"
        assert "rank 0 and rank 1" in message and "64" in message and "65" in message
        kind, message = report["diverged"]
        assert kind == "RankMismatchError" and "diverged at step 2" in message
        assert report["pages_kept"]
        for case in ("load_uneven", "run_uneven"):
            kind, message = report[case]
            assert kind == "InvalidArgumentError", report[case]
            assert "1 KV heads do not divide by 2" in message
    kind, message = reports[0]["wrong_backend"]
    assert kind == "InvalidArgumentError" and f"needs {wanted_backend!r}" in message


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_generate_the_tokens_of_one_process(ranks, family: str) -> None:
    models, reports = ranks
    check_tokens(models, reports, family, "cpu")


def check_compiled(reports: list[dict]) -> None:
    """Both ranks' compiled decode gave the tokens of the decode not compiled, with no
    graph break, each graph with the shards of q/k/v and of gate/up stacked into one
    matmul per layer."""
    first, second = reports
    if "skipped" in first["compiled"]:
        pytest.skip(first["compiled"]["skipped"])
    assert first["compiled"] == second["compiled"]
    assert first["compiled"]["outputs"] == first[FAMILIES[-1]][0]["outputs"]
    compiled = first["compiled"]
    assert compiled["graph_breaks"] == 0
    layers, groups = 2, 2  # q/k/v and gate/up per layer, in every graph
    assert compiled["stacked"] == layers * groups * compiled["compiles"]


def test_a_compiled_tensor_parallel_decode_generates_the_same_tokens(ranks) -> None:
    check_compiled(ranks[1])


def test_ranks_sample_rank_zeros_tokens(ranks) -> None:
    _, (first, second) = ranks
    assert first["sampled"] == second["sampled"]  # their generators were seeded 0 and 1


def test_ranks_that_differ_or_cannot_split_the_heads_are_refused(ranks) -> None:
    """Built differently, diverging at a step, heads that do not split, and a CUDA
    device on a gloo group."""
    _, reports = ranks
    check_refusals(reports, "nccl")


def test_sharding_without_accelerate_says_what_to_install(monkeypatch, tmp_path) -> None:
    import importlib.util

    from seqattn import MissingDependencyError
    from seqattn.integrations import hf_parallel

    monkeypatch.setattr(hf_parallel.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(hf_parallel.dist, "get_world_size", lambda: 2)
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "accelerate" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingDependencyError, match="pip install accelerate"):
        hf_parallel.load_tensor_parallel(tmp_path, dtype=torch.float32)
