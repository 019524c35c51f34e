"""Backward of the tiled cosine losses: recompute, never store (docs/kernels.md).

Each kernel recomputes the cosine tile from f and W (tl.dot, norms in the epilogue), forms
Gc = dL/dcos for the tile on chip (softmax: from p = exp(z - lse) with the saved lse; agent
losses: from the hinge indicators) and accumulates one of the two products:

    _grad_features_kernel  grid (row tiles, class splits, D chunks): grad f~ = (Gc / ||W||) W,
        accumulated over the split's class tiles in registers, then one fp32 atomic_add per
        program into a (B, D) buffer (splits x B x D atomics in all -- few, since B is small).
    _grad_weight_kernel    grid (class tiles, D chunks): grad W~ = Gc^T f~, accumulated over all
        row tiles in registers and written once, no atomics. When D fits one chunk, eq. 4 (and
        the ||W_j|| term) is applied in the epilogue and grad_W is written in the input dtype.

Why two kernels and not one with atomics on both: a single (row tile, class tile) grid would
atomically add into every row of the (C, D) gradient once per row tile (B / BLOCK_M times C * D
atomics, gigabytes of atomic traffic at C = 1M), while two kernels cost one extra recomputation
of the cosine tile (a third more matmul work) and keep grad_W deterministic.

The tile operands of the two products are the input dtype (tensor cores for fp16/bf16): the
row/column factors (s a_i, s b_j) are applied to the fp32 accumulator, and the other operand is
the unit row W~_j = W_j / ||W_j|| (or W_j itself when ||W_j|| is a factor of the logit), so no
operand can overflow a 16-bit type. Gradient filtering (config.GRAD_FILTER) skips the products
of a tile whose |Gc| sums to at most the threshold (never a tile holding a NaN).
"""

import torch
import triton
import triton.language as tl

from . import config
from .cosine_softmax_fwd import softmax_rows
from .normalize import unit_backward
from .tiles import dot_tile, launch, row_ids, softmax_logits, softmax_scales, wrap_triton

MODE_SOFTMAX = 0
MODE_CONTRASTIVE = 1  # Gc = 2g [thr - d > 0] off target, ty at the target
MODE_TRIPLET = 2      # the same, and the row count of active hinges (for Gc_iy of c_triplet)


@triton.jit
def _grad_tile(dot, rows, rmask, cols, cmask, yl, rp_ptr, B, nf, nw, s, MODE: tl.constexpr,
               NORM_F: tl.constexpr, NORM_W: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """(lhs, row_term, col_term) of one tile. lhs = Gc / (s a_i b_j) for softmax (the factors
    are applied to the accumulators), Gc for the agent losses. Row parameters rp (NPAR, B):
    softmax [z_iy, b_y t, a t, dt, lse, g, g + e]; agent losses [thr, 2g, Gc_iy]."""
    ACC = nf.dtype
    is_y = cols[None, :] == yl[:, None]
    valid = rmask[:, None] & cmask[None, :]
    if MODE == 0:
        zy = tl.load(rp_ptr + rows, mask=rmask, other=0.0)
        bt = tl.load(rp_ptr + B + rows, mask=rmask, other=0.0)
        at = tl.load(rp_ptr + 2 * B + rows, mask=rmask, other=0.0)
        dt = tl.load(rp_ptr + 3 * B + rows, mask=rmask, other=0.0)
        lse = tl.load(rp_ptr + 4 * B + rows, mask=rmask, other=0.0)
        g = tl.load(rp_ptr + 5 * B + rows, mask=rmask, other=0.0)
        ge = tl.load(rp_ptr + 6 * B + rows, mask=rmask, other=0.0)
        rs, cs = softmax_scales(nf, nw, s, NORM_F, NORM_W)
        z = softmax_logits(dot, rs, cs, yl, zy, cols, cmask)
        p = tl.where(valid, tl.exp(z - lse[:, None]), 0.0)
        # dL/dz = g (p - [j = y]) + e p ; dL/dcos = dL/dz s a b (t' at the target)
        G = ge[:, None] * p - tl.where(is_y & valid, g[:, None], 0.0)
        lhs = tl.where(is_y, G * dt[:, None], G)
        # grad_s and grad_a need sum_j G b_j h_ij; b_j cos_ij = <f_i, W_j> cs_j / ||f_i||.
        bh = tl.where(is_y, bt[:, None], (dot * cs[None, :]) / nf[:, None])
        row_term = tl.sum(tl.where(valid, G * bh, 0.0), 1)
        if NORM_W:
            col_term = tl.zeros((BLOCK_N,), ACC)
        else:
            # grad_b_j needs sum_i G a_i h_ij; a_i cos_ij = <f_i, W_j> ra_i / ||W_j||.
            if NORM_F:
                ra = 1.0 / nf
            else:
                ra = tl.zeros_like(nf) + 1.0
            ah = tl.where(is_y, at[:, None], (dot * ra[:, None]) / nw[None, :])
            col_term = tl.sum(tl.where(valid, G * ah, 0.0), 0)
    else:
        thr = tl.load(rp_ptr + rows, mask=rmask, other=0.0)
        g2 = tl.load(rp_ptr + B + rows, mask=rmask, other=0.0)
        ty = tl.load(rp_ptr + 2 * B + rows, mask=rmask, other=0.0)
        d = 2.0 - 2.0 * ((dot / nf[:, None]) / nw[None, :])
        active = (thr[:, None] - d > 0) & valid & (cols[None, :] != yl[:, None])
        lhs = tl.where(is_y & valid, ty[:, None], tl.where(active, g2[:, None], 0.0))
        if MODE == 2:
            row_term = tl.sum(active.to(ACC), 1)
        else:
            row_term = tl.zeros((BLOCK_M,), ACC)
        col_term = tl.zeros((BLOCK_N,), ACC)
    return lhs, row_term, col_term


@triton.jit
def _grad_features_kernel(f_ptr, w_ptr, nf_ptr, nw_ptr, s_ptr, yl_ptr, rp_ptr, gf_ptr, racc_ptr,
                          B, C, D, stride_fb, stride_fd, stride_wc, stride_wd, tiles_per_split,
                          filter_eps, MODE: tl.constexpr, NORM_F: tl.constexpr,
                          NORM_W: tl.constexpr, FILTER: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_CHUNK: tl.constexpr,
                          PRECISION: tl.constexpr):
    ACC = racc_ptr.dtype.element_ty
    IN = f_ptr.dtype.element_ty
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    rows, rmask = row_ids(tl.program_id(0), B, BLOCK_M)
    ds, dmask = row_ids(pid_d, D, D_CHUNK)
    s = tl.load(s_ptr).to(ACC)
    nf = tl.load(nf_ptr + rows, mask=rmask, other=1.0)
    yl = tl.load(yl_ptr + rows, mask=rmask, other=-2)
    acc = tl.zeros((BLOCK_M, D_CHUNK), ACC)
    racc = tl.zeros((BLOCK_M,), ACC)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(C, BLOCK_N))
    for t in range(t0, t1):
        cols, cmask = row_ids(t, C, BLOCK_N)
        nw = tl.load(nw_ptr + cols, mask=cmask, other=1.0)
        dot = dot_tile(f_ptr, w_ptr, rows, cols, rmask, cmask, D, stride_fb, stride_fd,
                       stride_wc, stride_wd, ACC, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        lhs, row_term, col_term = _grad_tile(dot, rows, rmask, cols, cmask, yl, rp_ptr, B, nf,
                                             nw, s, MODE, NORM_F, NORM_W, BLOCK_M, BLOCK_N)
        racc += row_term
        w = tl.load(w_ptr + cols[:, None] * stride_wc + ds[None, :] * stride_wd,
                    mask=cmask[:, None] & dmask[None, :], other=0.0)
        if NORM_W or MODE != 0:
            w = (w.to(ACC) / nw[:, None]).to(IN)  # b_j W~_j = W~_j (b = 1), else W_j itself
        if FILTER:
            total = tl.sum(tl.abs(lhs))  # a NaN tile is never skipped
            if (total > filter_eps) | (total != total):
                acc = tl.dot(lhs.to(IN), w, acc, input_precision=PRECISION, out_dtype=ACC)
        else:
            acc = tl.dot(lhs.to(IN), w, acc, input_precision=PRECISION, out_dtype=ACC)
    if MODE == 0:
        if NORM_F:
            acc = acc * s
        else:
            acc = acc * (s * nf)[:, None]
    tl.atomic_add(gf_ptr + rows[:, None] * D + ds[None, :], acc,
                  mask=rmask[:, None] & dmask[None, :])
    tl.atomic_add(racc_ptr + rows, racc, mask=rmask & (pid_d == 0))


@triton.jit
def _grad_weight_kernel(f_ptr, w_ptr, nf_ptr, nw_ptr, s_ptr, yl_ptr, rp_ptr, gw_ptr, cacc_ptr,
                        B, C, D, stride_fb, stride_fd, stride_wc, stride_wd, filter_eps,
                        MODE: tl.constexpr, NORM_F: tl.constexpr, NORM_W: tl.constexpr,
                        FUSED: tl.constexpr, FILTER: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_CHUNK: tl.constexpr,
                        PRECISION: tl.constexpr):
    ACC = nf_ptr.dtype.element_ty
    IN = f_ptr.dtype.element_ty
    pid_d = tl.program_id(1)
    cols, cmask = row_ids(tl.program_id(0), C, BLOCK_N)
    ds, dmask = row_ids(pid_d, D, D_CHUNK)
    s = tl.load(s_ptr).to(ACC)
    nw = tl.load(nw_ptr + cols, mask=cmask, other=1.0)
    acc = tl.zeros((BLOCK_N, D_CHUNK), ACC)
    cacc = tl.zeros((BLOCK_N,), ACC)
    for bt in range(0, tl.cdiv(B, BLOCK_M)):
        rows, rmask = row_ids(bt, B, BLOCK_M)
        nf = tl.load(nf_ptr + rows, mask=rmask, other=1.0)
        yl = tl.load(yl_ptr + rows, mask=rmask, other=-2)
        dot = dot_tile(f_ptr, w_ptr, rows, cols, rmask, cmask, D, stride_fb, stride_fd,
                       stride_wc, stride_wd, ACC, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        lhs, row_term, col_term = _grad_tile(dot, rows, rmask, cols, cmask, yl, rp_ptr, B, nf,
                                             nw, s, MODE, NORM_F, NORM_W, BLOCK_M, BLOCK_N)
        cacc += col_term
        f = tl.load(f_ptr + rows[:, None] * stride_fb + ds[None, :] * stride_fd,
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        if NORM_F or MODE != 0:
            f = (f.to(ACC) / nf[:, None]).to(IN)  # a_i f~_i = f~_i (a = 1), else f_i itself
        if FILTER:
            total = tl.sum(tl.abs(lhs))
            if (total > filter_eps) | (total != total):
                acc = tl.dot(tl.trans(lhs.to(IN)), f, acc, input_precision=PRECISION,
                             out_dtype=ACC)
        else:
            acc = tl.dot(tl.trans(lhs.to(IN)), f, acc, input_precision=PRECISION,
                         out_dtype=ACC)
    if MODE == 0:
        if NORM_W:
            acc = acc * s
        else:
            acc = acc * (s * nw)[:, None]
    offs = cols[:, None] * D + ds[None, :]
    mask = cmask[:, None] & dmask[None, :]
    if FUSED:
        # The whole row is here (D <= D_CHUNK): eq. 4 plus the ||W_j|| term, written once.
        w = tl.load(w_ptr + cols[:, None] * stride_wc + ds[None, :] * stride_wd, mask=mask,
                    other=0.0).to(ACC)
        u = w / nw[:, None]
        gu = tl.sum(acc * u, 1)
        out = (acc - u * gu[:, None]) / nw[:, None]
        if MODE == 0 and not NORM_W:
            out += (s * cacc)[:, None] * u
        tl.store(gw_ptr + offs, out.to(gw_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(gw_ptr + offs, acc, mask=mask)
        tl.store(cacc_ptr + cols, cacc, mask=cmask & (pid_d == 0))


def _filter():
    eps = config.GRAD_FILTER
    return (eps is not None), float(eps if eps is not None else 0.0)


def grad_features(features, weight, nf, nw, s, yl, rp, mode, norm_f, norm_w):
    """fp32 (B, D) grad f~ (times s a_i for softmax) and the (B,) row accumulator."""
    B, D = features.shape
    C = weight.shape[0]
    acc = nf.dtype
    blk = config.backward_blocks(features.dtype, D)
    n_d = config.cdiv(D, blk.d)
    n_row_tiles = config.cdiv(B, blk.m)
    splits, per_split = config.split_classes(n_row_tiles, config.cdiv(C, blk.n), n_d,
                                             features.device)
    gf = torch.zeros((B, D), dtype=acc, device=features.device)
    racc = torch.zeros((B,), dtype=acc, device=features.device)
    use_filter, eps = _filter()
    launch(wrap_triton(_grad_features_kernel), (n_row_tiles, splits, n_d),
        features, weight, nf, nw, s, yl, rp, gf, racc, B, C, D, features.stride(0),
        features.stride(1), weight.stride(0), weight.stride(1), per_split, eps, MODE=mode,
        NORM_F=norm_f, NORM_W=norm_w, FILTER=use_filter, BLOCK_M=blk.m, BLOCK_N=blk.n,
        BLOCK_K=blk.k, D_CHUNK=blk.d,
        PRECISION=config.dot_precision(features.dtype, features.device),
        num_warps=blk.num_warps, num_stages=blk.num_stages)
    return gf, racc


def grad_weight(features, weight, nf, nw, s, yl, rp, mode, norm_f, norm_w, grad_w,
                extra_scale=None):
    """Writes grad_W (C, D, input dtype) into grad_w: the tiled product, then eq. 4 (fused when
    D fits one chunk). extra_scale: s (0-dim) when ||W_j|| is a factor of the logits."""
    B, D = features.shape
    C = weight.shape[0]
    acc = nf.dtype
    blk = config.backward_blocks(features.dtype, D)
    n_d = config.cdiv(D, blk.d)
    fused = n_d == 1
    if fused:
        out, cacc = grad_w, nf
    else:
        out = torch.empty((C, D), dtype=acc, device=features.device)
        cacc = torch.zeros((C,), dtype=acc, device=features.device)
    use_filter, eps = _filter()
    launch(wrap_triton(_grad_weight_kernel), (config.cdiv(C, blk.n), n_d),
        features, weight, nf, nw, s, yl, rp, out, cacc, B, C, D, features.stride(0),
        features.stride(1), weight.stride(0), weight.stride(1), eps, MODE=mode, NORM_F=norm_f,
        NORM_W=norm_w, FUSED=fused, FILTER=use_filter, BLOCK_M=blk.m, BLOCK_N=blk.n,
        BLOCK_K=blk.k, D_CHUNK=blk.d,
        PRECISION=config.dot_precision(features.dtype, features.device),
        num_warps=blk.num_warps, num_stages=blk.num_stages)
    if not fused:
        extra = extra_scale * cacc if extra_scale is not None else None
        unit_backward(out, weight, extra=extra, out=grad_w)
    return grad_w


def drop_rows(x, dropped):
    """x with the rows of samples that take no part in the backward replaced by zeros. SPEC: an
    ignored sample contributes nothing, even when its features are NaN or inf -- zeroed before
    any product, its NaN cannot reach grad_W through 0 * NaN. The caller zeroes its grad_f."""
    return torch.where(dropped[:, None], torch.zeros((), dtype=x.dtype, device=x.device), x)


def softmax_backward(grad_loss, grad_lse, features, weight, labels, scale, lse, m1, m2, m3, lam,
                     normalize_features, normalize_weight, ignore_index, class_start):
    B, D = features.shape
    C = weight.shape[0]
    grad_f = torch.empty((B, D), dtype=features.dtype, device=features.device)
    grad_w = torch.empty((C, D), dtype=weight.dtype, device=weight.device)
    if B == 0 or D == 0:
        return grad_f.zero_(), grad_w.zero_(), torch.zeros_like(scale)
    norm_f, norm_w = bool(normalize_features), bool(normalize_weight)
    # An ignored row without an lse gradient takes no part (its lse, defined for shard merges,
    # may be NaN too: replaced as well, so that exp(z - lse) stays finite on the zeroed row).
    dropped = (labels == ignore_index) & (grad_lse == 0)
    features = drop_rows(features, dropped)
    lse = torch.where(dropped, torch.zeros((), dtype=lse.dtype, device=lse.device), lse)
    rows = softmax_rows(features, weight, labels, scale, m1, m2, m3, lam, norm_f, norm_w,
                       ignore_index, class_start)
    acc = rows.nf.dtype
    # g_i = 0 for ignored rows (their loss is 0); e_i (the lse gradient) applies to every row.
    g = torch.where(rows.yl != -2, grad_loss.to(acc), torch.zeros((), dtype=acc,
                                                                   device=features.device))
    ge = g + grad_lse.to(acc)
    rp = torch.stack([rows.zy, rows.b_y * rows.t, rows.a * rows.t, rows.dt, lse.to(acc), g, ge])
    gf, racc = grad_features(features, weight, rows.nf, rows.nw, rows.s, rows.yl, rp,
                             MODE_SOFTMAX, norm_f, norm_w)
    grad_weight(features, weight, rows.nf, rows.nw, rows.s, rows.yl, rp, MODE_SOFTMAX, norm_f,
                norm_w, grad_w, extra_scale=None if norm_w else rows.s)
    # grad_a_i = s sum_j G b h (kernels.md), only when ||f_i|| is a factor of the logits.
    unit_backward(gf, features, extra=None if norm_f else rows.s * racc, out=grad_f)
    grad_f.masked_fill_(dropped[:, None], 0)
    grad_s = (rows.a * racc).sum()
    return grad_f, grad_w, grad_s.to(device=scale.device, dtype=scale.dtype).reshape(scale.shape)
