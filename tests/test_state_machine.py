"""Random call sequences against a trivial model, checking every invariant after every step.

The model knows each live sequence's tokens (every appended token carries a unique
value in the cache) and the references the test itself added with ``ref``. After
each step: the pool's integrity, exact reference counts (sequence holders + explicit
refs), ceil(len / page_size) pages per sequence, the packed batch (through the
incremental packer) equal to each sequence's page list, and the KV read back
through the packed page table equal to the model's tokens. A call the model
predicts must fail raises the expected error and changes nothing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from seqattn import (
    CacheDescriptor,
    DuplicateSequenceError,
    InvalidLengthError,
    NoPageError,
    PagedAttention,
    PagedKVCacheManager,
    SequenceExistsError,
    StaleBatchError,
    UnknownSequenceError,
)
from tests.conftest import (
    HOSTILE_ID_LISTS,
    HOSTILE_INTEGERS,
    assert_raises_unchanged,
    assert_refused_unchanged,
    examples,
    machine_settings,
    read_back,
)

NUM_PAGES = 14
IDS = st.integers(0, 7)
# about 100 operations per example: the default checks ~1e5 operations in CI
EXAMPLES = 1000
OPERATIONS = {"count": 0}


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ps = 0
        self.tokens: dict[int, list[float]] = {}  # the model: seq id -> token values
        self.explicit: list[int] = []  # pages this test holds references to
        self.next_token = 1.0
        self.batch: list[int] = []

    @precondition(lambda self: self.ps == 0)
    @rule(ps=st.sampled_from([1, 3, 4]), layout=st.sampled_from(["NHD", "HND"]))
    def setup(self, ps: int, layout: str) -> None:
        self.ps = ps
        self.cache = PagedKVCacheManager(NUM_PAGES, ps, 1, 2, torch.float64, "cpu", layout)
        self.desc = CacheDescriptor(self.cache)
        self.attn = PagedAttention(self.cache, 1, backend="torch")

    # ------------------------------------------------------------------ helpers
    def free(self) -> int:
        return self.cache.available_pages_count

    def pages_for(self, n: int) -> int:
        return math.ceil(n / self.ps)

    def snapshot(self) -> tuple:
        seqs = {i: (self.desc.seq_len(i), self.desc.page_indices(i)) for i in self.desc.seq_ids}
        return self.cache.allocator.refcount.tolist(), self.free(), seqs, self.cache.kv_data.clone()

    def expect_failure(self, error: type[Exception], call) -> None:
        assert_raises_unchanged(self.snapshot, error, call)

    def append(self, ids: list[int], lens: list[int]) -> None:
        """Write unique token values for the tokens just allocated, and record them."""
        nnz = sum(lens)
        values = torch.arange(self.next_token, self.next_token + nnz, dtype=torch.float64)
        self.next_token += nnz
        kv = values[:, None, None].expand(nnz, 1, 2).contiguous()
        packed = self.desc.pack_for_flashinfer(ids, append_lens=lens)
        self.cache.append_kv(kv, -kv, packed)
        offset = 0
        for seq, n in zip(ids, lens, strict=True):
            self.tokens[seq] += values[offset : offset + n].tolist()
            offset += n

    def shared(self, page: int) -> bool:
        return int(self.cache.allocator.refcount[page]) > 1

    # -------------------------------------------------------------------- rules
    @precondition(lambda self: self.ps)
    @rule(ids=st.lists(IDS, min_size=1, max_size=4, unique=True), data=st.data())
    def allocate(self, ids: list[int], data: st.DataObject) -> None:
        lens = data.draw(
            st.lists(st.integers(0, 2 * self.ps + 1), min_size=len(ids), max_size=len(ids))
        )
        need = sum(
            self.pages_for(len(self.tokens.get(i, [])) + n)
            - self.pages_for(len(self.tokens.get(i, [])))
            for i, n in zip(ids, lens, strict=True)
        )
        if need > self.free():
            self.expect_failure(NoPageError, lambda: self.desc.allocate(ids, lens))
            return
        self.desc.allocate(ids, lens)
        for i in ids:
            self.tokens.setdefault(i, [])
        self.append(ids, lens)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def allocate_decoding(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(self.tokens)), min_size=1, unique=True))
        need = sum(len(self.tokens[i]) % self.ps == 0 for i in ids)
        if need > self.free():
            self.expect_failure(NoPageError, lambda: self.desc.allocate_decoding(ids))
            return
        self.desc.allocate_decoding(ids)
        self.append(ids, [1] * len(ids))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(self.tokens)), min_size=1, unique=True))
        self.desc.release(ids)
        for i in ids:
            del self.tokens[i]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), dst=IDS)
    def fork(self, data: st.DataObject, dst: int) -> None:
        src = data.draw(st.sampled_from(sorted(self.tokens)))
        if dst in self.tokens:
            self.expect_failure(SequenceExistsError, lambda: self.desc.fork(src, dst))
            return
        if len(self.tokens[src]) % self.ps and self.free() == 0:
            self.expect_failure(NoPageError, lambda: self.desc.fork(src, dst))
            return
        self.desc.fork(src, dst)
        self.tokens[dst] = list(self.tokens[src])
        full = len(self.tokens[src]) // self.ps
        assert self.desc.page_indices(dst)[:full] == self.desc.page_indices(src)[:full]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        new_len = data.draw(st.integers(0, len(self.tokens[seq])))
        pages = self.desc.page_indices(seq)
        keep = self.pages_for(new_len)
        cow = new_len % self.ps and self.shared(pages[keep - 1])
        if cow and self.free() == 0:
            self.expect_failure(NoPageError, lambda: self.desc.truncate(seq, new_len))
            return
        self.desc.truncate(seq, new_len)
        del self.tokens[seq][new_len:]

    @precondition(lambda self: any(self.tokens.values()))
    @rule(data=st.data())
    def ref_a_page(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from([i for i, t in self.tokens.items() if t]))
        page = data.draw(st.sampled_from(self.desc.page_indices(seq)))
        self.cache.ref([page])
        self.explicit.append(page)

    @precondition(lambda self: self.explicit)
    @rule(data=st.data())
    def unref_a_page(self, data: st.DataObject) -> None:
        page = self.explicit.pop(data.draw(st.integers(0, len(self.explicit) - 1)))
        self.cache.unref([page])

    @precondition(lambda self: self.ps)
    @rule(data=st.data())
    def repack_batch(self, data: st.DataObject) -> None:
        """Choose the batch the invariant packs each step (a steady batch exercises splicing)."""
        live = sorted(self.tokens)
        self.batch = data.draw(st.permutations(live)) if live else []

    @precondition(lambda self: self.ps)
    @rule(seq=IDS, data=st.data())
    def bad_calls(self, seq: int, data: st.DataObject) -> None:
        live = sorted(self.tokens)
        unknown = next(i for i in range(100, 200) if i not in self.tokens)
        choice = data.draw(st.integers(0, 5))
        if choice == 0:
            self.expect_failure(
                UnknownSequenceError, lambda: self.desc.allocate_decoding([unknown])
            )
        elif choice == 1:
            self.expect_failure(UnknownSequenceError, lambda: self.desc.release([*live, unknown]))
        elif choice == 2:
            self.expect_failure(InvalidLengthError, lambda: self.desc.allocate([seq], [-1]))
        elif choice == 3:
            self.expect_failure(
                DuplicateSequenceError, lambda: self.desc.allocate([seq, seq], [1, 1])
            )
        elif choice == 4 and live:
            target = data.draw(st.sampled_from(live))
            too_long = len(self.tokens[target]) + 1
            self.expect_failure(InvalidLengthError, lambda: self.desc.truncate(target, too_long))
        else:
            self.expect_failure(UnknownSequenceError, lambda: self.desc.fork(unknown, seq))

    @precondition(lambda self: self.ps)
    @rule(value=HOSTILE_INTEGERS, ids=HOSTILE_ID_LISTS, data=st.data())
    def hostile_calls(self, value: object, ids: object, data: st.DataObject) -> None:
        """What a careless user or an adversary passes (bools, floats, strings, None,
        tuples, sets, ints past int64, pages a sequence holds) is refused unchanged."""
        live = sorted(self.tokens)
        seq = data.draw(st.sampled_from(live)) if live else 0
        held = [p for i in live for p in self.desc.page_indices(i) if p not in self.explicit]
        calls = [
            lambda: self.desc.allocate(ids, [1]),
            lambda: self.desc.allocate([seq], [value]),
            lambda: self.desc.allocate([value], [1]),
            lambda: self.desc.allocate_decoding(ids),
            lambda: self.desc.release(ids),
            lambda: self.desc.truncate(seq, value),
            lambda: self.desc.truncate(value, 0),
            lambda: self.desc.fork(seq, value),
            lambda: self.desc.pack_for_flashinfer(ids),
            lambda: self.desc.pack_for_flashinfer([seq], [value]),
            lambda: self.desc.pages_needed([seq], [value]),
            lambda: self.desc.seq_len(value),
            lambda: self.cache.ref([value]),
            lambda: self.cache.unref(ids),
            lambda: self.cache.copy_pages([value], [0]),
            lambda: self.cache.copy_pages([0], [-1]),
            lambda: self.cache.allocate(value),
            lambda: self.cache.get_kv_cache(value),
        ]
        if held:  # a page some sequence lists, with no reference of the caller's
            calls.append(lambda: self.cache.unref([data.draw(st.sampled_from(held))]))
        assert_refused_unchanged(self.snapshot, data.draw(st.sampled_from(calls)))

    @precondition(lambda self: any(self.tokens.values()))
    @rule(data=st.data(), change=st.sampled_from(["decode", "truncate", "release+reuse"]))
    def stale_batch(self, data: st.DataObject, change: str) -> None:
        """A batch packed before its sequence changed is refused by append_kv and plan,
        whatever page the change left where (a reused page may now be another's)."""
        seq = data.draw(st.sampled_from(sorted(i for i, t in self.tokens.items() if t)))
        old = self.desc.pack_for_flashinfer([seq], append_lens=[1])
        if change == "decode":
            if len(self.tokens[seq]) % self.ps == 0 and self.free() == 0:
                return
            self.desc.allocate_decoding([seq])
            self.append([seq], [1])
        elif change == "truncate":
            pages = self.desc.page_indices(seq)
            new_len = len(self.tokens[seq]) - 1
            keep = self.pages_for(new_len)
            if new_len % self.ps and self.shared(pages[keep - 1]) and self.free() == 0:
                return
            self.desc.truncate(seq, new_len)
            del self.tokens[seq][new_len:]
        else:  # the same id again, on pages that may have been another's
            n = len(self.tokens.pop(seq))
            self.desc.release([seq])
            n = min(n, self.free() * self.ps)
            self.desc.allocate([seq], [n])
            self.tokens[seq] = []
            self.append([seq], [n])
        kv = torch.full((1, 1, 2), -7.0, dtype=torch.float64)
        self.expect_failure(StaleBatchError, lambda: self.cache.append_kv(kv, kv, old))
        self.expect_failure(StaleBatchError, lambda: self.attn.plan(old))

    # --------------------------------------------------------------- invariants
    @invariant()
    def everything_consistent(self) -> None:
        OPERATIONS["count"] += 1
        if not self.ps:
            return
        self.desc.check_integrity()
        refcount = self.cache.allocator.refcount
        holders = np.zeros(NUM_PAGES, dtype=np.int64)
        for seq, toks in self.tokens.items():
            pages = self.desc.page_indices(seq)
            assert self.desc.seq_len(seq) == len(toks)
            assert len(pages) == self.pages_for(len(toks))
            np.add.at(holders, pages, 1)
        np.add.at(holders, self.explicit, 1)
        assert refcount.tolist() == holders.tolist(), "refcount != holders"
        assert self.free() == int((holders == 0).sum())
        batch = [i for i in self.batch if i in self.tokens] or sorted(self.tokens)
        packed = self.desc.pack_for_flashinfer(batch)
        for row, seq in enumerate(batch):
            lo, hi = packed.kv_page_indptr[row : row + 2].tolist()
            assert packed.kv_page_indices[lo:hi].tolist() == self.desc.page_indices(seq)
            k, v = read_back(self.cache, packed, row)
            want = torch.tensor(self.tokens[seq], dtype=torch.float64)
            assert torch.equal(k[:, 0, 0], want) and torch.equal(v[:, 0, 1], -want)


CacheMachine.TestCase.settings = machine_settings(EXAMPLES, steps=100)
TestCacheMachine = CacheMachine.TestCase


def test_the_machine_ran_its_operations() -> None:
    """Runs after the machine (file order): it did check as many operations as planned."""
    print(f"\nstate machine: {OPERATIONS['count']} operations checked")
    assert OPERATIONS["count"] >= examples(EXAMPLES) * 50
