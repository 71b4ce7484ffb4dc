"""The tables a CUDA-graph head-wise decode step uploads, checked on the CPU.

``padded_tables`` (what ``HeadwiseGraphs.prepare`` uploads) is compared with the cache's
own page lists, head by head, and its key/value rows are used to write a step's K/V
the way the captured ``write`` does (one indexed copy per layer): the pages must equal
those of the eager ``HeadwiseKVCache.write``. ``QueryWindows.record_layers`` (after a
replay) must equal recording layer by layer. The graphs themselves run on a GPU
(``tests/gpu/test_gpu_headwise_graphs.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqattn.headwise import HeadwiseKVCache
from seqattn.headwise.graph import padded_tables
from seqattn.integrations.query_window import QueryWindows

L, H, D, PS = 3, 2, 8, 4


def compressed_cache(lens: list[int], seed: int = 0) -> HeadwiseKVCache:
    """Sequences of ``lens`` tokens, each head of each layer then keeping a random subset."""
    rng = np.random.default_rng(seed)
    cache = HeadwiseKVCache(256, PS, L, H, D, torch.float32, "cpu")
    ids = list(range(len(lens)))
    cache.add_sequences(ids)
    for layer in range(L):
        for seq, n in enumerate(lens):
            kv = torch.randn(n, H, D)
            cache.append(layer, [seq], kv, kv, [n])
            keep = [np.sort(rng.choice(n, int(rng.integers(1, n + 1)), replace=False))
                    for _ in range(H)]  # fmt: skip
            cache.compress(layer, seq, keep)
    return cache


@pytest.mark.parametrize("pad", [0, 1, 3])
@pytest.mark.parametrize("lens", [[5], [9, 4, 16], [1, 1]])
def test_padded_tables_hold_each_heads_pages_and_new_token(lens, pad) -> None:
    cache = compressed_cache(lens)
    ids = list(range(len(lens)))
    step = cache.begin_step(ids)
    requests = (len(ids) + pad) * H
    scratch = 255
    indices, meta = padded_tables(step.tables, L, requests, scratch, PS)
    total = L * requests
    indptr, last, key_rows, value_rows = np.split(meta, [total + 1, 2 * total + 1, 3 * total + 1])
    for layer in range(L):
        for b in range(len(ids) + pad):
            for h in range(H):
                r = layer * requests + b * H + h
                pages = indices[indptr[r] : indptr[r + 1]].tolist()
                if b >= len(ids):  # padding: one token on the scratch page
                    assert pages == [scratch] and last[r] == 1
                    assert key_rows[r] == scratch * 2 * PS
                    continue
                held = int(cache.head_lens(layer, b)[h])  # the new token included
                row_id = (b * L + layer) * H + h
                assert pages == list(cache.descriptor.page_indices(row_id))
                assert last[r] == (held - 1) % PS + 1
                assert key_rows[r] == pages[-1] * 2 * PS + (held - 1) % PS
                assert value_rows[r] == key_rows[r] + PS
    assert indptr[-1] == indices.size and indices.dtype == np.int32


@pytest.mark.parametrize("pad", [0, 2])
def test_writing_by_the_tables_rows_equals_the_eager_write(pad) -> None:
    cache = compressed_cache([9, 4, 16, 7], seed=1)
    ids = [0, 1, 2, 3]
    step = cache.begin_step(ids)
    requests = (len(ids) + pad) * H
    _, meta = padded_tables(step.tables, L, requests, 255, PS)
    total = L * requests
    key_rows = torch.from_numpy(meta[2 * total + 1 : 3 * total + 1]).view(L, requests)
    value_rows = torch.from_numpy(meta[3 * total + 1 :]).view(L, requests)
    before = cache.kv_pages.clone()
    new = [(torch.randn(len(ids), H, D), torch.randn(len(ids), H, D)) for _ in range(L)]
    for layer, (k, v) in enumerate(new):
        cache.write(step, layer, k, v)
    by_rows = before.clone()
    flat = by_rows.view(-1, D)
    real = len(ids) * H
    for layer, (k, v) in enumerate(new):
        flat.index_copy_(0, key_rows[layer, :real], k.reshape(-1, D))
        flat.index_copy_(0, value_rows[layer, :real], v.reshape(-1, D))
    assert torch.equal(by_rows, cache.kv_pages)
    assert not torch.equal(before, cache.kv_pages)  # the step wrote something


def test_record_layers_equals_recording_each_layer() -> None:
    def windows() -> QueryWindows:
        w = QueryWindows(L, 4, D, torch.float32, torch.device("cpu"))
        w.track(3, window=4)
        w.track(5, window=2)
        w.track(8, window=4)
        return w

    one, all_layers = windows(), windows()
    seq_ids, starts = [3, 4, 5, 8], np.array([6, 2, 9, 1])
    for step in range(6):  # decode steps: one query per sequence, the ring wrapping
        lens = np.ones(4, dtype=np.int64)
        queries = torch.randn(L, 5, 4, D)  # one row more than the step: a bucket's padding
        rows = one.step_rows(seq_ids, starts + step, lens)
        for layer in range(L):
            one.record(rows, layer, queries[layer, :4])
        all_layers.record_layers(all_layers.step_rows(seq_ids, starts + step, lens), queries)
    for seq, n in ((3, 12), (5, 15), (8, 7)):
        for layer in range(L):
            got = all_layers.read(seq, layer, n)
            assert got is not None and torch.equal(got, one.read(seq, layer, n))


def test_graph_buffers_check_their_arguments_before_the_device() -> None:
    """HeadwiseGraphs refuses bad arguments on any device (the CPU has no Triton kernel,
    which it says last), taking no scratch page."""
    from seqattn.errors import ArgumentTypeError, InvalidArgumentError
    from seqattn.headwise.graph import HeadwiseGraphs

    cache = compressed_cache([5])
    free = cache.available_pages_count
    bad = [
        (ArgumentTypeError, TypeError, lambda: HeadwiseGraphs(cache.storage, 4, [1]), "Headwise"),
        (InvalidArgumentError, ValueError, lambda: HeadwiseGraphs(cache, 3, [1]), "multiple"),
        (ArgumentTypeError, TypeError, lambda: HeadwiseGraphs(cache, 4.0, [1]), "num_qo_heads"),
        (InvalidArgumentError, ValueError, lambda: HeadwiseGraphs(cache, 4, []), "one bucket"),
        (InvalidArgumentError, ValueError, lambda: HeadwiseGraphs(cache, 4, [0]), "batch_sizes"),
        (InvalidArgumentError, ValueError, lambda: HeadwiseGraphs(cache, 4, [2]), "CUDA"),
    ]
    for error, builtin, call, message in bad:
        assert issubclass(error, builtin)
        with pytest.raises(error, match=message):
            call()
        assert cache.available_pages_count == free
