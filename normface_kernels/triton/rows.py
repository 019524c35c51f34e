"""Per-row and per-class quantities computed once per forward (docs/kernels.md "Norms, once per
call" and "Target logit"): B + C floats, saved for the backward, which never re-reads W for them.

    nf_i = ||f_i||, nw_j = ||W_j||             (normalize.row_norms)
    y_i  = local target (int32): y - class_start in [0, C), -1 in another shard, -2 ignored
    cos_iy, t_i = t(cos_iy), t'_i = dt/dcos    (a B-length dot, then the contract's margin function)
"""

from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from .. import reference
from . import config
from .normalize import row_norms
from .tiles import launch, row_ids, wrap_triton

ELSEWHERE, IGNORED = -1, -2


def local_targets(labels, ignore_index, class_start, num_local):
    """(B,) int32: the target's local class in [0, C), ELSEWHERE (-1) if it is in another shard
    (or, with the data checks off, out of range: never read), IGNORED (-2) for ignore_index."""
    local = labels - class_start
    here = (local >= 0) & (local < num_local)
    yl = torch.where(here, local, torch.full_like(local, ELSEWHERE))
    return torch.where(labels == ignore_index, torch.full_like(local, IGNORED), yl).to(torch.int32)


def margin_target(cos_y, m1, m2, m3, lam):
    """t_i and dt_i/dcos_iy of the contract's margin function over B values (the reference's
    psi and its closed-form derivative; csrc/common.h margin_target for C++):
    t = (lam cos + psi) / (1 + lam)."""
    psi, dpsi = reference.psi_and_derivative(cos_y, m1, m2, m3)
    return (lam * cos_y + psi) / (1.0 + lam), (lam + dpsi) / (1.0 + lam)


@triton.jit
def _target_cos_kernel(f_ptr, w_ptr, idx_ptr, nf_ptr, nw_ptr, out_ptr, B, D, stride_fb,
                       stride_fd, stride_wc, stride_wd, BLOCK_R: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """cos(f_i, W_{idx_i}) = <f_i, W_idx> / (||f_i|| ||W_idx||) for idx_i >= 0, else 0."""
    rows, rmask = row_ids(tl.program_id(0), B, BLOCK_R)
    idx = tl.load(idx_ptr + rows, mask=rmask, other=-1)
    has = rmask & (idx >= 0)
    ks = tl.where(has, idx, 0).to(tl.int64)
    ACC = nf_ptr.dtype.element_ty
    dot = tl.zeros((BLOCK_R,), ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = has[:, None] & (ds < D)[None, :]
        f = tl.load(f_ptr + rows[:, None] * stride_fb + ds[None, :] * stride_fd, mask=mask,
                    other=0.0).to(ACC)
        w = tl.load(w_ptr + ks[:, None] * stride_wc + ds[None, :] * stride_wd, mask=mask,
                    other=0.0).to(ACC)
        dot += tl.sum(f * w, 1)
    nf = tl.load(nf_ptr + rows, mask=has, other=1.0)
    nw = tl.load(nw_ptr + ks, mask=has, other=1.0)
    tl.store(out_ptr + rows, tl.where(has, dot / nf / nw, 0.0), mask=rmask)


def target_cosines(features, weight, index, nf, nw):
    """(B,) cos(f_i, W_{index_i}) for index_i >= 0 (local class ids), 0 elsewhere."""
    B, D = features.shape
    out = torch.empty((B,), dtype=nf.dtype, device=features.device)
    if B > 0:
        block_r, block_d = config.row_blocks(D)
        launch(wrap_triton(_target_cos_kernel), (config.cdiv(B, block_r),),
            features, weight, index, nf, nw, out, B, D, features.stride(0), features.stride(1),
            weight.stride(0), weight.stride(1), BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def softmax_rows(features, weight, labels, scale, m1, m2, m3, lam, normalize_features,
                 normalize_weight, ignore_index, class_start):
    """Norms and the target data of cosine_softmax (kernels.md): with h_iy = t_i,
    z_iy = s a_i b_y t_i; cs_y = b_y / ||W_y||, so that b_y W~_y = cs_y W_y."""
    nf = row_norms(features)
    nw = row_norms(weight)
    yl = local_targets(labels, ignore_index, class_start, weight.shape[0])
    s = scale.detach().to(device=features.device, dtype=nf.dtype).reshape(())
    has = yl >= 0
    ys = yl.clamp(min=0).long()
    cos_y = target_cosines(features, weight, yl, nf, nw)
    t, dt = margin_target(cos_y, m1, m2, m3, lam)
    zero = torch.zeros((), dtype=nf.dtype, device=features.device)
    a = torch.ones_like(nf) if normalize_features else nf
    b_y = torch.ones_like(nf) if normalize_weight else nw[ys]
    cs_y = 1.0 / nw[ys] if normalize_weight else torch.ones_like(nf)
    t, dt = torch.where(has, t, zero), torch.where(has, dt, zero)
    return SimpleNamespace(nf=nf, nw=nw, yl=yl, has=has, s=s, a=a, b_y=b_y, cs_y=cs_y, t=t,
                           dt=dt, zy=torch.where(has, s * a * b_y * t, zero), zero=zero)


def agent_rows(features, weight, labels, ignore_index, class_start):
    """Norms, local targets and the target distances d_iy = 2 - 2 cos_iy of the agent losses."""
    nf = row_norms(features)
    nw = row_norms(weight)
    yl = local_targets(labels, ignore_index, class_start, weight.shape[0])
    d_y = 2.0 - 2.0 * target_cosines(features, weight, yl, nf, nw)
    return SimpleNamespace(nf=nf, nw=nw, yl=yl, has=yl >= 0, d_y=d_y,
                           zero=torch.zeros((), dtype=nf.dtype, device=features.device))
