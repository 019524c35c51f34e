"""The CUDA kernels (the chunked path of csrc/chunked with the epilogues of csrc/cuda) are
registered for every op that has no composite kernel.

Needs no GPU: it asks the dispatcher, it runs nothing. Skipped only when the extension was
deliberately built without CUDA (NORMFACE_NO_CUDA=1 or a CPU-only torch, as setup.py recorded in
normface_kernels/_build_info.py) or cannot have been (no CUDA toolkit then or now) -- if a toolkit
is there and the build did not opt out, a missing CUDA kernel is a failure.
"""

import glob
import os
import shutil

import pytest
import torch

import normface_kernels  # noqa: F401  (loads _C and with it the registrations)

# Ops with a backend kernel per device; cosine_softmax, c_triplet and cosine_logits are
# CompositeImplicitAutograd and need none.
CUDA_OPS = (
    "l2_normalize",
    "l2_normalize_backward",
    "cosine_softmax_forward",
    "cosine_softmax_backward",
    "c_contrastive",
    "c_contrastive_backward",
    "c_triplet_forward",
    "c_triplet_backward",
    "center_loss",
    "center_loss_backward",
)
COMPOSITE_OPS = ("cosine_softmax", "c_triplet", "cosine_logits")


def _has_cuda_kernel(name):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"normface::{name}", "CUDA")


def _toolkit_found():
    """setup.py's rule: CUDA_HOME / CUDA_PATH, /usr/local/cuda*, or nvcc on PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [home] if home else []
    candidates += glob.glob("/usr/local/cuda-*") + ["/usr/local/cuda"]
    if any(c and os.path.exists(os.path.join(c, "bin", "nvcc")) for c in candidates):
        return True
    return shutil.which("nvcc") is not None


def _cpu_only_reason():
    """Why the build had no CUDA kernels on purpose (or could not have), else None."""
    try:
        from normface_kernels import _build_info
    except ImportError:  # built by other means than setup.py (e.g. CMake): the old rule
        _build_info = None
    if _build_info is not None and _build_info.CUDA_SKIPPED_BECAUSE in ("NORMFACE_NO_CUDA=1",
                                                                         "CPU-only torch"):
        return f"built without CUDA on purpose ({_build_info.CUDA_SKIPPED_BECAUSE})"
    if torch.version.cuda is None:
        return "CPU-only torch"
    if os.environ.get("NORMFACE_NO_CUDA", "0") == "1" and _build_info is None:
        return "NORMFACE_NO_CUDA=1"
    if not _toolkit_found():
        return "no CUDA toolkit"
    return None


_ANY_CUDA_KERNEL = normface_kernels._cpp_error is None and any(
    _has_cuda_kernel(name) for name in CUDA_OPS)

_CPU_ONLY = None if _ANY_CUDA_KERNEL else _cpu_only_reason()
pytestmark = pytest.mark.skipif(
    _CPU_ONLY is not None, reason=f"normface_kernels._C has no CUDA kernels: {_CPU_ONLY}")


def test_extension_loaded():
    assert normface_kernels._cpp_error is None, f"_C failed to load: {normface_kernels._cpp_error}"


@pytest.mark.parametrize("name", CUDA_OPS)
def test_cuda_kernel_registered(name):
    assert _has_cuda_kernel(name), (
        f"normface::{name} has no CUDA kernel: a CUDA toolkit is present, so csrc/cuda should "
        "have been built (rebuild with CUDA_HOME set, without NORMFACE_NO_CUDA=1)")


def test_has_cuda_kernels_reports_it():
    assert normface_kernels.has_cuda_kernels()


@pytest.mark.parametrize("name", CUDA_OPS)
def test_cuda_kernel_is_the_chunked_path(name):
    # One way to compute each thing: every CUDA kernel is the chunked orchestration.
    table = torch._C._dispatch_dump_table(f"normface::{name}")
    cuda = [line for line in table.splitlines() if line.startswith("CUDA:")]
    assert cuda and "chunked" in cuda[0], cuda


@pytest.mark.parametrize("name", COMPOSITE_OPS)
def test_composite_ops_need_no_cuda_kernel(name):
    # They decompose into the ops above, so they run on CUDA tensors through them.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        f"normface::{name}", "CompositeImplicitAutograd")
