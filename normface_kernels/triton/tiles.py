"""Triton helpers shared by the loss kernels (docs/kernels.md "Norms, once per call").

Every loss kernel computes a tile of raw dot products <f_i, W_j> with tl.dot and applies the
normalization in its epilogue: cos_ij = <f_i, W_j> / (||f_i|| ||W_j||). The norms are B + C floats
computed once per call (normalize.row_norms); no normalized copy of f or W is ever written.
Offsets are int64 throughout (row/column ids are widened before they meet a stride).
"""

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from . import config


def wrap_triton(kernel):
    """torch.library.wrap_triton (torch.compile traces the launch), but the kernel itself under
    TRITON_INTERPRET=1: torch 2.11's wrap_triton rejects the interpreter's kernels (newer torch
    passes them through). Keeps the name wrap_triton, which torch.library.triton_op looks for in
    the op's source to find its kernels."""
    if config.INTERPRET:
        return kernel
    return torch.library.wrap_triton(kernel)


def launch(kernel, grid, *args, **kwargs):
    """kernel = wrap_triton(_x_kernel) (kept literal at the call sites, where torch.library finds
    the kernels for its compile cache key). Under TRITON_INTERPRET=1 the kernel is a plain Python
    function that cannot see fake tensors: the launch is skipped while tracing (the outputs are
    allocated by the caller, which is all a fake kernel has to do)."""
    if config.INTERPRET and any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
        return
    kernel[grid](*args, **kwargs)


@triton.jit
def dot_tile(f_ptr, w_ptr, rows, cols, rmask, cmask, D, stride_fb, stride_fd, stride_wc,
             stride_wd, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) tile of <f_i, W_j> in the accumulation dtype; D in BLOCK_K steps."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        kmask = ks < D
        a = tl.load(f_ptr + rows[:, None] * stride_fb + ks[None, :] * stride_fd,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + ks[:, None] * stride_wd + cols[None, :] * stride_wc,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def row_ids(pid, B, BLOCK: tl.constexpr):
    """int64 ids [pid * BLOCK, pid * BLOCK + BLOCK) and their mask (pid * BLOCK < B < 2^31;
    the ids are int64 before they meet any stride)."""
    rows = tl.arange(0, BLOCK).to(tl.int64) + pid * BLOCK
    return rows, rows < B


@triton.jit
def relu_nan(x):
    """torch.relu with NaN propagation (kernels.md: x > 0 ? x : (x != x ? x : 0))."""
    return tl.where(x > 0, x, tl.where(x != x, x, 0.0))


@triton.jit
def softmax_scales(nf, nw, s, NORM_F: tl.constexpr, NORM_W: tl.constexpr):
    """Per-row and per-column factors of z = s a_i b_j cos_ij = <f_i, W_j> * rs_i * cs_j:
    rs_i = s a_i / ||f_i|| (s / ||f_i|| or s), cs_j = b_j / ||W_j|| (1 / ||W_j|| or 1)."""
    if NORM_F:
        rs = s / nf
    else:
        rs = tl.where(nf == float("inf"), float("nan"), tl.zeros_like(nf) + s)
    if NORM_W:
        cs = 1.0 / nw
    else:
        # An infinite norm makes cos = inf / inf: NaN as in the reference, not +-inf.
        cs = tl.where(nw == float("inf"), float("nan"), tl.zeros_like(nw) + 1.0)
    return rs, cs


@triton.jit
def softmax_logits(dot, rs, cs, yl, zy, cols, cmask):
    """z tile (kernels.md): the target column replaced by z_iy, padding columns -inf. The same
    expression in forward and backward, so p = exp(z - lse) is recomputed exactly."""
    z = (dot * cs[None, :]) * rs[:, None]
    z = tl.where(cols[None, :] == yl[:, None], zy[:, None], z)
    return tl.where(cmask[None, :], z, float("-inf"))


@triton.jit
def _target_cos_kernel(f_ptr, w_ptr, yl_ptr, nf_ptr, nw_ptr, out_ptr, B, D, stride_fb, stride_fd,
                       stride_wc, stride_wd, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """cos_iy = <f_i, W_y> / (||f_i|| ||W_y||) for rows with a local target (kernels.md "Target
    logit": a B-length dot, not a column of the tile); 0 for the other rows."""
    rows, rmask = row_ids(tl.program_id(0), B, BLOCK_R)
    yl = tl.load(yl_ptr + rows, mask=rmask, other=-1)
    has = rmask & (yl >= 0)
    ys = tl.where(has, yl, 0).to(tl.int64)
    ACC = nf_ptr.dtype.element_ty
    dot = tl.zeros((BLOCK_R,), ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = has[:, None] & (ds < D)[None, :]
        f = tl.load(f_ptr + rows[:, None] * stride_fb + ds[None, :] * stride_fd, mask=mask,
                    other=0.0).to(ACC)
        w = tl.load(w_ptr + ys[:, None] * stride_wc + ds[None, :] * stride_wd, mask=mask,
                    other=0.0).to(ACC)
        dot += tl.sum(f * w, 1)
    nf = tl.load(nf_ptr + rows, mask=has, other=1.0)
    nw = tl.load(nw_ptr + ys, mask=has, other=1.0)
    tl.store(out_ptr + rows, tl.where(has, dot / nf / nw, 0.0), mask=rmask)


def target_cosines(features, weight, targets, nf, nw):
    """(B,) cos(f_i, W_{targets_i}) for targets_i >= 0 (local class ids), 0 elsewhere."""
    B, D = features.shape
    out = torch.empty((B,), dtype=nf.dtype, device=features.device)
    if B > 0:
        launch(wrap_triton(_target_cos_kernel), (config.cdiv(B, 16),),
            features, weight, targets, nf, nw, out, B, D, features.stride(0), features.stride(1),
            weight.stride(0), weight.stride(1), BLOCK_R=16, BLOCK_D=64)
    return out
