"""Tensor parallelism over NCCL, one GPU per rank: the CPU checks of
tests/test_tensor_parallel.py (float32, attention in torch) on two GPUs."""

from __future__ import annotations

import pytest
import torch

from tests.test_tensor_parallel import (
    FAMILIES,
    check_compiled,
    check_refusals,
    check_tokens,
    run_ranks,
)

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_generate_the_tokens_of_one(tmp_path) -> None:
    reports = run_ranks(tmp_path, "cuda")
    for family in FAMILIES:
        check_tokens(tmp_path, reports, family, "cuda")
    assert reports[0]["sampled"] == reports[1]["sampled"]
    check_refusals(reports, "gloo")  # a CPU device on an NCCL group
    check_compiled(reports)  # last: it skips where inductor has no compiler
