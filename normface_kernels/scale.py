"""The scale s of the cosine softmax in the loss modules: fixed, or learned above a floor.

Paper section 3.3 learns s (a scalar layer started at 10, bounded below by 0.01). With a margin
that layer dies at random initialisation: the margin puts the target logit s * psi(theta) below
the others (theta ~ pi/2, so psi < 0 for ArcFace, CosFace and SphereFace), the loss then falls
as s falls, s reaches the floor, the features stop learning (their gradient is proportional to
s) and the loss stays at ln C. Two things keep it alive here:

1. The floor is where Proposition 2 says the loss can still fall. With the features on their
   agents and the agents on a regular simplex (cos = -1/(C-1) between classes) -- the optimum
   of Proposition 2 -- the loss with margins is

       L(s) = log(1 + (C - 1) exp(-s (t0 + 1/(C - 1))))      t0 = t(theta = 0), the contract's psi,

   which is Proposition 2's bound for t0 = 1 (no margin) and that bound shifted by the margin
   for CosFace (t0 = 1 - m3). The automatic floor is the s with L(s) = FLOOR_TARGET_LOSS: below
   it no feature can bring the loss that low, so the scale is not allowed there.
2. The bound is a projected gradient, not a clamp: the scale used is max(s, floor), and the
   gradient reaches the parameter whenever a descent step would raise it (at or below the
   floor) or it is above the floor. A clamp's gradient is 0 at the floor whatever the loss
   wants, so a scale that touched it never came back.
"""

import math

import torch
from torch import nn

from .checks import check_positive

# Paper section 3.3: the learned scale starts at 10 and is bounded below by 0.01.
PAPER_SCALE_INIT = 10.0
PAPER_SCALE_FLOOR = 0.01
# The automatic floor lets the loss of Proposition 2's optimum fall to this value (see above).
FLOOR_TARGET_LOSS = 0.1


def target_at_zero(m1=1.0, m2=0.0, m3=0.0, lam=0.0):
    """t(theta = 0) of the contract's margin family: the target cosine of a feature on its agent."""
    del m1  # m1 * 0 = 0: SphereFace's multiplicative margin costs nothing at theta = 0
    k = math.floor(m2 / math.pi)
    psi = (-1.0) ** k * math.cos(m2) - 2.0 * k - m3
    return (lam + psi) / (1.0 + lam)


def learned_scale_floor(num_classes, margins=(1.0, 0.0, 0.0), lam=0.0,
                        target_loss=FLOOR_TARGET_LOSS):
    """The smallest s at which the loss of Proposition 2's optimum, with these margins, is at
    most `target_loss`: s = log((C - 1) / expm1(target)) / (t0 + 1/(C - 1)).

    Without a margin it equals scale_for_loss(C, target_loss). At least PAPER_SCALE_FLOOR.
    Raises ValueError when the margins leave the target logit at or below the others even for
    a feature on its agent (t0 <= -1/(C - 1)): no scale lets such a loss fall.
    """
    n = int(num_classes)
    if n < 2:
        return PAPER_SCALE_FLOOR   # one class: the loss is 0 at any scale
    gap = target_at_zero(*margins, lam) + 1.0 / (n - 1)
    if not gap > 0:
        raise ValueError(f"margins {tuple(margins)} (lam={lam}) put the target logit at or "
                         f"below the others even for a feature on its agent: no learned scale "
                         f"lets the loss fall; pass a fixed scale")
    s = math.log((n - 1) / math.expm1(target_loss)) / gap
    return max(PAPER_SCALE_FLOOR, s)


class _LowerBound(torch.autograd.Function):
    """max(s, floor) with the projected gradient of the constraint s >= floor.

    The gradient g reaches s unless s <= floor and g > 0 (a descent step s - lr * g would push
    s further below the floor). So at and below the floor a gradient that raises s still
    arrives -- a bound, not a dead zone -- and s never drifts below the floor while the loss
    prefers smaller scales, so it moves up as soon as the loss prefers larger ones.
    """

    @staticmethod
    def forward(ctx, s, floor):
        ctx.save_for_backward(s)
        ctx.floor = floor
        return s.clamp(min=floor)

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        blocked = (s <= ctx.floor) & (grad > 0)
        return torch.where(blocked, torch.zeros_like(grad), grad), None


def init_scale(module, scale, num_classes, *, scale_init=None, scale_floor=None, device=None):
    """Give `module` its `scale`: a parameter for "learn", else a buffer; and `scale_floor`.

    Reads module.m1, m2, m3, lam, normalize_features, normalize_weight (set before the call).
    scale: "learn" or a fixed finite float > 0 (never clamped: ValueError otherwise).
    scale_floor: None -> learned_scale_floor(C, margins, lam) when both sides are normalized
        (Proposition 2 holds only then), else the paper's 0.01; or a float > 0.
    scale_init: None -> max(10, floor) (10 is the paper's start); or a float >= the floor.
    """
    if isinstance(scale, str):
        if scale != "learn":
            raise ValueError(f"scale must be 'learn' or a float > 0, got {scale!r}")
        if scale_floor is None:
            normalized = module.normalize_features and module.normalize_weight
            scale_floor = (learned_scale_floor(num_classes, (module.m1, module.m2, module.m3),
                                               module.lam)
                           if normalized else PAPER_SCALE_FLOOR)
        scale_floor = check_positive("scale_floor", scale_floor)
        if scale_init is None:
            scale_init = max(PAPER_SCALE_INIT, scale_floor)
        scale_init = check_positive("scale_init", scale_init)
        if scale_init < scale_floor:
            raise ValueError(f"scale_init ({scale_init}) must be >= scale_floor "
                             f"({scale_floor})")
        module.scale_floor = scale_floor
        module.scale = nn.Parameter(torch.tensor(scale_init, device=device))
        return
    if scale_init is not None or scale_floor is not None:
        raise ValueError("scale_init and scale_floor apply to scale='learn' only, got a fixed "
                         f"scale {scale!r}")
    module.scale_floor = None
    module.register_buffer("scale", torch.tensor(check_positive("scale", scale), device=device))


def scale_in_loss(module):
    """The scale the loss uses: the fixed buffer, or max(learned s, floor) (projected
    gradient, see _LowerBound)."""
    if module.scale_floor is None:
        return module.scale
    return _LowerBound.apply(module.scale, module.scale_floor)
