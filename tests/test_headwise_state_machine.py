"""Random append / step / compress / truncate / release sequences on head-wise caches.

The model knows, per (layer, sequence, KV head), the (position, value) of every token
the head holds, and each sequence's logical length per layer; every appended token
carries a unique value (keys ``+value``, values ``-value``), so content read back from
the pages proves that appends (per layer, or ``begin_step`` + ``write`` per layer in
any order, with other rules in between) and compaction moved the right tokens. Until
its ``write``, a step's layer holds its tokens without values (None): every call that
would change or read that layer must be refused, and so must a release that leaves
some of the step's sequences. After each
rule: the pool's and page tables' integrity, ceil(held / page_size) pages per head,
free pages equal to the pool minus what the model's heads need, positions and K/V read
back equal to the model's. A call the model predicts must fail raises the expected
error and changes nothing (pages, counts, lengths, positions and the stored K/V).
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from seqattn import (
    DuplicateSequenceError,
    InvalidLengthError,
    NoPageError,
    SeqAttnError,
    SequenceExistsError,
    TensorSpecError,
    UnknownSequenceError,
)
from seqattn.headwise import HeadwiseKVCache
from tests.conftest import (
    HOSTILE_ID_LISTS,
    HOSTILE_INTEGERS,
    assert_raises_unchanged,
    assert_refused_unchanged,
    examples,
    machine_settings,
)

NUM_PAGES, LAYERS = 24, 2
IDS = st.integers(0, 5)
EXAMPLES = 300
OPERATIONS = {"count": 0}


def pages(n: int, ps: int) -> int:
    return -(-n // ps)


class HeadwiseMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ps = 0
        # the model: held[layer][seq][head] = [(position, value or None)], length[seq][layer]
        self.held: list[dict[int, list[list[tuple[int, Optional[float]]]]]] = [
            {} for _ in range(LAYERS)
        ]
        self.length: dict[int, list[int]] = {}
        self.next_value = 1.0
        # the open step: (step, ids, lens, layers not written yet, layers changed since)
        self.open: Optional[tuple] = None

    @precondition(lambda self: self.ps == 0)
    @rule(ps=st.sampled_from([1, 2, 3]), heads=st.sampled_from([1, 2, 3]))
    def setup(self, ps: int, heads: int) -> None:
        self.ps, self.heads = ps, heads
        self.cache = HeadwiseKVCache(NUM_PAGES, ps, LAYERS, heads, 2, torch.float64, "cpu")

    # ------------------------------------------------------------------ helpers
    def snapshot(self) -> tuple:
        cache = self.cache
        state = {
            (layer, seq): (
                cache.seq_len(seq, layer),
                [cache.head_positions(layer, seq, h).tolist() for h in range(self.heads)],
                [cache.head_page_ids(layer, seq, h).tolist() for h in range(cache.num_kv_heads)],
            )
            for layer in range(LAYERS)
            for seq in cache.seq_ids
        }
        refcount = cache.storage.allocator.refcount.tolist()
        return cache.available_pages_count, refcount, state, cache.storage.kv_data.clone()

    def expect_failure(self, error: type[Exception], call) -> None:
        assert_raises_unchanged(self.snapshot, error, call)

    def free(self) -> int:
        return self.cache.available_pages_count

    def live(self) -> list[int]:
        return sorted(self.length)

    def unwritten(self, layer: Optional[int] = None) -> bool:
        """Whether ``layer`` (default: any layer) still waits for the open step's write."""
        pending = self.open[3] if self.open else set()
        return bool(pending) if layer is None else layer in pending

    def changed(self, layers: list[int]) -> None:
        """Note that ``layers`` changed: the open step is stale there from now on."""
        if self.open is not None:
            self.open[4].update(layers)

    def kv_values(self, nnz: int) -> torch.Tensor:
        """Unique values for ``nnz`` tokens of every head, ``[nnz, heads, 2]``."""
        values = torch.arange(
            self.next_value, self.next_value + nnz * self.heads, dtype=torch.float64
        )
        self.next_value += nnz * self.heads
        return values.view(nnz, self.heads, 1).expand(nnz, self.heads, 2).contiguous()

    # -------------------------------------------------------------------- rules
    @precondition(lambda self: self.ps)
    @rule(ids=st.lists(IDS, min_size=1, max_size=3, unique=True))
    def add(self, ids: list[int]) -> None:
        if any(i in self.length for i in ids):
            self.expect_failure(SequenceExistsError, lambda: self.cache.add_sequences(ids))
            return
        self.cache.add_sequences(ids)
        for seq in ids:
            self.length[seq] = [0] * LAYERS
            for layer in range(LAYERS):
                self.held[layer][seq] = [[] for _ in range(self.heads)]

    @precondition(lambda self: self.length)
    @rule(layer=st.integers(0, LAYERS - 1), data=st.data())
    def append(self, layer: int, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(self.live()), min_size=1, unique=True))
        lens = data.draw(st.lists(st.integers(0, 2 * self.ps + 1), min_size=len(ids),
                                  max_size=len(ids)))  # fmt: skip
        heads = self.held[layer]
        need = sum(
            pages(len(heads[s][h]) + n, self.ps) - pages(len(heads[s][h]), self.ps)
            for s, n in zip(ids, lens, strict=True)
            for h in range(self.heads)
        )
        kv = self.kv_values(sum(lens))
        append = functools.partial(self.cache.append, layer, ids, kv, -kv, lens)
        if self.unwritten(layer):
            self.expect_failure(SeqAttnError, append)
        elif need > self.free():
            self.expect_failure(NoPageError, append)
        else:
            append()
            self._record(layer, ids, lens, kv)
            self.changed([layer])

    @precondition(lambda self: self.length)
    @rule(data=st.data())
    def begin_step(self, data: st.DataObject) -> None:
        """Take every layer's pages for a step; its layers are written by write_layer."""
        ids = data.draw(st.lists(st.sampled_from(self.live()), min_size=1, unique=True))
        decode = data.draw(st.booleans())
        any_lens = st.lists(st.integers(0, 2 * self.ps + 1), min_size=len(ids), max_size=len(ids))
        lens = [1] * len(ids) if decode else data.draw(any_lens)
        need = sum(
            pages(len(heads[s][h]) + n, self.ps) - pages(len(heads[s][h]), self.ps)
            for heads in self.held
            for s, n in zip(ids, lens, strict=True)
            for h in range(self.heads)
        )
        begin = functools.partial(self.cache.begin_step, ids, None if decode else lens)
        if self.unwritten():
            self.expect_failure(SeqAttnError, begin)
            return
        if need > self.free():
            self.expect_failure(NoPageError, begin)
            return
        step = begin()
        for layer in range(LAYERS):
            self._record(layer, ids, lens, None)
        self.open = (step, ids, lens, set(range(LAYERS)) if sum(lens) else set(), set())

    @precondition(lambda self: self.unwritten())
    @rule(data=st.data())
    def write_layer(self, data: st.DataObject) -> None:
        step, ids, lens, pending, _ = self.open  # type: ignore[misc]
        layer = data.draw(st.sampled_from(sorted(pending)))
        kv = self.kv_values(sum(lens))
        self.cache.write(step, layer, kv, -kv)
        pending.discard(layer)
        heads, row = self.held[layer], 0  # the step's tokens are each head's newest
        for seq, n in zip(ids, lens, strict=True):
            for h in range(self.heads):
                tokens = heads[seq][h]
                for j in range(n):
                    tokens[len(tokens) - n + j] = (
                        tokens[len(tokens) - n + j][0],
                        float(kv[row + j, h, 0]),
                    )
            row += n

    @precondition(lambda self: self.open is not None and self.open[4])
    @rule(data=st.data())
    def write_a_changed_layer(self, data: st.DataObject) -> None:
        """Writing a layer again is refused once the layer changed after begin_step."""
        step, _, lens, _, changed = self.open  # type: ignore[misc]
        layer = data.draw(st.sampled_from(sorted(changed)))
        kv = self.kv_values(sum(lens))
        write = functools.partial(self.cache.write, step, layer, kv, -kv)
        self.expect_failure(SeqAttnError, write)

    def _record(
        self, layer: int, ids: list[int], lens: list[int], kv: Optional[torch.Tensor]
    ) -> None:
        heads, row = self.held[layer], 0
        for seq, n in zip(ids, lens, strict=True):
            start = self.length[seq][layer]
            for j in range(n):
                for h in range(self.heads):
                    value = None if kv is None else float(kv[row + j, h, 0])
                    heads[seq][h].append((start + j, value))
            self.length[seq][layer] += n
            row += n

    @precondition(lambda self: self.length)
    @rule(layer=st.integers(0, LAYERS - 1), data=st.data())
    def compress(self, layer: int, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live()))
        if self.unwritten(layer):
            compress = functools.partial(self.cache.compress, layer, seq, [None] * self.heads)
            self.expect_failure(SeqAttnError, compress)
            return
        heads = self.held[layer][seq]
        keep = []
        for tokens in heads:
            if data.draw(st.booleans()):
                keep.append(None)
                continue
            chosen = data.draw(
                st.sets(st.integers(0, max(len(tokens) - 1, 0)), max_size=len(tokens))
            )
            keep.append(np.array(sorted(chosen), dtype=np.int64))
        self.cache.compress(layer, seq, keep)
        self.changed([layer])
        for h, kh in enumerate(keep):
            if kh is not None:
                heads[h] = [heads[h][i] for i in kh.tolist()]

    @precondition(lambda self: self.length)
    @rule(layer=st.integers(0, LAYERS - 1), data=st.data())
    def truncate_head(self, layer: int, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live()))
        head = data.draw(st.integers(0, self.heads - 1))
        tokens = self.held[layer][seq][head]
        new_len = data.draw(st.integers(0, len(tokens)))
        if self.unwritten(layer):
            truncate = functools.partial(self.cache.truncate_head, layer, seq, head, new_len)
            self.expect_failure(SeqAttnError, truncate)
            return
        self.cache.truncate_head(layer, seq, head, new_len)
        self.changed([layer])
        del tokens[new_len:]

    @precondition(lambda self: self.length)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(self.live()), min_size=1, unique=True))
        if self.unwritten():
            step_ids = {s for s, n in zip(self.open[1], self.open[2], strict=True) if n}  # type: ignore[index]
            if not step_ids <= set(ids):
                self.expect_failure(SeqAttnError, lambda: self.cache.release(ids))
                return
            self.open = None
        self.cache.release(ids)
        self.changed(list(range(LAYERS)))
        for seq in ids:
            del self.length[seq]
            for layer in range(LAYERS):
                del self.held[layer][seq]

    @precondition(lambda self: self.ps)
    @rule(choice=st.integers(0, 7), data=st.data())
    def bad_calls(self, choice: int, data: st.DataObject) -> None:
        cache, live = self.cache, self.live()
        unknown = next(i for i in range(100, 200) if i not in self.length)
        kv = torch.zeros(1, self.heads, 2, dtype=torch.float64)
        if choice == 0:
            self.expect_failure(UnknownSequenceError, lambda: cache.release([*live, unknown]))
        elif choice == 1:
            self.expect_failure(UnknownSequenceError, lambda: cache.append(0, [unknown], kv, kv))
        elif choice == 2 or not live:
            self.expect_failure(
                UnknownSequenceError, lambda: cache.compress(0, unknown, [None] * self.heads)
            )
        else:
            seq = data.draw(st.sampled_from(live))
            held = len(self.held[0][seq][0])
            past_end = [[held]] + [None] * (self.heads - 1)  # one index past head 0's tokens
            bad = {
                3: (InvalidLengthError, lambda: cache.compress(0, seq, past_end)),
                4: (InvalidLengthError, lambda: cache.compress(0, seq, [None] * (self.heads + 1))),
                5: (TensorSpecError, lambda: cache.append(0, [seq], kv.float(), kv.float())),
                6: (DuplicateSequenceError, lambda: cache.append(0, [seq, seq], kv, kv, [1, 0])),
                7: (InvalidLengthError, lambda: cache.truncate_head(0, seq, 0, held + 1)),
            }  # fmt: skip
            error, call = bad[choice]
            self.expect_failure(error, call)

    @precondition(lambda self: self.ps)
    @rule(value=HOSTILE_INTEGERS, ids=HOSTILE_ID_LISTS, data=st.data())
    def hostile_calls(self, value: object, ids: object, data: st.DataObject) -> None:
        """Bad layers, heads, ids and lengths (``compress(True, ...)`` once truncated layer
        1 before raising): refused with nothing changed, in every layer."""
        cache, live = self.cache, self.live()
        seq = data.draw(st.sampled_from(live)) if live else 0
        kv = torch.zeros(1, self.heads, 2, dtype=torch.float64)
        keep = [None] * self.heads
        calls = [
            lambda: cache.compress(value, seq, keep),
            lambda: cache.compress(0, value, keep),
            lambda: cache.truncate_head(value, seq, 0, 0),
            lambda: cache.truncate_head(0, seq, value, 0),
            lambda: cache.truncate_head(0, seq, 0, value),
            lambda: cache.append(value, [seq], kv, kv),
            lambda: cache.append(0, ids, kv, kv),
            lambda: cache.append(0, [seq], kv, kv, [value]),
            lambda: cache.begin_step(ids),
            lambda: cache.begin_step([seq], [value]),
            lambda: cache.add_sequences(ids),
            lambda: cache.add_sequences([value]),
            lambda: cache.release(ids),
            lambda: cache.head_positions(0, seq, value),
            lambda: cache.pack(value, [seq]),
        ]
        assert_refused_unchanged(self.snapshot, data.draw(st.sampled_from(calls)))

    # --------------------------------------------------------------- invariants
    @invariant()
    def everything_consistent(self) -> None:
        OPERATIONS["count"] += 1
        if not self.ps:
            return
        cache, ps = self.cache, self.ps
        cache.check_integrity()
        need = 0
        for layer in range(LAYERS):
            for seq, heads in self.held[layer].items():
                lens = [len(tokens) for tokens in heads]
                need += sum(pages(n, ps) for n in lens)
                assert cache.seq_len(seq, layer) == self.length[seq][layer]
                assert cache.head_lens(layer, seq).tolist() == lens
                assert cache.head_pages(layer, seq).tolist() == [pages(n, ps) for n in lens]
                for h, tokens in enumerate(heads):
                    positions = [p for p, _ in tokens]
                    assert cache.head_positions(layer, seq, h).tolist() == positions
                    k, v = cache.read_head(layer, seq, h)
                    known = [i for i, (_, val) in enumerate(tokens) if val is not None]
                    want = torch.tensor([tokens[i][1] for i in known], dtype=torch.float64)
                    assert torch.equal(k[known, 0], want) and torch.equal(v[known, 1], -want)
        assert self.free() == NUM_PAGES - need
        assert int(cache.pages_held().sum()) == need


HeadwiseMachine.TestCase.settings = machine_settings(EXAMPLES, steps=40)
TestHeadwiseMachine = HeadwiseMachine.TestCase


def test_the_machine_ran_its_operations() -> None:
    """Runs after the machine (file order): it did check as many operations as planned."""
    print(f"\nhead-wise state machine: {OPERATIONS['count']} operations checked")
    assert OPERATIONS["count"] >= examples(EXAMPLES) * 20
