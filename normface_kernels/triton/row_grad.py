"""The GEMM-free parts of the backward (docs/kernels.md "Closed forms").

_row_grad_kernel: grad_features in closed form, one pass over (B, D):
    v_i      = alpha_i U_i + beta_i W_{y1_i} + gamma_i W_{y2_i}       (= grad f~_i)
    grad f_i = (v_i - f~_i <v_i, f~_i>) / ||f_i|| + ext_i f~_i       (eq. 4, + the ||f_i|| term)
  and 0 for rows that contribute nothing (live_i = 0), whatever their features hold. U is the
  forward's Ubar (softmax) or V (agent losses); W_y1 / W_y2 are the rows the sparse terms touch.

_sparse_weight_kernel: grad_weight of the losses that touch one or two rows of W per sample
(c_triplet hardest_only, center_loss): grad W~_k = sum over the (k, i, coef) entries of
coef f~_i, then eq. 4 -- entries sorted by class, one program per class, no atomics, no (C, D)
scratch; the rows of W no sample touches stay 0.
"""

import torch
import triton
import triton.language as tl

from . import config
from .tiles import launch, row_ids, wrap_triton


@triton.jit
def _row_vec(f_ptr, w_ptr, u_ptr, y1, y2, alpha, beta, gamma, rows, rmask, ds, D, stride_fb,
             stride_fd, stride_wc, stride_wd, ACC: tl.constexpr, HAS_U: tl.constexpr,
             HAS_Y2: tl.constexpr):
    mask = rmask[:, None] & (ds < D)[None, :]
    f = tl.load(f_ptr + rows[:, None] * stride_fb + ds[None, :] * stride_fd, mask=mask,
                other=0.0).to(ACC)
    m1 = mask & (y1 >= 0)[:, None]
    v = beta[:, None] * tl.load(w_ptr + tl.maximum(y1, 0)[:, None] * stride_wc
                                + ds[None, :] * stride_wd, mask=m1, other=0.0).to(ACC)
    if HAS_Y2:
        m2 = mask & (y2 >= 0)[:, None]
        v += gamma[:, None] * tl.load(w_ptr + tl.maximum(y2, 0)[:, None] * stride_wc
                                      + ds[None, :] * stride_wd, mask=m2, other=0.0).to(ACC)
    if HAS_U:
        v += alpha[:, None] * tl.load(u_ptr + rows[:, None] * D + ds[None, :], mask=mask,
                                      other=0.0)
    return f, v


@triton.jit
def _row_grad_kernel(f_ptr, w_ptr, u_ptr, coef_ptr, y1_ptr, y2_ptr, gf_ptr, B, D, stride_fb,
                     stride_fd, stride_wc, stride_wd, HAS_U: tl.constexpr, HAS_Y2: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    ACC = coef_ptr.dtype.element_ty
    rows, rmask = row_ids(tl.program_id(0), B, BLOCK_R)
    nf = tl.load(coef_ptr + rows, mask=rmask, other=1.0)
    alpha = tl.load(coef_ptr + B + rows, mask=rmask, other=0.0)
    beta = tl.load(coef_ptr + 2 * B + rows, mask=rmask, other=0.0)
    gamma = tl.load(coef_ptr + 3 * B + rows, mask=rmask, other=0.0)
    ext = tl.load(coef_ptr + 4 * B + rows, mask=rmask, other=0.0)
    live = tl.load(coef_ptr + 5 * B + rows, mask=rmask, other=0.0) != 0
    y1 = tl.load(y1_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    y2 = y1
    if HAS_Y2:
        y2 = tl.load(y2_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    vf = tl.zeros((BLOCK_R,), ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        f, v = _row_vec(f_ptr, w_ptr, u_ptr, y1, y2, alpha, beta, gamma, rows, rmask, ds, D,
                        stride_fb, stride_fd, stride_wc, stride_wd, ACC, HAS_U, HAS_Y2)
        vf += tl.sum(v * f, 1)
    vf = vf / nf  # <v, f~>
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        f, v = _row_vec(f_ptr, w_ptr, u_ptr, y1, y2, alpha, beta, gamma, rows, rmask, ds, D,
                        stride_fb, stride_fd, stride_wc, stride_wd, ACC, HAS_U, HAS_Y2)
        fu = f / nf[:, None]
        out = (v - fu * vf[:, None]) / nf[:, None] + ext[:, None] * fu
        out = tl.where(live[:, None], out, 0.0)
        tl.store(gf_ptr + rows[:, None] * D + ds[None, :], out.to(gf_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (ds < D)[None, :])


def row_grad(features, weight, coef, y1, y2=None, u=None):
    """grad_features (B, D) in features' dtype from the closed form above. coef: (6, B) rows
    (nf, alpha, beta, gamma, ext, live) in the accumulation dtype; y1, y2: (B,) row ids of W
    (< 0: none); u: (B, D)."""
    B, D = features.shape
    grad_f = torch.empty((B, D), dtype=features.dtype, device=features.device)
    if B == 0 or D == 0:
        return grad_f.zero_()
    block_r, block_d = config.row_blocks(D)
    launch(wrap_triton(_row_grad_kernel), (config.cdiv(B, block_r),),
        features, weight, u if u is not None else coef, coef, y1, y2 if y2 is not None else y1,
        grad_f, B, D, features.stride(0), features.stride(1), weight.stride(0),
        weight.stride(1), HAS_U=u is not None, HAS_Y2=y2 is not None, BLOCK_R=block_r,
        BLOCK_D=block_d)
    return grad_f


def row_coefs(nf, alpha, beta, gamma, ext, live):
    """The (6, B) table of _row_grad_kernel (live: bool (B,))."""
    zero = torch.zeros((), dtype=nf.dtype, device=nf.device)
    return torch.stack([nf] + [torch.where(live, x, zero) if torch.is_tensor(x) else
                               torch.zeros_like(nf) for x in (alpha, beta, gamma, ext)]
                       + [live.to(nf.dtype)])


@triton.jit
def _sparse_weight_kernel(f_ptr, w_ptr, cls_ptr, end_ptr, src_ptr, coef_ptr, nf_ptr, nw_ptr,
                          gw_ptr, C, D, stride_fb, stride_fd, stride_wc, stride_wd,
                          D_PAD: tl.constexpr):
    """One program per entry of the class-sorted list; the first entry of each class sums the
    class's entries (positions [p, end_p)) and writes its row of grad W (eq. 4)."""
    ACC = coef_ptr.dtype.element_ty
    p = tl.program_id(0).to(tl.int64)
    k = tl.load(cls_ptr + p)
    prev = tl.load(cls_ptr + tl.maximum(p - 1, 0))
    if (k < C) & ((p == 0) | (prev != k)):
        ds = tl.arange(0, D_PAD)
        dmask = ds < D
        acc = tl.zeros((D_PAD,), ACC)
        for q in range(p, tl.load(end_ptr + p)):
            i = tl.load(src_ptr + q)
            f = tl.load(f_ptr + i * stride_fb + ds * stride_fd, mask=dmask, other=0.0).to(ACC)
            acc += (tl.load(coef_ptr + q) / tl.load(nf_ptr + i)) * f
        nw = tl.load(nw_ptr + p)
        u = tl.load(w_ptr + k * stride_wc + ds * stride_wd, mask=dmask, other=0.0).to(ACC) / nw
        out = (acc - u * tl.sum(acc * u, 0)) / nw
        tl.store(gw_ptr + k * D + ds, out.to(gw_ptr.dtype.element_ty), mask=dmask)


def sparse_weight_grad(features, weight, nf, entries):
    """grad_W (C, D) from entries [(class (B,) int, coef (B,), ||W_class|| (B,))]: class < 0 adds
    nothing; row i of each entry refers to features[i]. Deterministic (a stable sort by class)."""
    B, D = features.shape
    C = weight.shape[0]
    grad_w = torch.zeros((C, D), dtype=weight.dtype, device=weight.device)
    if B == 0 or D == 0:
        return grad_w
    cls = torch.cat([torch.where(k >= 0, k.long(), torch.full_like(k.long(), C))
                     for k, _, _ in entries])
    coef = torch.cat([c for _, c, _ in entries])
    nw = torch.cat([n for _, _, n in entries])
    src = torch.arange(B, device=features.device).repeat(len(entries))
    cls, order = torch.sort(cls, stable=True)
    end = torch.searchsorted(cls, cls, right=True)
    launch(wrap_triton(_sparse_weight_kernel), (cls.shape[0],),
        features, weight, cls, end, src[order], coef[order].contiguous(), nf,
        nw[order].contiguous(), grad_w, C, D, features.stride(0), features.stride(1),
        weight.stride(0), weight.stride(1), D_PAD=config.d_pad(D))
    return grad_w
