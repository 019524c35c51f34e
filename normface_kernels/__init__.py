"""normface_kernels: fused kernels for hypersphere embedding losses with very many classes.

NormFace (Wang et al. 2017) and its family -- scaled cosine softmax with a learnable scale,
CosFace / ArcFace / SphereFace / L-Softmax margins, and the agent losses (C-contrastive,
C-triplet, center) -- computed without materializing the (B, C) logits matrix.

    import normface_kernels as nk
    loss = nk.cosine_softmax(features, weight, labels, scale=30.0, m2=0.5)   # ArcFace
    criterion = nk.NormFaceLoss(512, 100_000)                                 # learned scale
"""

import torch  # noqa: F401  (loads libtorch before the _C library that links it)

# Loads the C++ library (every op schema, the CPU and, when built, CUDA kernels); a failed load
# leaves backend="reference" (and "triton") usable and says why on use.
from .backends import CPP_ERROR as _cpp_error  # noqa: E402

if _cpp_error is None:
    from . import ops as _ops

    _ops.register_cpp_ops()

from .chunking import set_chunk_budget, set_cpu_path  # noqa: E402
from .functional import (  # noqa: E402
    BACKENDS,
    c_contrastive,
    c_triplet,
    center_loss,
    cosine_logits,
    cosine_softmax,
    data_checks_enabled,
    has_cuda_kernels,
    has_triton,
    l2_normalize,
    scale_for_loss,
    set_data_checks,
    softmax_loss_bound,
)
from .modules import NormFaceLoss, sphereface_lambda  # noqa: E402

__all__ = [
    "BACKENDS", "NormFaceLoss", "c_contrastive", "c_triplet", "center_loss", "cosine_logits",
    "cosine_softmax", "data_checks_enabled", "has_cuda_kernels", "has_triton", "l2_normalize",
    "scale_for_loss", "set_chunk_budget", "set_cpu_path", "set_data_checks",
    "softmax_loss_bound", "sphereface_lambda",
]
__version__ = "0.1.0"
