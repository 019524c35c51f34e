"""Triton backend of normface_kernels: the ops `torch.ops.normface.triton_<name>`.

Same schemas and meaning as the C++ ops of csrc/registration.cpp (class_start / num_classes
included), plus `triton_cosine_logits`. Imported lazily by functional.has_triton(); raises
ImportError when the triton package is missing, so normface_kernels itself never needs it.

Layout (one file per kernel family; in each, `_x_kernel` (Triton) -> launcher -> op):
    config.py              block sizes, grid splits, dot precision
    tiles.py               shared Triton helpers: cosine tile (tl.dot + norms in the epilogue),
                           target cosines (B-length dots)
    normalize.py           row norms, l2_normalize and its backward (eq. 3 / 4)
    cosine_softmax_fwd.py  online logsumexp over (row tiles x class splits) + exact merge
    cosine_softmax_bwd.py  recomputing backward: grad f~ (row tiles x splits, atomics into B x D)
                           and grad W~ (class tiles, eq. 4 fused when D fits one chunk)
    agents.py              c_contrastive, c_triplet, center_loss
    logits.py              cosine_logits (B, C)
    registration.py        the ops (torch.library.triton_op) and their argument checks
"""

# This package is named `triton` too: absolute imports reach the real Triton package.
try:
    import triton as _triton  # noqa: F401
    import triton.language as _tl  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(f"normface_kernels.triton needs the triton package ({error})") from error

from . import config  # noqa: E402
from . import registration  # noqa: E402,F401  (defines the ops)
from .. import ops as _ops  # noqa: E402

# Autograd for the loss family: the same formulas as the C++ ops, with the triton_ backward ops.
_ops.register_autograd_family("triton_")


def set_grad_filter(eps):
    """Gradient filtering of the tiled backward kernels: skip the products of a tile whose
    |dL/dcos| sums to at most eps. None (default) turns it off; 0.0 skips only all-zero tiles
    (exact); a positive eps is an approximation. Read when a backward op is traced or called."""
    if eps is not None and not eps >= 0:
        raise ValueError(f"eps must be None or >= 0, got {eps}")
    config.GRAD_FILTER = None if eps is None else float(eps)
