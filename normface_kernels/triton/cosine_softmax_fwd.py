"""cosine_softmax forward: online logsumexp over class tiles (docs/kernels.md), no (B, C) buffer.

Grid (row tiles, class splits): each program walks the class tiles of its split, computes the
(BLOCK_M, BLOCK_N) cosine tile with tl.dot from raw f and W, scales it in the epilogue
(z = <f_i, W_j> s a_i / ||f_i|| * b_j / ||W_j||, target column replaced by z_iy) and folds it into
a running (max, sum) pair. The (splits, B) partial pairs -- O(B * C / BLOCK_N) floats at most --
are merged exactly by _lse_merge_kernel, which also forms the loss.
"""

import math
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from . import config
from .normalize import acc_dtype, row_norms
from .tiles import (dot_tile, launch, row_ids, softmax_logits, softmax_scales, target_cosines,
                    wrap_triton)

_MERGE_BLOCK = 64


@triton.jit
def _online_update(m, l, z, cmask):
    """Merge a tile of logits into the running (max, sum): l' = l e^(m - m') + sum e^(z - m').
    The m' == m test keeps -inf - -inf out; a NaN z reaches l through exp (never lost in max)."""
    m_new = tl.maximum(m, tl.max(z, 1))
    alpha = tl.where(m_new == m, 1.0, tl.exp(m - m_new))
    p = tl.where(cmask[None, :], tl.exp(z - m_new[:, None]), 0.0)
    return m_new, l * alpha + tl.sum(p, 1)


@triton.jit
def _lse_partial_kernel(f_ptr, w_ptr, nf_ptr, nw_ptr, s_ptr, yl_ptr, zy_ptr, m_ptr, l_ptr,
                        B, C, D, stride_fb, stride_fd, stride_wc, stride_wd, tiles_per_split,
                        NORM_F: tl.constexpr, NORM_W: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    ACC = m_ptr.dtype.element_ty
    pid_s = tl.program_id(1)
    rows, rmask = row_ids(tl.program_id(0), B, BLOCK_M)
    s = tl.load(s_ptr).to(ACC)
    nf = tl.load(nf_ptr + rows, mask=rmask, other=1.0)
    yl = tl.load(yl_ptr + rows, mask=rmask, other=-2)
    zy = tl.load(zy_ptr + rows, mask=rmask, other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), ACC)
    l = tl.zeros((BLOCK_M,), ACC)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(C, BLOCK_N))
    for t in range(t0, t1):
        cols, cmask = row_ids(t, C, BLOCK_N)
        nw = tl.load(nw_ptr + cols, mask=cmask, other=1.0)
        rs, cs = softmax_scales(nf, nw, s, NORM_F, NORM_W)
        dot = dot_tile(f_ptr, w_ptr, rows, cols, rmask, cmask, D, stride_fb, stride_fd,
                       stride_wc, stride_wd, ACC, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        z = softmax_logits(dot, rs, cs, yl, zy, cols, cmask)
        m, l = _online_update(m, l, z, cmask)
    out = pid_s.to(tl.int64) * B + rows
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(l_ptr + out, l, mask=rmask)


@triton.jit
def _lse_merge_kernel(m_ptr, l_ptr, yl_ptr, zy_ptr, loss_ptr, lse_ptr, B, n_splits,
                      BLOCK: tl.constexpr):
    """lse = merge of the split pairs (same formula as the online update); loss_i = lse_i - z_iy
    with a local target, lse_i with the target in another shard, 0 for ignored rows."""
    ACC = m_ptr.dtype.element_ty
    rows, rmask = row_ids(tl.program_id(0), B, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), ACC)
    l = tl.zeros((BLOCK,), ACC)
    for sp in range(0, n_splits):
        offs = rows + sp * B  # (splits, B) with splits * B small
        ms = tl.load(m_ptr + offs, mask=rmask, other=0.0)
        ls = tl.load(l_ptr + offs, mask=rmask, other=1.0)
        m_new = tl.maximum(m, ms)
        l = (l * tl.where(m_new == m, 1.0, tl.exp(m - m_new))
             + ls * tl.where(m_new == ms, 1.0, tl.exp(ms - m_new)))
        m = m_new
    lse = m + tl.log(l)
    yl = tl.load(yl_ptr + rows, mask=rmask, other=-2)
    zy = tl.load(zy_ptr + rows, mask=rmask, other=0.0)
    loss = tl.where(yl >= 0, lse - zy, tl.where(yl == -1, lse, 0.0))
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(loss_ptr + rows, loss, mask=rmask)


# ---------------------------------------------------------------------------------------------
# Per-row pieces computed once (B values, fp32): local targets and the margin target t_i.
# ---------------------------------------------------------------------------------------------

COS_CLAMP = 1e-7


def local_targets(labels, ignore_index, class_start, num_local):
    """(B,) int64: local target class in [0, C), -1 if the target is in another shard, -2 if the
    sample is ignored (kernels.md: y_local = y - class_start)."""
    local = labels - class_start
    here = (local >= 0) & (local < num_local)
    yl = torch.where(here, local, torch.full_like(local, -1))
    return torch.where(labels == ignore_index, torch.full_like(local, -2), yl)


def margin_target(cos_y, m1, m2, m3, lam):
    """t_i and dt_i/dcos_iy: csrc/common.h margin_target, elementwise over B values."""
    lo, hi = -1.0 + COS_CLAMP, 1.0 - COS_CLAMP
    c = cos_y.clamp(lo, hi)
    inside = ((cos_y >= lo) & (cos_y <= hi)).to(cos_y.dtype)
    if m1 == 1.0 and m2 == 0.0:
        psi, dpsi = c - m3, inside
    else:
        theta = torch.arccos(c)
        angle = m1 * theta + m2
        k = torch.floor(angle / math.pi)
        sign = 1.0 - 2.0 * (k - 2.0 * torch.floor(k / 2.0))  # (-1)^k
        psi = sign * torch.cos(angle) - 2.0 * k - m3
        dpsi = inside * sign * m1 * torch.sin(angle) / torch.sqrt(1.0 - c * c)
    return (lam * cos_y + psi) / (1.0 + lam), (lam + dpsi) / (1.0 + lam)


def softmax_rows(features, weight, labels, scale, m1, m2, m3, lam, normalize_features,
                 normalize_weight, ignore_index, class_start):
    """Norms (B + C floats) and the per-row target data shared by forward and backward."""
    C = weight.shape[0]
    nf = row_norms(features)
    nw = row_norms(weight)
    yl = local_targets(labels, ignore_index, class_start, C)
    s = scale.detach().to(device=features.device, dtype=nf.dtype).reshape(())
    has = yl >= 0
    cos_y = target_cosines(features, weight, yl, nf, nw)
    t, dt = margin_target(cos_y, m1, m2, m3, lam)
    zero = torch.zeros_like(t)
    a = torch.ones_like(nf) if normalize_features else nf
    b_y = torch.ones_like(nf) if normalize_weight else nw[yl.clamp(min=0)]
    return SimpleNamespace(
        nf=nf, nw=nw, yl=yl, s=s, a=a, b_y=b_y,
        t=torch.where(has, t, zero), dt=torch.where(has, dt, zero),
        zy=torch.where(has, s * a * b_y * t, zero))  # z_iy = s a_i b_y t_i


def softmax_forward(features, weight, labels, scale, m1, m2, m3, lam, normalize_features,
                    normalize_weight, ignore_index, class_start):
    B, D = features.shape
    C = weight.shape[0]
    acc = acc_dtype(features.dtype)
    loss = torch.empty((B,), dtype=acc, device=features.device)
    lse = torch.empty((B,), dtype=acc, device=features.device)
    if B == 0:
        return loss, lse
    rows = softmax_rows(features, weight, labels, scale, m1, m2, m3, lam, normalize_features,
                       normalize_weight, ignore_index, class_start)
    blk = config.forward_blocks(features.dtype)
    n_row_tiles = config.cdiv(B, blk.m)
    splits, per_split = config.split_classes(n_row_tiles, config.cdiv(C, blk.n), 1,
                                             features.device)
    m_part = torch.empty((splits, B), dtype=acc, device=features.device)
    l_part = torch.empty((splits, B), dtype=acc, device=features.device)
    launch(wrap_triton(_lse_partial_kernel), (n_row_tiles, splits),
        features, weight, rows.nf, rows.nw, rows.s, rows.yl, rows.zy, m_part, l_part,
        B, C, D, features.stride(0), features.stride(1), weight.stride(0), weight.stride(1),
        per_split, NORM_F=bool(normalize_features), NORM_W=bool(normalize_weight),
        BLOCK_M=blk.m, BLOCK_N=blk.n, BLOCK_K=blk.k,
        PRECISION=config.dot_precision(features.dtype, features.device),
        num_warps=blk.num_warps, num_stages=blk.num_stages)
    launch(wrap_triton(_lse_merge_kernel), (config.cdiv(B, _MERGE_BLOCK),),
        m_part, l_part, rows.yl, rows.zy, loss, lse, B, splits, BLOCK=_MERGE_BLOCK)
    return loss, lse
