"""README.md's Python blocks and the Quick Start example run as written, on the CPU.

The blocks run in order in one namespace (a later block uses names an earlier one made),
as a reader pasting them into one session would. ```bash blocks are not run.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number of its first line, code)`` of each ```python block in ``text``."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_python_blocks_are_found() -> None:
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = x\n")]


def test_readme_python_blocks_run(monkeypatch) -> None:
    pytest.importorskip("transformers")
    # the blocks pick CUDA when there is one; this test checks what every reader can run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    blocks = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 5
    namespace: dict[str, object] = {"__name__": "readme"}
    for line, code in blocks:
        # padded so that a traceback names the README's own line numbers
        exec(compile("\n" * (line - 1) + code, str(ROOT / "README.md"), "exec"), namespace)


def test_quickstart_example_runs(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "max |diff|" in out and "NoPageError" in out
    assert float(out.split("max |diff| = ")[1].split()[0]) < 1e-2  # float16 K/V
