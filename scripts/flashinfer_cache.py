"""Carry flashinfer's compiled kernels from one GPU machine to the next.

A fresh GPU machine spends minutes compiling flashinfer's kernels (GPU.md). flashinfer
loads a module without compiling it when ``<package>/data/aot/<name>/<name>.so``
exists, so the ``.so`` files one run compiled (``~/.cache/flashinfer/<version>/<arch>/
cached_ops/<name>/<name>.so``), with those restored earlier, can be packed into a few
parts that come back under ``$OUT``, carried with the next call, and unpacked there:

    python3 scripts/flashinfer_cache.py save $OUT/fi      # parts of 15 MiB, xz
    python3 scripts/flashinfer_cache.py restore .ficache  # into the installed package

Only modules of the same flashinfer version are restored (the parts are named after it).
"""

from __future__ import annotations

import io
import lzma
import sys
import tarfile
from pathlib import Path

PART = 15 * 2**20


def _version() -> str:
    import flashinfer

    return str(flashinfer.__version__)


def save(target: Path) -> None:
    import flashinfer

    cache = Path.home() / ".cache" / "flashinfer" / _version()
    restored = Path(flashinfer.__file__).parent / "data" / "aot"  # what restore() put there
    found = {so.name: so for so in [*restored.glob("*/*.so"), *cache.glob("*/cached_ops/*/*.so")]}
    modules = sorted(found.values(), key=lambda so: so.name)
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for so in modules:
            tar.add(so, arcname=f"{so.parent.name}/{so.name}")
    packed = lzma.compress(data.getvalue(), preset=3)
    target.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(packed), PART):
        (target / f"fi-{_version()}.{i // PART:02d}").write_bytes(packed[i : i + PART])
    print(f"flashinfer cache: {len(modules)} modules, {len(data.getvalue()) / 2**20:.0f} MiB, "
          f"{len(packed) / 2**20:.1f} MiB packed in {-(-len(packed) // PART)} parts")  # fmt: skip


def restore(source: Path) -> None:
    import flashinfer

    parts = sorted(source.glob(f"fi-{_version()}.*"))
    if not parts:
        print(f"flashinfer cache: none for {_version()} in {source}")
        return
    aot = Path(flashinfer.__file__).parent / "data" / "aot"
    aot.mkdir(parents=True, exist_ok=True)
    data = lzma.decompress(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        tar.extractall(aot, filter="data")
    print(f"flashinfer cache: {len(names)} modules restored")


if __name__ == "__main__":
    {"save": save, "restore": restore}[sys.argv[1]](Path(sys.argv[2]))
