"""NormFaceLoss: the classifier agents W, the (learned) scale and the loss, in one module.

``LossModule`` is what NormFaceLoss and the sharded loss (normface_kernels.distributed) share:
the options (losses.LossOptions, shown as attributes), the agents and their Proposition-3
distortion, the scale (scale.py) and ``effective_scale``. The losses themselves are in
losses.LOSS_TABLE.
"""

import dataclasses
import math

import torch
from torch import nn

from . import functional as F
from .losses import DEFAULTS, LOSS_TABLE, OPTION_NAMES, LossOptions
from .scale import init_scale, scale_in_loss


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


def _option_attribute(name):
    def get(self):
        return getattr(self.options, name)

    def set_(self, value):  # the options are frozen: a new object, as given (checked on use)
        self.options = dataclasses.replace(self.options, **{name: value})

    return property(get, set_, doc=f"options.{name} (losses.LossOptions)")


class LossModule(nn.Module):
    """The part of NormFaceLoss and ShardedNormFaceLoss that does not depend on sharding.

    ``options`` (losses.LossOptions) holds the loss settings; each of its fields reads (and
    writes: ``criterion.lam = sphereface_lambda(step)``) as an attribute of the module.
    """

    def __init__(self, options):
        super().__init__()
        self.options = options

    @staticmethod
    def check_sizes(embedding_size, num_classes):
        if embedding_size <= 0 or num_classes <= 0:
            raise ValueError(f"embedding_size and num_classes must be > 0, got "
                             f"{embedding_size} and {num_classes}")

    def init_agents(self, rows, embedding_size, num_classes, scale, device, dtype, *,
                    scale_init=None, scale_floor=None):
        """The agents `weight` (rows, D), the `scale` (a parameter for "learn", else a buffer;
        see scale.init_scale, which reads the margins of the options) and the Proposition-3
        distortion buffers (rows: the classes this module owns, num_classes: the global C, which
        sets the learned scale's floor); then reset_parameters."""
        self.weight = nn.Parameter(torch.empty(rows, embedding_size, device=device, dtype=dtype))
        init_scale(self, scale, num_classes, scale_init=scale_init, scale_floor=scale_floor,
                   device=device)
        self.register_buffer("agent_distortion", torch.zeros(rows, device=device))
        self.register_buffer("distortion_seen",
                             torch.zeros(rows, dtype=torch.bool, device=device))
        self.reset_parameters()

    def reset_parameters(self):
        # Only the direction of each agent matters once normalized; a uniform init spreads them
        # (fan_in = D: the same distribution for a shard of the classes).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.agent_distortion.zero_()
        self.distortion_seen.zero_()

    @property
    def effective_scale(self):
        """The scale the loss uses (0-dim): the fixed one, or max(learned scale, scale_floor)
        with the projected gradient of scale.py (a bound, not a dead zone)."""
        return scale_in_loss(self)

    @property
    def distortion_per_class(self):
        """(rows,) float32: per class this module owns, the moving average of d(f, W_y)^2 over
        its training samples (Proposition 3); NaN for a class not seen in training yet (a copy:
        reading it does not change the buffers; no collective)."""
        nan = torch.full_like(self.agent_distortion, math.nan)
        return torch.where(self.distortion_seen, self.agent_distortion, nan)

    @torch.no_grad()
    def _update_distortion(self, features, labels, class_start=0):
        """Proposition 3's per-class moving average of d(f_i, W_y)^2 for the classes
        [class_start, class_start + rows) this module owns. A label outside them (another
        rank's, ignored, or out of range with the data checks off) is skipped, never an index
        out of bounds."""
        local = labels - class_start
        is_local = (labels != self.ignore_index) & (local >= 0) & (local < self.weight.shape[0])
        y = torch.where(is_local, local, -1)
        d = F.center_loss(features.detach(), self.weight.detach(), y, ignore_index=-1,
                          reduction="none", backend=self.backend)
        update_agent_distortion(self, y, d, is_local)


for _name in OPTION_NAMES:
    setattr(LossModule, _name, _option_attribute(_name))


class NormFaceLoss(LossModule):
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

    def __init__(self, embedding_size, num_classes, *, loss=DEFAULTS.loss, scale="learn",
                 margins=DEFAULTS.margins, aux=DEFAULTS.aux, aux_weight=DEFAULTS.aux_weight,
                 lam=DEFAULTS.lam, normalize_features=DEFAULTS.normalize_features,
                 normalize_weight=DEFAULTS.normalize_weight, pos_margin=DEFAULTS.pos_margin,
                 neg_margin=DEFAULTS.neg_margin, triplet_margin=DEFAULTS.triplet_margin,
                 hardest_only=DEFAULTS.hardest_only, center=DEFAULTS.center,
                 ignore_index=DEFAULTS.ignore_index, reduction=DEFAULTS.reduction,
                 backend=DEFAULTS.backend, distortion_momentum=DEFAULTS.distortion_momentum,
                 scale_init=None, scale_floor=None, device=None, dtype=None):
        options = LossOptions.from_arguments(locals())  # the option keywords above
        super().__init__(options)
        self.check_sizes(embedding_size, num_classes)
        self.init_agents(num_classes, embedding_size, num_classes, scale, device, dtype,
                         scale_init=scale_init, scale_floor=scale_floor)

    @property
    def mean_distortion(self):
        """float: the mean of distortion_per_class over the classes seen so far (NaN before
        any training step)."""
        seen = self.distortion_seen
        if not bool(seen.any()):
            return math.nan
        return float(self.agent_distortion[seen].double().mean())

    def _term(self, name, features, labels):
        entry = LOSS_TABLE[name]
        scale = self.effective_scale if entry.takes_scale else None
        return entry(self.options, features, self.weight, labels, scale)

    def forward(self, features, labels):
        loss = self._term(self.loss, features, labels)
        if self.aux is not None:
            loss = loss + self.aux_weight * self._term(self.aux, features, labels)
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
