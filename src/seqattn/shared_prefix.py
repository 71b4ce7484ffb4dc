"""Which rows of a batch hold the same leading pages (numpy, host side).

Sequences started from one cached system prompt, or forked from one parent, list the
very same page ids first. Attention can then read those pages once for the whole
group (cascade attention) instead of once per sequence.
"""

from __future__ import annotations

import numpy as np
from attrs import define

from ._arrays import indptr_of


@define(frozen=True)
class SharedPrefix:
    """Groups of batch rows whose first pages are the same pages.

    Rows ``rows[group_indptr[g] : group_indptr[g + 1]]`` (in batch order) all start with
    the same ``num_pages[g]`` full pages; every group has at least two rows and one page.
    A row belongs to at most one group.

    Attributes:
        rows: ``shape: [num_grouped_rows], dtype: int32``, host.
        group_indptr: ``shape: [num_groups + 1], dtype: int32``, host.
        num_pages: ``shape: [num_groups], dtype: int32``, host.
    """

    rows: np.ndarray
    group_indptr: np.ndarray
    num_pages: np.ndarray

    @property
    def num_groups(self) -> int:
        return int(self.num_pages.size)


def find_shared_prefixes(
    page_ids: np.ndarray, row_starts: np.ndarray, full_pages: np.ndarray
) -> SharedPrefix:
    """Group rows by their common leading pages.

    Args:
        page_ids: a flat array in which row ``r``'s pages are
            ``page_ids[row_starts[r] : row_starts[r] + n]`` (a CSR ``kv_page_indices``,
            or a page table's arena), int.
        row_starts: ``shape: [batch_size]``, int.
        full_pages: completely filled pages of each row, ``shape: [batch_size]``, int;
            only these can be shared.

    Rows are grouped by their first page; a group keeps the pages all its rows agree
    on, from the start. Costs one comparison per page of the grouped rows' common part.
    """
    candidates = np.flatnonzero(full_pages > 0)
    first = page_ids[row_starts[candidates]]
    order = np.argsort(first, kind="stable")  # groups together, batch order within
    rows, first = candidates[order], first[order]
    cut = np.flatnonzero(np.diff(first)) + 1
    bounds = np.concatenate([[0], cut, [rows.size]])
    groups, pages = [], []
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        if hi - lo < 2:
            continue
        members = rows[lo:hi]
        common = int(full_pages[members].min())
        table = page_ids[row_starts[members][:, None] + np.arange(common)]
        agree = (table == table[0]).all(axis=0)
        groups.append(members)
        pages.append(common if agree.all() else int(np.argmin(agree)))
    indptr = indptr_of(np.array([g.size for g in groups], dtype=np.int64))
    grouped = np.concatenate(groups).astype(np.int32) if groups else np.zeros(0, np.int32)
    return SharedPrefix(grouped, indptr, np.array(pages, dtype=np.int32))
