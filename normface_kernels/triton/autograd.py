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

from .. import schemas
from ..ops import grad_or_zeros, normalize_autograd

_LIB = torch.library.Library("normface", "FRAGMENT")  # noqa: TOR901 - composites only
ops = torch.ops.normface



def _composite(name, fn):
    """normface::triton_<name>, with the schema of schemas.TRITON[name], as a composite."""
    _LIB.define("triton_" + name + schemas.TRITON[name])
    _LIB.impl("triton_" + name, fn, "CompositeImplicitAutograd")


def _needs_grad(*tensors):
    """Grad mode on and an input requiring grad (a non-tensor is left to the op's checks)."""
    return torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad
                                           for t in tensors)


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
        grad_or_zeros(grad_loss, lse), grad_or_zeros(grad_lse, lse), features, weight, labels,
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


def _c_triplet_forward(features, weight, labels, margin, hardest_only, center, ignore_index,
                       class_start, num_classes):
    need = _needs_grad(features, weight)
    loss, hardest, _, _, _ = ops.triton_c_triplet_train(
        features, weight, labels, margin, hardest_only, center, ignore_index, class_start,
        num_classes, need)
    return loss, hardest


def _agent_autograd(backward_op, need_flag):
    """(backward, setup_context) of an agent loss's op with inputs (features, weight, labels,
    *params[, need]) and outputs (loss, *saved) or loss: backward_op takes (grad_loss, features,
    weight, labels, *saved, *params) and returns (grad_features, grad_weight)."""
    def setup(ctx, inputs, output):
        features, weight, labels, *params = inputs
        loss, *saved = output if isinstance(output, tuple) else (output,)
        # Not the loss: it is the caller's tensor, which may be changed in place.
        ctx.save_for_backward(features, weight, labels, *saved)
        ctx.params = params[:-1] if need_flag else params
        ctx.loss_dtype = loss.dtype

    def backward(ctx, grad_loss, *unused):
        features, *rest = ctx.saved_tensors
        like = features.new_empty(features.shape[:1], dtype=ctx.loss_dtype)
        grad_f, grad_w = backward_op(grad_or_zeros(grad_loss, like), features, *rest,
                                     *ctx.params)
        needs = ctx.needs_input_grad
        return ((grad_f if needs[0] else None, grad_w if needs[1] else None)
                + (None,) * (len(needs) - 2))

    return backward, setup


# ---------------------------------------------------------------------------------------------
# l2_normalize (eq. 4) and cosine_logits
# ---------------------------------------------------------------------------------------------

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
    for name, (backward, setup) in (
            ("triton_cosine_softmax_train", (_backward_softmax, _setup_softmax)),
            ("triton_c_contrastive_train",
             _agent_autograd(ops.triton_c_contrastive_backward_saved, need_flag=True)),
            ("triton_c_triplet_train",
             _agent_autograd(ops.triton_c_triplet_backward_saved, need_flag=True)),
            ("triton_center_loss",
             _agent_autograd(ops.triton_center_loss_backward_saved, need_flag=False)),
            ("triton_l2_normalize", normalize_autograd(ops.triton_l2_normalize_backward)),
            ("triton_cosine_logits", (_backward_logits, _setup_logits))):
        torch.library.register_autograd("normface::" + name, backward, setup_context=setup)
    _composite("cosine_softmax_forward", _softmax_forward)
    _composite("c_contrastive", _c_contrastive)
    _composite("c_triplet_forward", _c_triplet_forward)
