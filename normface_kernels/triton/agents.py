"""Agent losses (paper section 4, eq. 10 and 11), d_ij = 2 - 2 cos_ij, both normalized always.

Forward: grid (row tiles, class splits) like the softmax forward; each program walks its class
tiles (cosine tile from tl.dot, norms in the epilogue) and keeps per row either the sum of the
hinges relu(thr_i - d_ij) over j != y (c_contrastive: thr = neg_margin; c_triplet all:
thr = margin + d_iy) or the (min d, first index) of the nearest wrong agent (c_triplet hardest).
The (splits, B) partials are merged in torch (a sum, or a min with the first index on ties).
The target term d_iy is a B-length dot (tiles.target_cosines). center_loss needs only that.

Backward: c_contrastive and c_triplet (all) use the tiled kernels of cosine_softmax_bwd (modes
CONTRASTIVE / TRIPLET); c_triplet hardest and center_loss touch one or two rows of W per sample
(kernels.md: no matmul) and are sparse gathers / index_add in torch, then eq. 4 (normalize).

Shards (registration.cpp): c_contrastive sums the local negatives of a row whose target is in
another shard; c_triplet gives it loss 0 (and still its hardest local negative); center_loss 0.
"""

from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from . import config
from .cosine_softmax_bwd import (MODE_CONTRASTIVE, MODE_TRIPLET, drop_rows, grad_features,
                                 grad_weight)
from .cosine_softmax_fwd import local_targets
from .normalize import acc_dtype, row_norms, unit_backward
from .tiles import dot_tile, launch, relu_nan, row_ids, target_cosines, wrap_triton

_NO_INDEX = 2 ** 62  # "no index yet" in the first-index-of-the-minimum reduction
_NO_INDEX_TL = tl.constexpr(_NO_INDEX)


@triton.jit
def _agent_partial_kernel(f_ptr, w_ptr, nf_ptr, nw_ptr, yl_ptr, thr_ptr, val_ptr, idx_ptr,
                          B, C, D, stride_fb, stride_fd, stride_wc, stride_wd, tiles_per_split,
                          HARDEST: tl.constexpr, TARGET_ONLY: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr):
    ACC = val_ptr.dtype.element_ty
    pid_s = tl.program_id(1)
    rows, rmask = row_ids(tl.program_id(0), B, BLOCK_M)
    nf = tl.load(nf_ptr + rows, mask=rmask, other=1.0)
    yl = tl.load(yl_ptr + rows, mask=rmask, other=-2)
    thr = tl.load(thr_ptr + rows, mask=rmask, other=0.0)
    if TARGET_ONLY:
        row_on = rmask & (yl >= 0)
    else:
        row_on = rmask & (yl != -2)
    total = tl.zeros((BLOCK_M,), ACC)
    best = tl.full((BLOCK_M,), float("inf"), ACC)
    best_idx = tl.full((BLOCK_M,), -1, tl.int64)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(C, BLOCK_N))
    for t in range(t0, t1):
        cols, cmask = row_ids(t, C, BLOCK_N)
        nw = tl.load(nw_ptr + cols, mask=cmask, other=1.0)
        dot = dot_tile(f_ptr, w_ptr, rows, cols, rmask, cmask, D, stride_fb, stride_fd,
                       stride_wc, stride_wd, ACC, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        d = 2.0 - 2.0 * ((dot / nf[:, None]) / nw[None, :])
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
            total += tl.sum(tl.where(neg, relu_nan(thr[:, None] - d), 0.0), 1)
    out = pid_s.to(tl.int64) * B + rows
    if HARDEST:
        tl.store(val_ptr + out, best, mask=rmask)
        tl.store(idx_ptr + out, best_idx, mask=rmask)
    else:
        tl.store(val_ptr + out, total, mask=rmask)


def agent_rows(features, weight, labels, ignore_index, class_start):
    """Norms, local targets and target distances d_iy (B + C floats)."""
    nf = row_norms(features)
    nw = row_norms(weight)
    yl = local_targets(labels, ignore_index, class_start, weight.shape[0])
    d_y = 2.0 - 2.0 * target_cosines(features, weight, yl, nf, nw)
    return SimpleNamespace(nf=nf, nw=nw, yl=yl, has=yl >= 0, d_y=d_y,
                           zero=torch.zeros((), dtype=nf.dtype, device=features.device))


def _unit_rows(x, norms, index):
    """x~ rows x[index] / ||x[index]|| (index clamped at 0; masked by the caller)."""
    idx = index.clamp(min=0)
    return x.index_select(0, idx).to(norms.dtype) / norms[idx][:, None]


def _partials(features, weight, rows, thr, hardest, target_only):
    B, D = features.shape
    C = weight.shape[0]
    blk = config.forward_blocks(features.dtype)
    n_row_tiles = config.cdiv(B, blk.m)
    splits, per_split = config.split_classes(n_row_tiles, config.cdiv(C, blk.n), 1,
                                             features.device)
    val = torch.empty((splits, B), dtype=rows.nf.dtype, device=features.device)
    idx = torch.empty((splits, B) if hardest else (1,), dtype=torch.int64,
                      device=features.device)
    launch(wrap_triton(_agent_partial_kernel), (n_row_tiles, splits),
        features, weight, rows.nf, rows.nw, rows.yl, thr, val, idx, B, C, D,
        features.stride(0), features.stride(1), weight.stride(0), weight.stride(1), per_split,
        HARDEST=hardest, TARGET_ONLY=target_only, BLOCK_M=blk.m, BLOCK_N=blk.n, BLOCK_K=blk.k,
        PRECISION=config.dot_precision(features.dtype, features.device),
        num_warps=blk.num_warps, num_stages=blk.num_stages)
    return val, idx


def _relu_nan(x):
    return torch.where(x > 0, x, torch.where(x != x, x, torch.zeros_like(x)))


def _empty_loss(features):
    return torch.empty((features.shape[0],), dtype=acc_dtype(features.dtype),
                       device=features.device)


def c_contrastive(features, weight, labels, pos_margin, neg_margin, ignore_index, class_start):
    if features.shape[0] == 0:
        return _empty_loss(features)
    rows = agent_rows(features, weight, labels, ignore_index, class_start)
    thr = torch.full_like(rows.nf, float(neg_margin))
    val, _ = _partials(features, weight, rows, thr, hardest=False, target_only=False)
    target = torch.where(rows.has, _relu_nan(rows.d_y - pos_margin), rows.zero)
    return torch.where(rows.yl != -2, val.sum(0) + target, rows.zero)


def c_triplet_forward(features, weight, labels, margin, hardest_only, center, ignore_index,
                      class_start):
    B = features.shape[0]
    if B == 0:
        return _empty_loss(features), torch.empty((0,), dtype=torch.int64,
                                                  device=features.device)
    rows = agent_rows(features, weight, labels, ignore_index, class_start)
    thr = margin + rows.d_y
    if hardest_only:
        val, idx = _partials(features, weight, rows, thr, hardest=True, target_only=False)
        # Merge the splits: the smallest key, and among the splits holding it the first index.
        best = val.min(0).values
        cand = torch.where((val == best[None, :]) & (idx >= 0), idx,
                           torch.full_like(idx, _NO_INDEX))
        hardest = cand.min(0).values
        hardest = torch.where(hardest == _NO_INDEX, torch.full_like(hardest, -1), hardest)
        d_min = torch.where(best == float("-inf"), torch.full_like(best, float("nan")), best)
        loss = _relu_nan(thr - d_min)  # no negative at all: d_min = inf, loss 0
    else:
        val, _ = _partials(features, weight, rows, thr, hardest=False, target_only=True)
        loss = val.sum(0)
        hardest = torch.full((B,), -1, dtype=torch.int64, device=features.device)
    if center:
        loss = loss + rows.d_y
    return torch.where(rows.has, loss, rows.zero), hardest


def center_loss(features, weight, labels, ignore_index, class_start):
    if features.shape[0] == 0:
        return _empty_loss(features)
    rows = agent_rows(features, weight, labels, ignore_index, class_start)
    return torch.where(rows.has, rows.d_y, rows.zero)


# ---------------------------------------------------------------------------------------------
# Backward: Gc = dL/dcos (kernels.md "Agent losses"), then eq. 4 on both gradients.
# ---------------------------------------------------------------------------------------------

def _sparse_add(rows, features, weight, gf_unit, gw_unit, coef, target):
    """Gc_ik = coef_i at one class k = target_i per row: grad f~_i += coef_i W~_k and
    grad W~_k += coef_i f~_i (rows with target < 0 or coef 0 add nothing)."""
    on = (target >= 0)[:, None]
    w_unit = _unit_rows(weight, rows.nw, target)
    f_unit = features.to(rows.nf.dtype) / rows.nf[:, None]
    gf_unit += torch.where(on, coef[:, None] * w_unit, rows.zero)
    gw_unit.index_add_(0, target.clamp(min=0), torch.where(on, coef[:, None] * f_unit, rows.zero))


def _finish(features, weight, rows, gf_unit, gw_unit):
    grad_f = unit_backward(gf_unit, features)
    grad_w = unit_backward(gw_unit, weight)
    return grad_f, grad_w


def _upstream(grad_loss, rows, target_only):
    g = grad_loss.to(rows.nf.dtype)
    keep = rows.has if target_only else rows.yl != -2
    return torch.where(keep, g, rows.zero)


def _empty_grads(features, weight):
    return torch.zeros_like(features), torch.zeros_like(weight)


def _tiled_backward(features, weight, rows, rp_features, rp_weight, mode):
    """Both products with the tiled kernels (no target column handled outside)."""
    C, D = weight.shape
    ones = torch.ones((), dtype=rows.nf.dtype, device=features.device)
    gf, racc = grad_features(features, weight, rows.nf, rows.nw, ones, rows.yl, rp_features,
                             mode, True, True)
    if rp_weight is None:
        return gf, racc, None
    grad_w = torch.empty((C, D), dtype=weight.dtype, device=weight.device)
    grad_weight(features, weight, rows.nf, rows.nw, ones, rows.yl, rp_weight, mode, True, True,
                grad_w)
    return gf, racc, grad_w


def _drop_ignored(features, labels, ignore_index):
    """Ignored rows zeroed (drop_rows): they contribute nothing to any gradient, even when NaN;
    zero features give them a zero grad_f through eq. 4 as well."""
    return drop_rows(features, labels == ignore_index)


def c_contrastive_backward(grad_loss, features, weight, labels, pos_margin, neg_margin,
                           ignore_index, class_start):
    if features.shape[0] == 0 or features.shape[1] == 0:
        return _empty_grads(features, weight)
    features = _drop_ignored(features, labels, ignore_index)
    rows = agent_rows(features, weight, labels, ignore_index, class_start)
    g = _upstream(grad_loss, rows, target_only=False)
    # Gc_ij = 2 g [neg_margin - d_ij > 0] (j != y), Gc_iy = -2 g [d_iy - pos_margin > 0].
    g_y = torch.where(rows.has & (rows.d_y - pos_margin > 0), -2.0 * g, rows.zero)
    rp = torch.stack([torch.full_like(g, float(neg_margin)), 2.0 * g, g_y])
    gf, _, grad_w = _tiled_backward(features, weight, rows, rp, rp, MODE_CONTRASTIVE)
    return unit_backward(gf, features), grad_w


def c_triplet_backward(grad_loss, features, weight, labels, hardest, margin, hardest_only,
                       center, ignore_index, class_start):
    B, D = features.shape
    if B == 0 or D == 0:
        return _empty_grads(features, weight)
    features = _drop_ignored(features, labels, ignore_index)
    rows = agent_rows(features, weight, labels, ignore_index, class_start)
    g = _upstream(grad_loss, rows, target_only=True)
    acc = rows.nf.dtype
    thr = margin + rows.d_y
    center_term = 1.0 if center else 0.0
    if hardest_only:
        # Two rows of W per sample: Gc_iy = -2 g (active + center), Gc_ik* = 2 g active.
        k = hardest.to(torch.int64)
        d_k = 2.0 - 2.0 * target_cosines(features, weight, k, rows.nf, rows.nw)
        active = rows.has & (k >= 0) & (thr - d_k > 0)
        act = active.to(acc)
        gf_unit = torch.zeros((B, D), dtype=acc, device=features.device)
        gw_unit = torch.zeros(weight.shape, dtype=acc, device=features.device)
        _sparse_add(rows, features, weight, gf_unit, gw_unit, -2.0 * g * (act + center_term),
                    rows.yl)
        _sparse_add(rows, features, weight, gf_unit, gw_unit, 2.0 * g * act,
                    torch.where(active, k, torch.full_like(k, -1)))
        return _finish(features, weight, rows, gf_unit, gw_unit)
    # All negatives: Gc_ik = 2 g [margin + d_iy - d_ik > 0]; Gc_iy = -2 g (#active + center).
    # The count comes out of the grad-features pass (its target column contributes 0 there),
    # and the target column of grad f~ is added as a B-length gather afterwards.
    zero_y = torch.zeros_like(g)
    gf, count, _ = _tiled_backward(features, weight, rows, torch.stack([thr, 2.0 * g, zero_y]),
                                   None, MODE_TRIPLET)
    g_y = torch.where(rows.has, -2.0 * g * (count + center_term), rows.zero)
    gf = gf + torch.where(rows.has[:, None], g_y[:, None] * _unit_rows(weight, rows.nw, rows.yl),
                          rows.zero)
    C = weight.shape[0]
    grad_w = torch.empty((C, D), dtype=weight.dtype, device=weight.device)
    ones = torch.ones((), dtype=acc, device=features.device)
    grad_weight(features, weight, rows.nf, rows.nw, ones, rows.yl,
                torch.stack([thr, 2.0 * g, g_y]), MODE_TRIPLET, True, True, grad_w)
    return unit_backward(gf, features), grad_w


def center_loss_backward(grad_loss, features, weight, labels, ignore_index, class_start):
    B, D = features.shape
    if B == 0 or D == 0:
        return _empty_grads(features, weight)
    features = _drop_ignored(features, labels, ignore_index)
    rows = agent_rows(features, weight, labels, ignore_index, class_start)
    g = _upstream(grad_loss, rows, target_only=True)
    acc = rows.nf.dtype
    gf_unit = torch.zeros((B, D), dtype=acc, device=features.device)
    gw_unit = torch.zeros(weight.shape, dtype=acc, device=features.device)
    _sparse_add(rows, features, weight, gf_unit, gw_unit, -2.0 * g, rows.yl)  # Gc_iy = -2 g
    return _finish(features, weight, rows, gf_unit, gw_unit)
