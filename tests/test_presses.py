"""Presses (SnapKV, PyramidKV, AdaKV) against plain re-statements of their definitions.

What is compared to what: ``reference_scores`` restates SnapKV's score in float64 Python
loops over heads, query heads, queries and keys, from the view's fields alone (each
query's softmax over the keys its head holds at positions up to its own; the mean over
the queries; pooling over the head's older tokens with zero padding, kvpress's
``F.avg_pool1d`` or a max over the in-range neighbours; the mean over the GQA group).
``reference_snapkv`` and ``reference_adakv`` then choose tokens by sorting Python lists,
and ``reference_pyramid`` computes the layer shares from the formula in its docstring.
None of them shares code with seqattn. The padding of every view is NaN, so a padded
slot that entered a softmax, a pooling or a choice would show.

Ties: equal scores go to the newer token (then, across heads, to the later head).
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch

from seqattn import (
    ArgumentTypeError,
    IndexOutOfRangeError,
    InvalidArgumentError,
    InvalidLengthError,
    SeqAttnError,
    TensorSpecError,
)
from seqattn.headwise import (
    AdaKVPress,
    HeadwiseKVCache,
    PressInput,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    tokens_per_head,
)

INF = math.inf


# ------------------------------------------------------------------ the references
def reference_scores(view: PressInput, window: int, kernel: int, pooling: str) -> list:
    """Per head, the SnapKV score of each of its older tokens (all but the newest
    ``window`` it holds), as a list of floats (float64 throughout)."""
    heads = view.keys.shape[0]
    queries = view.queries.double().tolist()  # [w][qo_heads][dim]
    w, group = len(queries), len(queries[0]) // heads
    seq_len = 1 + max(int(p[-1]) for p in view.positions if len(p))
    out = []
    for h in range(heads):
        n = int(view.lens[h])
        positions = view.positions[h].tolist()
        keys = view.keys[h, :n].double().tolist()
        older = n - min(window, n)
        per_query_head = []
        for g in range(group):
            received = [0.0] * n
            for j in range(w):
                query = queries[j][h * group + g]
                seen = [i for i in range(n) if positions[i] <= seq_len - w + j]
                if not seen:
                    continue
                logits = [
                    view.sm_scale * sum(a * b for a, b in zip(query, keys[i], strict=True))
                    for i in seen
                ]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                for i, weight in zip(seen, weights, strict=True):
                    received[i] += weight / sum(weights) / w
            pooled = []
            for i in range(older):
                near = range(i - kernel // 2, i + kernel // 2 + 1)
                values = [received[t] for t in near if 0 <= t < older]
                pooled.append(sum(values) / kernel if pooling == "avg" else max(values))
            per_query_head.append(pooled)
        out.append([sum(column) / group for column in zip(*per_query_head, strict=True)])
    return out


def reference_snapkv(view: PressInput, budget: int, window: int, kernel: int, pooling: str):
    """Each head: all it holds if no more than ``budget``; else its newest
    ``min(window, budget)`` tokens and its best older ones up to ``budget``."""
    keep = []
    for scores, n in zip(
        reference_scores(view, window, kernel, pooling), view.lens.tolist(), strict=True
    ):
        if n <= budget:
            keep.append(list(range(n)))
            continue
        newest = min(window, budget)
        best = ranked_older(scores)[: budget - newest]
        keep.append(sorted(best + list(range(n - newest, n))))
    return keep


def reference_adakv(view, budget, window, kernel, pooling, alpha):
    """The layer keeps ``budget * heads`` (or all): each head its newest
    ``min(window, budget)`` and the first ``int(alpha * budget)`` of its own ranking
    (its window newest first, then its older tokens by score), the rest by score over
    all heads (a window token scoring above every older one)."""
    scores = reference_scores(view, window, kernel, pooling)
    lens = view.lens.tolist()
    floor, newest = int(alpha * budget), min(window, budget)
    kept = []
    for s, n in zip(scores, lens, strict=True):
        own = list(range(n - 1, len(s) - 1, -1)) + ranked_older(s)
        kept.append(set(range(max(n - newest, 0), n)) | set(own[:floor]))
    candidates = [
        (s[i] if i < len(s) else INF, h, i)
        for h, (s, n) in enumerate(zip(scores, lens, strict=True))
        for i in range(n)
        if i not in kept[h]
    ]
    candidates.sort(key=lambda c: (-c[0], -c[1], -c[2]))
    room = min(budget * len(lens), sum(lens)) - sum(map(len, kept))
    for _, h, i in candidates[:room]:
        kept[h].add(i)
    return [sorted(k) for k in kept]


def ranked_older(scores: list) -> list:
    """A head's older tokens from the best score down, the newer first on ties."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], -i))


def reference_pyramid(num_layers: int, average: int, window: int, beta: float) -> list:
    """Exact shares: ``window`` plus an arithmetic sequence from ``2 s - s / beta`` down
    to ``s / beta``, ``s = average - window`` (all ``average`` if ``s <= 0``)."""
    s = average - window
    if num_layers == 1 or s <= 0:
        return [float(average)] * num_layers
    top, bottom = 2 * s - s / beta, s / beta
    return [window + top + (bottom - top) * i / (num_layers - 1) for i in range(num_layers)]


# ------------------------------------------------------------------ views
def make_view(seed, lens, group, *, newest=3, window_q=4, dim=8, gaps=5, layer=0):
    """Heads holding ``lens[h]`` tokens each: the ``newest`` newest positions (all of
    them when fewer) and a random subset of the older ones; keys padded with NaN."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    heads, length = len(lens), max(lens)
    end = length + gaps
    positions = []
    for n in lens:
        recent = list(range(end - min(newest, n), end))
        older = sorted(rng.choice(end - len(recent), n - len(recent), replace=False).tolist())
        positions.append(torch.tensor(older + recent, dtype=torch.int64))
    keys = torch.full((heads, length, dim), math.nan)
    for h, n in enumerate(lens):
        keys[h, :n] = 2 * torch.randn(n, dim, generator=gen)
    queries = torch.randn(window_q, heads * group, dim, generator=gen)
    lens_t = torch.tensor(lens, dtype=torch.int64)
    return PressInput(layer, 4, positions, keys, lens_t, queries, dim**-0.5)


def check_keep(keep, view: PressInput, budget: int, window: int) -> None:
    """The contract of every select: int64, strictly increasing, in range, no more than
    held, each head's newest ``min(window, budget)`` kept."""
    assert len(keep) == view.keys.shape[0]
    for kept, n in zip(keep, view.lens.tolist(), strict=True):
        assert isinstance(kept, np.ndarray) and kept.dtype == np.int64
        assert kept.size <= n and (np.diff(kept) > 0).all()
        assert kept.size == 0 or 0 <= kept[0] <= kept[-1] < n
        newest = set(range(max(n - min(window, budget), 0), n))
        assert newest <= set(kept.tolist())


SHAPES = [  # (tokens each KV head holds, GQA group, the press's window, queries given)
    ([30, 30], 1, 4, 4),  # every head holds the same
    ([40, 17, 9, 25], 2, 4, 4),  # different holdings
    ([23, 5, 31], 4, 6, 6),  # a head holding less than the window
    ([12, 0, 20], 2, 3, 3),  # a head holding nothing
    ([5, 4], 4, 6, 5),  # a sequence shorter than the window
]
BUDGETS = [0, 1, 2, 5, 8, 13, 40, 100]


# ------------------------------------------------------------------ SnapKV
@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_snapkv_keeps_what_its_definition_keeps(shape, kernel, pooling):
    lens, group, window, window_q = SHAPES[shape]
    view = make_view(10 + shape, lens, group, window_q=window_q)
    press = SnapKVPress(window=window, kernel=kernel, pooling=pooling)
    for budget in BUDGETS:
        keep = press.select(view, budget)
        check_keep(keep, view, budget, window)
        assert [k.tolist() for k in keep] == reference_snapkv(view, budget, window, kernel, pooling)
        assert [k.size for k in keep] == [min(n, budget) for n in lens]


def test_snapkv_budget_at_or_above_held_keeps_everything():
    view = make_view(3, [9, 14, 2], 2)
    for budget in (14, 15, 1000):
        keep = SnapKVPress(window=4).select(view, budget)
        assert [k.tolist() for k in keep] == [list(range(n)) for n in (9, 14, 2)]


def test_snapkv_budget_below_the_window_keeps_the_newest():
    view = make_view(4, [20, 11], 1)
    keep = SnapKVPress(window=8).select(view, 3)
    assert [k.tolist() for k in keep] == [[17, 18, 19], [8, 9, 10]]


def test_snapkv_prefers_the_attended_token_and_its_neighbours():
    queries = torch.zeros(2, 2, 4)
    queries[..., 0] = 1
    keys = torch.zeros(1, 12, 4)
    keys[0, 5, 0] = 6
    view = PressInput(0, 1, [torch.arange(12)], keys, torch.tensor([12]), queries)
    kept = SnapKVPress(window=2, kernel=5).select(view, 7)[0].tolist()
    assert kept == [3, 4, 5, 6, 7, 10, 11]  # 5 and the 4 inside its pooling width


def test_heads_holding_nothing_keep_nothing():
    nothing = [torch.zeros(0, dtype=torch.int64)] * 2
    view = PressInput(
        0, 1, nothing, torch.zeros(2, 0, 8), torch.zeros(2, dtype=torch.int64), torch.randn(3, 2, 8)
    )
    assert [k.tolist() for k in SnapKVPress(window=3).select(view, 4)] == [[], []]
    assert [k.tolist() for k in AdaKVPress(SnapKVPress(window=3)).select(view, 4)] == [[], []]


# ------------------------------------------------------------------ PyramidKV
@pytest.mark.parametrize(
    ("num_layers", "average", "window", "beta"),
    [(32, 256, 64, 20), (32, 100, 8, 20), (4, 40, 8, 4), (7, 13, 2, 3.5), (2, 9, 1, 20),
     (28, 1000, 32, 1.5), (5, 3, 1, 20), (3, 1, 1, 20), (32, 65, 64, 20), (6, 50, 4, 1)],
)  # fmt: skip
def test_pyramid_budgets_fall_and_average_the_request(num_layers, average, window, beta):
    press = PyramidKVPress(window=window, beta=beta)
    budgets = press.layer_budgets(num_layers, average)
    exact = reference_pyramid(num_layers, average, window, beta)
    assert all(type(b) is int for b in budgets)
    assert sum(budgets) == num_layers * average
    assert all(a >= b for a, b in pairwise(budgets))
    assert all(abs(b - x) < 1 for b, x in zip(budgets, exact, strict=True))
    assert [press.layer_budget(i, num_layers, average) for i in range(num_layers)] == budgets
    if average > window:
        assert budgets[-1] >= window
    if average - window >= num_layers and beta > 1:
        assert budgets[0] > budgets[-1]


def test_pyramid_budgets_over_a_sweep_of_settings():
    for window in (1, 4, 16):
        for beta in (1, 1.5, 3, 20):
            press = PyramidKVPress(window=window, beta=beta)
            for num_layers in range(1, 13):
                for average in range(0, 80, 3):
                    budgets = press.layer_budgets(num_layers, average)
                    exact = reference_pyramid(num_layers, average, window, beta)
                    assert sum(budgets) == num_layers * average
                    assert all(a >= b for a, b in pairwise(budgets))
                    assert all(abs(b - x) < 1 for b, x in zip(budgets, exact, strict=True))
                    assert min(budgets) >= min(window, average)


def test_pyramid_equal_budgets_when_the_window_takes_all_or_beta_is_one():
    assert PyramidKVPress(window=64).layer_budgets(8, 64) == [64] * 8
    assert PyramidKVPress(window=64).layer_budgets(8, 10) == [10] * 8
    assert PyramidKVPress(window=4, beta=1).layer_budgets(6, 50) == [50] * 6
    assert PyramidKVPress(window=4).layer_budgets(1, 50) == [50]
    assert PyramidKVPress(window=4).layer_budgets(3, 0) == [0, 0, 0]


def test_pyramid_follows_the_paper_not_kvpress_on_the_window():
    """kvpress would spread the whole 40 (its top layer keeping 40 / 4 = 10); the paper
    spreads 40 - 8 = 32 and adds the window to every layer (top layer 8 + 32 / 4)."""
    assert PyramidKVPress(window=8, beta=4).layer_budgets(4, 40) == [64, 48, 32, 16]


@pytest.mark.parametrize("shape", [1, 2, 3])
def test_pyramid_selects_as_snapkv_with_its_layer_budget(shape):
    lens, group, window, window_q = SHAPES[shape]
    view = make_view(20 + shape, lens, group, window_q=window_q)
    press = PyramidKVPress(window=window, kernel=3, pooling="max", beta=5)
    for layer in range(4):
        budget = press.layer_budget(layer, 4, 12)
        keep = [k.tolist() for k in press.select(view, budget)]
        assert keep == reference_snapkv(view, budget, window, 3, "max")


# ------------------------------------------------------------------ AdaKV
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_adakv_keeps_what_its_definition_keeps(shape, alpha):
    lens, group, window, window_q = SHAPES[shape]
    view = make_view(30 + shape, lens, group, window_q=window_q)
    for pooling, kernel in (("avg", 5), ("max", 3)):
        press = AdaKVPress(SnapKVPress(window, kernel, pooling), alpha_safeguard=alpha)
        for budget in BUDGETS:
            keep = press.select(view, budget)
            check_keep(keep, view, budget, window)
            expected = reference_adakv(view, budget, window, kernel, pooling, alpha)
            assert [k.tolist() for k in keep] == expected


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.6])
def test_adakv_spends_the_layer_budget_with_a_floor_per_head(alpha):
    lens = [60, 45, 50, 38]
    view = make_view(5, lens, 2, window_q=4)
    press = AdaKVPress(SnapKVPress(window=4, kernel=3), alpha_safeguard=alpha)
    for budget in (4, 10, 20, 30):
        counts = [k.size for k in press.select(view, budget)]
        assert sum(counts) == budget * len(lens)  # every head holds enough
        assert min(counts) >= max(int(alpha * budget), 4)
    counts = [k.size for k in press.select(view, 45)]  # more than head 3 holds
    assert sum(counts) == 4 * 45 and counts[3] <= 38 and max(counts) > 45


def test_adakv_moves_budget_to_the_diffuse_head():
    queries = torch.zeros(2, 2, 4)
    queries[..., 0] = 1
    keys = torch.zeros(2, 20, 4)
    keys[0, 7, 0] = 10  # head 0: one token takes the attention
    keys[1, :, 0] = torch.linspace(0, 1, 20)  # head 1: attention spread wide
    view = PressInput(0, 1, [torch.arange(20)] * 2, keys, torch.tensor([20, 20]), queries)
    counts = [k.size for k in AdaKVPress(SnapKVPress(2, 1)).select(view, 6)]
    assert counts[0] < 6 < counts[1] and sum(counts) == 12


def test_adakv_with_a_full_floor_is_snapkv():
    view = make_view(6, [30, 22, 41], 2)
    snap = SnapKVPress(window=4, kernel=3)
    for budget in (4, 9, 22):
        ada = AdaKVPress(snap, alpha_safeguard=1.0).select(view, budget)
        assert [k.tolist() for k in ada] == [k.tolist() for k in snap.select(view, budget)]


def test_adakv_takes_the_scorers_window_and_layer_budgets():
    press = AdaKVPress(PyramidKVPress(window=8, beta=4))
    assert press.window == 8
    assert [press.layer_budget(i, 4, 40) for i in range(4)] == [64, 48, 32, 16]


# ------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda: SnapKVPress(window=0), InvalidArgumentError, ["window", "0"]),
        (lambda: SnapKVPress(window=True), ArgumentTypeError, ["window", "True"]),
        (lambda: SnapKVPress(window=4.0), ArgumentTypeError, ["window", "4.0"]),
        (lambda: SnapKVPress(kernel=4), InvalidArgumentError, ["odd", "4"]),
        (lambda: SnapKVPress(kernel=0), InvalidArgumentError, ["kernel", "0"]),
        (lambda: SnapKVPress(kernel="5"), ArgumentTypeError, ["kernel", "'5'"]),
        (lambda: SnapKVPress(pooling="mean"), InvalidArgumentError, ["avg", "'mean'"]),
        (lambda: SnapKVPress(pooling=None), ArgumentTypeError, ["pooling", "None"]),
        (lambda: PyramidKVPress(beta=0.5), InvalidArgumentError, ["beta", "0.5"]),
        (lambda: PyramidKVPress(beta=math.nan), InvalidArgumentError, ["beta", "nan"]),
        (lambda: PyramidKVPress(beta="20"), ArgumentTypeError, ["beta", "'20'"]),
        (lambda: PyramidKVPress(window=-1), InvalidArgumentError, ["window", "-1"]),
        (lambda: AdaKVPress(StreamingLLMPress()), ArgumentTypeError, ["ScorerPress", "Stream"]),
        (lambda: AdaKVPress(SnapKVPress, 0.2), ArgumentTypeError, ["ScorerPress", "class"]),
        (lambda: AdaKVPress(SnapKVPress(), 1.5), InvalidArgumentError, ["1.0]", "1.5"]),
        (lambda: AdaKVPress(SnapKVPress(), -0.1), InvalidArgumentError, ["alpha", "-0.1"]),
        (lambda: AdaKVPress(SnapKVPress(), True), ArgumentTypeError, ["alpha", "True"]),
    ],
)
def test_bad_settings_are_refused_saying_what_came(make, error, words):
    with pytest.raises(error) as caught:
        make()
    assert isinstance(caught.value, SeqAttnError)
    for word in words:
        assert word in str(caught.value)


def bad_views(view: PressInput) -> list:
    """``(error, view, words in the message)`` for views a press must refuse."""

    def swap(**fields) -> PressInput:
        return PressInput(**{**view.__dict__, **fields})

    length = view.keys.shape[1]
    return [
        (TensorSpecError, swap(queries=None), "queries"),
        (TensorSpecError, swap(queries=view.queries[..., :4]), "head_dim=8"),
        (TensorSpecError, swap(queries=view.queries[:, :3]), "multiple of"),
        (TensorSpecError, swap(queries=view.queries[:0]), "window >= 1"),
        (TensorSpecError, swap(keys=view.keys[0]), "keys"),
        (TensorSpecError, swap(lens=view.lens[:1]), "one entry per KV head"),
        (InvalidLengthError, swap(lens=view.lens + length), "at most"),
        (ArgumentTypeError, swap(lens=view.lens.float()), "integers"),
        (InvalidLengthError, swap(positions=view.positions[:1]), "positions"),
        (InvalidLengthError, swap(positions=[p[1:] for p in view.positions]), "positions"),
    ]


@pytest.mark.parametrize(
    "press",
    [SnapKVPress(4), PyramidKVPress(4), AdaKVPress(PyramidKVPress(4))],
    ids=["snapkv", "pyramidkv", "ada-pyramidkv"],
)
def test_bad_views_and_budgets_are_refused_and_change_nothing(press):
    view = make_view(8, [10, 7], 2)
    settings = repr(press.__dict__)
    tensors = [view.keys.clone(), view.lens.clone(), view.queries.clone()]
    expected = [k.tolist() for k in press.select(view, 5)]
    for error, bad, words in bad_views(view):
        with pytest.raises(error, match=words):
            press.select(bad, 5)
    for budget, error in ((-1, InvalidLengthError), (2.0, ArgumentTypeError),
                          (True, ArgumentTypeError), (None, ArgumentTypeError)):  # fmt: skip
        with pytest.raises(error, match="budget"):
            press.select(view, budget)
    for layer, error in ((4, IndexOutOfRangeError), (-1, IndexOutOfRangeError),
                         (1.0, ArgumentTypeError)):  # fmt: skip
        with pytest.raises(error, match="layer"):
            press.layer_budget(layer, 4, 10)
    assert repr(press.__dict__) == settings
    for before, after in zip(tensors, [view.keys, view.lens, view.queries], strict=True):
        assert torch.equal(before.nan_to_num(), after.nan_to_num())
    assert [k.tolist() for k in press.select(view, 5)] == expected


def test_pyramid_layer_budget_arguments_are_checked():
    press = PyramidKVPress(window=4)
    with pytest.raises(InvalidArgumentError, match="num_layers"):
        press.layer_budgets(0, 10)
    with pytest.raises(InvalidLengthError, match="tokens_per_head"):
        press.layer_budgets(4, -1)
    with pytest.raises(ArgumentTypeError, match="tokens_per_head"):
        press.layer_budgets(4, 10.0)


# ------------------------------------------------------------------ on a head-wise cache
def view_of(cache: HeadwiseKVCache, layer: int, seq: int, queries: torch.Tensor) -> PressInput:
    """What a serving loop hands a press: the keys the cache holds, padded with NaN."""
    lens = cache.head_lens(layer, seq).astype(np.int64)
    keys = torch.full((cache.num_kv_heads, int(lens.max()), cache.head_dim), math.nan)
    positions = []
    for head in range(cache.num_kv_heads):
        keys[head, : lens[head]] = cache.read_head(layer, seq, head)[0]
        positions.append(torch.from_numpy(cache.head_positions(layer, seq, head)))
    scale = cache.head_dim**-0.5
    lens_t = torch.from_numpy(lens)
    return PressInput(layer, cache.num_layers, positions, keys, lens_t, queries, scale)


def pages(tokens) -> int:
    """Pages of 4 tokens that heads holding ``tokens`` take."""
    return sum(-(-int(n) // 4) for n in tokens)


@pytest.mark.parametrize(
    "press",
    [SnapKVPress(window=4, kernel=3), PyramidKVPress(window=4, beta=4),
     AdaKVPress(PyramidKVPress(window=4, beta=4), alpha_safeguard=0.25)],
    ids=["snapkv", "pyramidkv", "ada-pyramidkv"],
)  # fmt: skip
def test_presses_compress_a_headwise_cache_and_free_what_the_budgets_say(press):
    layers, heads, group, dim = 3, 4, 2, 8
    cache = HeadwiseKVCache(512, 4, layers, heads, dim, torch.float32, "cpu", check_invariants=True)
    gen = torch.Generator().manual_seed(7)
    cache.add_sequences([0, 1])
    prompt = [45, 26]
    for layer in range(layers):
        k, v = torch.randn(2, sum(prompt), heads, dim, generator=gen).unbind(0)
        cache.append(layer, [0, 1], k, v, append_lens=prompt)
    scorer = press.scorer if isinstance(press, AdaKVPress) else press
    for round_ in range(2):  # after the prompt, then after decoding over compressed heads
        for seq in (0, 1):
            average = tokens_per_head(0.3, cache.seq_len(seq))
            for layer in range(layers):
                view = view_of(cache, layer, seq, torch.randn(4, heads * group, dim, generator=gen))
                budget = press.layer_budget(layer, layers, average)
                keep = press.select(view, budget)
                held, free = cache.head_lens(layer, seq), cache.available_pages_count
                counts = [k.size for k in keep]
                if isinstance(press, AdaKVPress):
                    assert sum(counts) == min(budget * heads, int(held.sum()))
                    expected = reference_adakv(view, budget, 4, 5, "avg", 0.25)
                else:
                    assert counts == np.minimum(held, budget).tolist()
                    expected = reference_snapkv(view, budget, 4, scorer.kernel, "avg")
                assert [k.tolist() for k in keep] == expected
                cache.compress(layer, seq, keep)
                assert cache.head_lens(layer, seq).tolist() == counts
                assert cache.available_pages_count - free == pages(held) - pages(counts)
        for _ in range(3 + round_):  # decode: one token in every head of every layer
            for layer in range(layers):
                k, v = torch.randn(2, 2, heads, dim, generator=gen).unbind(0)
                cache.append(layer, [0, 1], k, v)
    cache.release([0, 1])
    assert cache.available_pages_count == 512
