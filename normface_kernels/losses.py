"""The losses of the loss modules, in one place: their options and one table.

``LossOptions``: the loss, its margins and every other loss keyword of the constructors of
NormFaceLoss and ShardedNormFaceLoss, as one frozen object checked once (``validate``). Both
modules keep theirs in ``module.options`` and show its fields as attributes (``criterion.lam =
x`` replaces the options).

``LOSS_TABLE``: per loss name ("softmax", "c_contrastive", "c_triplet", and "center", which is
only an aux term), a ``LossEntry`` with

- ``function``: its public function (functional.py), which NormFaceLoss calls;
- ``op``: the op that function calls (``torch.ops.normface.<op>``, ``triton_<op>`` on the
  Triton backend);
- ``shard_terms``: what one rank of ShardedNormFaceLoss computes on its shard of the classes:
  a few per-row partials (B,) each;
- ``shard_merge``: how every rank's partials (R, T, B) combine into the per-sample loss of the
  global batch, exactly (see normface_kernels/distributed/__init__.py for the formulas).

Both modules dispatch through this table only.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from . import checks, reference
from . import functional as F

LOSSES = ("softmax", "c_contrastive", "c_triplet")
AUX_LOSSES = (None, "c_contrastive", "center")


# ---------------------------------------------------------------------------------------------
# The options
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossOptions:
    """Everything the loss of a NormFaceLoss / ShardedNormFaceLoss computes with, but the scale
    and the agents. Defaults are the constructors' (and docs/contract.md's)."""

    loss: str = "softmax"
    aux: Optional[str] = None
    aux_weight: float = 0.01
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    lam: float = 0.0
    normalize_features: bool = True
    normalize_weight: bool = True
    pos_margin: float = 0.0
    neg_margin: float = 1.0
    triplet_margin: float = 0.8
    hardest_only: bool = True
    center: bool = False
    ignore_index: int = -100
    reduction: str = "mean"
    backend: str = "auto"
    distortion_momentum: float = 0.99

    @property
    def margins(self):
        """(m1, m2, m3), as the constructors take them."""
        return (self.m1, self.m2, self.m3)

    @classmethod
    def from_arguments(cls, arguments):
        """The validated options of a constructor's arguments (a mapping, e.g. its locals():
        the option names and ``margins``; other names are not read)."""
        margins = arguments["margins"]
        if len(margins) != 3:
            raise ValueError(f"margins must be (m1, m2, m3), got {margins!r}")
        m1, m2, m3 = margins
        names = [field.name for field in dataclasses.fields(cls)]
        return cls(m1=m1, m2=m2, m3=m3, **{name: arguments[name] for name in names
                                           if name not in ("m1", "m2", "m3")}).validate()

    def validate(self):
        """These options checked (ValueError naming the argument, contract "Bad input") and
        normalized (floats, bools, an int ignore_index). The hinge margins are checked by the
        functions and ops at the first forward, as for a direct call."""
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.aux not in AUX_LOSSES:
            raise ValueError(f"aux must be one of {AUX_LOSSES}, got {self.aux!r}")
        if not 0.0 <= self.distortion_momentum < 1.0:
            raise ValueError(f"distortion_momentum must be in [0, 1), got "
                             f"{self.distortion_momentum}")
        checks.check_reduction(self.reduction)
        m1, m2, m3, lam = checks.check_margins(self.m1, self.m2, self.m3, self.lam)
        return dataclasses.replace(
            self, aux_weight=float(self.aux_weight), m1=m1, m2=m2, m3=m3, lam=lam,
            normalize_features=bool(self.normalize_features),
            normalize_weight=bool(self.normalize_weight), pos_margin=float(self.pos_margin),
            neg_margin=float(self.neg_margin), triplet_margin=float(self.triplet_margin),
            hardest_only=bool(self.hardest_only), center=bool(self.center),
            ignore_index=checks.check_int("ignore_index", self.ignore_index),
            distortion_momentum=float(self.distortion_momentum))


OPTION_NAMES = tuple(field.name for field in dataclasses.fields(LossOptions))
DEFAULTS = LossOptions()


# ---------------------------------------------------------------------------------------------
# One step of the sharded loss, as the table's shard functions see it
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardStep:
    """One forward of ShardedNormFaceLoss on this rank (built by it; the collectives come in as
    functions, so that this module needs no process group)."""

    options: LossOptions
    op: Callable            # name -> the op of the backend (backends.Backend.op)
    features: torch.Tensor  # (B, D) the global batch
    weight: torch.Tensor    # (n, D) the agents this rank uses (its shard, or the sampled ones)
    labels: torch.Tensor    # (B,) the labels the ops get (see ShardedNormFaceLoss._sample_shard)
    shard: tuple            # the ops' trailing (ignore_index, class_start, num_classes)
    valid: torch.Tensor     # (B,) bool: the label is not ignore_index
    labels_all: torch.Tensor    # (B,) global class ids
    class_starts: torch.Tensor  # (R,) the first class of every rank
    scale: Callable         # () -> the scale tensor, replicated across the shards
    gather: Callable        # x (...) -> (R, ...) every rank's x (replicated, differentiable)
    copy_to_shards: Callable    # a replicated x that every shard uses (gradient all-reduced)
    triplet_block_elems: int    # c_triplet without hardest_only: (B x agents) per block


# ---------------------------------------------------------------------------------------------
# Per loss: the shard's partials and their merge
# ---------------------------------------------------------------------------------------------

def _sum_over_ranks(partials, step, carry):
    """One partial (R, 1, B), summed over ranks: the loss is a sum over the classes."""
    return partials[:, 0].sum(0)


def _softmax_terms(step):
    o = step.options
    loss, lse = step.op("cosine_softmax_forward")(
        step.features, step.weight, step.labels, step.scale(), o.m1, o.m2, o.m3, o.lam,
        o.normalize_features, o.normalize_weight, *step.shard)
    return [lse, loss], None


def _softmax_merge(partials, step, carry):
    """loss_i = loss_oi + (lse_i - lse_oi), o = the rank owning y_i; lse_i = logsumexp_r lse_ri."""
    valid = step.valid
    owner = torch.bucketize(step.labels_all, step.class_starts, right=True) - 1
    owner = torch.where(valid, owner, torch.zeros_like(owner))
    owner = owner.clamp(0, step.class_starts.shape[0] - 1)[None]
    # Ignored rows are masked before the merge, so that their partials (NaN for NaN features)
    # send exactly 0, not 0 * NaN, back to the ops' lse (contract "Bad input").
    zero = torch.zeros((), dtype=partials.dtype, device=partials.device)
    lse_all = torch.where(valid[None], partials[:, 0], zero)
    loss_all = torch.where(valid[None], partials[:, 1], zero)
    lse = torch.logsumexp(lse_all, dim=0)
    return loss_all.gather(0, owner)[0] + (lse - lse_all.gather(0, owner)[0])


def _c_contrastive_terms(step):
    o = step.options
    return [step.op("c_contrastive")(step.features, step.weight, step.labels, o.pos_margin,
                                     o.neg_margin, *step.shard)], None


def _center_terms(step):
    return [step.op("center_loss")(step.features, step.weight, step.labels, *step.shard)], None


def _c_triplet_terms(step):
    """hardest_only: (this shard's nearest wrong agent's distance, d_iy's part); else this
    shard's part of the sum over wrong agents, after an extra round that gathers d_iy (carried
    to the merge)."""
    o, op, f, w = step.options, step.op, step.features, step.weight
    d_y = op("center_loss")(f, w, step.labels, *step.shard)
    if o.hardest_only:
        # The op finds this shard's nearest wrong agent; its distance is recomputed
        # differentiably by center_loss on those rows (B x D), so no (B, C) tensor enters
        # autograd. No wrong agent in the shard (-1): +inf, which loses the min over ranks.
        with torch.no_grad():
            _, hardest = op("c_triplet_forward")(f.detach(), w.detach(), step.labels,
                                                 o.triplet_margin, True, False, *step.shard)
        d_hard = op("center_loss")(f, w, hardest, -1, 0, -1)
        d_hard = torch.where(hardest >= 0, d_hard, torch.full_like(d_hard, math.inf))
        return [d_hard, d_y], None
    d_y = step.gather(d_y).sum(0)
    target = step.labels - step.shard[1]
    target = torch.where(step.valid & (target >= 0) & (target < w.shape[0]), target,
                         torch.full_like(target, -1))
    part = triplet_hinge_sum(f, w, step.copy_to_shards(d_y), target, o.triplet_margin,
                             step.triplet_block_elems)
    return [part], d_y


def _c_triplet_merge(partials, step, d_y):
    o = step.options
    if o.hardest_only:
        d_hard, d_y = partials[:, 0], partials[:, 1].sum(0)
        # argmin over ranks: first (lowest) rank on ties, i.e. the lowest class id; NaN wins
        # as in torch.argmin, so NaN propagates.
        d_min = d_hard.gather(0, d_hard.argmin(dim=0, keepdim=True))[0]
        main = torch.relu(o.triplet_margin + d_y - d_min)
    else:
        main = partials[:, 0].sum(0)
    return main + d_y if o.center else main


def _triplet_block(features, w, d_y, target, offset, margin):
    """sum_{k in block, k != y} relu(margin + d_iy - d_ik) for one block of agents, (B,)."""
    d = 2.0 - 2.0 * reference.cosine_logits(features, w)
    hinge = torch.relu(margin + d_y[:, None] - d)
    cols = torch.arange(offset, offset + w.shape[0], device=w.device)
    hinge = torch.where(cols[None, :] == target[:, None], torch.zeros_like(hinge), hinge)
    return hinge.sum(dim=1)


def triplet_hinge_sum(features, weight, d_y, target, margin, block_elems):
    """sum_{k != target} relu(margin + d_y - d(f_i, W_k)) over the rows of weight, (B,)
    (target: a row index or -1): the non-hardest C-triplet sum of one shard of the classes.

    Here and not in an op or the reference because d_iy comes from outside (the global batch's
    d_iy, from the rank owning y): the ops and reference.c_triplet compute it from the weight
    they get, and the reference builds (B, C). So: a torch loop over blocks of about
    block_elems (B x agents) distances (reference.cosine_logits), each recomputed in the
    backward (checkpoint), keeping the extra memory at O(B x block).
    """
    d_y = d_y.to(checks.acc_dtype(features.dtype))
    block = max(1, block_elems // max(1, features.shape[0]))
    total = d_y.new_zeros(features.shape[0])
    for offset in range(0, weight.shape[0], block):
        w = weight[offset: offset + block]
        if weight.shape[0] <= block:
            part = _triplet_block(features, w, d_y, target, offset, margin)
        else:
            part = checkpoint(_triplet_block, features, w, d_y, target, offset, margin,
                              use_reentrant=False)
        total = total + part
    return total


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossEntry:
    """One loss: see the module docstring."""

    name: str
    function: Callable      # functional.<name>(features, weight, labels, [scale], **keywords)
    op: str                 # the op `function` calls
    keywords: Callable      # options -> the loss's own keywords of `function`
    shard_terms: Callable   # ShardStep -> ([(B,) partials of this rank], carry)
    shard_merge: Callable   # ((R, T, B) partials, ShardStep, carry) -> (B,) per-sample loss
    takes_scale: bool = False

    def __call__(self, options, features, weight, labels, scale=None):
        """The loss reduced as options.reduction, by the public function."""
        args = (scale,) if self.takes_scale else ()
        return self.function(features, weight, labels, *args, **self.keywords(options),
                             ignore_index=options.ignore_index, reduction=options.reduction,
                             backend=options.backend)


LOSS_TABLE = {entry.name: entry for entry in (
    LossEntry("softmax", F.cosine_softmax, "cosine_softmax_forward",
              lambda o: dict(m1=o.m1, m2=o.m2, m3=o.m3, lam=o.lam,
                             normalize_features=o.normalize_features,
                             normalize_weight=o.normalize_weight),
              _softmax_terms, _softmax_merge, takes_scale=True),
    LossEntry("c_contrastive", F.c_contrastive, "c_contrastive",
              lambda o: dict(pos_margin=o.pos_margin, neg_margin=o.neg_margin),
              _c_contrastive_terms, _sum_over_ranks),
    LossEntry("c_triplet", F.c_triplet, "c_triplet_forward",
              lambda o: dict(margin=o.triplet_margin, hardest_only=o.hardest_only,
                             center=o.center),
              _c_triplet_terms, _c_triplet_merge),
    LossEntry("center", F.center_loss, "center_loss", lambda o: {},
              _center_terms, _sum_over_ranks),
)}
