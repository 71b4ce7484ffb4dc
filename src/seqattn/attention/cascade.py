"""Cascade attention: a group's shared leading pages read once for all its queries.

Attention over a sequence's keys splits at any point into attention over the keys
before it and over the keys after it, merged by their log-sum-exps. When rows share
their first pages (a cached system prompt), the shared part becomes one *shared
level* request per group, whose queries are all the group's query tokens (no causal
mask: every query comes after the shared pages), and the rest a *suffix level* batch
(each row over its remaining pages, with the batch's own mask). Only full pages that
precede every query of the row are shared, so both levels see exactly the keys the
plain batch would.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch
from attrs import define

from .._arrays import concat_ranges, indptr_of
from ..errors import SeqAttnError
from ..packed_data import FlashInferPackedData
from ..shared_prefix import SharedPrefix, find_shared_prefixes
from .batch import AttentionBatch, host_tensor

QueryRows = Union[slice, torch.Tensor]


@define(frozen=True)
class CascadeSplit:
    """One step's batch as two levels whose outputs merge into the plain result.

    Attributes:
        shared: one request per group over its shared pages; its queries are
            ``q[query_rows]`` (no causal mask, no window).
        suffix: every row of the batch over the pages after its group's shared ones.
        fused: for a decode batch (one query per row, which sees its whole suffix, so
            no mask is needed), both levels as one batch: the rows' suffixes, then the
            groups, for queries ``cat([q, q[query_rows]])``. One kernel launch instead of
            two: on a GPU, small cascade steps are bound by launches.
        query_rows: the query tokens of the shared level, in its order: a slice when
            they are contiguous, else ``shape: [n], dtype: torch.int64`` on q's device.
        query_tokens: the same, ``shape: [n], dtype: int64``, on the host.
        saved_tokens: K/V tokens the step reads fewer times per layer and head.
    """

    shared: AttentionBatch
    suffix: AttentionBatch
    query_rows: QueryRows
    query_tokens: np.ndarray
    saved_tokens: int
    fused: Optional[AttentionBatch] = None


def split_for_cascade(
    batch: AttentionBatch,
    prefix: SharedPrefix,
    page_size: int,
    min_saved_tokens: int,
    max_groups: Optional[int] = None,
) -> Optional[CascadeSplit]:
    """The two levels, or None when sharing would save fewer than ``min_saved_tokens``.

    With ``max_groups``, only that many groups (those saving the most) share; the rows
    of the others read all their pages in the suffix level."""
    packed = batch.packed
    qo_lens = np.diff(batch.qo_indptr)
    # a page is shared only if it precedes every query token of every row of the group
    before_queries = (batch.kv_lens - qo_lens) // page_size
    if prefix.num_groups == 0:
        return None
    sizes = np.diff(prefix.group_indptr)
    pages = np.minimum(
        prefix.num_pages, np.minimum.reduceat(before_queries[prefix.rows], prefix.group_indptr[:-1])
    )
    keep = pages > 0
    savings = (sizes - 1) * pages
    if max_groups is not None and keep.sum() > max_groups:
        keep &= savings >= np.sort(savings[keep])[-max_groups]
        keep[np.flatnonzero(keep)[max_groups:]] = False  # ties
    saved = int(savings[keep].sum()) * page_size
    if not keep.any() or saved < min_saved_tokens:
        return None
    rows = prefix.rows[np.repeat(keep, sizes)].astype(np.int64)
    sizes, pages = sizes[keep], pages[keep].astype(np.int64)
    firsts = rows[np.cumsum(sizes) - sizes]
    skip = np.zeros(batch.batch_size, dtype=np.int64)
    skip[rows] = np.repeat(pages, sizes)
    kv_indptr = _host_array(packed.kv_page_indptr).astype(np.int64)
    suffix_counts = np.diff(kv_indptr) - skip
    shared_pos = concat_ranges(kv_indptr[firsts], pages)
    suffix_pos = concat_ranges(kv_indptr[:-1] + skip, suffix_counts)
    indices = _gather(packed.kv_page_indices, np.concatenate([suffix_pos, shared_pos]))
    suffix_idx, shared_idx = indices[: suffix_pos.size], indices[suffix_pos.size :]

    group_qo = np.add.reduceat(qo_lens[rows], np.cumsum(sizes) - sizes)
    shared = AttentionBatch(
        _packed(shared_idx, pages, np.full(pages.size, page_size), pages * page_size),
        indptr_of(group_qo), (pages * page_size).astype(np.int32),
        causal=False, sm_scale=batch.sm_scale, window_left=-1,
        logits_soft_cap=batch.logits_soft_cap,
    )  # fmt: skip
    suffix_lens = (batch.kv_lens - skip * page_size).astype(np.int32)
    last = _host_array(packed.kv_last_page_len)
    suffix = AttentionBatch(
        _packed(suffix_idx, suffix_counts, last, suffix_lens), batch.qo_indptr, suffix_lens,
        causal=batch.causal, sm_scale=batch.sm_scale, window_left=batch.window_left,
        logits_soft_cap=batch.logits_soft_cap,
    )  # fmt: skip
    tokens = concat_ranges(batch.qo_indptr[rows].astype(np.int64), qo_lens[rows])
    fused = None
    if batch.decode_only:
        fused = AttentionBatch(
            _packed(indices, np.concatenate([suffix_counts, pages]),
                    np.concatenate([last, np.full(pages.size, page_size)]),
                    np.concatenate([suffix_lens, shared.kv_lens])),
            indptr_of(np.concatenate([qo_lens, group_qo])),
            np.concatenate([suffix_lens, shared.kv_lens]),
            causal=False, sm_scale=batch.sm_scale, window_left=-1,
            logits_soft_cap=batch.logits_soft_cap,
        )  # fmt: skip
    device = packed.kv_page_indices.device
    return CascadeSplit(shared, suffix, _query_rows(tokens, device), tokens, saved, fused)


def choose_split(
    batch: AttentionBatch, cascade: Optional[bool], page_size: int, min_saved_tokens: int
) -> Optional[CascadeSplit]:
    """The cascade split ``plan(cascade=...)`` asks for: None (plain attention) when
    ``cascade`` is False, or None and the batch was packed without shared prefixes or
    saves fewer than ``min_saved_tokens``; with True, whenever rows share a page."""
    packed = batch.packed
    if cascade is False or (cascade is None and packed.shared_prefix is None):
        return None
    if batch.window_left >= 0:
        if cascade:
            raise SeqAttnError("cascade attention does not combine with window_left")
        return None
    prefix = packed.shared_prefix
    if prefix is None:  # cascade=True on a batch packed without its groups
        if packed.kv_page_indices.device.type != "cpu":
            raise SeqAttnError(
                "cascade=True needs the batch packed with shared_prefix=True "
                "(or its kv_page_indices on the host)"
            )
        starts = _host_array(packed.kv_page_indptr)[:-1]
        prefix = find_shared_prefixes(packed.kv_page_indices.numpy(), starts,
                                      batch.kv_lens // page_size)  # fmt: skip
    return split_for_cascade(batch, prefix, page_size, 1 if cascade else min_saved_tokens)


def run_cascade(
    levels: tuple[Any, Any], split: CascadeSplit, q: torch.Tensor, layer: int,
    out: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Both levels of ``split`` for one layer, merged: ``(out, lse)`` shaped like plain
    attention's. ``levels``: the backends planned with the suffix (or fused) batch and
    with the shared batch."""
    suffix_level, shared_level = levels
    rows = split.query_rows
    shared_q = q[rows] if isinstance(rows, slice) else q.index_select(0, rows)
    if split.fused is not None:  # one batch: the rows' suffixes, then the groups
        both, both_lse = suffix_level.run(torch.cat([q, shared_q]), layer, True, None)
        n = q.shape[0]
        result, lse, shared, shared_lse = both[:n], both_lse[:n], both[n:], both_lse[n:]
    else:
        result, lse = suffix_level.run(q, layer, True, out)
        shared, shared_lse = shared_level.run(shared_q, layer, True, None)
    if isinstance(rows, slice):  # fold the shared level into its rows, in place
        suffix_level.merge(result[rows], lse[rows], shared, shared_lse)
    else:
        picked, picked_lse = result.index_select(0, rows), lse.index_select(0, rows)
        suffix_level.merge(picked, picked_lse, shared, shared_lse)
        result.index_copy_(0, rows, picked)
        lse.index_copy_(0, rows, picked_lse)
    if out is not None and out.data_ptr() != result.data_ptr():
        result = out.copy_(result)
    return result, lse


@define(frozen=True)
class PaddedSharedLevel:
    """The shared level of a cascade decode step in the fixed shapes a CUDA graph replays.

    ``max_groups + 1`` requests over ``size`` query rows: the groups, then empty slots
    (no queries), then one dummy request that takes the rows no group uses. Unused
    requests read one token of ``scratch_page``. Shared query ``j`` is batch row
    ``q_rows[j]``; its merged output goes to row ``out_rows[j]``, where ``size`` is a
    dump row for the padding. Host arrays, int32 except the int64 row indices.
    """

    qo_indptr: np.ndarray  # [max_groups + 2]
    kv_indptr: np.ndarray  # [max_groups + 2]
    last_page_len: np.ndarray  # [max_groups + 1]
    unused: int  # requests that read the scratch page
    q_rows: np.ndarray  # [size]
    out_rows: np.ndarray  # [size]


def pad_shared_level(
    split: Optional[CascadeSplit], size: int, max_groups: int, page_size: int
) -> PaddedSharedLevel:
    """Lay the shared level of ``split`` (at most ``max_groups`` groups; None: no group)
    out for a graph whose batch holds ``size`` rows."""
    if split is None:
        group_qo = group_pages = tokens = np.zeros(0, np.int64)
    else:
        group_qo = np.diff(split.shared.qo_indptr)
        group_pages = np.diff(_host_array(split.shared.packed.kv_page_indptr))
        tokens = split.query_tokens
    groups, rows = group_qo.size, tokens.size
    assert groups <= max_groups and rows <= size, "split with max_groups, for this bucket"
    unused = max_groups - groups + 1
    pad = size - rows
    return PaddedSharedLevel(
        indptr_of(np.concatenate([group_qo, np.zeros(max_groups - groups, np.int64), [pad]])),
        indptr_of(np.concatenate([group_pages, np.ones(unused, np.int64)])),
        np.concatenate([np.full(groups, page_size), np.ones(unused)]).astype(np.int32),
        unused,
        np.concatenate([tokens, np.zeros(pad, np.int64)]),
        np.concatenate([tokens, np.full(pad, size, np.int64)]),
    )


def _packed(
    indices: torch.Tensor, counts: np.ndarray, last: np.ndarray, lens: np.ndarray
) -> FlashInferPackedData:
    return FlashInferPackedData(
        indices,
        torch.from_numpy(indptr_of(counts)),
        torch.from_numpy(np.ascontiguousarray(last, dtype=np.int32)),
        kv_seq_lens=torch.from_numpy(np.ascontiguousarray(lens, dtype=np.int32)),
    )


def _gather(page_indices: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
    """``page_indices[positions]`` where the indices live (the positions go up pinned)."""
    device = page_indices.device
    where = host_tensor(positions, pin=device.type == "cuda").to(device, non_blocking=True)
    return page_indices[where]


def _query_rows(tokens: np.ndarray, device: torch.device) -> QueryRows:
    if tokens.size and (np.diff(tokens) == 1).all():  # consecutive: a view, no copies
        return slice(int(tokens[0]), int(tokens[-1]) + 1)
    return host_tensor(tokens, pin=device.type == "cuda").to(device, non_blocking=True)


def _host_array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.cpu().numpy()
