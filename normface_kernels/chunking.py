"""Switches of the chunked path (csrc/chunked, docs/kernels.md "Chunked path").

The chunked path walks the classes in chunks: per chunk the vendor library does the matrix work
(cuBLAS on CUDA, the CPU BLAS on CPU) and small epilogue kernels do the rest. It is what the CUDA
kernels (backend="cuda") run. On CPU tensors backend="cpu" runs the blocked CPU kernels
(csrc/cpu) by default; ``set_cpu_path("chunked")`` makes the ops run the chunked path on CPU
tensors too (the same orchestration as on CUDA, with CPU epilogues), e.g. to test or benchmark it.

``set_chunk_budget(nbytes)`` bounds the bytes of a chunk's buffers (the (B, Cc) float32 logits and
gradient operand, the (Cc, D) gradient of W), which sets the chunk width Cc; 0 restores the
defaults (the L2 cache on CUDA, capped at 256 MiB; see docs/kernels.md for CPU).
"""

import contextlib
import warnings

import torch

CPU_PATHS = ("blocked", "chunked")


def set_cpu_path(path):
    """Which kernels the ops run on CPU tensors: "blocked" (default) or "chunked". Returns the
    previous setting."""
    if path not in CPU_PATHS:
        raise ValueError(f"path must be one of {CPU_PATHS}, got {path!r}")
    with warnings.catch_warnings():
        # Putting the chunked kernels in front of the blocked ones is a dispatcher override, which
        # PyTorch reports once per process.
        warnings.filterwarnings("ignore", message="Warning only once for all operators")
        warnings.filterwarnings("ignore", message="Overriding a previously registered kernel")
        return torch.ops.normface.set_cpu_path(path)


def set_chunk_budget(nbytes):
    """Bytes of the chunked path's per-chunk buffers (int > 0; 0: the default). Returns the
    previous setting (0 when it was the default). The forward and the backward of one step must
    see the same budget (they must walk the same chunks)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
    return torch.ops.normface.set_chunk_budget(nbytes)


@contextlib.contextmanager
def cpu_path(path):
    """Context manager: set_cpu_path(path) inside, the previous setting after."""
    previous = set_cpu_path(path)
    try:
        yield
    finally:
        set_cpu_path(previous)


@contextlib.contextmanager
def chunk_budget(nbytes):
    """Context manager: set_chunk_budget(nbytes) inside, the previous budget after."""
    previous = set_chunk_budget(nbytes)
    try:
        yield
    finally:
        set_chunk_budget(previous)
