"""cosine_logits: the (B, C) matrix s * cos(f_i, W_j) for inference and small C.

Forward: grid (row tiles, class tiles), tl.dot of raw f and W, then s / (||f_i|| ||W_j||) in the
epilogue, stored in the input dtype. Backward (the output is (B, C) anyway, so plain matmuls):
grad f~ = s G W~, grad W~ = s G^T f~, grad_s = sum G cos = sum_i <(G W~)_i, f~_i>, then eq. 4.
"""

import torch
import triton
import triton.language as tl

from ..checks import acc_dtype
from . import config
from .normalize import row_norms, unit_backward
from .tiles import cos_tile, launch, row_ids, wrap_triton


@triton.jit
def _cosine_logits_kernel(f_ptr, w_ptr, nf_ptr, nw_ptr, s_ptr, out_ptr, B, C, D, stride_fb,
                          stride_fd, stride_wc, stride_wd, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, D_PAD: tl.constexpr,
                          PRECISION: tl.constexpr):
    ACC = nf_ptr.dtype.element_ty
    rows, rmask = row_ids(tl.program_id(0), B, BLOCK_M)
    cols, cmask = row_ids(tl.program_id(1), C, BLOCK_N)
    s = tl.load(s_ptr).to(ACC)
    nf = tl.load(nf_ptr + rows, mask=rmask, other=1.0)
    nw = tl.load(nw_ptr + cols, mask=cmask, other=1.0)
    dot = cos_tile(f_ptr, rows, rmask, stride_fb, stride_fd, w_ptr, cols, cmask, stride_wc,
                   stride_wd, D, ACC, PRECISION, BLOCK_M, BLOCK_N, CHUNK, D_PAD)
    z = s * ((dot / nf[:, None]) / nw[None, :])
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], z.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def cosine_logits(features, weight, scale, eps):
    B, D = features.shape
    C = weight.shape[0]
    out = torch.empty((B, C), dtype=features.dtype, device=features.device)
    if B == 0 or C == 0:
        return out
    nf = row_norms(features, eps)
    nw = row_norms(weight, eps)
    s = scale.detach().to(device=features.device, dtype=nf.dtype).reshape(())
    blk = config.forward_blocks(features.dtype, D, accumulate=False)
    launch(wrap_triton(_cosine_logits_kernel), (config.cdiv(B, blk.m), config.cdiv(C, blk.n)),
        features, weight, nf, nw, s, out, B, C, D, features.stride(0), features.stride(1),
        weight.stride(0), weight.stride(1), BLOCK_M=blk.m, BLOCK_N=blk.n, CHUNK=blk.k, D_PAD=blk.d,
        PRECISION=config.dot_precision(features.dtype, features.device),
        num_warps=blk.num_warps, num_stages=blk.num_stages)
    return out


def cosine_logits_backward(grad, features, weight, scale, eps):
    acc = acc_dtype(features.dtype)
    nf = row_norms(features, eps)
    nw = row_norms(weight, eps)
    s = scale.detach().to(device=features.device, dtype=acc).reshape(())
    f_unit = features.to(acc) / nf[:, None]
    w_unit = weight.to(acc) / nw[:, None]
    g = grad.to(acc)
    g_fu = g @ w_unit              # sum_j G_ij W~_j      (B, D)
    g_wu = g.t() @ f_unit          # sum_i G_ij f~_i      (C, D)
    grad_s = (g_fu * f_unit).sum()  # sum_ij G_ij cos_ij
    grad_f = unit_backward((s * g_fu).contiguous(), features, eps)
    grad_w = unit_backward((s * g_wu).contiguous(), weight, eps)
    return grad_f, grad_w, grad_s.to(device=scale.device, dtype=scale.dtype).reshape(scale.shape)
