"""Public functional API (docs/contract.md, "Public"): argument checks, backend choice, reduction.

Shapes everywhere: features (B, D), weight (C, D), labels (B,) int64, scale float or 0-dim tensor.
`backend` is "auto" | "reference" | "cpu" | "triton" | "cuda"; every backend computes the same
per-sample losses (float32, float64 for float64 inputs) and the same gradients.
"""

import functools
import os

import torch

from . import checks, reference
from .checks import REDUCTIONS, data_checks_enabled, set_data_checks  # noqa: F401 (public)
from .reference import reduce_loss, scale_for_loss, softmax_loss_bound  # noqa: F401 (public)

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
# Which GPU backend "auto" prefers when both are built, first wins. Triton first: it is the one
# whose kernels are also exercised in CI (interpreter); revisit with the GPU benchmark results.
AUTO_GPU_ORDER = ("triton", "cuda")


# ---------------------------------------------------------------------------------------------
# Backend discovery
# ---------------------------------------------------------------------------------------------

def _cpp_loaded():
    from . import _cpp_error
    return _cpp_error is None


def has_cuda_kernels():
    """True when normface_kernels._C was built with the CUDA kernels (csrc/cuda)."""
    return _cpp_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "normface::cosine_softmax_forward", "CUDA")


_TRITON_STATUS = None  # (usable, why not), set on first use


def _triton_status():
    """(usable, why not): imports normface_kernels.triton once. Any failure -- triton missing or
    too old, a kernel or op that fails to define or register -- makes the backend unavailable
    with its reason, instead of an exception on every call of backend="auto". (A module-level
    cache rather than functools.lru_cache, which torch.compile would trace through with a
    warning.)"""
    global _TRITON_STATUS
    if _TRITON_STATUS is None:
        try:
            from . import triton as _nf_triton  # noqa: F401
        except Exception as error:  # noqa: BLE001 - any import/registration failure
            _TRITON_STATUS = (False, f"normface_kernels.triton failed to load "
                                     f"({type(error).__name__}: {error})")
        else:
            registered = hasattr(torch.ops.normface, "triton_cosine_softmax_forward")
            _TRITON_STATUS = (registered, None if registered else "the Triton ops did not register")
    return _TRITON_STATUS


def has_triton():
    """True when Triton imports and the Triton ops are registered (False on any failure; the
    reason is in the error of backend="triton")."""
    return _triton_status()[0]


def _triton_interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unavailable(backend, why):
    return RuntimeError(f"backend={backend!r} is not available: {why}")


def resolve_backend(backend, device):
    """The concrete backend for tensors on `device`; raises naming what is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            for candidate in AUTO_GPU_ORDER:
                if (candidate == "triton" and has_triton()) or (
                        candidate == "cuda" and has_cuda_kernels()):
                    return candidate
            return "reference"
        return "cpu" if device.type == "cpu" and _cpp_loaded() else "reference"
    if backend == "cpu":
        if not _cpp_loaded():
            from . import _cpp_error
            raise _unavailable("cpu", f"normface_kernels._C did not load ({_cpp_error})")
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got features on {device}")
    elif backend == "cuda":
        if not has_cuda_kernels():
            raise _unavailable("cuda", "normface_kernels._C was built without CUDA kernels "
                               "(no CUDA toolkit at build time, or NORMFACE_NO_CUDA=1)")
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got features on {device}")
    elif backend == "triton":
        if not has_triton():
            raise _unavailable("triton", _triton_status()[1])
        if device.type != "cuda" and not (device.type == "cpu" and _triton_interpreted()):
            raise ValueError("backend='triton' needs CUDA tensors (or CPU tensors with "
                             f"TRITON_INTERPRET=1), got features on {device}")
    return backend


def _op(name, backend):
    prefix = "triton_" if backend == "triton" else ""
    return getattr(torch.ops.normface, prefix + name)


def _prepare(features, weight, labels, ignore_index, reduction, backend):
    """The checks every loss makes (contract "Bad input"): returns int64 labels, ignore_index as an
    int and the concrete backend."""
    labels = checks.check_inputs(features, weight, labels)
    ignore_index = checks.check_int("ignore_index", ignore_index)
    checks.check_reduction(reduction)
    backend = resolve_backend(backend, features.device)
    if backend == "reference":
        checks.check_labels_range(labels, weight.shape[0], ignore_index)
    return labels, ignore_index, backend


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def l2_normalize(x, eps=1e-12, *, backend="auto"):
    """x / sqrt(sum x^2 + eps) along the last dim (paper eq. 3); gradient is eq. 4.

    x: (..., D) floating. Returns the same shape and dtype.
    """
    eps = checks.check_normalize_inputs(x, eps)
    backend = resolve_backend(backend, x.device)
    if backend == "reference":
        return reference.l2_normalize(x, eps)
    return _op("l2_normalize", backend)(x, eps)


def cosine_logits(features, weight, scale=1.0, *, backend="auto"):
    """(B, C) matrix s * cos(f_i, W_j) for inference and small C, in the input dtype.

    features: (B, D), weight: (C, D). Differentiable in features, weight and a tensor scale.
    """
    checks.check_inputs(features, weight)
    s = checks.scale_tensor(scale, features)
    backend = resolve_backend(backend, features.device)
    if backend == "reference":
        checks.check_scale_value(s)  # the ops check it themselves
        return reference.cosine_logits(features, weight, s).to(features.dtype)
    if backend == "triton" and hasattr(torch.ops.normface, "triton_cosine_logits"):
        return torch.ops.normface.triton_cosine_logits(features, weight, s, 1e-12)
    return torch.ops.normface.cosine_logits(features, weight, s)


def cosine_softmax(features, weight, labels, scale=30.0, *, m1=1.0, m2=0.0, m3=0.0, lam=0.0,
                   normalize_features=True, normalize_weight=True, ignore_index=-100,
                   reduction="mean", backend="auto"):
    """Scaled cosine softmax with the margin family of the contract, without a (B, C) logits matrix.

    features: (B, D) float32/float16/bfloat16 (float64 on CPU); weight: (C, D) same dtype;
    labels: (B,) int64 in [0, C) or ignore_index; scale: float, or 0-dim tensor (learnable).
    m1 (SphereFace, integer > 1), m2 (ArcFace, radians), m3 (CosFace), lam (SphereFace annealing).
    Returns the reduced loss (0-dim) or, with reduction="none", per-sample losses (B,), float32.
    """
    labels, ignore_index, backend = _prepare(features, weight, labels, ignore_index, reduction,
                                             backend)
    m1, m2, m3, lam = checks.check_margins(m1, m2, m3, lam)
    s = checks.scale_tensor(scale, features)
    if backend == "reference":
        checks.check_scale_value(s)  # the ops check it themselves
        loss = reference.cosine_softmax(
            features, weight, labels, s, m1=m1, m2=m2, m3=m3, lam=lam,
            normalize_features=normalize_features, normalize_weight=normalize_weight,
            ignore_index=ignore_index)
    else:
        loss, _ = _op("cosine_softmax_forward", backend)(
            features, weight, labels, s, m1, m2, m3, lam, bool(normalize_features),
            bool(normalize_weight), ignore_index, 0, -1)
    return reduce_loss(loss, labels, ignore_index, reduction)


def c_contrastive(features, weight, labels, *, pos_margin=0.0, neg_margin=1.0, ignore_index=-100,
                  reduction="mean", backend="auto"):
    """C-contrastive loss with class agents (paper eq. 10), d_ij = 2 - 2 cos_ij.

    relu(d_iy - pos_margin) + sum_{j != y_i} relu(neg_margin - d_ij) per sample.
    features: (B, D), weight: (C, D) agents, labels: (B,). Returns 0-dim or (B,) float32.
    """
    labels, ignore_index, backend = _prepare(features, weight, labels, ignore_index, reduction,
                                             backend)
    pos_margin = checks.check_finite("pos_margin", pos_margin)
    neg_margin = checks.check_finite("neg_margin", neg_margin)
    if backend == "reference":
        loss = reference.c_contrastive(features, weight, labels, pos_margin=pos_margin,
                                       neg_margin=neg_margin, ignore_index=ignore_index)
    else:
        loss = _op("c_contrastive", backend)(features, weight, labels, pos_margin, neg_margin,
                                             ignore_index, 0, -1)
    return reduce_loss(loss, labels, ignore_index, reduction)


def c_triplet(features, weight, labels, *, margin=0.8, hardest_only=True, center=False,
              ignore_index=-100, reduction="mean", backend="auto"):
    """C-triplet loss with class agents (paper eq. 11), d_ij = 2 - 2 cos_ij.

    hardest_only: relu(margin + d_iy - min_{k != y} d_ik), else the sum over every k != y;
    center=True adds d_iy ("C-triplet + center"). Returns 0-dim or (B,) float32.
    """
    labels, ignore_index, backend = _prepare(features, weight, labels, ignore_index, reduction,
                                             backend)
    margin = checks.check_finite("margin", margin)
    if backend == "reference":
        loss = reference.c_triplet(features, weight, labels, margin=margin,
                                   hardest_only=hardest_only, center=center,
                                   ignore_index=ignore_index)
    else:
        loss, _ = _op("c_triplet_forward", backend)(
            features, weight, labels, margin, bool(hardest_only), bool(center), ignore_index,
            0, -1)
    return reduce_loss(loss, labels, ignore_index, reduction)


def center_loss(features, weight, labels, *, ignore_index=-100, reduction="mean",
                backend="auto"):
    """Center loss on the hypersphere, d_iy = ||f~_i - W~_y||^2 = 2 - 2 cos_iy per sample."""
    labels, ignore_index, backend = _prepare(features, weight, labels, ignore_index, reduction,
                                             backend)
    if backend == "reference":
        loss = reference.center_loss(features, weight, labels, ignore_index=ignore_index)
    else:
        loss = _op("center_loss", backend)(features, weight, labels, ignore_index, 0, -1)
    return reduce_loss(loss, labels, ignore_index, reduction)
