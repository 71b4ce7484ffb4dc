"""Random mixes of cached and uncached sequences under a small pool, checked after every step.

Every token's K/V encodes (token id, position), so reading a sequence back through its
page table proves each of its pages holds its own tokens, however the pages were
shared, swapped or evicted. After each step: the descriptor's integrity (pool, table,
prefix cache, LRU order, committed chains), exact reference counts (sequences + cached
pages), and each live sequence's KV. A start must hit at least the committed pages of
a live sequence with the same salt and tokens (those cannot have been evicted).
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from seqattn import CacheDescriptor, NoPageError, PagedKVCacheManager
from tests.conftest import (
    HOSTILE_ID_LISTS,
    HOSTILE_INTEGERS,
    assert_raises_unchanged,
    assert_refused_unchanged,
    examples,
    machine_settings,
    read_back,
)

PS = 2
NUM_PAGES = 12
IDS = st.integers(0, 5)
TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=9)
EXAMPLES = 600
OPERATIONS = {"count": 0}


def foreign_pin() -> object:
    """A pin handle of another descriptor's prefix cache."""
    other = CacheDescriptor(PagedKVCacheManager(4, PS, 1, 2, torch.float64, "cpu"),
                            prefix_caching=True)  # fmt: skip
    other.start_sequence(0, [1, 2, 3])
    other.allocate([0], [3])
    other.commit([0])
    return other.pin_prefix(0)


def kv_values(tokens: list[int], start: int) -> torch.Tensor:
    return torch.tensor([t * 1000 + start + i for i, t in enumerate(tokens)], dtype=torch.float64)


class PrefixMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache = PagedKVCacheManager(NUM_PAGES, PS, 1, 2, torch.float64, "cpu")
        self.desc = CacheDescriptor(self.cache, prefix_caching=True)
        self.tokens: dict[int, list[int]] = {}  # model: every token each sequence holds
        self.prompt: dict[int, list[int]] = {}  # tokens still to prefill
        self.salt: dict[int, object] = {}
        self.known: dict[int, int] = {}  # leading tokens the descriptor was told
        self.committed: dict[int, int] = {}  # leading pages committed (lower bound)
        self.pins: list[tuple[object, object, list[int]]] = []  # handle, salt, tokens kept
        self.foreign = foreign_pin()

    # -------------------------------------------------------------- helpers
    def append(self, seq: int, tokens: list[int]) -> None:
        start = len(self.tokens[seq])
        values = kv_values(tokens, start)[:, None, None].expand(len(tokens), 1, 2).contiguous()
        packed = self.desc.pack_for_flashinfer([seq], append_lens=[len(tokens)])
        self.cache.append_kv(values, -values, packed)
        self.tokens[seq] += tokens

    def snapshot(self) -> tuple:
        pages = {i: self.desc.page_indices(i) for i in self.tokens}
        stats = self.desc.prefix_stats
        return self.cache.allocator.refcount.tolist(), stats, pages, self.cache.kv_data.clone()

    def unchanged_after(self, error: type[Exception], call) -> None:
        assert_raises_unchanged(self.snapshot, error, call)

    def pages_needed(self, seq: int, n: int) -> int:
        have = len(self.tokens[seq])
        return -(-(have + n) // PS) - -(-have // PS)

    def expected_hit(self, prompt: list[int], salt: object) -> int:
        best = 0
        for seq, pages in self.committed.items():
            if self.salt.get(seq, "untracked") != salt:
                continue
            n, held = 0, self.tokens[seq]
            while n < pages and held[n * PS : (n + 1) * PS] == prompt[n * PS : (n + 1) * PS]:
                n += 1
            best = max(best, n)
        for _, pin_salt, kept in self.pins:  # pinned prefixes outlive their sequences
            if pin_salt == salt:
                n = 0
                while (n + 1) * PS <= len(kept) and kept[n * PS : (n + 1) * PS] == prompt[
                    n * PS : (n + 1) * PS
                ]:
                    n += 1
                best = max(best, n)
        return min(best, (len(prompt) - 1) // PS) * PS

    # ---------------------------------------------------------------- rules
    @rule(seq=IDS, prompt=TOKENS, salt=st.sampled_from([None, "a"]))
    def start(self, seq: int, prompt: list[int], salt: object) -> None:
        if seq in self.tokens:
            return
        floor = self.expected_hit(prompt, salt)
        cached = self.desc.start_sequence(seq, prompt, salt=salt)
        assert floor <= cached <= (len(prompt) - 1) // PS * PS and cached % PS == 0
        self.tokens[seq] = prompt[:cached]  # KV written by whoever cached it
        self.prompt[seq], self.salt[seq] = prompt[cached:], salt
        self.known[seq], self.committed[seq] = len(prompt), cached // PS

    @precondition(lambda self: any(self.prompt.values()))
    @rule(data=st.data())
    def prefill_chunk(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(s for s, p in self.prompt.items() if p)))
        n = data.draw(st.integers(1, len(self.prompt[seq])))
        chunk = self.prompt[seq][:n]
        if self.pages_needed(seq, n) > self.cache.available_pages_count:
            self.unchanged_after(NoPageError, lambda: self.desc.allocate([seq], [n]))
            return
        self.desc.allocate([seq], [n])
        self.append(seq, chunk)
        self.prompt[seq] = self.prompt[seq][n:]

    @rule(seq=IDS, n=st.integers(1, 5))
    def plain_allocate(self, seq: int, n: int) -> None:
        """An uncached sequence (the seed's allocate), or unknown tokens for a live one."""
        if seq in self.tokens and self.prompt[seq]:
            return
        new = seq not in self.tokens
        self.tokens.setdefault(seq, [])
        self.prompt.setdefault(seq, [])
        if self.pages_needed(seq, n) > self.cache.available_pages_count:
            if new:
                del self.tokens[seq], self.prompt[seq]
            self.unchanged_after(NoPageError, lambda: self.desc.allocate([seq], [n]))
            return
        self.desc.allocate([seq], [n])
        self.append(seq, [9] * n)

    @precondition(lambda self: any(not p for p in self.prompt.values()))
    @rule(data=st.data(), with_tokens=st.booleans())
    def decode(self, data: st.DataObject, with_tokens: bool) -> None:
        ready = sorted(s for s, p in self.prompt.items() if not p and self.tokens[s])
        if not ready:
            return
        ids = data.draw(st.lists(st.sampled_from(ready), min_size=1, unique=True))
        new = data.draw(st.lists(st.integers(0, 2), min_size=len(ids), max_size=len(ids)))
        if sum(self.pages_needed(i, 1) for i in ids) > self.cache.available_pages_count:
            self.unchanged_after(NoPageError, lambda: self.desc.allocate_decoding(ids, new))
            return
        self.desc.allocate_decoding(ids, token_ids=new if with_tokens else None)
        for seq, token in zip(ids, new, strict=True):
            if with_tokens and self.known.get(seq) == len(self.tokens[seq]):
                self.known[seq] += 1
            self.append(seq, [token])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(self.tokens)), min_size=1, unique=True))
        self.desc.commit(ids)
        for seq in ids:
            if seq in self.known and self.committed[seq] * PS <= self.known[seq]:
                full = min(len(self.tokens[seq]), self.known[seq]) // PS
                self.committed[seq] = max(self.committed[seq], full)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(self.tokens)), min_size=1, unique=True))
        self.desc.release(ids)
        for seq in ids:
            for model in (self.tokens, self.prompt, self.salt, self.known, self.committed):
                model.pop(seq, None)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), dst=IDS)
    def fork(self, data: st.DataObject, dst: int) -> None:
        if dst in self.tokens:
            return
        src = data.draw(st.sampled_from(sorted(self.tokens)))
        if len(self.tokens[src]) % PS and self.cache.available_pages_count == 0:
            self.unchanged_after(NoPageError, lambda: self.desc.fork(src, dst))
            return
        self.desc.fork(src, dst)
        self.tokens[dst], self.prompt[dst] = list(self.tokens[src]), list(self.prompt[src])
        for model in (self.salt, self.known, self.committed):
            if src in model:
                model[dst] = model[src]

    @precondition(lambda self: any(self.committed.get(s) for s in self.tokens))
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(s for s in self.tokens if self.committed.get(s))))
        handle = self.desc.pin_prefix(seq)
        self.pins.append((handle, self.salt[seq], self.tokens[seq][: self.committed[seq] * PS]))

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        handle, _, _ = self.pins.pop(data.draw(st.integers(0, len(self.pins) - 1)))
        self.desc.unpin_prefix(handle)

    @precondition(lambda self: any(self.tokens.values()))
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(s for s, t in self.tokens.items() if t)))
        new_len = data.draw(st.integers(0, len(self.tokens[seq])))
        partial_shared = new_len % PS and self.cache.allocator.refcount[
            self.desc.page_indices(seq)[new_len // PS]
        ] > 1  # fmt: skip
        if partial_shared and self.cache.available_pages_count == 0:
            self.unchanged_after(NoPageError, lambda: self.desc.truncate(seq, new_len))
            return
        self.desc.truncate(seq, new_len)
        self.tokens[seq] = self.tokens[seq][:new_len]
        self.prompt[seq] = []  # the rest of a prompt is abandoned with the tail
        if seq in self.known:
            self.known[seq] = min(self.known[seq], new_len)
            self.committed[seq] = min(self.committed[seq], new_len // PS)

    @rule(value=HOSTILE_INTEGERS, ids=HOSTILE_ID_LISTS, data=st.data())
    def hostile_calls(self, value: object, ids: object, data: st.DataObject) -> None:
        """Bad ids, tokens, salts and foreign pin handles: refused, nothing changed."""
        live = sorted(self.tokens)
        seq = data.draw(st.sampled_from(live)) if live else 0
        new = next(i for i in range(6, 20) if i not in self.tokens)
        calls = [
            lambda: self.desc.start_sequence(value, [1, 2]),
            lambda: self.desc.start_sequence(new, ids),
            lambda: self.desc.start_sequence(
                new, [1, 2], salt=data.draw(st.sampled_from([7, 1.5, ["a"], ("a",)]))
            ),
            lambda: self.desc.commit(ids),
            lambda: self.desc.allocate_decoding([seq], token_ids=[value]),
            lambda: self.desc.allocate_decoding([seq], token_ids=[-1]),
            lambda: self.desc.record_decode_tokens([seq], [value]),
            lambda: self.desc.record_decode_tokens([seq], [1, 2]),
            lambda: self.desc.pin_prefix(value),
            lambda: self.desc.unpin_prefix(self.foreign),
            lambda: self.desc.unpin_prefix(value),
        ]
        assert_refused_unchanged(self.snapshot, data.draw(st.sampled_from(calls)))

    # ------------------------------------------------------------ invariants
    @invariant()
    def consistent(self) -> None:
        OPERATIONS["count"] += 1
        self.desc.check_integrity()
        holders = np.zeros(NUM_PAGES, dtype=np.int64)
        for seq in self.tokens:
            np.add.at(holders, self.desc.page_indices(seq), 1)
        holders += self.desc.prefix_cache.watched
        assert holders.tolist() == self.cache.allocator.refcount.tolist()
        stats = self.desc.prefix_stats
        assert stats.evictable_pages + self.cache.allocator.free_pages_count == (
            self.cache.available_pages_count
        )
        if self.tokens:
            ids = sorted(self.tokens)
            packed = self.desc.pack_for_flashinfer(ids)
            for row, seq in enumerate(ids):
                k, v = read_back(self.cache, packed, row)
                assert k[:, 0, 0].tolist() == kv_values(self.tokens[seq], 0).tolist(), seq
                assert torch.equal(v, -k)


PrefixMachine.TestCase.settings = machine_settings(EXAMPLES, steps=40)
TestPrefixMachine = PrefixMachine.TestCase


def test_the_machine_ran_its_operations() -> None:
    """Runs after the machine (file order): it did check as many operations as planned."""
    print(f"\nprefix state machine: {OPERATIONS['count']} operations checked")
    assert OPERATIONS["count"] >= examples(EXAMPLES) * 20
