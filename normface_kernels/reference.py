"""The executable form of docs/contract.md: plain PyTorch, clear rather than fast.

Every other backend (cpu, triton, cuda) is tested against these functions. They build the full
(B, C) cosine matrix and let autograd produce every gradient, so they are the ground truth for
values *and* derivatives. Shapes:

    features  (B, D)   one embedding per sample (paper: f)
    weight    (C, D)   one agent per class (paper: columns of W; here rows, like nn.Linear)
    labels    (B,)     int64 class index in [0, C) or ignore_index
    scale     float or 0-dim tensor (paper's s; a tensor with requires_grad is the learned scale)

Per-sample losses are computed in float32 (float64 for float64 inputs) and returned in that
dtype; ``reduce_loss`` applies "mean" | "sum" | "none". Within ``with input_precision():`` every
function computes in its inputs' own dtype instead: plain PyTorch in float16 or bfloat16, the
yardstick of the contract's tolerance rule ("Backends").
"""

import contextlib
import math

import torch

from . import checks

# The contract's constants: the eps of every norm, sqrt(sum x^2 + EPS), and the clamp of a
# cosine before arccos, theta = arccos(clamp(cos, -1 + COS_CLAMP, 1 - COS_CLAMP)).
from .checks import COS_CLAMP, EPS

_IN_INPUT_PRECISION = False


def acc_dtype(x):
    """The dtype the functions below compute in for input x: float32 for every input dtype,
    float64 stays float64 (gradcheck); x's own dtype inside ``input_precision()``."""
    return x.dtype if _IN_INPUT_PRECISION else checks.acc_dtype(x.dtype)


@contextlib.contextmanager
def input_precision():
    """Within this context the functions of this module compute in their inputs' own dtype (no
    float32 accumulation for 16-bit inputs): the plain low-precision PyTorch computation whose
    error the tolerance rule of docs/contract.md "Backends" allows the kernels twice of."""
    global _IN_INPUT_PRECISION
    previous, _IN_INPUT_PRECISION = _IN_INPUT_PRECISION, True
    try:
        yield
    finally:
        _IN_INPUT_PRECISION = previous


def norm(x, eps=EPS):
    """(..., 1) ||x|| along the last dim with eps inside the root, as every backend defines it:
    sqrt(sum x^2 + eps)."""
    return torch.sqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def l2_normalize(x, eps=EPS):
    """x / sqrt(sum x^2 + eps) along the last dim (paper eq. 3); result in x's dtype."""
    xa = x.to(acc_dtype(x))
    return (xa / norm(xa, eps)).to(x.dtype)


def cosine_logits(features, weight, scale=1.0, eps=EPS):
    """(B, C) matrix s * cos(f_i, W_j), in the accumulation dtype."""
    f = features.to(acc_dtype(features))
    w = weight.to(f.dtype)
    return scale * ((f / norm(f, eps)) @ (w / norm(w, eps)).t())


def psi(cos_target, m1=1.0, m2=0.0, m3=0.0):
    """The margin function of the contract, monotone and continuous on theta in [0, pi].

    psi(theta) = (-1)^k cos(m1 theta + m2) - 2k - m3,  k = floor((m1 theta + m2) / pi).
    Without an angular margin (m1 = 1, m2 = 0) cos(arccos(c)) is c itself, so psi is computed as
    clamp(c) - m3 directly: the same number, without the round trip through arccos.
    """
    return psi_and_derivative(cos_target, m1, m2, m3)[0]


def psi_and_derivative(cos_target, m1=1.0, m2=0.0, m3=0.0):
    """(psi, d psi / d cos) at cos_target: the derivative in closed form, for the backends whose
    backward is written out (the Triton target terms); 0 outside the clamp, as autograd of psi
    gives. The reference itself differentiates psi with autograd."""
    lo, hi = -1.0 + COS_CLAMP, 1.0 - COS_CLAMP
    c = cos_target.clamp(lo, hi)
    inside = ((cos_target >= lo) & (cos_target <= hi)).to(c.dtype)
    if m1 == 1.0 and m2 == 0.0:
        return c - m3, inside
    theta = torch.arccos(c)
    angle = m1 * theta + m2
    k = torch.floor(angle / math.pi).detach()
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k
    dpsi = inside * sign * m1 * torch.sin(angle) / torch.sqrt(1.0 - c * c)
    return sign * torch.cos(angle) - 2.0 * k - m3, dpsi.detach()


def _valid(labels, ignore_index):
    return labels != ignore_index


def _keep_valid_rows(features, labels, ignore_index):
    """Features with the rows of ignored samples replaced by zeros, and the valid mask. contract: an
    ignored sample contributes nothing, even when its features are NaN or inf; zeroing the row
    before any arithmetic keeps 0 * NaN out of every gradient (its own gradient is exactly 0)."""
    valid = _valid(labels, ignore_index)
    return torch.where(valid[:, None], features, torch.zeros((), dtype=features.dtype,
                                                             device=features.device)), valid


def softmax_logits(features, weight, labels, scale, *, m1=1.0, m2=0.0, m3=0.0, lam=0.0,
                   normalize_features=True, normalize_weight=True, ignore_index=-100,
                   class_start=0, columns=None, acc=None, eps=EPS):
    """The logits of the contract ("Cosine softmax ..."): z_ij = s a_i b_j cos_ij, and in the
    target column z_iy = s a_i b_y t_i.

    weight (C, D) holds the classes class_start .. class_start + C - 1 (a shard of the classes,
    as the ops' class_start / num_classes take it; all of them by default). columns (K,) picks
    rows of weight (local indices; default all). Computed in `acc` (default the accumulation
    dtype: float32, float64 for float64 inputs). Returns z (B, K), z_y (B,) and has (B,): the
    row's label is not ignore_index and is a class of this weight (only those rows have a target
    column; z_y means nothing elsewhere).
    """
    acc = acc_dtype(features) if acc is None else acc
    f, w = features.to(acc), weight.to(acc)
    s = scale.to(acc) if torch.is_tensor(scale) else scale
    f_norm, w_norm = norm(f, eps), norm(w, eps)          # (B, 1), (C, 1)
    f_unit, w_unit = f / f_norm, w / w_norm
    a = torch.ones_like(f_norm) if normalize_features else f_norm
    b = torch.ones_like(w_norm) if normalize_weight else w_norm

    local = labels - class_start
    has = (labels != ignore_index) & (local >= 0) & (local < weight.shape[0])
    y = torch.where(has, local, torch.zeros_like(local))
    # (B, 1); a batched product, so it rounds as the (B, C) product does (16-bit: float32 sums)
    cos_y = (f_unit[:, None, :] @ w_unit[y][:, :, None])[:, 0]
    t = (lam * cos_y + psi(cos_y, m1, m2, m3)) / (1.0 + lam)
    z_y = s * a * b[y] * t                                 # (B, 1)

    cols = slice(None) if columns is None else columns
    ids = torch.arange(weight.shape[0], device=weight.device) if columns is None else columns
    z = s * a * b[cols].t() * (f_unit @ w_unit[cols].t())  # (B, K)
    target = (y[:, None] == ids[None, :]) & has[:, None]
    return torch.where(target, z_y, z), z_y[:, 0], has


def softmax_loss_lse(features, weight, labels, scale, *, ignore_index=-100, **kwargs):
    """(loss, lse), (B,) each, as the op cosine_softmax_forward returns them: lse_i the
    logsumexp of z over the classes of weight, for every row (ignored ones included);
    loss_i = lse_i - z_iy, or lse_i alone when the target is in another shard, and 0 for an
    ignored row. Keyword arguments of softmax_logits (but columns)."""
    z, z_y, has = softmax_logits(features, weight, labels, scale, ignore_index=ignore_index,
                                 **kwargs)
    lse = torch.logsumexp(z, dim=1)
    loss = lse - torch.where(has, z_y, torch.zeros_like(z_y))
    return torch.where(labels != ignore_index, loss, torch.zeros_like(loss)), lse


def cosine_softmax(features, weight, labels, scale=30.0, *, m1=1.0, m2=0.0, m3=0.0, lam=0.0,
                   normalize_features=True, normalize_weight=True, ignore_index=-100, eps=EPS):
    """Per-sample loss_i = logsumexp_j z_ij - z_iy (contract: "Cosine softmax ..."), (B,)."""
    features, _ = _keep_valid_rows(features, labels, ignore_index)
    loss, _ = softmax_loss_lse(features, weight, labels, scale, m1=m1, m2=m2, m3=m3, lam=lam,
                               normalize_features=normalize_features,
                               normalize_weight=normalize_weight, ignore_index=ignore_index,
                               eps=eps)
    return loss


def _agent_distance(features, weight, eps):
    """d_ij = ||f~_i - W~_j||^2 = 2 - 2 cos_ij (paper section 4), (B, C)."""
    return 2.0 - 2.0 * cosine_logits(features, weight, 1.0, eps)


def _agent_setup(features, weight, labels, ignore_index, eps):
    """d (B, C), the valid mask, the one-hot of the targets and d_iy (ignored rows zeroed)."""
    features, _ = _keep_valid_rows(features, labels, ignore_index)
    d = _agent_distance(features, weight, eps)
    return (d,) + _target_distance(d, labels, ignore_index)


def _target_distance(d, labels, ignore_index):
    valid = _valid(labels, ignore_index)
    y = torch.where(valid, labels, torch.zeros_like(labels))
    onehot = torch.nn.functional.one_hot(y, d.shape[1]).to(torch.bool)
    return valid, onehot, d.gather(1, y[:, None])[:, 0]


def c_contrastive(features, weight, labels, *, pos_margin=0.0, neg_margin=1.0, ignore_index=-100,
                  eps=EPS):
    """Paper eq. 10 with agents: relu(d_iy - pos_margin) + sum_{j != y} relu(neg_margin - d_ij)."""
    d, valid, onehot, d_y = _agent_setup(features, weight, labels, ignore_index, eps)
    negatives = torch.where(onehot, torch.zeros_like(d), torch.relu(neg_margin - d)).sum(dim=1)
    loss = torch.relu(d_y - pos_margin) + negatives
    return torch.where(valid, loss, torch.zeros_like(loss))


def c_triplet(features, weight, labels, *, margin=0.8, hardest_only=True, center=False,
              ignore_index=-100, eps=EPS):
    """Paper eq. 11 with agents; hardest_only uses the nearest wrong agent (first on ties)."""
    d, valid, onehot, d_y = _agent_setup(features, weight, labels, ignore_index, eps)
    if hardest_only:
        d_neg = torch.where(onehot, torch.full_like(d, math.inf), d)
        hardest = d_neg.argmin(dim=1, keepdim=True)      # first index among equal distances
        d_min = d_neg.gather(1, hardest)[:, 0]            # NaN wins argmin, so NaN propagates
        loss = torch.relu(margin + d_y - d_min)
    else:
        hinge = torch.relu(margin + d_y[:, None] - d)
        loss = torch.where(onehot, torch.zeros_like(hinge), hinge).sum(dim=1)
    if center:
        loss = loss + d_y
    return torch.where(valid, loss, torch.zeros_like(loss))


def center_loss(features, weight, labels, *, ignore_index=-100, eps=EPS):
    """Center loss on the hypersphere: d_iy = 2 - 2 cos_iy."""
    _, valid, _, d_y = _agent_setup(features, weight, labels, ignore_index, eps)
    return torch.where(valid, d_y, torch.zeros_like(d_y))


def reduce_loss(loss, labels, ignore_index, reduction):
    """'mean' over non-ignored samples (0 when there are none), 'sum', or 'none'."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        count = (labels != ignore_index).sum().clamp(min=1)
        return loss.sum() / count.to(loss.dtype)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def softmax_loss_bound(num_classes, scale):
    """Proposition 2: log(1 + (n - 1) exp(-n / (n - 1) * s)), the lowest loss reachable at
    scale s."""
    n = float(num_classes)
    if n < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return math.log1p((n - 1.0) * math.exp(-n / (n - 1.0) * float(scale)))


def scale_for_loss(num_classes, target_loss):
    """The smallest s with softmax_loss_bound(n, s) <= target (Proposition 2 solved for s)."""
    n = float(num_classes)
    if n < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not target_loss > 0:
        raise ValueError(f"target_loss must be > 0, got {target_loss}")
    # bound(s) <= L  <=>  s >= (n-1)/n * log((n-1) / expm1(L)); the bound decreases in s.
    return max(0.0, (n - 1.0) / n * math.log((n - 1.0) / math.expm1(target_loss)))
