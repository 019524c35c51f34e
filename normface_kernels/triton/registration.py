"""The Triton ops `normface::triton_<name>`: the schemas of csrc/registration.cpp (inferred from
the annotations below), Triton kernels.

Each op checks its arguments (normface_kernels/checks.py: messages name the argument, SPEC "Bad
input"), then calls the launcher of its kernel family.
"""

from typing import Tuple

import torch
from torch import Tensor
from torch.library import triton_op

from . import config
from ..checks import (check_device, check_finite, check_hardest, check_logits_inputs, check_margins,
                      check_normalize_inputs, check_op_inputs, check_per_sample)
from .agents import (c_contrastive, c_contrastive_backward, c_triplet_backward,
                     c_triplet_forward, center_loss, center_loss_backward)
from .cosine_softmax_bwd import softmax_backward
from .cosine_softmax_fwd import softmax_forward
from .logits import cosine_logits, cosine_logits_backward
from .normalize import l2_normalize, l2_normalize_backward

Tuple2 = Tuple[Tensor, Tensor]
Tuple3 = Tuple[Tensor, Tensor, Tensor]


def _define(name):
    """torch.library.triton_op: torch.compile traces into the body and sees the kernels. Under
    TRITON_INTERPRET=1 the kernels are plain Python functions that cannot be traced, so the op is
    an opaque custom op there instead (same body, also its fake kernel: launch() skips the
    kernels on fake tensors). The schema is inferred from the annotations: torch 2.11's
    triton_op ignores an explicit schema= and always infers it."""
    def register(fn):
        if config.INTERPRET:
            op = torch.library.custom_op(name, fn, mutates_args=())
            op.register_fake(fn)
            return op
        return triton_op(name, fn, mutates_args=())
    return register


# ---------------------------------------------------------------------------------------------
# l2_normalize (paper eq. 3 / 4)
# ---------------------------------------------------------------------------------------------

@_define("normface::triton_l2_normalize")
def triton_l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    return l2_normalize(x, check_normalize_inputs(x, eps))


@_define("normface::triton_l2_normalize_backward")
def triton_l2_normalize_backward(grad: Tensor, x: Tensor, eps: float) -> Tensor:
    return l2_normalize_backward(grad, x, check_normalize_inputs(x, eps, grad))


# ---------------------------------------------------------------------------------------------
# cosine_logits (inference, small C): its own autograd through the backward op below.
# ---------------------------------------------------------------------------------------------

@_define("normface::triton_cosine_logits")
def triton_cosine_logits(features: Tensor, weight: Tensor, scale: Tensor,
                         eps: float = 1e-12) -> Tensor:
    eps = check_logits_inputs(features, weight, scale, eps)
    return cosine_logits(features, weight, scale, eps)


@_define("normface::triton_cosine_logits_backward")
def triton_cosine_logits_backward(grad: Tensor, features: Tensor, weight: Tensor, scale: Tensor,
                                  eps: float) -> Tuple3:
    eps = check_logits_inputs(features, weight, scale, eps)
    check_device("grad", grad, features)
    if grad.shape != (features.shape[0], weight.shape[0]):
        raise ValueError(f"grad must have shape (B, C) = ({features.shape[0]}, "
                         f"{weight.shape[0]}), got {tuple(grad.shape)}")
    return cosine_logits_backward(grad, features, weight, scale, eps)


def _setup_logits(ctx, inputs, output):
    features, weight, scale, eps = inputs
    ctx.save_for_backward(features, weight, scale)
    ctx.eps = eps


def _backward_logits(ctx, grad):
    features, weight, scale = ctx.saved_tensors
    grad_f, grad_w, grad_s = torch.ops.normface.triton_cosine_logits_backward(
        grad, features, weight, scale, ctx.eps)
    needs = ctx.needs_input_grad
    return (grad_f if needs[0] else None, grad_w if needs[1] else None,
            grad_s if needs[2] else None, None)


torch.library.register_autograd("normface::triton_cosine_logits", _backward_logits,
                                setup_context=_setup_logits)


# ---------------------------------------------------------------------------------------------
# cosine_softmax (SPEC "one formula for the whole family")
# ---------------------------------------------------------------------------------------------

@_define("normface::triton_cosine_softmax_forward")
def triton_cosine_softmax_forward(features: Tensor, weight: Tensor, labels: Tensor, scale: Tensor,
                                  m1: float, m2: float, m3: float, lam: float,
                                  normalize_features: bool, normalize_weight: bool,
                                  ignore_index: int, class_start: int,
                                  num_classes: int) -> Tuple2:
    m1, m2, m3, lam = check_margins(m1, m2, m3, lam)
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes, scale)
    return softmax_forward(features, weight, labels, scale, m1, m2, m3, lam, normalize_features,
                           normalize_weight, ignore_index, class_start)


@_define("normface::triton_cosine_softmax_backward")
def triton_cosine_softmax_backward(grad_loss: Tensor, grad_lse: Tensor, features: Tensor,
                                   weight: Tensor, labels: Tensor, scale: Tensor, lse: Tensor,
                                   m1: float, m2: float, m3: float, lam: float,
                                   normalize_features: bool, normalize_weight: bool,
                                   ignore_index: int, class_start: int,
                                   num_classes: int) -> Tuple3:
    m1, m2, m3, lam = check_margins(m1, m2, m3, lam)
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes, scale)
    for name, t in (("grad_loss", grad_loss), ("grad_lse", grad_lse), ("lse", lse)):
        check_per_sample(name, t, features)
    return softmax_backward(grad_loss, grad_lse, features, weight, labels, scale, lse, m1, m2,
                            m3, lam, normalize_features, normalize_weight, ignore_index,
                            class_start)


# ---------------------------------------------------------------------------------------------
# Agent losses (paper section 4)
# ---------------------------------------------------------------------------------------------

def _hinge_margins(pos_margin, neg_margin):
    return check_finite("pos_margin", pos_margin), check_finite("neg_margin", neg_margin)


@_define("normface::triton_c_contrastive")
def triton_c_contrastive(features: Tensor, weight: Tensor, labels: Tensor,
                         pos_margin: float = 0.0, neg_margin: float = 1.0,
                         ignore_index: int = -100, class_start: int = 0,
                         num_classes: int = -1) -> Tensor:
    pos_margin, neg_margin = _hinge_margins(pos_margin, neg_margin)
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes)
    return c_contrastive(features, weight, labels, pos_margin, neg_margin, ignore_index,
                                class_start)


@_define("normface::triton_c_contrastive_backward")
def triton_c_contrastive_backward(grad_loss: Tensor, features: Tensor, weight: Tensor,
                                  labels: Tensor, pos_margin: float, neg_margin: float,
                                  ignore_index: int, class_start: int,
                                  num_classes: int) -> Tuple2:
    pos_margin, neg_margin = _hinge_margins(pos_margin, neg_margin)
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes)
    check_per_sample("grad_loss", grad_loss, features)
    return c_contrastive_backward(grad_loss, features, weight, labels, pos_margin,
                                         neg_margin, ignore_index, class_start)


@_define("normface::triton_c_triplet_forward")
def triton_c_triplet_forward(features: Tensor, weight: Tensor, labels: Tensor, margin: float,
                             hardest_only: bool, center: bool, ignore_index: int,
                             class_start: int, num_classes: int) -> Tuple2:
    margin = check_finite("margin", margin)
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes)
    return c_triplet_forward(features, weight, labels, margin, hardest_only, center,
                                    ignore_index, class_start)


@_define("normface::triton_c_triplet_backward")
def triton_c_triplet_backward(grad_loss: Tensor, features: Tensor, weight: Tensor,
                              labels: Tensor, hardest: Tensor, margin: float, hardest_only: bool,
                              center: bool, ignore_index: int, class_start: int,
                              num_classes: int) -> Tuple2:
    margin = check_finite("margin", margin)
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes)
    check_per_sample("grad_loss", grad_loss, features)
    if hardest_only:
        check_hardest(hardest, features, weight)
    return c_triplet_backward(grad_loss, features, weight, labels, hardest, margin,
                                     hardest_only, center, ignore_index, class_start)


@_define("normface::triton_center_loss")
def triton_center_loss(features: Tensor, weight: Tensor, labels: Tensor,
                       ignore_index: int = -100, class_start: int = 0,
                       num_classes: int = -1) -> Tensor:
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes)
    return center_loss(features, weight, labels, ignore_index, class_start)


@_define("normface::triton_center_loss_backward")
def triton_center_loss_backward(grad_loss: Tensor, features: Tensor, weight: Tensor,
                                labels: Tensor, ignore_index: int, class_start: int,
                                num_classes: int) -> Tuple2:
    check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes)
    check_per_sample("grad_loss", grad_loss, features)
    return center_loss_backward(grad_loss, features, weight, labels, ignore_index,
                                       class_start)
