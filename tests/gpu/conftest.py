"""GPU tests: skipped cleanly on machines without CUDA."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


def flashinfer_or_skip():
    """flashinfer's module, or skip the test when it is not installed."""
    return pytest.importorskip("flashinfer", reason="needs flashinfer (scripts/gpu_check.sh)")
