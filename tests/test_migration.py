"""Moving a sequence's KV: export/import in one process and send/recv between two gloo
ranks give the same KV bit for bit, decode after a move equals decode without it, the
destination's prefix cache is shared, and every refusal changes nothing anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from seqattn import (
    ArgumentTypeError,
    CacheDescriptor,
    InvalidArgumentError,
    InvalidLengthError,
    NoPageError,
    PagedKVCacheManager,
    SequenceExistsError,
    TensorSpecError,
    UnknownSequenceError,
    migration,
    migration_p2p,
)
from seqattn.migration import PageSpec, SequenceKV, export_sequence, import_sequence
from tests import migration_ranks
from tests.conftest import assert_raises_unchanged, read_back
from tests.migration_ranks import fill, prefill

ROOT = Path(__file__).resolve().parents[1]


def make(num_pages=64, page_size=4, heads=2, head_dim=4, *, layers=2, layout="NHD",
         dtype=torch.float32, prefix=False, k_scale=1.0) -> CacheDescriptor:  # fmt: skip
    cache = PagedKVCacheManager(
        num_pages, page_size, heads, head_dim, dtype, "cpu", layout,
        num_layers=layers, k_scale=k_scale,
    )  # fmt: skip
    return CacheDescriptor(cache, prefix_caching=prefix, check_invariants=True)


def token_kv(desc: CacheDescriptor, seq_id: int) -> torch.Tensor:
    """K and V of every token of ``seq_id`` in every layer: ``[layers, 2, len, H, D]``,
    read page by page (whatever the layout)."""
    packed = desc.pack_for_flashinfer([seq_id])
    cache = desc.cache_manager
    return torch.stack(
        [torch.stack(read_back(cache, packed, 0, layer)) for layer in range(cache.num_layers)]
    )


def snapshot(desc: CacheDescriptor) -> tuple:
    """Everything a refused import must leave as it was (the KV storage last)."""
    alloc = desc.cache_manager.allocator
    seqs = {i: (desc.seq_len(i), desc.page_indices(i)) for i in desc.seq_ids}
    return (alloc.refcount.tolist(), alloc.available_pages_count, seqs, desc.prefix_stats,
            desc.cache_manager.kv_data.clone())  # fmt: skip


# ------------------------------------------------------------------ in one process
@pytest.mark.parametrize("ps", [1, 4, 7])
@pytest.mark.parametrize("layouts", [("NHD", "NHD"), ("NHD", "HND"), ("HND", "NHD")])
def test_import_gives_the_same_kv_bit_for_bit(ps: int, layouts: tuple[str, str]) -> None:
    src = make(page_size=ps, layout=layouts[0])
    dst = make(page_size=ps, layout=layouts[1])
    dst.allocate([50], [ps + 1])  # so the destination's page ids differ from the source's
    lengths = sorted({0, 1, max(ps - 1, 1), ps, ps + 1, 3 * ps + 2})
    for i, n in enumerate(lengths):
        fill(src, i, n, seed=i)
    for i, n in enumerate(lengths):
        kv = export_sequence(src, i)
        assert (kv.length, kv.num_pages, kv.num_layers) == (n, -(-n // ps), 2)
        assert kv.token_ids is None  # no prefix caching: no tokens were kept
        import_sequence(dst, 100 + i, kv)
        assert dst.seq_len(100 + i) == n
        assert torch.equal(token_kv(dst, 100 + i), token_kv(src, i))
        back = export_sequence(dst, 100 + i).pages
        if layouts[0] != layouts[1]:
            back = back.transpose(-3, -2)
        assert torch.equal(back, kv.pages)  # whole pages, in the source's layout
    assert sorted(src.seq_ids) == list(range(len(lengths)))  # the source keeps them
    dst.check_integrity()


def test_float8_pages_move_bit_for_bit() -> None:
    src = make(dtype=torch.float8_e4m3fn, k_scale=0.5)
    dst = make(dtype=torch.float8_e4m3fn, k_scale=0.5, layout="HND")
    fill(src, 1, 11, seed=1)
    kv = export_sequence(src, 1)
    import_sequence(dst, 2, kv)
    back = export_sequence(dst, 2).pages.transpose(-3, -2)
    assert torch.equal(back.view(torch.uint8), kv.pages.view(torch.uint8))


def test_export_is_a_copy_on_the_cache_device_and_immutable() -> None:
    src = make(prefix=True)
    prefill(src, 1, list(range(10)), seed=1)
    kv = export_sequence(src, 1)
    assert kv.pages.shape == (2, 3, 2, 4, 2, 4) and kv.dtype == torch.float32
    assert kv.token_ids.tolist() == list(range(10)) and kv.token_ids.dtype == np.int64
    assert not kv.token_ids.flags.writeable and kv.salt is None
    kv.pages.zero_()  # the cache's pages are not the exported tensor
    assert token_kv(src, 1).abs().sum() > 0
    with pytest.raises(AttributeError):
        kv.length = 3  # type: ignore[misc]


def test_decode_after_import_equals_decode_without_moving() -> None:
    transformers = pytest.importorskip("transformers")
    from seqattn.integrations.hf import PagedCausalLM

    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    a = PagedCausalLM(model, num_pages=64, page_size=4, prefix_caching=True)
    b = PagedCausalLM(model, num_pages=64, page_size=4, prefix_caching=True)
    prompts = {3: [5, 9, 17, 3, 44, 8, 1], 4: list(range(20, 33))}
    first = []
    for seq_id, prompt in prompts.items():
        a.descriptor.start_sequence(seq_id, prompt)
        a.descriptor.allocate([seq_id], [len(prompt)])
        first.append(int(a.forward([seq_id], [prompt])[0].argmax()))
        a.descriptor.commit([seq_id])
        import_sequence(b.descriptor, seq_id, export_sequence(a.descriptor, seq_id))
    ids = list(prompts)
    tokens = {"a": list(first), "b": list(first)}
    for _ in range(6):
        logits = {}
        for name, runner in (("a", a), ("b", b)):
            runner.descriptor.allocate_decoding(ids, token_ids=tokens[name])
            logits[name] = runner.decode(ids, tokens[name])
            runner.descriptor.commit(ids)
            tokens[name] = logits[name].argmax(-1).tolist()
        assert torch.equal(logits["a"], logits["b"])  # the same KV, the same math
    assert tokens["a"] == tokens["b"]
    for seq_id in ids:
        assert torch.equal(token_kv(b.descriptor, seq_id), token_kv(a.descriptor, seq_id))


def test_import_shares_the_prefix_cache_and_writes_only_its_own_pages() -> None:
    src, dst = make(prefix=True), make(prefix=True)
    prompt = list(range(100, 113))  # 13 tokens: 3 full pages and one of 1
    prefill(src, 1, prompt, seed=1)
    prefill(dst, 9, [*prompt[:8], 7, 7, 7], seed=9)  # its first two pages are cached
    cached = dst.page_indices(9)[:2]
    cached_kv = dst.cache_manager.kv_data[:, cached].clone()
    free = dst.cache_manager.available_pages_count
    kv = export_sequence(src, 1)
    assert dst.pages_to_start(kv.token_ids) == 2
    import_sequence(dst, 2, kv)
    assert dst.page_indices(2)[:2] == cached  # shared, not copied
    assert free - dst.cache_manager.available_pages_count == 2
    # the cached pages keep the destination's own KV (different here, so that a write
    # would show): only the sequence's own pages were written
    assert torch.equal(dst.cache_manager.kv_data[:, cached], cached_kv)
    assert torch.equal(token_kv(dst, 2)[:, :, 8:], token_kv(src, 1)[:, :, 8:])
    # its full pages are committed: the same prompt now hits all three
    assert dst.pages_to_start(prompt) == 1 and dst.recorded_tokens(2)[0].tolist() == prompt
    assert dst.start_sequence(3, prompt) == 12
    dst.check_integrity()


def test_an_import_that_fits_only_through_prefix_hits_succeeds() -> None:
    src, dst = make(prefix=True), make(num_pages=5, prefix=True)
    prompt = list(range(13))  # 4 pages
    prefill(src, 1, prompt, seed=1)
    prefill(dst, 9, [*prompt[:8], 1], seed=9)  # 3 pages, the first two cached
    assert dst.cache_manager.available_pages_count == 2
    import_sequence(dst, 2, export_sequence(src, 1))  # 4 pages, less 2 shared
    assert dst.seq_len(2) == 13 and dst.cache_manager.available_pages_count == 0


def test_token_ids_travel_only_when_every_one_is_known() -> None:
    src = make(prefix=True)
    prefill(src, 1, list(range(6)), seed=1)
    src.allocate_decoding([1], token_ids=[40])
    assert export_sequence(src, 1).token_ids.tolist() == [*range(6), 40]
    src.allocate_decoding([1])  # a token nobody named
    assert export_sequence(src, 1).token_ids is None
    dst = make(prefix=True)
    import_sequence(dst, 1, export_sequence(src, 1))  # imported on fresh pages, uncached
    assert dst.seq_len(1) == 8 and dst.recorded_tokens(1) is None


def test_salt_travels_and_keeps_its_namespace() -> None:
    src, dst = make(prefix=True), make(prefix=True)
    tokens = list(range(9))
    src.start_sequence(1, tokens, salt="tenant")
    fill(src, 1, 9, seed=1)
    src.commit([1])
    kv = export_sequence(src, 1)
    assert kv.salt == "tenant"
    import_sequence(dst, 1, kv)
    assert dst.start_sequence(2, tokens, salt="tenant") == 8
    assert dst.start_sequence(3, tokens) == 0  # another namespace


def bad_spec_cases() -> list:
    return [
        (dict(page_size=8), TensorSpecError, "page_size 4, the sequence's KV has 8"),
        (dict(layers=3), TensorSpecError, "num_layers 2, the sequence's KV has 3"),
        (dict(heads=4), TensorSpecError, "num_heads 2, the sequence's KV has 4"),
        (dict(head_dim=8), TensorSpecError, "head_dim 4, the sequence's KV has 8"),
        (dict(dtype=torch.float16), TensorSpecError, "float32, the sequence's KV has torch.fl"),
        (dict(k_scale=0.5), InvalidArgumentError, r"\(1.0, 1.0\), the sequence's KV has \(0.5, "),
    ]


@pytest.mark.parametrize("prefix", [False, True])
def test_every_refusal_changes_nothing(prefix: bool) -> None:
    src = make(prefix=True)
    prefill(src, 1, list(range(13)), seed=1)
    kv = export_sequence(src, 1)
    dst = make(num_pages=8, prefix=prefix)
    prefill(dst, 5, list(range(50, 59)), seed=5)

    def refused(error, call, message, desc=dst):
        assert_raises_unchanged(lambda: snapshot(desc), error, call)
        with pytest.raises(error, match=message):
            call()
        desc.check_integrity()

    refused(ArgumentTypeError, lambda: import_sequence("d", 2, kv), "CacheDescriptor")
    refused(ArgumentTypeError, lambda: import_sequence(dst, 2, kv.pages), "SequenceKV")
    for bad in (True, 2.0, "2", None):
        refused(ArgumentTypeError, lambda bad=bad: import_sequence(dst, bad, kv), "integer")
    refused(InvalidArgumentError, lambda: import_sequence(dst, 2**63, kv), "2\\*\\*63")
    refused(SequenceExistsError, lambda: import_sequence(dst, 5, kv), "live")
    for sizes, error, message in bad_spec_cases():
        other = export_sequence(*_filled(**sizes))
        refused(error, lambda other=other: import_sequence(dst, 2, other), message)
    small = make(num_pages=3, prefix=prefix)
    message = "needs 4 free pages, the pool has 3"
    refused(NoPageError, lambda: import_sequence(small, 2, kv), message, desc=small)
    refused(UnknownSequenceError, lambda: export_sequence(src, 2), "2", desc=src)
    with pytest.raises(KeyError):
        export_sequence(src, 2)


def _filled(**sizes) -> tuple[CacheDescriptor, int]:
    desc = make(**sizes)
    fill(desc, 1, 13, seed=1)
    return desc, 1


def test_a_failure_after_allocating_gives_everything_back(monkeypatch) -> None:
    src, dst = make(prefix=True), make(prefix=True)
    prefill(src, 1, list(range(13)), seed=1)
    prefill(dst, 9, [*range(8), 5], seed=9)
    kv = export_sequence(src, 1)

    def broken(*args):
        raise RuntimeError("device lost")

    monkeypatch.setattr(migration, "write_sequence_pages", broken)
    before = snapshot(dst)
    with pytest.raises(RuntimeError, match="device lost"):
        import_sequence(dst, 2, kv)
    after = snapshot(dst)
    assert before[:3] == after[:3] and 2 not in dst
    dst.check_integrity()


@pytest.mark.parametrize(
    "fields, error, message",
    [
        (dict(length=True), ArgumentTypeError, "length must be an integer"),
        (dict(length=6), TensorSpecError, "holds 2 pages of 4, got 4 pages"),
        (dict(page_size=2), TensorSpecError, "page_size 2"),
        (dict(kv_layout="NDH"), InvalidArgumentError, "kv_layout"),
        (dict(pages=torch.zeros(2, 4, 2, 4, 2)), TensorSpecError, "shape"),
        (dict(pages=[1]), ArgumentTypeError, "torch.Tensor"),
        (dict(pages=torch.zeros(2, 4, 2, 4, 2, 4, dtype=torch.int32)), TensorSpecError, "dtype"),
        (dict(token_ids=[1, 2]), InvalidLengthError, "one id per token \\(13\\), got 2"),
        (dict(token_ids=[1.5] * 13), ArgumentTypeError, "integers"),
        (dict(salt=3), ArgumentTypeError, "salt"),
        (dict(k_scale=0.0), InvalidArgumentError, "scale"),
    ],
)
def test_a_sequence_kv_is_checked_when_made(fields, error, message) -> None:
    good = dict(length=13, page_size=4, kv_layout="NHD", pages=torch.zeros(2, 4, 2, 4, 2, 4))
    SequenceKV(**good)
    with pytest.raises(error, match=message):
        SequenceKV(**{**good, **fields})


# ------------------------------------------------------------------ between ranks
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[dict, dict]:
    """Both ranks' results of every scenario (one spawn of two gloo processes)."""
    outdir = tmp_path_factory.mktemp("ranks")
    mp.spawn(migration_ranks.run, args=(migration_ranks.free_port(), str(outdir)), nprocs=2)
    return tuple(torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in (0, 1))


def test_send_recv_gives_the_same_kv_bit_for_bit(ranks) -> None:
    sent, received = ranks
    lengths = {**migration_ranks.LENGTHS, migration_ranks.PLAIN: 9}
    assert sent["kept"] == sorted(lengths)
    for seq_id in lengths:
        got = received["pages"][seq_id].transpose(-3, -2)  # the receiver is HND
        skip = 2 if seq_id == 6 else 0  # from the receiver's own prefix cache
        assert torch.equal(got[:, skip:], sent["pages"][seq_id][:, skip:])
        tokens, theirs = sent["tokens"][seq_id], received["tokens"][seq_id]
        assert (tokens is None) == (seq_id == migration_ranks.PLAIN)
        assert tokens is None or tokens.tolist() == theirs.tolist()
    assert torch.equal(received["again"].transpose(-3, -2)[:, 2:], sent["pages"][6][:, 2:])
    assert torch.equal(received["fp8"], sent["fp8"])


def test_pages_in_several_chunks_arrive_bit_for_bit(ranks) -> None:
    """Without token ids, and after the refused moves of STREAMED, whose pages the
    receiver took and dropped: the stream stayed in step."""
    sent, received = ranks
    assert sent["chunked"].shape[0] == migration_ranks.CHUNKED_LAYERS
    assert sent["chunked_tokens"] is None  # pages first, the receiver's status after
    assert torch.equal(received["chunked"].transpose(-3, -2), sent["chunked"])


@pytest.mark.parametrize(
    "layers, chunk_pages, want",
    [
        (32, 4, [(0, 1), *[(i, i + 4) for i in range(1, 29, 4)], (29, 31), (31, 32)]),
        (6, 2, [(0, 1), (1, 3), (3, 5), (5, 6)]),
        (6, 6, [(0, 6)]),  # one chunk: no split
        (6, 1, [(i, i + 1) for i in range(6)]),
        (2, 1, [(0, 1), (1, 2)]),
    ],
)
def test_chunks_cover_every_layer_once_one_layer_first_and_last(
    layers: int, chunk_pages: int, want: list, monkeypatch
) -> None:
    cache = PagedKVCacheManager(4, 4, 2, 4, torch.float32, "cpu", num_layers=layers)
    spec = PageSpec.of_cache(cache, 4)
    monkeypatch.setattr(migration_p2p, "CHUNK_BYTES", chunk_pages * spec.page_bytes)
    assert migration_p2p._chunks(spec, 1) == want


def test_recv_shares_the_receivers_prefix_cache(ranks) -> None:
    _, received = ranks
    assert received["page_ids"][6][:2] == received["cached_pages"][:2]
    lengths = {**migration_ranks.LENGTHS, migration_ranks.PLAIN: 9}
    assert received["used"] == sum(-(-n // 4) for n in lengths.values()) - 2
    assert received["hit"] == 1  # sequence 6's three full pages are committed


@pytest.mark.parametrize(
    "scenario, error, builtin, message",
    [
        ("no_pages", "NoPageError", "RuntimeError", "needs 4 free pages, the pool has 2"),
        ("unknown", "UnknownSequenceError", "KeyError", "999"),
        ("live", "SequenceExistsError", "ValueError", "1003"),
        ("shape", "TensorSpecError", "ValueError", "head_dim 8, the sequence's KV has 4"),
    ],
)
def test_a_refusal_raises_on_both_ranks_and_changes_nothing(
    ranks, scenario, error, builtin, message
) -> None:
    for side in ranks:
        seen = side[scenario]
        assert (seen["error"], seen["builtin"]) == (error, builtin), seen
        assert message in seen["message"] and seen["unchanged"]


@pytest.mark.parametrize(
    "scenario, errors, builtins, message",
    [
        ("streamed_no_pages", ("NoPageError",) * 2, ("RuntimeError",) * 2,
         "needs 4 free pages, the pool has 3"),
        ("streamed_live", ("SequenceExistsError",) * 2, ("ValueError",) * 2, "sequence 7"),
        ("streamed_shape", ("TensorSpecError",) * 2, ("ValueError",) * 2,
         "head_dim 8, the sequence's KV has 4"),
        # the receiver's own RuntimeError; the sender's SeqAttnError names it
        ("streamed_write", ("SeqAttnError", "RuntimeError"), ("Exception", "RuntimeError"),
         "device lost"),
        ("streamed_index", ("SeqAttnError", "RuntimeError"), ("Exception", "RuntimeError"),
         "device lost"),
    ],
)  # fmt: skip
def test_a_refusal_after_the_pages_went_raises_on_both_ranks_and_changes_nothing(
    ranks, scenario, errors, builtins, message
) -> None:
    """Without token ids the pages follow the header unasked: a refusal (or a failed
    write) is answered once the receiver took them all, and changes nothing."""
    assert scenario in migration_ranks.STREAMED
    for side, error, builtin in zip(ranks, errors, builtins, strict=True):
        seen = side[scenario]
        assert (seen["error"], seen["builtin"]) == (error, builtin), seen
        assert message in seen["message"] and seen["unchanged"], seen


def test_bad_ranks_and_groups_are_refused_before_anything_travels(ranks) -> None:
    expected = [
        "ArgumentTypeError/TypeError/True", "ArgumentTypeError/TypeError/True",
        "IndexOutOfRangeError/IndexError/True", "IndexOutOfRangeError/IndexError/True",
        "InvalidArgumentError/ValueError/True", "ArgumentTypeError/TypeError/True",
    ]  # fmt: skip
    for side in ranks:
        assert side["local"] == expected


def test_moving_between_ranks_needs_torch_distributed() -> None:
    desc = make()
    fill(desc, 1, 5, seed=1)
    for call in (migration_p2p.send_sequence, migration_p2p.recv_sequence):
        assert_raises_unchanged(lambda c=call: snapshot(desc), InvalidArgumentError,
                                lambda c=call: c(desc, 1, 1))  # fmt: skip
    with pytest.raises(ArgumentTypeError, match="CacheDescriptor"):
        migration_p2p.send_sequence(None, 1, 1)


def test_disaggregated_serving_example_runs() -> None:
    """examples/disaggregated_serving.py in spawn mode: rank 1's decoded tokens equal a
    single-process run (the example asserts it, and says so)."""
    pytest.importorskip("transformers")
    script = ROOT / "examples" / "disaggregated_serving.py"
    run = subprocess.run(
        [sys.executable, str(script), "--spawn", "--new-tokens", "6"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},  # this checkout's seqattn
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "identical to a single-process run" in run.stdout
