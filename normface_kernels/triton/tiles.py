"""Launch wrapper and the Triton helpers shared by the loss kernels (docs/kernels.md).

Every loss kernel computes tiles of raw dot products <f_i, W_j> with tl.dot over the whole
(padded) D and applies the norms in its epilogue: cos_ij = <f_i, W_j> / (||f_i|| ||W_j||). The
norms are B + C floats computed once per forward; no normalized copy of f or W is ever written.
Offsets are int64 wherever a row id meets a stride.
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
def row_ids(pid, n, BLOCK: tl.constexpr):
    """int64 ids [pid * BLOCK, pid * BLOCK + BLOCK) and their mask (ids < n; pid * BLOCK < n <
    2^31, the ids are int64 before they meet any stride)."""
    ids = tl.arange(0, BLOCK).to(tl.int64) + pid * BLOCK
    return ids, ids < n


@triton.jit
def load_rows(ptr, ids, mask, D, stride_r, stride_d, D_PAD: tl.constexpr):
    """(len(ids), D_PAD) tile of a 2-D tensor: whole rows, zero past D and outside `mask`."""
    ds = tl.arange(0, D_PAD)
    return tl.load(ptr + ids[:, None] * stride_r + ds[None, :] * stride_d,
                   mask=mask[:, None] & (ds < D)[None, :], other=0.0)


@triton.jit
def _tf32_split(x):
    """x = hi + lo with hi exact in TF32 (10 mantissa bits kept, the rest truncated) and lo the
    exact remainder; an inf/NaN x keeps its hi and a zero lo (as Triton's own TF32x3)."""
    hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    lo = x - hi
    return hi, tl.where(lo == lo, lo, 0.0)


@triton.jit
def cos_dot(a, b, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """a (M, D) and b (N, D) -> (M, N) of <a_m, b_n>, whole D at once, so that cos_dot(b, a) is
    exactly the transpose of cos_dot(a, b): the class-stationary backward recomputes each logit
    bit-identically to the row-stationary forward (contract "Bad input"). The tensor-core product of
    one element does not depend on which operand is A; Triton's TF32x3 adds its two cross terms
    in an order that does, so fp32 uses this symmetric split (hi.hi + (lo.hi + hi.lo))."""
    if PRECISION == "tf32x3":
        a_hi, a_lo = _tf32_split(a)
        b_hi, b_lo = _tf32_split(b)
        cross = (tl.dot(a_lo, tl.trans(b_hi), input_precision="tf32", out_dtype=ACC)
                 + tl.dot(a_hi, tl.trans(b_lo), input_precision="tf32", out_dtype=ACC))
        return tl.dot(a_hi, tl.trans(b_hi), input_precision="tf32", out_dtype=ACC) + cross
    else:
        return tl.dot(a, tl.trans(b), input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def cos_tile(a_ptr, a_ids, a_mask, stride_a, stride_ad, b_ptr, b_ids, b_mask, stride_b,
             stride_bd, D, ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_A: tl.constexpr,
             BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, D_PAD: tl.constexpr):
    """cos_dot over D in CHUNK-wide pieces loaded here (fp32 / fp64, whose whole-D tiles would
    not fit in registers): the same chunks in the same order from either side, so that
    cos_tile(b, a) is still exactly the transpose of cos_tile(a, b)."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), ACC)
    ks = tl.arange(0, CHUNK)
    for k0 in tl.static_range(0, D_PAD, CHUNK):
        kmask = (k0 + ks < D)[None, :]
        a = tl.load(a_ptr + a_ids[:, None] * stride_a + (k0 + ks)[None, :] * stride_ad,
                    mask=a_mask[:, None] & kmask, other=0.0)
        b = tl.load(b_ptr + b_ids[:, None] * stride_b + (k0 + ks)[None, :] * stride_bd,
                    mask=b_mask[:, None] & kmask, other=0.0)
        acc = acc + cos_dot(a, b, ACC, PRECISION)
    return acc


@triton.jit
def relu_nan(x):
    """torch.relu with NaN propagation (kernels.md: x > 0 ? x : (x != x ? x : 0))."""
    return tl.where(x > 0, x, tl.where(x != x, x, 0.0))


@triton.jit
def logit_factors(nf, nw, s, NORM_F: tl.constexpr, NORM_W: tl.constexpr):
    """z_ij = s a_i b_j cos_ij = (<f_i, W_j> cs_j) rs_i with rs_i = s a_i / ||f_i|| (s / ||f_i||
    or s) and cs_j = b_j / ||W_j|| (1 / ||W_j|| or 1). Forward and backward form z with exactly
    this expression, (dot * cs) * rs, so that it is the same float in both."""
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
def unit_distance(dot, nf, nw):
    """d_ij = ||f~_i - W~_j||^2 = 2 - 2 cos_ij of the agent losses, from a (rows, cols) tile of
    <f_i, W_j>; the same expression in forward and backward (the hinges are recomputed)."""
    return 2.0 - 2.0 * ((dot / nf) / nw)
