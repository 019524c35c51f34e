"""Autograd of the Triton ops, and the public-schema loss ops as composites (one place).

The public schemas (those of csrc/registration.cpp) return only the losses, so they cannot hand
the backward what the forward accumulated. They are CompositeImplicitAutograd ops over the
training ops of registration.py, asking for the (B, D) accumulator only when a gradient is
needed (grad mode on and features, weight or scale requiring grad); autograd flows through the
training op, whose backward op reads the saved statistics:

    triton_cosine_softmax_forward -> triton_cosine_softmax_train -> ..._backward_saved
    triton_c_contrastive          -> triton_c_contrastive_train  -> ..._backward_saved
    triton_c_triplet_forward      -> triton_c_triplet_train      -> ..._backward_saved

torch.compile decomposes the composites and traces the training ops (opaque custom ops under
TRITON_INTERPRET=1, triton_op bodies on a GPU).
"""

import torch

_LIB = torch.library.Library("normface", "FRAGMENT")  # noqa: TOR901 - composites only
ops = torch.ops.normface

_SOFTMAX_PARAMS = ("float m1, float m2, float m3, float lam, bool normalize_features, "
                   "bool normalize_weight, int ignore_index, int class_start, int num_classes")


def _composite(schema, fn):
    name = schema.split("(")[0]
    _LIB.define(schema)
    _LIB.impl(name, fn, "CompositeImplicitAutograd")


def _needs_grad(*tensors):
    """Grad mode on and an input requiring grad (a non-tensor is left to the op's checks)."""
    return torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad
                                           for t in tensors)


def _grad_or_zeros(grad, like):
    """Upstream gradients may be None (output unused) or expanded views (from .sum())."""
    return torch.zeros_like(like) if grad is None else grad.contiguous()


# ---------------------------------------------------------------------------------------------
# cosine_softmax
# ---------------------------------------------------------------------------------------------

def _softmax_forward(features, weight, labels, scale, *params):
    need = _needs_grad(features, weight, scale)
    loss, lse, _, _, _ = ops.triton_cosine_softmax_train(features, weight, labels, scale,
                                                          *params, need)
    return loss, lse


def _setup_softmax(ctx, inputs, output):
    features, weight, labels, scale, *params, _ = inputs
    _, lse, stats, ubar, nw = output
    ctx.save_for_backward(features, weight, labels, scale, lse, stats, ubar, nw)
    ctx.params = params


def _backward_softmax(ctx, grad_loss, grad_lse, *unused):
    features, weight, labels, scale, lse, stats, ubar, nw = ctx.saved_tensors
    grad_f, grad_w, grad_s = ops.triton_cosine_softmax_backward_saved(
        _grad_or_zeros(grad_loss, lse), _grad_or_zeros(grad_lse, lse), features, weight, labels,
        scale, lse, stats, ubar, nw, *ctx.params)
    needs = ctx.needs_input_grad
    return ((grad_f if needs[0] else None, grad_w if needs[1] else None, None,
             grad_s if needs[3] else None) + (None,) * (len(ctx.params) + 1))


# ---------------------------------------------------------------------------------------------
# Agent losses
# ---------------------------------------------------------------------------------------------

def _c_contrastive(features, weight, labels, pos_margin=0.0, neg_margin=1.0, ignore_index=-100,
                   class_start=0, num_classes=-1):
    need = _needs_grad(features, weight)
    return ops.triton_c_contrastive_train(features, weight, labels, pos_margin, neg_margin,
                                          ignore_index, class_start, num_classes, need)[0]


def _setup_contrastive(ctx, inputs, output):
    features, weight, labels, *params, _ = inputs
    loss, stats, v, nw = output
    ctx.save_for_backward(features, weight, labels, stats, v, nw)
    ctx.params = params


def _backward_contrastive(ctx, grad_loss, *unused):
    features, weight, labels, stats, v, nw = ctx.saved_tensors
    grad_f, grad_w = ops.triton_c_contrastive_backward_saved(
        _grad_or_zeros(grad_loss, stats[0]), features, weight, labels, stats, v, nw,
        *ctx.params)
    needs = ctx.needs_input_grad
    return ((grad_f if needs[0] else None, grad_w if needs[1] else None, None)
            + (None,) * (len(ctx.params) + 1))


def _c_triplet_forward(features, weight, labels, margin, hardest_only, center, ignore_index,
                       class_start, num_classes):
    need = _needs_grad(features, weight)
    loss, hardest, _, _, _ = ops.triton_c_triplet_train(
        features, weight, labels, margin, hardest_only, center, ignore_index, class_start,
        num_classes, need)
    return loss, hardest


def _setup_triplet(ctx, inputs, output):
    features, weight, labels, *params, _ = inputs
    _, hardest, stats, v, nw = output
    ctx.save_for_backward(features, weight, labels, hardest, stats, v, nw)
    ctx.params = params


def _backward_triplet(ctx, grad_loss, *unused):
    features, weight, labels, hardest, stats, v, nw = ctx.saved_tensors
    grad_f, grad_w = ops.triton_c_triplet_backward_saved(
        _grad_or_zeros(grad_loss, stats[0]), features, weight, labels, hardest, stats, v, nw,
        *ctx.params)
    needs = ctx.needs_input_grad
    return ((grad_f if needs[0] else None, grad_w if needs[1] else None, None)
            + (None,) * (len(ctx.params) + 1))


def _setup_center(ctx, inputs, output):
    features, weight, labels, *params = inputs
    ctx.save_for_backward(features, weight, labels)
    ctx.params = params


def _backward_center(ctx, grad_loss):
    features, weight, labels = ctx.saved_tensors
    grad_f, grad_w = ops.triton_center_loss_backward_saved(grad_loss.contiguous(), features,
                                                           weight, labels, *ctx.params)
    needs = ctx.needs_input_grad
    return ((grad_f if needs[0] else None, grad_w if needs[1] else None, None)
            + (None,) * len(ctx.params))


# ---------------------------------------------------------------------------------------------
# l2_normalize (eq. 4) and cosine_logits
# ---------------------------------------------------------------------------------------------

def _setup_normalize(ctx, inputs, output):
    x, eps = inputs
    ctx.save_for_backward(x)
    ctx.eps = eps


def _backward_normalize(ctx, grad):
    (x,) = ctx.saved_tensors
    return ops.triton_l2_normalize_backward(grad.contiguous(), x, ctx.eps), None


def _setup_logits(ctx, inputs, output):
    features, weight, scale, eps = inputs
    ctx.save_for_backward(features, weight, scale)
    ctx.eps = eps


def _backward_logits(ctx, grad):
    features, weight, scale = ctx.saved_tensors
    grad_f, grad_w, grad_s = ops.triton_cosine_logits_backward(grad, features, weight, scale,
                                                               ctx.eps)
    needs = ctx.needs_input_grad
    return (grad_f if needs[0] else None, grad_w if needs[1] else None,
            grad_s if needs[2] else None, None)


def register():
    """Called once, after registration.py defined the ops."""
    for name, backward, setup in (
            ("triton_cosine_softmax_train", _backward_softmax, _setup_softmax),
            ("triton_c_contrastive_train", _backward_contrastive, _setup_contrastive),
            ("triton_c_triplet_train", _backward_triplet, _setup_triplet),
            ("triton_center_loss", _backward_center, _setup_center),
            ("triton_l2_normalize", _backward_normalize, _setup_normalize),
            ("triton_cosine_logits", _backward_logits, _setup_logits)):
        torch.library.register_autograd("normface::" + name, backward, setup_context=setup)
    _composite("triton_cosine_softmax_forward(Tensor features, Tensor weight, Tensor labels, "
               f"Tensor scale, {_SOFTMAX_PARAMS}) -> (Tensor, Tensor)", _softmax_forward)
    _composite("triton_c_contrastive(Tensor features, Tensor weight, Tensor labels, "
               "float pos_margin=0.0, float neg_margin=1.0, int ignore_index=-100, "
               "int class_start=0, int num_classes=-1) -> Tensor", _c_contrastive)
    _composite("triton_c_triplet_forward(Tensor features, Tensor weight, Tensor labels, "
               "float margin, bool hardest_only, bool center, int ignore_index, "
               "int class_start, int num_classes) -> (Tensor, Tensor)", _c_triplet_forward)
