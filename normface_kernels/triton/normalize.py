"""L2 normalization (paper eq. 3), its backward (eq. 4), and the row norms of the loss kernels.

    normalize(x) = x / ||x||,  ||x|| = sqrt(sum x^2 + eps)
    backward:      (g - x~ <g, x~>) / ||x||  (+ extra_r x~ when ||x|| itself scales a logit)

Rows are the last dimension; everything is accumulated in float32 (float64 for float64 inputs).
"""

import torch
import triton
import triton.language as tl

from ..checks import EPS, acc_dtype
from . import config
from .tiles import launch, row_ids, wrap_triton

_BLOCK_R = 16
_BLOCK_D = 64


@triton.jit
def _row_norm_kernel(x_ptr, norm_ptr, R, D, stride_r, stride_d, eps,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, rmask = row_ids(tl.program_id(0), R, BLOCK_R)
    ACC = norm_ptr.dtype.element_ty
    sq = tl.zeros((BLOCK_R,), ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * stride_r + ds[None, :] * stride_d,
                    mask=rmask[:, None] & (ds < D)[None, :], other=0.0).to(ACC)
        sq += tl.sum(x * x, 1)
    tl.store(norm_ptr + rows, tl.sqrt(sq + eps), mask=rmask)


@triton.jit
def _l2_normalize_kernel(x_ptr, out_ptr, R, D, eps, ACC: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, rmask = row_ids(tl.program_id(0), R, BLOCK_R)
    sq = tl.zeros((BLOCK_R,), ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * D + ds[None, :],
                    mask=rmask[:, None] & (ds < D)[None, :], other=0.0).to(ACC)
        sq += tl.sum(x * x, 1)
    norm = tl.sqrt(sq + eps)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = rmask[:, None] & (ds < D)[None, :]
        offs = rows[:, None] * D + ds[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + offs, (x / norm[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unit_backward_kernel(x_ptr, g_ptr, extra_ptr, out_ptr, R, D, stride_xr, stride_xd, eps,
                          HAS_EXTRA: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = (g - u <g, u>) / ||x|| + extra_r u, u = x / ||x|| (eq. 4). g and out contiguous."""
    rows, rmask = row_ids(tl.program_id(0), R, BLOCK_R)
    sq = tl.zeros((BLOCK_R,), ACC)
    gx = tl.zeros((BLOCK_R,), ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = rmask[:, None] & (ds < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xr + ds[None, :] * stride_xd, mask=mask,
                    other=0.0).to(ACC)
        g = tl.load(g_ptr + rows[:, None] * D + ds[None, :], mask=mask, other=0.0).to(ACC)
        sq += tl.sum(x * x, 1)
        gx += tl.sum(g * x, 1)
    inv = 1.0 / tl.sqrt(sq + eps)
    gu = gx * inv  # <g, u>
    if HAS_EXTRA:
        extra = tl.load(extra_ptr + rows, mask=rmask, other=0.0).to(ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = rmask[:, None] & (ds < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xr + ds[None, :] * stride_xd, mask=mask,
                    other=0.0).to(ACC)
        g = tl.load(g_ptr + rows[:, None] * D + ds[None, :], mask=mask, other=0.0).to(ACC)
        u = x * inv[:, None]
        out = (g - u * gu[:, None]) * inv[:, None]
        if HAS_EXTRA:
            out += extra[:, None] * u
        tl.store(out_ptr + rows[:, None] * D + ds[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask)


def _tl_acc(dtype):
    """checks.acc_dtype as a Triton dtype."""
    return {torch.float32: tl.float32, torch.float64: tl.float64}[acc_dtype(dtype)]


def row_norms(x, eps=EPS):
    """(R,) ||x_r|| of a 2-D x (any strides), accumulation dtype."""
    R, D = x.shape
    norm = torch.empty((R,), dtype=acc_dtype(x.dtype), device=x.device)
    if R > 0:
        launch(wrap_triton(_row_norm_kernel), (config.cdiv(R, _BLOCK_R),),
            x, norm, R, D, x.stride(0), x.stride(1), eps, BLOCK_R=_BLOCK_R, BLOCK_D=_BLOCK_D)
    return norm


def _rows(x):
    D = x.shape[-1] if x.dim() > 0 else 1
    return (x.numel() // D if D > 0 else 0), D


def l2_normalize(x, eps):
    x = x.contiguous()
    out = torch.empty_like(x)
    R, D = _rows(x)
    if R > 0 and D > 0:
        launch(wrap_triton(_l2_normalize_kernel), (config.cdiv(R, _BLOCK_R),),
            x, out, R, D, eps, ACC=_tl_acc(x.dtype), BLOCK_R=_BLOCK_R, BLOCK_D=_BLOCK_D)
    return out


def unit_backward(grad_unit, x2d, eps=EPS, extra=None, out=None):
    """Eq. 4 for the rows of a 2-D x (any strides): grad_unit (R, D) contiguous (any float
    dtype) -> out (R, D) in x's dtype, plus extra_r * x~_r when extra (R,) is given."""
    R, D = x2d.shape
    if out is None:
        out = torch.empty((R, D), dtype=x2d.dtype, device=x2d.device)
    if R > 0 and D > 0:
        launch(wrap_triton(_unit_backward_kernel), (config.cdiv(R, _BLOCK_R),),
            x2d, grad_unit, extra if extra is not None else grad_unit, out, R, D,
            x2d.stride(0), x2d.stride(1), eps, HAS_EXTRA=extra is not None,
            ACC=_tl_acc(x2d.dtype), BLOCK_R=_BLOCK_R, BLOCK_D=_BLOCK_D)
    return out


def l2_normalize_backward(grad, x, eps):
    x = x.contiguous()
    R, D = _rows(x)
    out = torch.empty_like(x)
    if R > 0 and D > 0:
        g = grad.reshape(x.shape).contiguous()
        unit_backward(g.view(R, D), x.view(R, D), eps, out=out.view(R, D))
    return out
