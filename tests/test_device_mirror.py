"""The device mirror of the page arena, exercised on the CPU.

On CUDA, ``pack_for_flashinfer(ids, device="cuda")`` gathers page indices from a device
copy of the arena that receives, row by row, only the page ids it lacks (a row whose
layout changed goes up whole, a grown row sends its new pages). Here
the same mirror runs with device "cpu" through random growth, moves, compactions,
forks, truncations and releases, and must always gather what the host table holds.
"""

import numpy as np
import pytest
import torch

from seqattn import CacheDescriptor
from seqattn.packing import _DeviceArena
from seqattn.page_table import pages_for
from tests.conftest import make_cache


@pytest.mark.parametrize("seed", range(4))
def test_mirror_gathers_what_the_host_table_holds(seed):
    rng = np.random.default_rng(seed)
    desc = CacheDescriptor(make_cache(num_pages=60000, page_size=int(rng.integers(1, 5))))
    table = desc.table
    mirror = _DeviceArena(torch.device("cpu"))
    live: list[int] = []
    next_id = 0
    for _ in range(250):
        action = rng.integers(6)
        if action == 0 or not live:
            new = list(range(next_id, next_id + 3))
            next_id += 3
            desc.allocate(new, rng.integers(0, 30, 3).tolist())
            live += new
        elif action == 1:
            desc.allocate(live, rng.integers(0, 9, len(live)).tolist())
        elif action == 2 and len(live) > 1:
            desc.release([live.pop(int(rng.integers(len(live))))])
        elif action == 3:
            seq = live[int(rng.integers(len(live)))]
            desc.truncate(seq, int(rng.integers(0, desc.seq_len(seq) + 1)))
        elif action == 4:
            desc.fork(live[0], next_id)
            live.append(next_id)
            next_id += 1
        else:
            desc.allocate_decoding(live)
        # the whole batch, or some of it: rows left out must catch up when they return
        batch = live if rng.random() < 0.5 else [i for i in live if rng.random() < 0.5]
        slots = table.slots(batch)
        counts = pages_for(table.lengths(slots), table.page_size)
        indptr = np.zeros(len(batch) + 1, dtype=np.int32)
        np.cumsum(counts, out=indptr[1:])
        extra = rng.integers(0, 100, 5)
        indices, on_device, on_host = mirror.gather(table, slots, counts, indptr, [extra], [counts])
        assert indices.tolist() == table.pages_of_slots(slots).tolist()
        assert on_device[0].tolist() == extra.tolist() and on_host[0].tolist() == counts.tolist()
    assert mirror.arena.shape[0] == table.arena.size
