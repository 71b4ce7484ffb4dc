"""The Triton kernels of :mod:`.triton_decode` (imported only where triton is: the CPU
needs none). Shapes, strides and the split rule are described there."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """A kernel's first step when launched as a programmatic dependent launch
    (:mod:`.triton_launch`): let the next kernel launch now (it waits for this one in
    turn), then wait for the kernel before, before any load or store."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def partial(q_ptr, k_ptr, v_ptr, new_k_ptr, new_v_ptr, indptr_ptr, indices_ptr, last_ptr,
            o_ptr, lse_ptr, count_ptr, out_ptr, lse_out_ptr, scale_log2, sq_b, sq_h,
            sk_p, sk_t, sk_h, sv_p, sv_t, sv_h, so_b, so_h, snk_b, snk_h, snv_b, snv_h,
            GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
            PS: tl.constexpr, PAGES: tl.constexpr, SPLITS: tl.constexpr,
            MIN_SHARE: tl.constexpr, FUSED: tl.constexpr, PROGRAMS: tl.constexpr,
            WITH_LSE: tl.constexpr, APPEND: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    pdl_start(PDL)
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = tl.num_programs(1) * GROUP
    p0 = tl.load(indptr_ptr + b)
    n_pages = tl.load(indptr_ptr + b + 1) - p0
    share = split_share(indptr_ptr, n_pages, PAGES, SPLITS, MIN_SHARE, FUSED, PROGRAMS)
    first = s * share
    if first < n_pages:  # splits past the row's pages do nothing at all
        last = tl.load(last_ptr + b)
        kv_len = (n_pages - 1) * PS + last
        # the split that reads the row's last page writes the step's token there first
        # (two ifs: APPEND is a constant, so a kernel without it has no such code)
        if APPEND:  # noqa: SIM102
            if first + share >= n_pages:
                page = tl.load(indices_ptr + p0 + n_pages - 1).to(tl.int64)
                write_token(k_ptr + h * sk_h + page * sk_p + (last - 1) * sk_t,
                            new_k_ptr + b * snk_b + h * snk_h, D)  # fmt: skip
                write_token(v_ptr + h * sv_h + page * sv_p + (last - 1) * sv_t,
                            new_v_ptr + b * snv_b + h * snv_h, D)  # fmt: skip
                tl.debug_barrier()  # every thread's store before any thread reads the page
        out, lse = attend(q_ptr + b * sq_b, k_ptr + h * sk_h, v_ptr + h * sv_h,
                          indices_ptr + p0, first, tl.minimum(first + share, n_pages),
                          kv_len, scale_log2, h, sq_h, sk_p, sk_t, sv_p, sv_t,
                          GROUP, G_PAD, D, PS, PAGES)  # fmt: skip
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        mine = g < GROUP
        row = (b * heads + h * GROUP + g) * SPLITS + s
        used = tl.cdiv(n_pages, share)  # the splits that read pages
        if FUSED:
            if used == 1:  # one split read every page: its result is the answer
                tl.store(out_ptr + b * so_b + (h * GROUP + g)[:, None] * so_h + d[None, :],
                         out.to(out_ptr.dtype.element_ty), mask=mine[:, None])  # fmt: skip
                if WITH_LSE:
                    tl.store(lse_out_ptr + b * heads + h * GROUP + g, lse, mask=mine)
            else:
                tl.store(o_ptr + row[:, None] * D + d[None, :], out, mask=mine[:, None])
                tl.store(lse_ptr + row, lse, mask=mine)
                # the row's last split to finish merges them all: the barrier puts
                # every thread's stores before the counter's release
                tl.debug_barrier()
                count = count_ptr + b * tl.num_programs(1) + h
                if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == used - 1:
                    merge_group(o_ptr, lse_ptr, out_ptr, lse_out_ptr, b, h, heads, used,
                                so_b, so_h, GROUP, G_PAD, D, SPLITS, WITH_LSE)  # fmt: skip
                    tl.store(count, 0)  # ready for the next launch
        else:
            tl.store(o_ptr + row[:, None] * D + d[None, :], out, mask=mine[:, None])
            tl.store(lse_ptr + row, lse, mask=mine)


@triton.jit
def split_share(indptr_ptr, n_pages, PAGES: tl.constexpr, SPLITS: tl.constexpr,
                MIN_SHARE: tl.constexpr, FUSED: tl.constexpr,
                PROGRAMS: tl.constexpr):  # fmt: skip
    """Pages each split of a row reads: whole loop iterations, at least MIN_SHARE."""
    if FUSED:
        # a row splits only where the batch's pages, spread evenly over PROGRAMS
        # programs, give it more than one program's share: rows of a balanced batch
        # keep one split each and write their answer directly
        batch_pages = tl.load(indptr_ptr + tl.num_programs(0)) - tl.load(indptr_ptr)
        fair = tl.maximum(tl.cdiv(batch_pages * tl.num_programs(1), PROGRAMS), 1)
        wanted = tl.minimum(n_pages // fair, n_pages // MIN_SHARE)
        wanted = tl.minimum(tl.maximum(wanted, 1), SPLITS)
        share = tl.cdiv(tl.cdiv(n_pages, wanted), PAGES) * PAGES
    else:
        # at most SPLITS splits (a short row uses few, and only those are written);
        # merge agrees
        share = tl.maximum(tl.cdiv(tl.cdiv(n_pages, SPLITS), PAGES) * PAGES, MIN_SHARE)
    return share


@triton.jit
def attend(q_ptr, k_ptr, v_ptr, indices_ptr, first, end, kv_len, scale_log2, h, sq_h,
           sk_p, sk_t, sv_p, sv_t, GROUP: tl.constexpr, G_PAD: tl.constexpr,
           D: tl.constexpr, PS: tl.constexpr, PAGES: tl.constexpr):  # fmt: skip
    """The softmax of KV head ``h``'s query group over pages ``[first, end)`` of a row
    (online, base 2): its normalized output ``[G_PAD, D]`` and log-sum-exp ``[G_PAD]``."""
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    t = tl.arange(0, PAGES * PS)
    q_rows = q_ptr + (h * GROUP + g)[:, None] * sq_h + d[None, :]
    q = tl.load(q_rows, mask=(g < GROUP)[:, None], other=0.0)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    total = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for start in range(first, end, PAGES):
        slot = start + t // PS
        token = slot * PS + t % PS
        valid = (slot < end) & (token < kv_len)
        page = tl.load(indices_ptr + slot, mask=slot < end, other=0).to(tl.int64)
        k = tl.load(k_ptr + page[:, None] * sk_p + (t % PS)[:, None] * sk_t + d[None, :],
                    mask=valid[:, None], other=0.0)  # fmt: skip
        scores = tl.dot(q, tl.trans(k)) * scale_log2
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + page[:, None] * sv_p + (t % PS)[:, None] * sv_t + d[None, :],
                    mask=valid[:, None], other=0.0)  # fmt: skip
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    seen = total > 0  # an empty split adds nothing
    out = tl.where(seen[:, None], acc / tl.where(seen, total, 1.0)[:, None], 0.0)
    lse = tl.where(seen, m + tl.log2(tl.where(seen, total, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def merge_group(o_ptr, lse_ptr, out_ptr, lse_out_ptr, b, h, heads, used, so_b, so_h,
                GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                SPLITS: tl.constexpr, WITH_LSE: tl.constexpr):  # fmt: skip
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    mine = g < GROUP
    qo = b * heads + h * GROUP + g
    top = tl.full([G_PAD], float("-inf"), tl.float32)
    for i in range(used):  # .cg: the other splits' stores are in L2
        part_lse = tl.load(lse_ptr + qo * SPLITS + i, mask=mine, other=float("-inf"),
                           cache_modifier=".cg")  # fmt: skip
        top = tl.maximum(top, part_lse)
    top = tl.where(mine, top, 0.0)
    total = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for i in range(used):
        part_lse = tl.load(lse_ptr + qo * SPLITS + i, mask=mine, other=float("-inf"),
                           cache_modifier=".cg")  # fmt: skip
        w = tl.exp2(part_lse - top)
        part = tl.load(o_ptr + (qo * SPLITS + i)[:, None] * D + d[None, :],
                       mask=mine[:, None], other=0.0, cache_modifier=".cg")  # fmt: skip
        total += w
        acc += part * w[:, None]
    total = tl.where(mine, total, 1.0)
    tl.store(out_ptr + b * so_b + (h * GROUP + g)[:, None] * so_h + d[None, :],
             (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=mine[:, None])  # fmt: skip
    if WITH_LSE:
        tl.store(lse_out_ptr + qo, top + tl.log2(total), mask=mine)


@triton.jit
def merge(o_ptr, lse_ptr, out_ptr, lse_out_ptr, indptr_ptr, so_b, so_h,
          D: tl.constexpr, PAGES: tl.constexpr, SPLITS: tl.constexpr,
          MIN_SHARE: tl.constexpr, WITH_LSE: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    pdl_start(PDL)
    b, h = tl.program_id(0), tl.program_id(1)
    row = b * tl.num_programs(1) + h
    n_pages = tl.load(indptr_ptr + b + 1) - tl.load(indptr_ptr + b)
    share = split_share(indptr_ptr, n_pages, PAGES, SPLITS, MIN_SHARE, False, 1)
    used = tl.cdiv(n_pages, share)  # the splits partial wrote
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    lse = tl.load(lse_ptr + row * SPLITS + s, mask=s < used, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.exp2(lse - top)
    parts = tl.load(o_ptr + (row * SPLITS + s)[:, None] * D + d[None, :],
                    mask=(s < used)[:, None], other=0.0)  # fmt: skip
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / total
    tl.store(out_ptr + b * so_b + h * so_h + d, out.to(out_ptr.dtype.element_ty))
    if WITH_LSE:
        tl.store(lse_out_ptr + row, top + tl.log2(total))


@triton.jit
def write_token(to_ptr, from_ptr, D: tl.constexpr):
    """Copy one head's ``D`` values (unit stride on both sides), cast to the target's dtype."""
    d = tl.arange(0, D)
    tl.store(to_ptr + d, tl.load(from_ptr + d).to(to_ptr.dtype.element_ty))


@triton.jit
def append(rows_ptr, key_rows_ptr, value_rows_ptr, k_ptr, v_ptr, D: tl.constexpr):
    r = tl.program_id(0)
    key_row = tl.load(key_rows_ptr + r).to(tl.int64)
    value_row = tl.load(value_rows_ptr + r).to(tl.int64)
    write_token(rows_ptr + key_row * D, k_ptr + r * D, D)
    write_token(rows_ptr + value_row * D, v_ptr + r * D, D)
