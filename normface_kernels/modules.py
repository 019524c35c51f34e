"""NormFaceLoss: the classifier agents W, the (learned) scale and the loss, in one module."""

import math

import torch
from torch import nn

from . import checks, functional as F
from .scale import init_scale, scale_in_loss

LOSSES = ("softmax", "c_contrastive", "c_triplet")
AUX_LOSSES = (None, "c_contrastive", "center")


def init_agents(module, rows, embedding_size, num_classes, scale, device, dtype, *,
                scale_init=None, scale_floor=None):
    """Give `module` its agents `weight` (rows, D), its `scale` (a parameter for "learn", else a
    buffer; see scale.init_scale, which reads the margins already set on `module`) and the
    Proposition-3 distortion buffers; shared with the sharded loss (rows: its shard, num_classes:
    the global C, which sets the learned scale's floor)."""
    module.weight = nn.Parameter(torch.empty(rows, embedding_size, device=device, dtype=dtype))
    init_scale(module, scale, num_classes, scale_init=scale_init, scale_floor=scale_floor,
               device=device)
    module.register_buffer("agent_distortion", torch.zeros(rows, device=device))
    module.register_buffer("distortion_seen",
                           torch.zeros(rows, dtype=torch.bool, device=device))


def reset_agents(module):
    # Only the direction of each agent matters once normalized; a uniform init spreads them.
    nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    module.agent_distortion.zero_()
    module.distortion_seen.zero_()


@torch.no_grad()
def update_agent_distortion(module, y, d, valid):
    """Proposition 3: per class, a moving average of the batch mean of d(f_i, W_y)^2.

    y: (N,) row indices into module.weight of the samples' classes (any value where `valid` is
    False); d: (N,) their distances; valid: (N,) bool, the samples that count. The other samples
    add exact zeros at row 0 (selects, not a boolean index, which would read the mask on the host:
    a host-device sync in every CUDA training step).
    A class seen for the first time starts at its batch mean instead of decaying from 0.
    """
    buf = module.agent_distortion
    rows = torch.where(valid, y, torch.zeros_like(y))
    zero = torch.zeros((), dtype=buf.dtype, device=buf.device)
    num = torch.zeros_like(buf).index_add_(0, rows, torch.where(valid, d.to(buf.dtype), zero))
    cnt = torch.zeros_like(buf).index_add_(0, rows, valid.to(buf.dtype))
    present = cnt > 0
    batch_mean = num / cnt.clamp(min=1)
    momentum = torch.where(module.distortion_seen, module.distortion_momentum, 0.0)
    updated = momentum * buf + (1 - momentum) * batch_mean
    buf.copy_(torch.where(present, updated, buf))
    module.distortion_seen |= present


def distortion_per_class(module):
    """(rows,) float32: agent_distortion where a class has been seen in training, NaN where
    it never has (a copy: reading it does not change the buffers)."""
    nan = torch.full_like(module.agent_distortion, math.nan)
    return torch.where(module.distortion_seen, module.agent_distortion, nan)


class NormFaceLoss(nn.Module):
    """Loss over normalized features and class agents, for training embeddings.

    Args:
        embedding_size: D. num_classes: C (owns ``weight`` of shape (C, D)).
        loss: "softmax" (cosine softmax with ``margins``), "c_contrastive" or "c_triplet".
        scale: "learn" (the default: a parameter, see below) or a fixed float > 0 (a buffer,
            used as given; 0, negative or non-finite values raise ValueError).
        scale_floor, scale_init: for scale="learn" only. The floor defaults to the smallest
            scale at which the loss can still fall to 0.1 at Proposition 2's optimum with these
            margins (``scale.learned_scale_floor``; e.g. 9.8 for C=2,000 without a margin,
            13.1 for C=50,000, 20.1 for C=50,000 with CosFace's m3=0.35), or the paper's 0.01
            when a side is not normalized; the start defaults to max(10, floor).
            ``scale_init=10.0, scale_floor=0.01`` is the paper's layer exactly (section 3.3),
            which trains NormFace without a margin but shrinks to the floor and stalls at ln C
            with any margin.
        margins: (m1, m2, m3) -- SphereFace, ArcFace, CosFace margins of the contract.
        aux: None, "c_contrastive" or "center": a second term weighted by ``aux_weight``
            (the paper's best row is softmax + 0.01 * C-contrastive).
        distortion_momentum: momentum of the per-class moving average of
            d(f, W_y)^2 = 2 - 2 cos (Proposition 3's bound on the agent approximation), read
            as ``distortion_per_class`` (C,) and ``mean_distortion``.
        Other keywords are passed to the loss functions (lam, normalize_features,
        normalize_weight, pos_margin, neg_margin, triplet_margin, hardest_only, center,
        ignore_index, reduction, backend).

    forward(features (B, D), labels (B,)) -> loss (0-dim, or (B,) with reduction="none").

    The learned scale: the loss uses ``effective_scale`` = max(scale, floor), and the gradient
    reaches ``scale`` except where it is at or below the floor and a descent step would lower
    it further (a projected gradient). A plain clamp would give it gradient 0 at the floor for
    good; here it rises again as soon as the loss prefers a larger scale. Measured on a
    2,000-class toy (python_tests/test_training.py, where the numbers are printed): with the
    paper's layer every margin ends at ln C = 7.6 with s = 0.01; with the defaults every
    margin trains (the README has the table).
    """

    def __init__(self, embedding_size, num_classes, *, loss="softmax", scale="learn",
                 margins=(1.0, 0.0, 0.0), aux=None, aux_weight=0.01, lam=0.0,
                 normalize_features=True, normalize_weight=True, pos_margin=0.0,
                 neg_margin=1.0, triplet_margin=0.8, hardest_only=True, center=False,
                 ignore_index=-100, reduction="mean", backend="auto", distortion_momentum=0.99,
                 scale_init=None, scale_floor=None, device=None, dtype=None):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if aux not in AUX_LOSSES:
            raise ValueError(f"aux must be one of {AUX_LOSSES}, got {aux!r}")
        if embedding_size <= 0 or num_classes <= 0:
            raise ValueError(f"embedding_size and num_classes must be > 0, got "
                             f"{embedding_size} and {num_classes}")
        if len(margins) != 3:
            raise ValueError(f"margins must be (m1, m2, m3), got {margins!r}")
        if not 0.0 <= distortion_momentum < 1.0:
            raise ValueError(f"distortion_momentum must be in [0, 1), got {distortion_momentum}")
        checks.check_reduction(reduction)
        self.loss, self.aux, self.aux_weight = loss, aux, float(aux_weight)
        self.m1, self.m2, self.m3, self.lam = checks.check_margins(*margins, lam)
        self.normalize_features, self.normalize_weight = normalize_features, normalize_weight
        self.pos_margin, self.neg_margin = float(pos_margin), float(neg_margin)
        self.triplet_margin, self.hardest_only, self.center = (
            float(triplet_margin), hardest_only, center)
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend
        self.distortion_momentum = float(distortion_momentum)

        init_agents(self, num_classes, embedding_size, num_classes, scale, device, dtype,
                    scale_init=scale_init, scale_floor=scale_floor)
        self.reset_parameters()

    def reset_parameters(self):
        reset_agents(self)

    @property
    def effective_scale(self):
        """The scale the loss uses (0-dim): the fixed one, or max(learned scale, scale_floor)
        with the projected gradient described in the class docstring."""
        return scale_in_loss(self)

    @property
    def distortion_per_class(self):
        """(C,) float32: per class, the moving average of d(f, W_y)^2 over its training samples
        (Proposition 3); NaN for a class not seen in training yet."""
        return distortion_per_class(self)

    @property
    def mean_distortion(self):
        """float: the mean of distortion_per_class over the classes seen so far (NaN before
        any training step)."""
        seen = self.distortion_seen
        if not bool(seen.any()):
            return math.nan
        return float(self.agent_distortion[seen].double().mean())

    def _main_loss(self, features, labels):
        common = dict(ignore_index=self.ignore_index, reduction=self.reduction,
                      backend=self.backend)
        if self.loss == "softmax":
            return F.cosine_softmax(
                features, self.weight, labels, self.effective_scale, m1=self.m1, m2=self.m2,
                m3=self.m3, lam=self.lam, normalize_features=self.normalize_features,
                normalize_weight=self.normalize_weight, **common)
        if self.loss == "c_contrastive":
            return F.c_contrastive(features, self.weight, labels, pos_margin=self.pos_margin,
                                   neg_margin=self.neg_margin, **common)
        return F.c_triplet(features, self.weight, labels, margin=self.triplet_margin,
                           hardest_only=self.hardest_only, center=self.center, **common)

    def _aux_loss(self, features, labels):
        common = dict(ignore_index=self.ignore_index, reduction=self.reduction,
                      backend=self.backend)
        if self.aux == "c_contrastive":
            return F.c_contrastive(features, self.weight, labels, pos_margin=self.pos_margin,
                                   neg_margin=self.neg_margin, **common)
        return F.center_loss(features, self.weight, labels, **common)

    @torch.no_grad()
    def _update_distortion(self, features, labels):
        """Proposition 3: moving average, per class, of the batch mean of d(f_i, W_y)^2."""
        d = F.center_loss(features.detach(), self.weight.detach(), labels,
                          ignore_index=self.ignore_index, reduction="none", backend=self.backend)
        # A label outside [0, C) (let through when the data checks are off) is skipped, never an
        # index out of bounds.
        valid = (labels != self.ignore_index) & (labels >= 0) & (labels < self.weight.shape[0])
        update_agent_distortion(self, labels, d, valid)

    def forward(self, features, labels):
        loss = self._main_loss(features, labels)
        if self.aux is not None:
            loss = loss + self.aux_weight * self._aux_loss(features, labels)
        if self.training and not torch.compiler.is_compiling():
            self._update_distortion(features, labels.long())
        return loss

    def extra_repr(self):
        c, d = self.weight.shape
        return (f"embedding_size={d}, num_classes={c}, loss={self.loss!r}, "
                f"margins=({self.m1}, {self.m2}, {self.m3}), aux={self.aux!r}, "
                f"backend={self.backend!r}")


def sphereface_lambda(step, base=1000.0, gamma=0.12, minimum=5.0):
    """SphereFace's annealing of ``lam`` (the SphereFace paper's schedule and defaults):
    lam = max(minimum, base / (1 + gamma * step)), from 1000 (almost the plain softmax) down to
    5. Set ``criterion.lam = sphereface_lambda(step)`` before each training step."""
    return max(minimum, base / (1.0 + gamma * step))
