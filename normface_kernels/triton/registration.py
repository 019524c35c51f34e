"""The Triton ops `normface::triton_<name>`: the schemas of csrc/registration.cpp, Triton kernels.

Each op checks its arguments (messages name the argument, SPEC "Bad input"), then calls the
launcher of its kernel family. Data-dependent checks (label range, finite scale) cost one host
sync per call and are skipped while tracing (fake tensors: torch.compile, opcheck), where no
data exists; functional.py has already checked shapes and dtypes by then.
"""

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op

from . import config
from ..functional import _check_inputs
from .agents import (c_contrastive, c_contrastive_backward, c_triplet_backward,
                     c_triplet_forward, center_loss, center_loss_backward)
from .cosine_softmax_bwd import softmax_backward
from .cosine_softmax_fwd import softmax_forward
from .logits import cosine_logits, cosine_logits_backward
from .normalize import l2_normalize, l2_normalize_backward


def _define(name, schema):
    """torch.library.triton_op: torch.compile traces into the body and sees the kernels. Under
    TRITON_INTERPRET=1 the kernels are plain Python functions that cannot be traced, so the op is
    an opaque custom op there instead (same body, also its fake kernel: launch() skips the
    kernels on fake tensors)."""
    def register(fn):
        if config.INTERPRET:
            op = torch.library.custom_op(name, fn, mutates_args=(), schema=schema)
            op.register_fake(fn)
            return op
        return triton_op(name, fn, mutates_args=(), schema=schema)
    return register


def _tracing(*tensors):
    if torch._guards.detect_fake_mode() is not None:
        return True
    return any(is_fake(t) or t.device.type == "meta" for t in tensors)


def _check_loss_inputs(features, weight, labels, ignore_index, class_start, num_classes,
                       scale=None):
    # The public API's shape/dtype/device checks, plus the op's stricter int64 labels.
    _check_inputs(features, weight, labels)
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {labels.dtype}")
    C = weight.shape[0]
    n = C if num_classes < 0 else num_classes
    if not (class_start >= 0 and class_start + C <= n):
        raise ValueError(f"class_start/num_classes must describe a shard of the classes, got "
                         f"class_start {class_start}, num_classes {n} for weight "
                         f"{tuple(weight.shape)}")
    if scale is not None:
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(f"scale must be a floating 0-dim tensor, got {scale.dtype} of "
                             f"shape {tuple(scale.shape)}")
        if scale.device != features.device and scale.device.type != "cpu":
            raise ValueError(f"scale must be on the device of features ({features.device}), "
                             f"got {scale.device}")
    if _tracing(features, weight, labels, *(() if scale is None else (scale,))):
        return
    # One host sync for both data-dependent checks.
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n))
    flags = [bad.any()]
    if scale is not None:
        flags.append(~torch.isfinite(scale.detach().reshape(())).to(bad.device))
    bad_labels, *bad_scale = torch.stack(flags).tolist()
    if bad_labels:
        raise ValueError(f"labels must be in [0, {n}) or equal ignore_index ({ignore_index}); "
                         f"got {int(labels[bad][0])}")
    if bad_scale and bad_scale[0]:
        raise ValueError(f"scale must be finite, got {float(scale)}")


def _check_per_sample(name, t, features):
    if t.dim() != 1 or t.shape[0] != features.shape[0]:
        raise ValueError(f"{name} must have shape (B,) = ({features.shape[0]},), got "
                         f"{tuple(t.shape)}")


# ---------------------------------------------------------------------------------------------
# l2_normalize (paper eq. 3 / 4)
# ---------------------------------------------------------------------------------------------

@_define("normface::triton_l2_normalize",
         "(Tensor x, float eps=1e-12) -> Tensor")
def triton_l2_normalize(x, eps=1e-12):
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
    return l2_normalize(x, eps)


@_define("normface::triton_l2_normalize_backward",
         "(Tensor grad, Tensor x, float eps) -> Tensor")
def triton_l2_normalize_backward(grad, x, eps):
    if grad.shape != x.shape:
        raise ValueError(f"grad must have the shape of x {tuple(x.shape)}, got "
                         f"{tuple(grad.shape)}")
    return l2_normalize_backward(grad, x, eps)


# ---------------------------------------------------------------------------------------------
# cosine_logits (inference, small C): its own autograd through the backward op below.
# ---------------------------------------------------------------------------------------------

def _check_logits(features, weight, scale):
    if features.dim() != 2 or weight.dim() != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(f"features (B, D) and weight (C, D) must share D, got "
                         f"{tuple(features.shape)} and {tuple(weight.shape)}")
    if weight.dtype != features.dtype or not features.is_floating_point():
        raise ValueError(f"features and weight must have the same floating dtype, got "
                         f"{features.dtype} and {weight.dtype}")
    if scale.numel() != 1:
        raise ValueError(f"scale must be a 0-dim tensor, got shape {tuple(scale.shape)}")


@_define("normface::triton_cosine_logits",
         "(Tensor features, Tensor weight, Tensor scale, float eps=1e-12) -> Tensor")
def triton_cosine_logits(features, weight, scale, eps=1e-12):
    _check_logits(features, weight, scale)
    return cosine_logits(features, weight, scale, eps)


@_define("normface::triton_cosine_logits_backward",
         "(Tensor grad, Tensor features, Tensor weight, Tensor scale, float eps) "
                  "-> (Tensor, Tensor, Tensor)")
def triton_cosine_logits_backward(grad, features, weight, scale, eps):
    _check_logits(features, weight, scale)
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

@_define("normface::triton_cosine_softmax_forward",
         "(Tensor features, Tensor weight, Tensor labels, Tensor scale, float m1, "
                  "float m2, float m3, float lam, bool normalize_features, "
                  "bool normalize_weight, int ignore_index, int class_start, int num_classes) "
                  "-> (Tensor, Tensor)")
def triton_cosine_softmax_forward(features, weight, labels, scale, m1, m2, m3, lam,
                                  normalize_features, normalize_weight, ignore_index,
                                  class_start, num_classes):
    _check_loss_inputs(features, weight, labels, ignore_index, class_start, num_classes, scale)
    return softmax_forward(features, weight, labels, scale, m1, m2, m3, lam, normalize_features,
                           normalize_weight, ignore_index, class_start)


@_define("normface::triton_cosine_softmax_backward",
         "(Tensor grad_loss, Tensor grad_lse, Tensor features, Tensor weight, "
                  "Tensor labels, Tensor scale, Tensor lse, float m1, float m2, float m3, "
                  "float lam, bool normalize_features, bool normalize_weight, int ignore_index, "
                  "int class_start, int num_classes) -> (Tensor, Tensor, Tensor)")
def triton_cosine_softmax_backward(grad_loss, grad_lse, features, weight, labels, scale, lse,
                                   m1, m2, m3, lam, normalize_features, normalize_weight,
                                   ignore_index, class_start, num_classes):
    _check_loss_inputs(features, weight, labels, ignore_index, class_start, num_classes, scale)
    for name, t in (("grad_loss", grad_loss), ("grad_lse", grad_lse), ("lse", lse)):
        _check_per_sample(name, t, features)
    return softmax_backward(grad_loss, grad_lse, features, weight, labels, scale, lse, m1, m2,
                            m3, lam, normalize_features, normalize_weight, ignore_index,
                            class_start)


# ---------------------------------------------------------------------------------------------
# Agent losses (paper section 4)
# ---------------------------------------------------------------------------------------------

@_define("normface::triton_c_contrastive",
         "(Tensor features, Tensor weight, Tensor labels, float pos_margin=0.0, "
                  "float neg_margin=1.0, int ignore_index=-100, int class_start=0, "
                  "int num_classes=-1) -> Tensor")
def triton_c_contrastive(features, weight, labels, pos_margin=0.0, neg_margin=1.0,
                         ignore_index=-100, class_start=0, num_classes=-1):
    _check_loss_inputs(features, weight, labels, ignore_index, class_start, num_classes)
    return c_contrastive(features, weight, labels, pos_margin, neg_margin, ignore_index,
                                class_start)


@_define("normface::triton_c_contrastive_backward",
         "(Tensor grad_loss, Tensor features, Tensor weight, Tensor labels, "
                  "float pos_margin, float neg_margin, int ignore_index, int class_start, "
                  "int num_classes) -> (Tensor, Tensor)")
def triton_c_contrastive_backward(grad_loss, features, weight, labels, pos_margin, neg_margin,
                                  ignore_index, class_start, num_classes):
    _check_loss_inputs(features, weight, labels, ignore_index, class_start, num_classes)
    _check_per_sample("grad_loss", grad_loss, features)
    return c_contrastive_backward(grad_loss, features, weight, labels, pos_margin,
                                         neg_margin, ignore_index, class_start)


@_define("normface::triton_c_triplet_forward",
         "(Tensor features, Tensor weight, Tensor labels, float margin, "
                  "bool hardest_only, bool center, int ignore_index, int class_start, "
                  "int num_classes) -> (Tensor, Tensor)")
def triton_c_triplet_forward(features, weight, labels, margin, hardest_only, center,
                             ignore_index, class_start, num_classes):
    _check_loss_inputs(features, weight, labels, ignore_index, class_start, num_classes)
    return c_triplet_forward(features, weight, labels, margin, hardest_only, center,
                                    ignore_index, class_start)


@_define("normface::triton_c_triplet_backward",
         "(Tensor grad_loss, Tensor features, Tensor weight, Tensor labels, "
                  "Tensor hardest, float margin, bool hardest_only, bool center, "
                  "int ignore_index, int class_start, int num_classes) -> (Tensor, Tensor)")
def triton_c_triplet_backward(grad_loss, features, weight, labels, hardest, margin,
                              hardest_only, center, ignore_index, class_start, num_classes):
    _check_loss_inputs(features, weight, labels, ignore_index, class_start, num_classes)
    _check_per_sample("grad_loss", grad_loss, features)
    if hardest_only:
        _check_per_sample("hardest", hardest, features)
        if hardest.dtype != torch.int64:
            raise ValueError(f"hardest must be int64, got {hardest.dtype}")
        if not _tracing(hardest) and hardest.numel() > 0:
            C = weight.shape[0]
            if bool(((hardest < -1) | (hardest >= C)).any()):
                raise ValueError(f"hardest must be in [-1, {C}), got values outside")
    return c_triplet_backward(grad_loss, features, weight, labels, hardest, margin,
                                     hardest_only, center, ignore_index, class_start)


@_define("normface::triton_center_loss",
         "(Tensor features, Tensor weight, Tensor labels, int ignore_index=-100, "
                  "int class_start=0, int num_classes=-1) -> Tensor")
def triton_center_loss(features, weight, labels, ignore_index=-100, class_start=0,
                       num_classes=-1):
    _check_loss_inputs(features, weight, labels, ignore_index, class_start, num_classes)
    return center_loss(features, weight, labels, ignore_index, class_start)


@_define("normface::triton_center_loss_backward",
         "(Tensor grad_loss, Tensor features, Tensor weight, Tensor labels, "
                  "int ignore_index, int class_start, int num_classes) -> (Tensor, Tensor)")
def triton_center_loss_backward(grad_loss, features, weight, labels, ignore_index, class_start,
                                num_classes):
    _check_loss_inputs(features, weight, labels, ignore_index, class_start, num_classes)
    _check_per_sample("grad_loss", grad_loss, features)
    return center_loss_backward(grad_loss, features, weight, labels, ignore_index,
                                       class_start)
