"""Python half of the op registration: fake (meta) kernels and autograd formulas.

The schemas live in csrc/registration.cpp (their table: schemas.py), the kernels in csrc (CPU,
CUDA, the chunked path); the math of the backward ops is in docs/kernels.md. The Triton ops
register their own autograd in normface_kernels/triton/autograd.py: their forward saves
statistics (U, R, norms) that its closed-form backward reads, so their training ops have schemas
of their own.
"""

import torch

from . import checks


def _per_sample(features, dtype=None):
    return features.new_empty((features.shape[0],),
                              dtype=dtype or checks.acc_dtype(features.dtype))


# ---------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only, for torch.compile and opcheck.
# ---------------------------------------------------------------------------------------------

def _register_fakes():
    """Fake kernels of the C++ ops. They make the ops' argument checks too (checks.py, data
    checks skipped: a fake or meta tensor has no data): torch.compile reports a bad argument at
    trace time, and a meta tensor mixed with real ones -- which the dispatcher sends here, the
    Meta key winning -- raises instead of returning uninitialized memory."""
    ns = "normface::"

    @torch.library.register_fake(ns + "l2_normalize")
    def _(x, eps=checks.EPS):
        checks.check_normalize_inputs(x, eps)
        return torch.empty_like(x)

    @torch.library.register_fake(ns + "l2_normalize_backward")
    def _(grad, x, eps):
        checks.check_normalize_inputs(x, eps, grad)
        return torch.empty_like(x)

    @torch.library.register_fake(ns + "cosine_softmax_forward")
    def _(features, weight, labels, scale, m1, m2, m3, lam, normalize_features,
          normalize_weight, ignore_index, class_start, num_classes):
        checks.check_margins(m1, m2, m3, lam)
        checks.check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes,
                               scale)
        return _per_sample(features), _per_sample(features)

    @torch.library.register_fake(ns + "cosine_softmax_backward")
    def _(grad_loss, grad_lse, features, weight, labels, scale, lse, m1, m2, m3, lam,
          normalize_features, normalize_weight, ignore_index, class_start, num_classes,
          check_data=True):
        checks.check_margins(m1, m2, m3, lam)
        checks.check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes,
                               scale, data=check_data)
        for name, t in (("grad_loss", grad_loss), ("grad_lse", grad_lse), ("lse", lse)):
            checks.check_per_sample(name, t, features)
        return torch.empty_like(features), torch.empty_like(weight), torch.empty_like(scale)

    # Defaults as in the schemas: a call may leave them out.
    @torch.library.register_fake(ns + "c_contrastive")
    def _(features, weight, labels, pos_margin=0.0, neg_margin=1.0, ignore_index=-100,
          class_start=0, num_classes=-1):
        checks.check_finite("pos_margin", pos_margin)
        checks.check_finite("neg_margin", neg_margin)
        checks.check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes)
        return _per_sample(features)

    @torch.library.register_fake(ns + "c_contrastive_backward")
    def _(grad_loss, features, weight, labels, pos_margin, neg_margin, ignore_index,
          class_start, num_classes, check_data=True):
        checks.check_finite("pos_margin", pos_margin)
        checks.check_finite("neg_margin", neg_margin)
        checks.check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes,
                               data=check_data)
        checks.check_per_sample("grad_loss", grad_loss, features)
        return torch.empty_like(features), torch.empty_like(weight)

    @torch.library.register_fake(ns + "c_triplet_forward")
    def _(features, weight, labels, margin, hardest_only, center, ignore_index, class_start,
          num_classes):
        checks.check_finite("margin", margin)
        checks.check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes)
        return _per_sample(features), _per_sample(features, torch.int64)

    @torch.library.register_fake(ns + "c_triplet_backward")
    def _(grad_loss, features, weight, labels, hardest, margin, hardest_only, center,
          ignore_index, class_start, num_classes, check_data=True):
        checks.check_finite("margin", margin)
        checks.check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes,
                               data=check_data)
        checks.check_per_sample("grad_loss", grad_loss, features)
        if hardest_only:
            checks.check_hardest(hardest, features, weight, data=check_data)
        return torch.empty_like(features), torch.empty_like(weight)

    @torch.library.register_fake(ns + "center_loss")
    def _(features, weight, labels, ignore_index=-100, class_start=0, num_classes=-1):
        checks.check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes)
        return _per_sample(features)

    @torch.library.register_fake(ns + "center_loss_backward")
    def _(grad_loss, features, weight, labels, ignore_index, class_start, num_classes,
          check_data=True):
        checks.check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes,
                               data=check_data)
        checks.check_per_sample("grad_loss", grad_loss, features)
        return torch.empty_like(features), torch.empty_like(weight)


# ---------------------------------------------------------------------------------------------
# Autograd: every forward op saves its inputs (and the outputs the backward needs) and calls the
# matching *_backward op with check_data=False: the forward checked the same labels and scale,
# so the backward makes no host sync (contract: at most one per training step, in the forward).
# Labels and the float/int/bool parameters get no gradient.
# ---------------------------------------------------------------------------------------------

def grad_or_zeros(grad, like):
    """Upstream gradients may be None (output unused) or expanded views (from .sum())."""
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def normalize_autograd(backward_op):
    """(backward, setup_context) of an l2_normalize op (eq. 4) whose backward op is
    backward_op(grad, x, eps); the Triton op's too (triton/autograd.py)."""
    def setup(ctx, inputs, output):
        x, eps = inputs
        ctx.save_for_backward(x)
        ctx.eps = eps

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return backward_op(grad.contiguous(), x, ctx.eps), None

    return backward, setup


def _register_autograd():
    """Autograd of the C++ ops: each backward is a separate op taking (grads..., *inputs, *saved
    outputs, *params)."""
    ns = "normface::"
    ops = torch.ops.normface

    def backward_op(name):
        return getattr(ops, name)

    # l2_normalize: eq. 4.
    backward, setup = normalize_autograd(backward_op("l2_normalize_backward"))
    torch.library.register_autograd(ns + "l2_normalize", backward, setup_context=setup)

    # cosine_softmax_forward: both outputs (loss, lse) are differentiable.
    def setup_softmax(ctx, inputs, output):
        features, weight, labels, scale, *params = inputs
        ctx.save_for_backward(features, weight, labels, scale, output[1])
        ctx.params = params

    def backward_softmax(ctx, grad_loss, grad_lse):
        features, weight, labels, scale, lse = ctx.saved_tensors
        grad_f, grad_w, grad_s = backward_op("cosine_softmax_backward")(
            grad_or_zeros(grad_loss, lse), grad_or_zeros(grad_lse, lse), features, weight,
            labels, scale, lse, *ctx.params, False)
        needs = ctx.needs_input_grad
        return ((grad_f if needs[0] else None, grad_w if needs[1] else None, None,
                 grad_s if needs[3] else None) + (None,) * len(ctx.params))

    torch.library.register_autograd(ns + "cosine_softmax_forward", backward_softmax,
                                    setup_context=setup_softmax)

    # Agent losses: (features, weight, labels, *params) -> loss [, hardest].
    def make_agent(backward_name, saves_hardest):
        def setup(ctx, inputs, output):
            features, weight, labels, *params = inputs
            saved = (features, weight, labels) + ((output[1],) if saves_hardest else ())
            ctx.save_for_backward(*saved)
            ctx.params = params

        def backward(ctx, grad_loss, *unused):
            saved = ctx.saved_tensors
            grad_f, grad_w = backward_op(backward_name)(
                grad_or_zeros(grad_loss, _per_sample(saved[0])), *saved, *ctx.params, False)
            needs = ctx.needs_input_grad
            return ((grad_f if needs[0] else None, grad_w if needs[1] else None, None)
                    + (None,) * len(ctx.params))

        return backward, setup

    for name, backward_name, saves_hardest in (
            ("c_contrastive", "c_contrastive_backward", False),
            ("c_triplet_forward", "c_triplet_backward", True),
            ("center_loss", "center_loss_backward", False)):
        backward, setup = make_agent(backward_name, saves_hardest)
        torch.library.register_autograd(ns + name, backward, setup_context=setup)


def register_cpp_ops():
    """Fake kernels and autograd for the ops of normface_kernels._C (called once on import)."""
    _register_fakes()
    _register_autograd()
