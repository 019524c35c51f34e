"""grad_weight of the dense losses: one class-stationary kernel, 2 GEMM-equivalents, written
once in the input dtype -- no atomics, no scratch, deterministic (docs/kernels.md "grad_weight").

Grid: class tiles. A (BLOCK_N, D) tile of W stays on chip; the kernel walks all of B in
(BLOCK_M, D) tiles of f and per tile

    S^T = W f^T                  (tl.dot; bit-identical to the forward's S, tiles.cos_dot)
    A_ji = dL/dcos_ij a_i / (s b_j ||f_i||)   from S^T and the saved per-row terms
    acc_j += sum_i A_ji f_i      (tl.dot, A^T already the A operand: FlashAttention's backward)
    gcos_j += sum_i A_ji S_ji    (= ||W_j|| <grad W~_j, W~_j> / (s b_j): eq. 4's radial part)

and in its epilogue applies eq. 4 (and the ||W_j|| term of unnormalized agents) as one more small
tl.dot of diag(c) with the same W tile:

    grad W_j = s cs_j (acc_j + c_j W_j),  c_j = (colb_j - gcos_j) / ||W_j||^2,  cs_j = b_j/||W_j||

where colb_j ||W_j|| = sum_i G_ij a_i h_ij ||W_j|| is dL/db_j / s (only when b_j = ||W_j||).

A per mode (rows of `coef`, (K, B) in the accumulation dtype; a_i / ||f_i|| = ra_i folded in):
  SOFTMAX: [nf, lse, gea, gya, bt]  A = gya at the target, gea e^(z - lse) elsewhere, with
           z = (S cs) rs formed as in the forward; bt_i = G_iy a_i t_i for colb.
  HINGE:   [nf, thr, g2a, gya]      A = gya at the target, g2a [thr_i - d_ij > 0] elsewhere.
Rows that contribute nothing have zero coefficients and zeroed features (the launcher passes
f with those rows zeroed), so a NaN in an ignored row reaches nothing.

16-bit operands never carry a tiny gradient: bf16 has fp32's exponent range; for fp16 each
class column of A is scaled by a running power of two 2^-k_j (acc rescaled exactly when k_j
grows), so per-element gradients far below fp16's subnormals keep their precision.
"""

import torch
import triton
import triton.language as tl

from . import config
from .tiles import (
    cos_dot,
    cos_tile,
    launch,
    load_rows,
    logit_factors,
    row_ids,
    unit_distance,
    wrap_triton,
)

SOFTMAX, HINGE = 0, 1
# fp16 headroom: A * 2^-k_j stays below 2^(HEADROOM + 1), far from fp16's 65504.
_HEADROOM = tl.constexpr(13.0)


@triton.jit
def _exponent(x):
    """floor(log2(|x|)) of normal fp32 values, exactly (-127 for 0, 128 for inf/NaN)."""
    return (((tl.abs(x).to(tl.int32, bitcast=True) >> 23) & 255) - 127).to(tl.float32)


@triton.jit
def _grad_weight_kernel(f_ptr, w_ptr, nw_ptr, s_ptr, yl_ptr, coef_ptr, gw_ptr, B, C, D,
                        stride_fb, stride_fd, stride_wc, stride_wd, MODE: tl.constexpr,
                        NORM_F: tl.constexpr, NORM_W: tl.constexpr, SCALE_EXP: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
                        D_PAD: tl.constexpr, PRECISION: tl.constexpr):
    ACC = coef_ptr.dtype.element_ty
    IN = f_ptr.dtype.element_ty
    cols, cmask = row_ids(tl.program_id(0), C, BLOCK_N)
    if CHUNK == D_PAD:
        w = load_rows(w_ptr, cols, cmask, D, stride_wc, stride_wd, D_PAD)  # stays on chip
    nw = tl.load(nw_ptr + cols, mask=cmask, other=1.0)
    s = tl.load(s_ptr).to(ACC)
    acc = tl.zeros((BLOCK_N, D_PAD), ACC)
    gcos = tl.zeros((BLOCK_N,), ACC)
    colb = tl.zeros((BLOCK_N,), ACC)
    # -127: _exponent's floor, so that 2^-k stays finite (B = 0 leaves k here and c = 0).
    k = tl.full((BLOCK_N,), -127.0, tl.float32)
    cols32 = cols.to(tl.int32)  # yl is int32: the target test without 64-bit lanes
    for bt in range(0, tl.cdiv(B, BLOCK_M)):
        rows, rmask = row_ids(bt, B, BLOCK_M)
        f = load_rows(f_ptr, rows, rmask, D, stride_fb, stride_fd, D_PAD)
        yl = tl.load(yl_ptr + rows, mask=rmask, other=-2)
        is_y = cols32[:, None] == yl[None, :]
        if CHUNK == D_PAD:
            dot = cos_dot(w, f, ACC, PRECISION)  # (BLOCK_N, BLOCK_M)
        else:
            dot = cos_tile(w_ptr, cols, cmask, stride_wc, stride_wd, f_ptr, rows, rmask,
                           stride_fb, stride_fd, D, ACC, PRECISION, BLOCK_N, BLOCK_M, CHUNK,
                           D_PAD)
        if MODE == 0:
            nf = tl.load(coef_ptr + rows, mask=rmask, other=1.0)
            rs, cs = logit_factors(nf, nw, s, NORM_F, NORM_W)
            lse = tl.load(coef_ptr + B + rows, mask=rmask, other=0.0)
            gea = tl.load(coef_ptr + 2 * B + rows, mask=rmask, other=0.0)
            gya = tl.load(coef_ptr + 3 * B + rows, mask=rmask, other=0.0)
            z = (dot * cs[:, None]) * rs[None, :]
            a = tl.where(is_y, gya[None, :], gea[None, :] * tl.exp(z - lse[None, :]))
            if not NORM_W:
                bt_y = tl.load(coef_ptr + 4 * B + rows, mask=rmask, other=0.0)
                colb += tl.sum(tl.where(is_y, bt_y[None, :] * nw[:, None], a * dot), 1)
        else:
            nf = tl.load(coef_ptr + rows, mask=rmask, other=1.0)
            thr = tl.load(coef_ptr + B + rows, mask=rmask, other=0.0)
            g2a = tl.load(coef_ptr + 2 * B + rows, mask=rmask, other=0.0)
            gya = tl.load(coef_ptr + 3 * B + rows, mask=rmask, other=0.0)
            d = unit_distance(dot, nf[None, :], nw[:, None])
            active = (thr[None, :] - d > 0) & (cols32[:, None] != yl[None, :])
            a = tl.where(is_y, gya[None, :], tl.where(active, g2a[None, :], 0.0))
        gcos += tl.sum(a * dot, 1)
        if SCALE_EXP:
            need = _exponent(tl.max(tl.abs(a), 1))
            k_new = tl.where(need > k + _HEADROOM, need, k)
            acc = acc * tl.exp2(k - k_new)[:, None]
            k = k_new
            a = a * tl.exp2(-k)[:, None]
        acc = tl.dot(a.to(IN), f, acc, input_precision=PRECISION, out_dtype=ACC)
    # Epilogue: eq. 4, acc += c W. 16-bit: as one more tl.dot, diag(c) with the W tile read
    # again (keeping the first copy alive through the loop, or an fp32 copy of the tile next to
    # acc, costs more registers than the kernel can spare). fp32 / fp64 tiles are narrow: FMAs.
    c = (colb - gcos) / (nw * nw)
    w2 = load_rows(w_ptr + 0 * B, cols, cmask, D, stride_wc, stride_wd, D_PAD)
    if IN == tl.float16 or IN == tl.bfloat16:
        if SCALE_EXP:
            # acc + c W = 2^e (acc 2^(k - e) + c 2^-e W): c 2^-e in [1, 2) for the fp16 operand.
            # e comes from c itself, never from c 2^-k: k follows the column's A alone (-127 for
            # a column of zeros) and c holds the ||W_j|| term too, so c 2^-k can overflow fp32.
            # acc is scaled up by at most 2^60 (c far below the column's A: its term is lost
            # to rounding anyway), so it stays finite.
            e = tl.where(c == 0, k, tl.maximum(_exponent(c), k - 60.0))
            acc = acc * tl.exp2(k - e)[:, None]
            c = c * tl.exp2(-e)
            k = e
        eye = tl.arange(0, BLOCK_N)[:, None] == tl.arange(0, BLOCK_N)[None, :]
        acc = tl.dot(tl.where(eye, c[:, None], 0.0).to(IN), w2, acc, out_dtype=ACC)
    else:
        acc = acc + c[:, None] * w2.to(ACC)
    if NORM_W:
        out_scale = s / nw
    else:
        out_scale = tl.zeros_like(nw) + s
    if SCALE_EXP:
        out_scale = out_scale * tl.exp2(k)
    ds = tl.arange(0, D_PAD)
    tl.store(gw_ptr + cols[:, None] * D + ds[None, :],
             (acc * out_scale[:, None]).to(gw_ptr.dtype.element_ty),
             mask=cmask[:, None] & (ds < D)[None, :])


def grad_weight(features_live, weight, nw, s, yl, coef, mode, normalize_features,
                normalize_weight):
    """grad_W (C, D) in weight's dtype. features_live: f with the rows that contribute nothing
    zeroed; s: 0-dim scale (1 for the agent losses); coef: (K, B), see the module docstring."""
    B, D = features_live.shape
    C = weight.shape[0]
    grad_w = torch.empty((C, D), dtype=weight.dtype, device=weight.device)
    if C == 0:
        return grad_w
    blk = config.grad_weight_blocks(weight.dtype, D)
    launch(wrap_triton(_grad_weight_kernel), (config.cdiv(C, blk.n),),
        features_live, weight, nw, s, yl, coef, grad_w, B, C, D, features_live.stride(0),
        features_live.stride(1), weight.stride(0), weight.stride(1), MODE=mode,
        NORM_F=bool(normalize_features), NORM_W=bool(normalize_weight),
        SCALE_EXP=weight.dtype == torch.float16,
        BLOCK_N=blk.n, BLOCK_M=blk.m, CHUNK=blk.k, D_PAD=blk.d,
        PRECISION=config.dot_precision(weight.dtype, weight.device),
        num_warps=blk.num_warps, num_stages=blk.num_stages)
    return grad_w
