"""NormFaceLoss: the classifier agents W, the (learned) scale and the loss, in one module."""

import math

import torch
from torch import nn

from . import checks, functional as F

LOSSES = ("softmax", "c_contrastive", "c_triplet")
AUX_LOSSES = (None, "c_contrastive", "center")
# Paper section 3.3: the scale layer starts at 10 and is bounded below (here at 0.01).
SCALE_INIT = 10.0
SCALE_FLOOR = 0.01


def init_agents(module, rows, embedding_size, scale, device, dtype):
    """Give `module` its agents `weight` (rows, D), its `scale` (a parameter for "learn", else a
    buffer) and the Proposition-3 distortion buffers; shared with the sharded loss."""
    module.weight = nn.Parameter(torch.empty(rows, embedding_size, device=device, dtype=dtype))
    if scale == "learn":
        module.scale = nn.Parameter(torch.tensor(SCALE_INIT, device=device))
    else:
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be 'learn' or a finite float, got {scale!r}")
        module.register_buffer("scale", torch.tensor(float(scale), device=device))
    module.register_buffer("agent_distortion", torch.zeros(rows, device=device))
    module.register_buffer("distortion_seen",
                           torch.zeros(rows, dtype=torch.bool, device=device))


def reset_agents(module):
    # Only the direction of each agent matters once normalized; a uniform init spreads them.
    nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    module.agent_distortion.zero_()
    module.distortion_seen.zero_()


@torch.no_grad()
def update_agent_distortion(module, y, d):
    """Proposition 3: per class, a moving average of the batch mean of d(f_i, W_y)^2.

    y: (N,) row indices into module.weight of the samples' classes; d: (N,) their distances.
    A class seen for the first time starts at its batch mean instead of decaying from 0.
    """
    buf = module.agent_distortion
    num = torch.zeros_like(buf).index_add_(0, y, d.to(buf.dtype))
    cnt = torch.zeros_like(buf).index_add_(0, y, torch.ones_like(d, dtype=buf.dtype))
    present = cnt > 0
    batch_mean = num / cnt.clamp(min=1)
    momentum = torch.where(module.distortion_seen, module.distortion_momentum, 0.0)
    updated = momentum * buf + (1 - momentum) * batch_mean
    buf.copy_(torch.where(present, updated, buf))
    module.distortion_seen |= present


class NormFaceLoss(nn.Module):
    """Loss over normalized features and class agents, for training embeddings.

    Args:
        embedding_size: D. num_classes: C (owns ``weight`` of shape (C, D)).
        loss: "softmax" (cosine softmax with ``margins``), "c_contrastive" or "c_triplet".
        scale: "learn" (a parameter initialised to 10, kept above 0.01) or a fixed float.
        margins: (m1, m2, m3) -- SphereFace, ArcFace, CosFace margins of SPEC.md.
        aux: None, "c_contrastive" or "center": a second term weighted by ``aux_weight``
            (the paper's best row is softmax + 0.01 * C-contrastive).
        distortion_momentum: momentum of ``agent_distortion``, the per-class moving average of
            d(f, W_y)^2 = 2 - 2 cos (Proposition 3's bound on the agent approximation).
        Other keywords are passed to the loss functions (lam, normalize_features,
        normalize_weight, pos_margin, neg_margin, triplet_margin, hardest_only, center,
        ignore_index, reduction, backend).

    forward(features (B, D), labels (B,)) -> loss (0-dim, or (B,) with reduction="none").
    """

    def __init__(self, embedding_size, num_classes, *, loss="softmax", scale="learn",
                 margins=(1.0, 0.0, 0.0), aux=None, aux_weight=0.01, lam=0.0,
                 normalize_features=True, normalize_weight=True, pos_margin=0.0,
                 neg_margin=1.0, triplet_margin=0.8, hardest_only=True, center=False,
                 ignore_index=-100, reduction="mean", backend="auto", distortion_momentum=0.99,
                 device=None, dtype=None):
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
        self.m1, self.m2, self.m3 = (float(m) for m in margins)
        self.lam = float(lam)
        self.normalize_features, self.normalize_weight = normalize_features, normalize_weight
        self.pos_margin, self.neg_margin = float(pos_margin), float(neg_margin)
        self.triplet_margin, self.hardest_only, self.center = (
            float(triplet_margin), hardest_only, center)
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend
        self.distortion_momentum = float(distortion_momentum)

        init_agents(self, num_classes, embedding_size, scale, device, dtype)
        self.reset_parameters()

    def reset_parameters(self):
        reset_agents(self)

    @property
    def effective_scale(self):
        """The scale used in the loss: the parameter, bounded below by 0.01 (paper's layer)."""
        return self.scale.clamp(min=SCALE_FLOOR)

    @property
    def mean_distortion(self):
        """Mean over the classes seen so far of the moving average of d(f, W_y)^2."""
        seen = self.distortion_seen
        if not bool(seen.any()):
            return 0.0
        return float(self.agent_distortion[seen].mean())

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
        valid = labels != self.ignore_index
        update_agent_distortion(self, labels[valid], d[valid])

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
