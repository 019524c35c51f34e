"""Public functional API (docs/contract.md, "Public"): argument checks, backend choice, reduction.

Shapes everywhere: features (B, D), weight (C, D), labels (B,) int64, scale float or 0-dim tensor.
`backend` is "auto" | "reference" | "cpu" | "triton" | "cuda"; every backend computes the same
per-sample losses (float32, float64 for float64 inputs) and the same gradients.
"""


from . import backends, checks, reference
from .backends import BACKENDS, has_cuda_kernels, has_triton  # noqa: F401 (public)
from .checks import REDUCTIONS, data_checks_enabled, set_data_checks  # noqa: F401 (public)
from .reference import reduce_loss, scale_for_loss, softmax_loss_bound  # noqa: F401 (public)


def resolve_backend(backend, device):
    """The concrete backend name for tensors on `device` (backends.resolve); raises naming what
    is missing."""
    return backends.resolve(backend, device).name


def _prepare(features, weight, labels, ignore_index, reduction, backend):
    """The checks every loss makes (contract "Bad input"): returns int64 labels, ignore_index as an
    int and the concrete backend (a backends.Backend)."""
    labels = checks.check_inputs(features, weight, labels)
    ignore_index = checks.check_int("ignore_index", ignore_index)
    checks.check_reduction(reduction)
    backend = backends.resolve(backend, features.device)
    if backend.name == "reference":
        checks.check_labels_range(labels, weight.shape[0], ignore_index)
    return labels, ignore_index, backend


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def l2_normalize(x, eps=checks.EPS, *, backend="auto"):
    """x / sqrt(sum x^2 + eps) along the last dim (paper eq. 3); gradient is eq. 4.

    x: (..., D) floating. Returns the same shape and dtype.
    """
    eps = checks.check_normalize_inputs(x, eps)
    backend = backends.resolve(backend, x.device)
    if backend.name == "reference":
        return reference.l2_normalize(x, eps)
    return backend.op("l2_normalize")(x, eps)


def cosine_logits(features, weight, scale=1.0, *, backend="auto"):
    """(B, C) matrix s * cos(f_i, W_j) for inference and small C, in the input dtype.

    features: (B, D), weight: (C, D). Differentiable in features, weight and a tensor scale.
    """
    checks.check_inputs(features, weight)
    s = checks.scale_tensor(scale, features)
    backend = backends.resolve(backend, features.device)
    if backend.name == "reference":
        checks.check_scale_value(s)  # the ops check it themselves
        return reference.cosine_logits(features, weight, s).to(features.dtype)
    return backend.op("cosine_logits")(features, weight, s)


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
    if backend.name == "reference":
        checks.check_scale_value(s)  # the ops check it themselves
        loss = reference.cosine_softmax(
            features, weight, labels, s, m1=m1, m2=m2, m3=m3, lam=lam,
            normalize_features=normalize_features, normalize_weight=normalize_weight,
            ignore_index=ignore_index)
    else:
        loss, _ = backend.op("cosine_softmax_forward")(
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
    if backend.name == "reference":
        loss = reference.c_contrastive(features, weight, labels, pos_margin=pos_margin,
                                       neg_margin=neg_margin, ignore_index=ignore_index)
    else:
        loss = backend.op("c_contrastive")(features, weight, labels, pos_margin, neg_margin,
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
    if backend.name == "reference":
        loss = reference.c_triplet(features, weight, labels, margin=margin,
                                   hardest_only=hardest_only, center=center,
                                   ignore_index=ignore_index)
    else:
        loss, _ = backend.op("c_triplet_forward")(
            features, weight, labels, margin, bool(hardest_only), bool(center), ignore_index,
            0, -1)
    return reduce_loss(loss, labels, ignore_index, reduction)


def center_loss(features, weight, labels, *, ignore_index=-100, reduction="mean",
                backend="auto"):
    """Center loss on the hypersphere, d_iy = ||f~_i - W~_y||^2 = 2 - 2 cos_iy per sample."""
    labels, ignore_index, backend = _prepare(features, weight, labels, ignore_index, reduction,
                                             backend)
    if backend.name == "reference":
        loss = reference.center_loss(features, weight, labels, ignore_index=ignore_index)
    else:
        loss = backend.op("center_loss")(features, weight, labels, ignore_index, 0, -1)
    return reduce_loss(loss, labels, ignore_index, reduction)
