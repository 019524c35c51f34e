"""The Triton ops `normface::triton_<name>`, their schemas from normface_kernels/schemas.py.

Two kinds of loss op (autograd and the composites are in autograd.py):
- the training ops `triton_<loss>_train(..., need_grad) -> (loss..., saved...)` and their
  `triton_<loss>_backward_saved(grads, inputs, saved..., params)`: the forward returns what the
  closed-form backward needs (norms, target terms, U or V), so the backward never repeats the
  forward's work (docs/kernels.md). need_grad=False skips the (B, D) accumulator.
- the schemas of the C++ ops (csrc/registration.cpp): `triton_cosine_softmax_forward`,
  `triton_c_contrastive`, `triton_c_triplet_forward` are composites over the training ops;
  `triton_*_backward` take only the inputs, so they run the forward's statistics again; their
  check_data=False skips the data checks, as the C++ ops' does.
Each op checks its arguments first (normface_kernels/checks.py; contract "Bad input"); the backward
ops skip the data checks (no host sync: their forward checked the same labels).
"""

import torch
from torch.library import triton_op

from .. import schemas
from ..checks import (
    acc_dtype,
    check_device,
    check_finite,
    check_hardest,
    check_logits_inputs,
    check_margins,
    check_normalize_inputs,
    check_op_inputs,
    check_per_sample,
)
from . import config
from .agents import STATS as AGENT_STATS
from .agents import (
    c_contrastive_backward,
    c_contrastive_forward,
    c_triplet_backward,
    c_triplet_forward,
    center_loss,
    center_loss_backward,
    hardest_hinge,
)
from .cosine_softmax_bwd import softmax_backward
from .cosine_softmax_fwd import STATS as SOFTMAX_STATS
from .cosine_softmax_fwd import softmax_forward
from .logits import cosine_logits, cosine_logits_backward
from .normalize import l2_normalize, l2_normalize_backward


def _define(name):
    """Defines normface::triton_<name> with the schema of schemas.TRITON[name] (the body's
    parameter names must be the schema's). torch.library.triton_op: torch.compile traces into
    the body and sees the kernels. Under TRITON_INTERPRET=1 the kernels are plain Python
    functions that cannot be traced, so the op is an opaque custom op there instead (same body,
    also its fake kernel: launch() skips the kernels on fake tensors). Both infer the schema from
    the body's signature, which is set from the table: torch 2.11's triton_op ignores an explicit
    schema= and always infers it."""
    def register(fn):
        fn.__signature__ = signature = schemas.signature(name, schemas.TRITON[name], fn)
        # The schema's defaults (trailing) for direct calls of the body, e.g. as a fake kernel.
        fn.__defaults__ = tuple(p.default for p in signature.parameters.values()
                                if p.default is not p.empty) or None
        qualname = "normface::triton_" + name
        if config.INTERPRET:
            op = torch.library.custom_op(qualname, fn, mutates_args=())
            op.register_fake(fn)
            return op
        return triton_op(qualname, fn, mutates_args=())
    return register


def _check_saved(features, weight, **saved):
    """The saved tensors a backward op receives: accumulation dtype, features' device, and the
    shapes the forward produced ((k, B) statistics, (B, D) or (0, D) accumulator, (C,) norms)."""
    B, D = features.shape
    acc = acc_dtype(features.dtype)
    shapes = {"stats": None, "ubar": (B, D), "v": (B, D), "nw": (weight.shape[0],)}
    for name, t in saved.items():
        want = shapes[name]
        ok = t.dim() == 2 and t.shape[1] == B if want is None else (
            tuple(t.shape) == want or (name in ("ubar", "v") and tuple(t.shape) == (0, D)))
        if not torch.is_tensor(t) or not ok or t.dtype != acc or t.device != features.device:
            raise ValueError(f"{name} must be the forward's {acc} tensor on {features.device}"
                             f"{'' if want is None else ' of shape ' + str(want)}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")


def _need_accumulator(name, t, features):
    if features.shape[0] > 0 and t.shape[0] == 0:
        raise ValueError(f"{name} is empty: the forward ran with need_grad=False")


# ---------------------------------------------------------------------------------------------
# l2_normalize (paper eq. 3 / 4), cosine_logits (inference, small C)
# ---------------------------------------------------------------------------------------------

@_define("l2_normalize")
def triton_l2_normalize(x, eps):
    return l2_normalize(x, check_normalize_inputs(x, eps))


@_define("l2_normalize_backward")
def triton_l2_normalize_backward(grad, x, eps):
    return l2_normalize_backward(grad, x, check_normalize_inputs(x, eps, grad))


@_define("cosine_logits")
def triton_cosine_logits(features, weight, scale, eps):
    eps = check_logits_inputs(features, weight, scale, eps)
    return cosine_logits(features, weight, scale, eps)


@_define("cosine_logits_backward")
def triton_cosine_logits_backward(grad, features, weight, scale, eps):
    eps = check_logits_inputs(features, weight, scale, eps)
    check_device("grad", grad, features)
    if grad.shape != (features.shape[0], weight.shape[0]):
        raise ValueError(f"grad must have shape (B, C) = ({features.shape[0]}, "
                         f"{weight.shape[0]}), got {tuple(grad.shape)}")
    return cosine_logits_backward(grad, features, weight, scale, eps)


# ---------------------------------------------------------------------------------------------
# cosine_softmax (contract "one formula for the whole family")
# ---------------------------------------------------------------------------------------------

@_define("cosine_softmax_train")
def triton_cosine_softmax_train(features, weight, labels, scale, m1, m2, m3, lam,
                                normalize_features, normalize_weight, ignore_index, class_start,
                                num_classes, need_grad):
    """(loss, lse, stats (7, B), ubar (B, D) or (0, D), nw (C,)); see cosine_softmax_fwd."""
    m1, m2, m3, lam = check_margins(m1, m2, m3, lam)
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes, scale)
    return softmax_forward(features, weight, labels, scale, m1, m2, m3, lam, normalize_features,
                           normalize_weight, ignore_index, class_start, need_grad)


@_define("cosine_softmax_backward_saved")
def triton_cosine_softmax_backward_saved(grad_loss, grad_lse, features, weight, labels, scale, lse,
                                         stats, ubar, nw, m1, m2, m3, lam, normalize_features,
                                         normalize_weight, ignore_index, class_start, num_classes):
    check_margins(m1, m2, m3, lam)
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes, scale,
                    data=False)
    for name, t in (("grad_loss", grad_loss), ("grad_lse", grad_lse), ("lse", lse)):
        check_per_sample(name, t, features)
    _check_saved(features, weight, stats=stats, ubar=ubar, nw=nw)
    _need_accumulator("ubar", ubar, features)
    if stats.shape[0] != len(SOFTMAX_STATS):
        raise ValueError(f"stats must have {len(SOFTMAX_STATS)} rows, got {stats.shape[0]}")
    return softmax_backward(grad_loss, grad_lse, features, weight, labels, scale, lse, stats,
                            ubar, nw, normalize_features, normalize_weight, ignore_index,
                            class_start)


@_define("cosine_softmax_backward")
def triton_cosine_softmax_backward(grad_loss, grad_lse, features, weight, labels, scale, lse, m1,
                                   m2, m3, lam, normalize_features, normalize_weight, ignore_index,
                                   class_start, num_classes, check_data):
    """The C++ op's schema: runs the forward's statistics again (use the training op pair for
    training). The given lse is used for nothing but its check."""
    m1, m2, m3, lam = check_margins(m1, m2, m3, lam)
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes, scale,
                    data=check_data)
    for name, t in (("grad_loss", grad_loss), ("grad_lse", grad_lse), ("lse", lse)):
        check_per_sample(name, t, features)
    _, lse2, stats, ubar, nw = softmax_forward(
        features, weight, labels, scale, m1, m2, m3, lam, normalize_features, normalize_weight,
        ignore_index, class_start, True)
    return softmax_backward(grad_loss, grad_lse, features, weight, labels, scale, lse2, stats,
                            ubar, nw, normalize_features, normalize_weight, ignore_index,
                            class_start)


# ---------------------------------------------------------------------------------------------
# Agent losses (paper section 4)
# ---------------------------------------------------------------------------------------------

def _hinge_margins(pos_margin, neg_margin):
    return check_finite("pos_margin", pos_margin), check_finite("neg_margin", neg_margin)


@_define("c_contrastive_train")
def triton_c_contrastive_train(features, weight, labels, pos_margin, neg_margin, ignore_index,
                               class_start, num_classes, need_grad):
    """(loss, stats (3, B), V (B, D) or (0, D), nw (C,)); see agents.py."""
    pos_margin, neg_margin = _hinge_margins(pos_margin, neg_margin)
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes)
    return c_contrastive_forward(features, weight, labels, pos_margin, neg_margin, ignore_index,
                                 class_start, need_grad)


@_define("c_contrastive_backward_saved")
def triton_c_contrastive_backward_saved(grad_loss, features, weight, labels, stats, v, nw,
                                        pos_margin, neg_margin, ignore_index, class_start,
                                        num_classes):
    pos_margin, neg_margin = _hinge_margins(pos_margin, neg_margin)
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes,
                    data=False)
    check_per_sample("grad_loss", grad_loss, features)
    _check_saved(features, weight, stats=stats, v=v, nw=nw)
    _need_accumulator("v", v, features)
    return c_contrastive_backward(grad_loss, features, weight, labels, stats, v, nw, pos_margin,
                                  neg_margin, ignore_index, class_start)


@_define("c_contrastive_backward")
def triton_c_contrastive_backward(grad_loss, features, weight, labels, pos_margin, neg_margin,
                                  ignore_index, class_start, num_classes, check_data):
    pos_margin, neg_margin = _hinge_margins(pos_margin, neg_margin)
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes,
                    data=check_data)
    check_per_sample("grad_loss", grad_loss, features)
    _, stats, v, nw = c_contrastive_forward(features, weight, labels, pos_margin, neg_margin,
                                            ignore_index, class_start, True)
    return c_contrastive_backward(grad_loss, features, weight, labels, stats, v, nw, pos_margin,
                                  neg_margin, ignore_index, class_start)


@_define("c_triplet_train")
def triton_c_triplet_train(features, weight, labels, margin, hardest_only, center, ignore_index,
                           class_start, num_classes, need_grad):
    """(loss, hardest, stats (3, B), V (B, D) or (0, D), nw (C,)); see agents.py."""
    margin = check_finite("margin", margin)
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes)
    return c_triplet_forward(features, weight, labels, margin, hardest_only, center,
                             ignore_index, class_start, need_grad)


def _check_hardest_shape(hardest, features):
    """hardest (B,) int64 on features' device; its range is the forward's own output (the
    training path makes no data check, so no host sync)."""
    check_device("hardest", hardest, features)
    if hardest.dim() != 1 or hardest.shape[0] != features.shape[0] or (
            hardest.dtype != torch.int64):
        raise ValueError(f"hardest must be int64 of shape (B,) = ({features.shape[0]},), got "
                         f"{hardest.dtype} {tuple(hardest.shape)}")


@_define("c_triplet_backward_saved")
def triton_c_triplet_backward_saved(grad_loss, features, weight, labels, hardest, stats, v, nw,
                                    margin, hardest_only, center, ignore_index, class_start,
                                    num_classes):
    margin = check_finite("margin", margin)
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes,
                    data=False)
    check_per_sample("grad_loss", grad_loss, features)
    _check_saved(features, weight, stats=stats, v=v, nw=nw)
    if stats.shape[0] != len(AGENT_STATS):
        raise ValueError(f"stats must have {len(AGENT_STATS)} rows, got {stats.shape[0]}")
    if hardest_only:
        _check_hardest_shape(hardest, features)
    else:
        _need_accumulator("v", v, features)
    return c_triplet_backward(grad_loss, features, weight, labels, hardest, stats, v, nw, margin,
                              hardest_only, center, ignore_index, class_start)


@_define("c_triplet_backward")
def triton_c_triplet_backward(grad_loss, features, weight, labels, hardest, margin, hardest_only,
                              center, ignore_index, class_start, num_classes, check_data):
    margin = check_finite("margin", margin)
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes,
                    data=check_data)
    check_per_sample("grad_loss", grad_loss, features)
    if hardest_only:
        check_hardest(hardest, features, weight, data=check_data)
        stats, nw = hardest_hinge(features, weight, labels, hardest, margin, ignore_index,
                                  class_start)
        v = stats.new_empty((0, features.shape[1]))
    else:
        _, hardest, stats, v, nw = c_triplet_forward(features, weight, labels, margin, False,
                                                     center, ignore_index, class_start, True)
    return c_triplet_backward(grad_loss, features, weight, labels, hardest, stats, v, nw, margin,
                              hardest_only, center, ignore_index, class_start)


@_define("center_loss")
def triton_center_loss(features, weight, labels, ignore_index, class_start, num_classes):
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes)
    return center_loss(features, weight, labels, ignore_index, class_start)


@_define("center_loss_backward")
def triton_center_loss_backward(grad_loss, features, weight, labels, ignore_index, class_start,
                                num_classes, check_data):
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes,
                    data=check_data)
    check_per_sample("grad_loss", grad_loss, features)
    return center_loss_backward(grad_loss, features, weight, labels, ignore_index, class_start)


@_define("center_loss_backward_saved")
def triton_center_loss_backward_saved(grad_loss, features, weight, labels, ignore_index,
                                      class_start, num_classes):
    """The training path's backward of center_loss (autograd.py): nothing is saved (it reads the
    B target rows again), and no data check (no host sync: the forward checked the labels)."""
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes,
                    data=False)
    check_per_sample("grad_loss", grad_loss, features)
    return center_loss_backward(grad_loss, features, weight, labels, ignore_index, class_start)
