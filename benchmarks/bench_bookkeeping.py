"""Per-step CPU bookkeeping cost of seqattn vs. the published seqattn 0.0.2.

Both libraries are driven through the same public calls (``PagedKVCacheManager``,
``CacheDescriptor.allocate / allocate_decoding / pack_for_flashinfer / release``) with identical,
pre-generated call sequences on a CPU cache with tiny KV storage, so only the bookkeeping an
engine pays per step is measured. A "step" is the set of calls an engine makes per forward pass:

- ``decode``, ``decode_len``: ``allocate_decoding(ids)`` + ``pack_for_flashinfer(ids)`` on a
  fixed batch of B sequences starting at L + 0..15 tokens (staggered so 1/16 of the batch
  crosses a page boundary each step), in short rounds on fresh state so L barely drifts;
- ``churn``: 256 live sequences; 8 finish (``release``), 8 arrive (``allocate``), then a
  decode step on the live batch;
- ``chunked_prefill``: 4 prompts get a 512-token chunk (``allocate``) next to a decode batch
  of 64 (``allocate_decoding``), then one ``pack_for_flashinfer`` of all 68.

Each step is timed with ``time.perf_counter_ns`` (GC disabled while timing, as ``timeit``
does) after untimed warm-up steps; the table reports the median microseconds per step and
the speed-up of seqattn over 0.0.2. After each round, outside the timed region, each
library's packed page counts, last-page lengths, page distinctness and free-page count are
checked against the lengths the plan expects, and at the end of each scenario the two
libraries' packed ``kv_page_indptr`` / ``kv_last_page_len`` are compared (page ids may differ);
any mismatch is flagged in the table and makes the exit status 1.

seqattn 0.0.2 is fetched once with pip into ``~/.cache/seqattn-bench`` (override the directory
with ``SEQATTN_BENCH_CACHE``) and imported as ``seqattn_002``; the local package is a plain
``import seqattn``.

Run from the repository root:

    PYTHONPATH=src python benchmarks/bench_bookkeeping.py                # full run
    PYTHONPATH=src python benchmarks/bench_bookkeeping.py --quick        # smoke test
    PYTHONPATH=src python benchmarks/bench_bookkeeping.py --scenario churn
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PEER_VERSION = "0.0.2"
PEER_MODULE = "seqattn_002"
PAGE_SIZE = 16
PAGE_MARGIN = 256
GROUPS = ("decode", "decode_len", "churn", "chunked_prefill")

Desc = Any  # a CacheDescriptor of either library
StepFn = Callable[[Desc, int], None]


# ----------------------------------------------------------------------------- loading


def peer_dir() -> Path:
    root = os.environ.get("SEQATTN_BENCH_CACHE", str(Path.home() / ".cache" / "seqattn-bench"))
    return Path(root).expanduser() / f"seqattn-{PEER_VERSION}"


def pip_install_target(requirement: str, target: Path) -> None:
    """``pip install --no-deps --target`` into a temporary dir, then move it into place."""
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet"]
    cmd += ["--disable-pip-version-check", "--target", str(tmp), requirement]
    print(f"fetching {requirement} into {target}", file=sys.stderr)
    subprocess.run(cmd, check=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)


def ensure_peer_files() -> Path:
    target = peer_dir()
    pkg = target / "seqattn"
    if not (pkg / "__init__.py").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        pip_install_target(f"seqattn=={PEER_VERSION}", target)
    if importlib.util.find_spec("attr") is None:  # 0.0.2 needs attrs
        deps = target.with_name(f"{target.name}-deps")
        if not (deps / "attr").is_dir():
            pip_install_target("attrs", deps)
        sys.path.append(str(deps))
    return pkg


def flashinfer_importable() -> bool:
    try:
        import flashinfer  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def load_peer() -> types.ModuleType:
    """Import seqattn 0.0.2 as ``seqattn_002`` (stubbing flashinfer only while importing)."""
    if PEER_MODULE in sys.modules:
        return sys.modules[PEER_MODULE]
    pkg = ensure_peer_files()
    spec = importlib.util.spec_from_file_location(
        PEER_MODULE, pkg / "__init__.py", submodule_search_locations=[str(pkg)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    stub = not flashinfer_importable()
    if stub:  # 0.0.2 imports flashinfer at import time but never calls it for bookkeeping
        sys.modules["flashinfer"] = types.ModuleType("flashinfer")
    sys.modules[PEER_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(PEER_MODULE, None)
        raise
    finally:
        if stub:
            sys.modules.pop("flashinfer", None)
    if getattr(module, "__version__", None) != PEER_VERSION:
        raise RuntimeError(f"{pkg} is not seqattn {PEER_VERSION}")
    return module


def load_ours() -> types.ModuleType:
    try:
        import seqattn
    except ImportError as exc:
        raise SystemExit(
            f"cannot import seqattn ({exc}); run with PYTHONPATH=src or pip install -e ."
        ) from exc
    return seqattn


# ----------------------------------------------------------------------------- plans


def pages_for(num_tokens: int) -> int:
    return -(-num_tokens // PAGE_SIZE)


def pages_in_use(lengths: dict[int, int]) -> int:
    return sum(pages_for(n) for n in lengths.values())


@dataclass
class Plan:
    """A library-independent call sequence; ``step(desc, i)`` is the timed part."""

    num_pages: int
    setup: Callable[[Desc], None]
    step: StepFn
    final_ids: list[int]
    final_lengths: list[int]


def decode_plan(batch: int, length: int, total_steps: int, seed: int) -> Plan:
    """Fixed batch decoding one token a step; sequence i starts at ``length + offset_i``.

    The offsets are 0..page_size-1 (shuffled), so every step the same share (1/page_size) of
    the batch crosses a page boundary, as in a real batch; equal lengths would make all
    sequences gain a page on the same step and leave the other steps with none.
    """
    rng = random.Random(seed)
    ids = list(range(batch))
    offsets = [i % PAGE_SIZE for i in ids]
    rng.shuffle(offsets)
    start = [length + off for off in offsets]
    final = [n + total_steps for n in start]

    def setup(desc: Desc) -> None:
        desc.allocate(ids, start)

    def step(desc: Desc, _i: int) -> None:
        desc.allocate_decoding(ids)
        desc.pack_for_flashinfer(ids)

    num_pages = sum(pages_for(n) for n in final) + PAGE_MARGIN
    return Plan(num_pages, setup, step, ids, final)


@dataclass
class ChurnStep:
    finished: list[int]
    new_ids: list[int]
    new_lens: list[int]
    live: list[int]


def churn_plan(total_steps: int, seed: int, batch: int = 256, turnover: int = 8) -> Plan:
    """Continuous batching: each step ``turnover`` sequences finish and as many arrive."""
    rng = random.Random(seed)
    init_ids = list(range(batch))
    init_lens = [rng.randint(100, 2000) for _ in init_ids]
    lengths = dict(zip(init_ids, init_lens, strict=True))
    live = list(init_ids)
    next_id = batch
    peak = pages_in_use(lengths)
    steps: list[ChurnStep] = []
    for _ in range(total_steps):
        finished = rng.sample(live, turnover)
        done = set(finished)
        live = [s for s in live if s not in done]
        for s in finished:
            del lengths[s]
        new_ids = list(range(next_id, next_id + turnover))
        next_id += turnover
        new_lens = [rng.randint(100, 2000) for _ in new_ids]
        lengths.update(zip(new_ids, new_lens, strict=True))
        live += new_ids
        for s in live:
            lengths[s] += 1
        peak = max(peak, pages_in_use(lengths))
        steps.append(ChurnStep(finished, new_ids, new_lens, list(live)))

    def setup(desc: Desc) -> None:
        desc.allocate(init_ids, init_lens)

    def step(desc: Desc, i: int) -> None:
        s = steps[i]
        desc.release(s.finished)
        desc.allocate(s.new_ids, s.new_lens)
        desc.allocate_decoding(s.live)
        desc.pack_for_flashinfer(s.live)

    return Plan(peak + PAGE_MARGIN, setup, step, live, [lengths[s] for s in live])


@dataclass
class ChunkedStep:
    released: list[int]
    prefill_ids: list[int]
    chunk_lens: list[int]
    decode_ids: list[int]
    pack_ids: list[int]


def chunked_prefill_plan(
    total_steps: int, seed: int, slots: int = 4, chunk: int = 512, decode_batch: int = 64
) -> Plan:
    """``slots`` prompts of 4-16 chunks prefill ``chunk`` tokens a step next to a decode batch.

    A finished prompt joins the decode batch (the oldest decoding sequence is released) and a
    new prompt takes its slot; the new id first appears in ``allocate`` next to known ids.
    """
    rng = random.Random(seed)
    decode = list(range(decode_batch))
    # decoders start like finished prompts, so the batch is in its steady state from step 0
    lengths = {s: rng.randint(4, 16) * chunk + rng.randint(1, 200) for s in decode}
    init_decode_lens = [lengths[s] for s in decode]
    next_id = decode_batch
    prompt: dict[int, int] = {}
    prefill: list[int] = []
    init_prefill_ids: list[int] = []
    for _ in range(slots):  # stagger the slots by pre-filling a random number of chunks
        prompt[next_id] = rng.randint(4, 16) * chunk
        lengths[next_id] = rng.randrange(0, prompt[next_id], chunk)
        if lengths[next_id]:  # a zero-length start is left to the first chunk
            init_prefill_ids.append(next_id)
        prefill.append(next_id)
        next_id += 1
    init_decode_ids = list(decode)
    init_prefill_lens = [lengths[s] for s in init_prefill_ids]
    peak = pages_in_use(lengths)
    steps: list[ChunkedStep] = []
    for _ in range(total_steps):
        released: list[int] = []
        for k, s in enumerate(prefill):
            if lengths[s] == prompt[s]:  # prompt done: decode it, retire the oldest decoder
                released.append(decode.pop(0))
                del lengths[released[-1]]
                decode.append(s)
                prefill[k] = next_id
                prompt[next_id] = rng.randint(4, 16) * chunk
                lengths[next_id] = 0
                next_id += 1
        for s in prefill:
            lengths[s] += chunk
        for s in decode:
            lengths[s] += 1
        peak = max(peak, pages_in_use(lengths))
        pids, dids = list(prefill), list(decode)
        steps.append(ChunkedStep(released, pids, [chunk] * slots, dids, pids + dids))

    def setup(desc: Desc) -> None:
        desc.allocate(init_decode_ids, init_decode_lens)
        if init_prefill_ids:
            desc.allocate(init_prefill_ids, init_prefill_lens)

    def step(desc: Desc, i: int) -> None:
        s = steps[i]
        if s.released:
            desc.release(s.released)
        desc.allocate(s.prefill_ids, s.chunk_lens)
        desc.allocate_decoding(s.decode_ids)
        desc.pack_for_flashinfer(s.pack_ids)

    final_ids = steps[-1].pack_ids
    return Plan(peak + PAGE_MARGIN, setup, step, final_ids, [lengths[s] for s in final_ids])


# ----------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """``rounds`` x (fresh state, ``warmup`` untimed steps, ``steps`` timed steps)."""

    name: str
    groups: tuple[str, ...]
    build: Callable[[int, int], Plan]  # (warmup + steps, seed) -> Plan
    steps: int
    rounds: int = 1
    warmup: int = 100


def decode(name: str, groups: tuple[str, ...], batch: int, length: int, rounds: int) -> Scenario:
    """Short rounds: sequences grow by at most 72 tokens past their start (L + 0..15)."""

    def build(total: int, seed: int) -> Plan:
        return decode_plan(batch, length, total, seed)

    return Scenario(name, groups, build, steps=64, rounds=rounds, warmup=8)


SCENARIOS = (
    decode("decode B=32 L=1024", ("decode",), 32, 1024, rounds=40),
    decode("decode B=1024 L=1024", ("decode",), 1024, 1024, rounds=8),
    decode("decode B=256 L=512", ("decode_len",), 256, 512, rounds=15),
    decode("decode B=256 L=2048", ("decode", "decode_len"), 256, 2048, rounds=15),
    decode("decode B=256 L=8192", ("decode_len",), 256, 8192, rounds=6),
    decode("decode B=256 L=16384", ("decode_len",), 256, 16384, rounds=5),
    Scenario("churn B=256, 8 out + 8 in /step", ("churn",), churn_plan, steps=1500),
    Scenario("chunked prefill 4x512 + decode 64", ("chunked_prefill",), chunked_prefill_plan, 1500),
)


# ----------------------------------------------------------------------------- measuring


def make_descriptor(lib: types.ModuleType, num_pages: int) -> tuple[Any, Desc]:
    cache = lib.PagedKVCacheManager(
        num_pages=num_pages,
        page_size=PAGE_SIZE,
        num_heads=1,
        head_dim=8,
        dtype=torch.float16,
        device=torch.device("cpu"),
    )
    return cache, lib.CacheDescriptor(cache)


def time_steps(desc: Desc, step: StepFn, warmup: int, steps: int) -> list[int]:
    for i in range(warmup):
        step(desc, i)
    samples: list[int] = []
    clock = time.perf_counter_ns
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(warmup, warmup + steps):
            t0 = clock()
            step(desc, i)
            samples.append(clock() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def check_state(cache: Any, desc: Desc, plan: Plan) -> list[str]:
    """Compare the packed state with the lengths the plan expects (outside the timed region)."""
    packed = desc.pack_for_flashinfer(plan.final_ids)
    lengths = torch.tensor(plan.final_lengths, dtype=torch.int64)
    want_counts = (lengths + PAGE_SIZE - 1) // PAGE_SIZE
    want_last = (lengths - 1) % PAGE_SIZE + 1
    indptr = packed.kv_page_indptr.to(torch.int64)
    indices = packed.kv_page_indices.to(torch.int64)
    errors = []
    if not torch.equal(torch.diff(indptr), want_counts) or int(indptr[0]) != 0:
        errors.append("page counts (kv_page_indptr)")
    if not torch.equal(packed.kv_last_page_len.to(torch.int64), want_last):
        errors.append("kv_last_page_len")
    if indices.numel() != int(indptr[-1]) or indices.unique().numel() != indices.numel():
        errors.append("kv_page_indices not distinct")
    if cache.available_pages_count != plan.num_pages - int(want_counts.sum()):
        errors.append("available_pages_count")
    return errors


@dataclass
class LibRun:
    median_us: float
    steps: int
    errors: list[str]
    indptr: list[int]
    last_page_len: list[int]


@dataclass
class Result:
    name: str
    steps: int
    median_us: dict[str, float]
    errors: list[str]


def run_round(
    lib: types.ModuleType, plan: Plan, steps: int, warmup: int
) -> tuple[list[int], set[str], Any]:
    """One round on a fresh cache: setup, ``warmup`` untimed steps, ``steps`` timed steps."""
    cache, desc = make_descriptor(lib, plan.num_pages)
    plan.setup(desc)
    samples = time_steps(desc, plan.step, warmup, steps)
    errors = set(check_state(cache, desc, plan))
    packed = desc.pack_for_flashinfer(plan.final_ids)
    del cache, desc
    gc.collect()
    return samples, errors, packed


def run_libs(
    libs: dict[str, types.ModuleType], plan: Plan, steps: int, rounds: int, warmup: int
) -> dict[str, LibRun]:
    """``rounds`` rounds per library, the libraries taking turns round by round so that
    both meet the same machine conditions."""
    samples: dict[str, list[int]] = {label: [] for label in libs}
    errors: dict[str, set[str]] = {label: set() for label in libs}
    packed: dict[str, Any] = {}
    for _ in range(rounds):
        for label, lib in libs.items():
            got, errs, packed[label] = run_round(lib, plan, steps, warmup)
            samples[label] += got
            errors[label] |= errs
    return {
        label: LibRun(
            statistics.median(samples[label]) / 1e3,
            len(samples[label]),
            sorted(errors[label]),
            packed[label].kv_page_indptr.tolist(),
            packed[label].kv_last_page_len.tolist(),
        )
        for label in libs
    }


def run_scenario(sc: Scenario, libs: dict[str, types.ModuleType], quick: bool, seed: int) -> Result:
    steps, rounds, warmup = (20, 1, 3) if quick else (sc.steps, sc.rounds, sc.warmup)
    plan = sc.build(warmup + steps, seed)
    runs = run_libs(libs, plan, steps, rounds, warmup)
    errors = [f"{label}: {e}" for label, run in runs.items() for e in run.errors]
    ours, peer = runs["seqattn"], runs["0.0.2"]
    if (ours.indptr, ours.last_page_len) != (peer.indptr, peer.last_page_len):
        errors.append("packed kv_page_indptr / kv_last_page_len differ between the libraries")
    result = Result(sc.name, ours.steps, {k: r.median_us for k, r in runs.items()}, errors)
    status = "ok" if not errors else "FAIL: " + "; ".join(errors)
    print(
        f"{sc.name:36s} seqattn {ours.median_us:10.1f} us  0.0.2 {peer.median_us:10.1f} us"
        f"  {peer.median_us / ours.median_us:6.1f}x  {status}",
        flush=True,
    )
    return result


def markdown_table(results: Sequence[Result]) -> str:
    lines = [
        "| scenario | steps | seqattn (us/step) | 0.0.2 (us/step) | 0.0.2 / seqattn | check |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ours, peer = r.median_us["seqattn"], r.median_us["0.0.2"]
        check = "ok" if not r.errors else "FAIL"
        lines.append(
            f"| {r.name} | {r.steps} | {ours:,.1f} | {peer:,.1f} | {peer / ours:.1f}x | {check} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps (smoke test)")
    parser.add_argument("--scenario", choices=GROUPS, help="run one scenario group only")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ours, peer = load_ours(), load_peer()
    libs = {"seqattn": ours, "0.0.2": peer}
    print(
        f"seqattn {getattr(ours, '__version__', '?')} from {Path(ours.__file__).parent}\n"
        f"seqattn {peer.__version__} from {Path(peer.__file__).parent} (as {PEER_MODULE})\n"
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, page_size {PAGE_SIZE}, median of timed steps\n",
        flush=True,
    )
    selected = [s for s in SCENARIOS if args.scenario is None or args.scenario in s.groups]
    t0 = time.perf_counter()
    results = [run_scenario(sc, libs, args.quick, args.seed) for sc in selected]
    print(f"\ntotal {time.perf_counter() - t0:.1f} s\n")
    print(markdown_table(results))
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
