"""Agent losses (paper section 4, eq. 10 and 11), d_ij = 2 - 2 cos_ij, both normalized always
(docs/kernels.md "Agent losses").

Forward: the row-stationary structure of the softmax forward (grid (row tiles, class splits)).
Per row, the sum of the hinges relu(thr_i - d_ij) over j != y (c_contrastive: thr = neg_margin;
c_triplet all: thr = margin + d_iy) and -- only when a gradient is needed -- the closed-form
terms of grad_features: the count of active hinges and V_i = sum_{j active} W~_j (B, D), the
second tl.dot. c_triplet hardest_only keeps the (min d, first index) of the nearest wrong agent.
The (splits, B) partials are merged in torch (sums, or a min with the first index on ties).

Backward: c_contrastive and c_triplet all: grad f~ in closed form from V (row_grad) and grad W
from the class-stationary kernel (grad_weight, HINGE). c_triplet hardest_only and center_loss
touch one or two rows of W per sample: a sparse backward, no GEMM, no (C, D) buffer.

Shards: c_contrastive sums the local negatives of a row whose target is in another shard;
c_triplet gives it loss 0 (and still its hardest local negative); center_loss 0.
"""

from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from . import config
from .grad_weight import HINGE, grad_weight
from .normalize import row_norms
from .row_grad import row_coefs, row_grad, sparse_weight_grad
from .rows import agent_rows, local_targets, target_cosines
from .tiles import (
    cos_dot,
    cos_tile,
    launch,
    load_rows,
    relu_nan,
    row_ids,
    unit_distance,
    wrap_triton,
)

_NO_INDEX = 2 ** 62  # "no index yet" in the first-index-of-the-minimum reduction
_NO_INDEX_TL = tl.constexpr(_NO_INDEX)
# Rows of the saved statistics: ||f_i||, d_iy, and the count of active hinges (all negatives)
# or the hardest hinge margin + d_iy - d_ik* (hardest_only).
STATS = ("nf", "d_y", "aux")


@triton.jit
def _agent_fwd_kernel(f_ptr, w_ptr, nf_ptr, nw_ptr, yl_ptr, thr_ptr, part_ptr, idx_ptr, v_ptr,
                      B, C, D, stride_fb, stride_fd, stride_wc, stride_wd, tiles_per_split,
                      HARDEST: tl.constexpr, TARGET_ONLY: tl.constexpr, GRAD: tl.constexpr,
                      W_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CHUNK: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr):
    ACC = part_ptr.dtype.element_ty
    IN = f_ptr.dtype.element_ty
    pid_s = tl.program_id(1)
    rows, rmask = row_ids(tl.program_id(0), B, BLOCK_M)
    if CHUNK == D_PAD:
        f = load_rows(f_ptr, rows, rmask, D, stride_fb, stride_fd, D_PAD)  # stays on chip
    nf = tl.load(nf_ptr + rows, mask=rmask, other=1.0)
    yl = tl.load(yl_ptr + rows, mask=rmask, other=-2)
    thr = tl.load(thr_ptr + rows, mask=rmask, other=0.0)
    if TARGET_ONLY:
        row_on = rmask & (yl >= 0)
    else:
        row_on = rmask & (yl != -2)
    total = tl.zeros((BLOCK_M,), ACC)
    count = tl.zeros((BLOCK_M,), ACC)
    best = tl.full((BLOCK_M,), float("inf"), ACC)
    best_idx = tl.full((BLOCK_M,), -1, tl.int64)
    v = tl.zeros((BLOCK_M, D_PAD), ACC)
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
        d = unit_distance(dot, nf[:, None], nw[None, :])
        neg = row_on[:, None] & cmask[None, :] & (cols[None, :] != yl[:, None])
        if HARDEST:
            # NaN wins (as torch.argmin): it becomes -inf for the search, NaN again in torch.
            key = tl.where(d != d, float("-inf"), d)
            key = tl.where(neg, key, float("inf"))
            tile_min = tl.min(key, 1)
            first = tl.min(tl.where(key == tile_min[:, None], cols[None, :], _NO_INDEX_TL), 1)
            better = tile_min < best  # strict: an earlier tile keeps ties
            best_idx = tl.where(better, first, best_idx)
            best = tl.where(better, tile_min, best)
        else:
            hinge = thr[:, None] - d
            total += tl.sum(tl.where(neg, relu_nan(hinge), 0.0), 1)
            if GRAD:
                active = neg & (hinge > 0)
                count += tl.sum(active.to(ACC), 1)
                if W_UNIT:
                    wu = (w.to(ACC) * (1.0 / nw)[:, None]).to(IN)
                    v = tl.dot(active.to(IN), wu, v, input_precision=PRECISION, out_dtype=ACC)
                else:
                    v = tl.dot(tl.where(active, 1.0 / nw[None, :], 0.0).to(IN), w, v,
                               input_precision=PRECISION, out_dtype=ACC)
    out = pid_s.to(tl.int64) * B + rows
    n_part = tl.num_programs(1).to(tl.int64) * B
    if HARDEST:
        tl.store(part_ptr + out, best, mask=rmask)
        tl.store(idx_ptr + out, best_idx, mask=rmask)
    else:
        tl.store(part_ptr + out, total, mask=rmask)
        if GRAD:
            tl.store(part_ptr + n_part + out, count, mask=rmask)
            ds = tl.arange(0, D_PAD)
            tl.store(v_ptr + out[:, None] * D + ds[None, :], v,
                     mask=rmask[:, None] & (ds < D)[None, :])


def _partials(features, weight, rows, thr, hardest, target_only, need_grad):
    """Split partials: (values (splits, B), indices (splits, B) | None, count (B) | None,
    V (B, D) | None)."""
    B, D = features.shape
    C = weight.shape[0]
    dev = features.device
    grad = need_grad and not hardest
    w_unit = grad and features.dtype == torch.float16
    blk = config.forward_blocks(features.dtype, D, grad, w_unit)
    n_row_tiles = config.cdiv(B, blk.m)
    splits, per_split = config.split_classes(n_row_tiles, config.cdiv(C, blk.n), dev,
                                             accumulate=grad)
    part = torch.empty((2, splits, B), dtype=rows.nf.dtype, device=dev)
    idx = torch.empty((splits, B) if hardest else (1,), dtype=torch.int64, device=dev)
    v_part = torch.empty((splits, B, D) if grad else (1,), dtype=rows.nf.dtype, device=dev)
    launch(wrap_triton(_agent_fwd_kernel), (n_row_tiles, splits),
        features, weight, rows.nf, rows.nw, rows.yl, thr, part, idx, v_part, B, C, D,
        features.stride(0), features.stride(1), weight.stride(0), weight.stride(1), per_split,
        HARDEST=hardest, TARGET_ONLY=target_only, GRAD=grad, W_UNIT=w_unit, BLOCK_M=blk.m,
        BLOCK_N=blk.n, CHUNK=blk.k, D_PAD=blk.d,
        PRECISION=config.dot_precision(features.dtype, dev),
        num_warps=blk.num_warps, num_stages=blk.num_stages)
    if not grad:
        return part[0], (idx if hardest else None), None, None
    return part[0], None, part[1].sum(0), v_part.sum(0)


def _relu_nan(x):
    return torch.where(x > 0, x, torch.where(x != x, x, torch.zeros_like(x)))


def _saved(rows, aux, v, D):
    stats = torch.stack([rows.nf, rows.d_y, aux])
    if v is None:
        v = torch.empty((0, D), dtype=rows.nf.dtype, device=rows.nf.device)
    return stats, v, rows.nw


def c_contrastive_forward(features, weight, labels, pos_margin, neg_margin, ignore_index,
                          class_start, need_grad):
    """(loss (B,), stats (3, B), V (B, D) or (0, D), nw (C,))."""
    B, D = features.shape
    rows = agent_rows(features, weight, labels, ignore_index, class_start)
    thr = torch.full_like(rows.nf, float(neg_margin))
    if B == 0:
        return torch.empty_like(rows.nf), *_saved(rows, rows.nf, None, D)
    val, _, count, v = _partials(features, weight, rows, thr, False, False, need_grad)
    target = torch.where(rows.has, _relu_nan(rows.d_y - pos_margin), rows.zero)
    loss = torch.where(rows.yl != -2, val.sum(0) + target, rows.zero)
    return loss, *_saved(rows, count if count is not None else torch.zeros_like(rows.nf), v, D)


def c_triplet_forward(features, weight, labels, margin, hardest_only, center, ignore_index,
                      class_start, need_grad):
    """(loss (B,), hardest (B,) int64 (-1: none / not hardest_only), stats (3, B), V, nw)."""
    B, D = features.shape
    rows = agent_rows(features, weight, labels, ignore_index, class_start)
    thr = margin + rows.d_y
    hardest = torch.full((B,), -1, dtype=torch.int64, device=features.device)
    if B == 0:
        return torch.empty_like(rows.nf), hardest, *_saved(rows, rows.nf, None, D)
    if hardest_only:
        val, idx, _, _ = _partials(features, weight, rows, thr, True, False, need_grad)
        # Merge the splits: the smallest key, and among the splits holding it the first index.
        best = val.min(0).values
        cand = torch.where((val == best[None, :]) & (idx >= 0), idx,
                           torch.full_like(idx, _NO_INDEX))
        hardest = cand.min(0).values
        hardest = torch.where(hardest == _NO_INDEX, torch.full_like(hardest, -1), hardest)
        d_min = torch.where(best == float("-inf"), torch.full_like(best, float("nan")), best)
        aux = thr - d_min  # no negative at all: d_min = inf, no hinge
        loss = _relu_nan(aux)
        v = None
    else:
        val, _, count, v = _partials(features, weight, rows, thr, False, True, need_grad)
        loss = val.sum(0)
        aux = count if count is not None else torch.zeros_like(rows.nf)
    if center:
        loss = loss + rows.d_y
    loss = torch.where(rows.has, loss, rows.zero)
    return loss, hardest, *_saved(rows, aux, v, D)


# ---------------------------------------------------------------------------------------------
# Backward from the saved statistics (kernels.md "Agent losses"): Gc = dL/dcos, eq. 4 on both.
# ---------------------------------------------------------------------------------------------

def _upstream(grad_loss, yl, acc, target_only):
    keep = yl >= 0 if target_only else yl != -2
    g = torch.where(keep, grad_loss.to(acc), torch.zeros((), dtype=acc, device=yl.device))
    return g, g != 0


def _dense_backward(features, weight, yl, stats, v, nw, g, live, g_y, thr):
    """grad f~_i = 2 g_i V_i + Gc_iy W~_y (closed form); grad W~ from the class-stationary
    kernel with Gc_ij = 2 g_i [thr_i - d_ij > 0] (j != y) and Gc_iy at the target."""
    nf = stats[0]
    ys = yl.clamp(min=0).long()
    zero = torch.zeros((), dtype=nf.dtype, device=nf.device)
    grad_f = row_grad(features, weight, row_coefs(nf, 2.0 * g, g_y / nw[ys], 0.0, 0.0, live),
                      yl, u=v)
    table = torch.stack([torch.where(live, nf, torch.ones_like(nf)),
                         torch.where(live, thr, zero), torch.where(live, 2.0 * g / nf, zero),
                         torch.where(live, g_y / nf, zero)])
    f_live = torch.where(live[:, None], features, torch.zeros((), dtype=features.dtype,
                                                                 device=features.device))
    one = torch.ones((), dtype=nf.dtype, device=nf.device)
    grad_w = grad_weight(f_live, weight, nw, one, yl, table, HINGE, True, True)
    return grad_f, grad_w


def c_contrastive_backward(grad_loss, features, weight, labels, stats, v, nw, pos_margin,
                           neg_margin, ignore_index, class_start):
    yl = local_targets(labels, ignore_index, class_start, weight.shape[0])
    g, live = _upstream(grad_loss, yl, stats.dtype, target_only=False)
    d_y = stats[1]
    # Gc_ij = 2 g [neg_margin - d_ij > 0] (j != y), Gc_iy = -2 g [d_iy - pos_margin > 0].
    g_y = torch.where((yl >= 0) & (d_y - pos_margin > 0), -2.0 * g, torch.zeros_like(g))
    thr = torch.full_like(g, float(neg_margin))
    return _dense_backward(features, weight, yl, stats, v, nw, g, live, g_y, thr)


def c_triplet_backward(grad_loss, features, weight, labels, hardest, stats, v, nw, margin,
                       hardest_only, center, ignore_index, class_start):
    yl = local_targets(labels, ignore_index, class_start, weight.shape[0])
    has = yl >= 0
    g, live = _upstream(grad_loss, yl, stats.dtype, target_only=True)
    nf, d_y, aux = stats
    center_term = 1.0 if center else 0.0
    if not hardest_only:
        # Gc_ik = 2 g [margin + d_iy - d_ik > 0]; Gc_iy = -2 g (#active + center).
        g_y = torch.where(has, -2.0 * g * (aux + center_term), torch.zeros_like(g))
        return _dense_backward(features, weight, yl, stats, v, nw, g, live, g_y, margin + d_y)
    # Two rows of W per sample: Gc_iy = -2 g (active + center), Gc_ik* = 2 g active.
    k = in_range(hardest, weight.shape[0])
    active = has & (k >= 0) & (aux > 0)
    act = active.to(g.dtype)
    g_y = torch.where(has, -2.0 * g * (act + center_term), torch.zeros_like(g))
    g_k = 2.0 * g * act
    k = torch.where(active, k, torch.full_like(k, -1))
    nw_y, nw_k = nw[yl.clamp(min=0).long()], nw[k.clamp(min=0)]
    coef = row_coefs(nf, 0.0, g_y / nw_y, g_k / nw_k, 0.0, live)
    grad_f = row_grad(features, weight, coef, yl, k)
    grad_w = sparse_weight_grad(features, weight, nf, [(yl, g_y, nw_y), (k, g_k, nw_k)])
    return grad_f, grad_w


def in_range(hardest, C):
    """hardest as int64 with every value outside [0, C) read as -1, "no hardest negative" (the
    range is a data check that a backward op may skip: nothing may be read out of bounds)."""
    k = hardest.to(torch.int64)
    return torch.where((k >= 0) & (k < C), k, torch.full_like(k, -1))


def hardest_hinge(features, weight, labels, hardest, margin, ignore_index, class_start):
    """(stats, nw) of c_triplet hardest_only for a given hardest index (the backward op called
    on its own): margin + d_iy - d_ik* from B-length dots."""
    rows = agent_rows(features, weight, labels, ignore_index, class_start)
    k = in_range(hardest, weight.shape[0])
    d_k = 2.0 - 2.0 * target_cosines(features, weight, k, rows.nf, rows.nw)
    d_k = torch.where(k >= 0, d_k, torch.full_like(d_k, float("inf")))
    return torch.stack([rows.nf, rows.d_y, margin + rows.d_y - d_k]), rows.nw


# ---------------------------------------------------------------------------------------------
# center_loss: d_iy only, B-length work in both directions (reads the B target rows of W).
# ---------------------------------------------------------------------------------------------

def _target_rows(features, weight, labels, ignore_index, class_start):
    """Norms of f, of the target rows of W (gathered: never all C), targets and d_iy."""
    yl = local_targets(labels, ignore_index, class_start, weight.shape[0])
    ys = yl.clamp(min=0).long()
    nf = row_norms(features)
    w_y = weight.index_select(0, ys)
    nw_y = row_norms(w_y)
    rows = torch.arange(features.shape[0], dtype=torch.int32, device=features.device)
    cos = target_cosines(features, w_y, torch.where(yl >= 0, rows, torch.full_like(rows, -1)),
                         nf, nw_y)
    return SimpleNamespace(yl=yl, has=yl >= 0, nf=nf, nw_y=nw_y, d_y=2.0 - 2.0 * cos)


def center_loss(features, weight, labels, ignore_index, class_start):
    t = _target_rows(features, weight, labels, ignore_index, class_start)
    return torch.where(t.has, t.d_y, torch.zeros_like(t.d_y))


def center_loss_backward(grad_loss, features, weight, labels, ignore_index, class_start):
    t = _target_rows(features, weight, labels, ignore_index, class_start)
    g, live = _upstream(grad_loss, t.yl, t.nf.dtype, target_only=True)
    g_y = -2.0 * g  # Gc_iy = -2 g
    grad_f = row_grad(features, weight, row_coefs(t.nf, 0.0, g_y / t.nw_y, 0.0, 0.0, live), t.yl)
    grad_w = sparse_weight_grad(features, weight, t.nf, [(t.yl, g_y, t.nw_y)])
    return grad_f, grad_w

