"""Triton backend of normface_kernels: the ops `torch.ops.normface.triton_<name>`.

Same schemas and meaning as the C++ ops of csrc/registration.cpp (class_start / num_classes
included), plus `triton_cosine_logits` and the training ops (registration.py). Imported on first
use of backend="triton" (normface_kernels.backends); raises ImportError without triton, so
normface_kernels itself never needs it. docs/kernels.md derives every kernel.

Layout (one file per kernel family; in each, `_x_kernel` (Triton) -> launcher -> op):
    config.py              block sizes, warps, stages, grid splits (functions of dtype and D)
    tiles.py               launch(), the cosine tile (symmetric dot), logit factors
    normalize.py           row norms, l2_normalize and its backward (eq. 3 / 4)
    rows.py                per-row terms computed once: local targets, cos_iy, t_i, t'_i
    cosine_softmax_fwd.py  row-stationary forward: online logsumexp + U, R; exact split merge
    cosine_softmax_bwd.py  closed-form backward (grad f, grad s, grad a) + grad_weight
    grad_weight.py         class-stationary grad_W kernel (softmax and hinge modes), eq. 4 fused
    row_grad.py            closed-form grad_features kernel; sparse grad_W (two rows per sample)
    agents.py              c_contrastive, c_triplet, center_loss
    logits.py              cosine_logits (B, C)
    registration.py        the ops and their argument checks
    autograd.py            autograd of the ops; the public-schema loss ops as composites
"""

import re

# This package is named `triton` too: absolute imports reach the real Triton package.
try:
    import triton as _triton  # noqa: F401
    import triton.language as _tl  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(f"normface_kernels.triton needs the triton package ({error})") from error

# The oldest Triton release the kernels are written and checked for (the AOT check, CI-oldest).
MIN_TRITON = (3, 6)
_version = re.match(r"(\d+)\.(\d+)", _triton.__version__)
if _version is None or tuple(map(int, _version.groups())) < MIN_TRITON:
    raise ImportError(f"triton {_triton.__version__} is older than the oldest supported, "
                      f"{'.'.join(map(str, MIN_TRITON))}")

# registration defines the ops, autograd.register() their autograd and the composites.
from . import autograd, config, registration  # noqa: E402,F401

autograd.register()
