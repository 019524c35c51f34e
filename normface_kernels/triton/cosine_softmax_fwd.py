"""cosine_softmax forward: FlashAttention's forward with queries f and keys = values = W
(docs/kernels.md "Forward"), 2 GEMM-equivalents, no (B, C) buffer.

Grid (row tiles, class splits). A (BLOCK_M, D) tile of f stays on chip; the (BLOCK_N, D) tiles
of the split's classes stream through. Per tile: S = f W^T (tl.dot), z = (S cs_j) rs_i, the
target column left out (it is the B-length z_iy, added in the merge), then the online update of
the running max m_i and sum l_i over the negatives j != y_i and -- only when a gradient is
needed -- of

    U_i = sum_j e^(z_ij - m_i) b_j W~_j   (B, D), the second tl.dot: P (cs W) with the tile
    R_i = sum_j e^(z_ij - m_i) b_j cos_ij

_softmax_merge_kernel merges the (splits, B) partials exactly (flash-decoding), adds the target
logit and forms loss, lse and the saved statistics of the closed-form backward:

    p_iy = e^(z_iy - lse_i),  P_i = sum_{j != y} p_ij,  Ubar_i = U_i / sum,  Rbar_i = R_i / sum
"""

import torch
import triton
import triton.language as tl

from ..checks import acc_dtype
from . import config
from .rows import softmax_rows
from .tiles import cos_dot, cos_tile, launch, load_rows, logit_factors, row_ids, wrap_triton

# Rows of the saved statistics (stats[k] is a (B,) vector), see softmax_forward.
STATS = ("nf", "t", "dt", "zy", "p_neg", "p_y", "r_bar")


@triton.jit
def _softmax_fwd_kernel(f_ptr, w_ptr, nf_ptr, nw_ptr, s_ptr, yl_ptr, part_ptr, u_ptr,
                        B, C, D, stride_fb, stride_fd, stride_wc, stride_wd, tiles_per_split,
                        NORM_F: tl.constexpr, NORM_W: tl.constexpr, GRAD: tl.constexpr,
                        W_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CHUNK: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr):
    ACC = part_ptr.dtype.element_ty
    IN = f_ptr.dtype.element_ty
    pid_s = tl.program_id(1)
    rows, rmask = row_ids(tl.program_id(0), B, BLOCK_M)
    if CHUNK == D_PAD:
        f = load_rows(f_ptr, rows, rmask, D, stride_fb, stride_fd, D_PAD)  # stays on chip
    s = tl.load(s_ptr).to(ACC)
    nf = tl.load(nf_ptr + rows, mask=rmask, other=1.0)
    yl = tl.load(yl_ptr + rows, mask=rmask, other=-2)
    m = tl.full((BLOCK_M,), float("-inf"), ACC)
    lsum = tl.zeros((BLOCK_M,), ACC)
    r = tl.zeros((BLOCK_M,), ACC)
    u = tl.zeros((BLOCK_M, D_PAD), ACC)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(C, BLOCK_N))
    for t in range(t0, t1):
        cols, cmask = row_ids(t, C, BLOCK_N)
        if GRAD or CHUNK == D_PAD:
            w = load_rows(w_ptr, cols, cmask, D, stride_wc, stride_wd, D_PAD)
        if CHUNK == D_PAD:
            dot = cos_dot(f, w, ACC, PRECISION)
        else:
            dot = cos_tile(f_ptr, rows, rmask, stride_fb, stride_fd, w_ptr, cols, cmask,
                           stride_wc, stride_wd, D, ACC, PRECISION, BLOCK_M, BLOCK_N, CHUNK,
                           D_PAD)
        nw = tl.load(nw_ptr + cols, mask=cmask, other=1.0)
        rs, cs = logit_factors(nf, nw, s, NORM_F, NORM_W)
        neg = cmask[None, :] & (cols[None, :] != yl[:, None])
        z = tl.where(neg, (dot * cs[None, :]) * rs[:, None], float("-inf"))
        # Online update; the m_new == m test keeps -inf - -inf out. A NaN z reaches lsum through
        # exp (a max may drop it, the sum never does).
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.where(m_new == m, 1.0, tl.exp(m - m_new))
        p = tl.where(neg, tl.exp(z - m_new[:, None]), 0.0)
        lsum = lsum * alpha + tl.sum(p, 1)
        if GRAD:
            # b_j cos_ij = <f_i, W_j> cs_j / ||f_i||
            r = r * alpha + tl.sum(p * ((dot * cs[None, :]) / nf[:, None]), 1)
            if W_UNIT:
                # fp16: cs_j in the operand could leave fp16's range; the W~ tile cannot.
                wu = (w.to(ACC) * cs[:, None]).to(IN)
                u = tl.dot(p.to(IN), wu, u * alpha[:, None], input_precision=PRECISION,
                           out_dtype=ACC)
            else:
                # p <= 1 and cs_j in bf16 (fp32's exponent range), fp32 or fp64.
                u = tl.dot((p * cs[None, :]).to(IN), w, u * alpha[:, None],
                           input_precision=PRECISION, out_dtype=ACC)
        m = m_new
    out = pid_s.to(tl.int64) * B + rows
    n_part = tl.num_programs(1).to(tl.int64) * B
    tl.store(part_ptr + out, m, mask=rmask)
    tl.store(part_ptr + n_part + out, lsum, mask=rmask)
    if GRAD:
        tl.store(part_ptr + 2 * n_part + out, r, mask=rmask)
        ds = tl.arange(0, D_PAD)
        tl.store(u_ptr + out[:, None] * D + ds[None, :], u,
                 mask=rmask[:, None] & (ds < D)[None, :])


@triton.jit
def _softmax_merge_kernel(part_ptr, u_part_ptr, yl_ptr, zy_ptr, loss_ptr, lse_ptr, stats_ptr,
                          u_ptr, B, D, n_splits, GRAD: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """Exact merge of the split partials and the target logit:
    M = max(m_s, z_iy), L = sum_s l_s e^(m_s - M), lse = M + log(L + e^(z_iy - M));
    loss = lse - z_iy with a local target, lse with the target in another shard, 0 ignored."""
    ACC = part_ptr.dtype.element_ty
    rows, rmask = row_ids(tl.program_id(0), B, BLOCK_R)
    n_part = n_splits.to(tl.int64) * B
    yl = tl.load(yl_ptr + rows, mask=rmask, other=-2)
    has = yl >= 0
    zy = tl.where(has, tl.load(zy_ptr + rows, mask=rmask, other=0.0), float("-inf"))
    mx = zy
    for sp in range(0, n_splits):
        mx = tl.maximum(mx, tl.load(part_ptr + sp * B + rows, mask=rmask, other=0.0))
    neg_sum = tl.zeros((BLOCK_R,), ACC)
    r_sum = tl.zeros((BLOCK_R,), ACC)
    for sp in range(0, n_splits):
        ms = tl.load(part_ptr + sp * B + rows, mask=rmask, other=0.0)
        scale = tl.where(ms == mx, 1.0, tl.exp(ms - mx))
        neg_sum += scale * tl.load(part_ptr + n_part + sp * B + rows, mask=rmask, other=0.0)
        if GRAD:
            r_sum += scale * tl.load(part_ptr + 2 * n_part + sp * B + rows, mask=rmask,
                                     other=0.0)
    y_term = tl.where(has, tl.where(zy == mx, 1.0, tl.exp(zy - mx)), 0.0)
    total = neg_sum + y_term
    lse = mx + tl.log(total)
    loss = tl.where(has, lse - zy, tl.where(yl == -1, lse, 0.0))
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(loss_ptr + rows, loss, mask=rmask)
    if GRAD:
        inv = 1.0 / total
        tl.store(stats_ptr + rows, neg_sum * inv, mask=rmask)           # P_i
        tl.store(stats_ptr + B + rows, y_term * inv, mask=rmask)        # p_iy
        tl.store(stats_ptr + 2 * B + rows, r_sum * inv, mask=rmask)     # Rbar_i
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = rmask[:, None] & (ds < D)[None, :]
            acc = tl.zeros((BLOCK_R, BLOCK_D), ACC)
            for sp in range(0, n_splits):
                ms = tl.load(part_ptr + sp * B + rows, mask=rmask, other=0.0)
                scale = tl.where(ms == mx, 1.0, tl.exp(ms - mx)) * inv
                offs = (sp * B + rows)[:, None] * D + ds[None, :]
                acc += scale[:, None] * tl.load(u_part_ptr + offs, mask=dmask, other=0.0)
            tl.store(u_ptr + rows[:, None] * D + ds[None, :], acc, mask=dmask)


def softmax_forward(features, weight, labels, scale, m1, m2, m3, lam, normalize_features,
                    normalize_weight, ignore_index, class_start, need_grad):
    """(loss (B,), lse (B,), stats (len(STATS), B), ubar (B, D) or (0, D), nw (C,)), all in the
    accumulation dtype. stats and ubar are what the closed-form backward needs (kernels.md);
    without need_grad only nf, t, dt and zy of stats are filled and U is not accumulated."""
    B, D = features.shape
    C = weight.shape[0]
    acc = acc_dtype(features.dtype)
    dev = features.device
    norm_f, norm_w = bool(normalize_features), bool(normalize_weight)
    rows = softmax_rows(features, weight, labels, scale, m1, m2, m3, lam, norm_f, norm_w,
                        ignore_index, class_start)
    loss = torch.empty((B,), dtype=acc, device=dev)
    lse = torch.empty((B,), dtype=acc, device=dev)
    merged = torch.zeros((3, B), dtype=acc, device=dev)  # P, p_y, Rbar (filled with need_grad)
    ubar = torch.empty((B if need_grad else 0, D), dtype=acc, device=dev)

    def saved():
        return torch.cat([torch.stack([rows.nf, rows.t, rows.dt, rows.zy]), merged])

    if B == 0:
        return loss, lse, saved(), ubar, rows.nw
    w_unit = need_grad and norm_w and features.dtype == torch.float16
    blk = config.forward_blocks(features.dtype, D, need_grad, w_unit)
    n_row_tiles = config.cdiv(B, blk.m)
    splits, per_split = config.split_classes(n_row_tiles, config.cdiv(C, blk.n), dev,
                                             accumulate=need_grad)
    part = torch.empty((3, splits, B), dtype=acc, device=dev)
    u_part = torch.empty((splits, B, D) if need_grad else (1,), dtype=acc, device=dev)
    launch(wrap_triton(_softmax_fwd_kernel), (n_row_tiles, splits),
        features, weight, rows.nf, rows.nw, rows.s, rows.yl, part, u_part,
        B, C, D, features.stride(0), features.stride(1), weight.stride(0), weight.stride(1),
        per_split, NORM_F=norm_f, NORM_W=norm_w, GRAD=need_grad, W_UNIT=w_unit,
        BLOCK_M=blk.m, BLOCK_N=blk.n, CHUNK=blk.k, D_PAD=blk.d,
        PRECISION=config.dot_precision(features.dtype, dev),
        num_warps=blk.num_warps, num_stages=blk.num_stages)
    block_r, block_d = config.row_blocks(D)
    launch(wrap_triton(_softmax_merge_kernel), (config.cdiv(B, block_r),),
        part, u_part, rows.yl, rows.zy, loss, lse, merged, ubar if need_grad else part,
        B, D, splits, GRAD=need_grad, BLOCK_R=block_r, BLOCK_D=block_d)
    return loss, lse, saved(), ubar, rows.nw
