"""Shared helpers for the test suite: inputs, the contract settings, the tolerance rule, and the
chunk budget of the chunked path."""

import os
from unittest import mock

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. triton.jit reads TRITON_INTERPRET when
# a function is decorated -- triton's own tl.* helpers included -- so it must be set before any
# test module imports triton, whatever the collection order; tests that compile for a real
# target (the AOT check) run in a subprocess without it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import normface_kernels
from normface_kernels import reference

# The Triton ops are defined on first use of backend="triton"; tests also call them directly. A
# failed load is not hidden here: those tests then fail on the missing op, with the reason in
# backend="triton"'s error.
normface_kernels.backends.REGISTRY["triton"].load()

# The rows of the contract's table, as keyword arguments of cosine_softmax.
SPEC_SETTINGS = {
    "normface": dict(scale=10.0),
    "cosface": dict(scale=30.0, m3=0.35),
    "arcface": dict(scale=30.0, m2=0.5),
    "sphereface_normalized": dict(scale=20.0, m1=4.0, lam=5.0),
    "a_softmax_weight_only": dict(scale=1.0, m1=4.0, lam=5.0, normalize_features=False),
    "l_softmax": dict(scale=1.0, m1=2.0, normalize_features=False, normalize_weight=False),
    "plain_softmax": dict(scale=1.0, normalize_features=False, normalize_weight=False),
    "l2_softmax_features_only": dict(scale=16.0, normalize_weight=False),
    "combined_margins": dict(scale=24.0, m1=1.5, m2=0.2, m3=0.1),
}


@pytest.fixture(scope="session", autouse=True)
def _require_extension():
    """The C++ extension is part of what is tested: a failed build must fail, not skip."""
    if normface_kernels._cpp_error is not None:
        pytest.fail(f"normface_kernels._C did not load: {normface_kernels._cpp_error}")


def make_inputs(B, C, D, dtype=torch.float64, seed=0, ignore=(), device="cpu",
                requires_grad=True):
    """features (B, D), weight (C, D), labels (B,) with rows `ignore` set to -100."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    w = torch.randn(C, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    for i in ignore:
        y[i] = -100
    return f.requires_grad_(requires_grad), w.requires_grad_(requires_grad), y


def grads(loss_fn, *tensors):
    """Loss (reduction 'none') and the gradients of a weighted sum of it w.r.t. `tensors`."""
    loss = loss_fn()
    g = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype)
    out = torch.autograd.grad((loss * g).sum(), tensors, allow_unused=True)
    return loss.detach(), [None if x is None else x.detach() for x in out]


def assert_low_precision_close(kernel, low_ref, exact, atol, what):
    """The contract's tolerance rule (docs/contract.md "Backends"):
    |kernel - exact| <= 2 |low-precision reference - exact| + atol."""
    kernel, low_ref, exact = (t.double() for t in (kernel, low_ref, exact))
    err = (kernel - exact).abs().max().item()
    ref_err = (low_ref - exact).abs().max().item()
    assert err <= 2 * ref_err + atol, (
        f"{what}: error {err:.3g} vs reference-in-low-precision error {ref_err:.3g} (+{atol})")


def low_precision_reference():
    """A context in which normface_kernels.reference computes in its inputs' own dtype instead
    of float32 / float64: the plain PyTorch implementation in low precision, whose error the
    tolerance rule (assert_low_precision_close) allows the kernels twice of."""
    return mock.patch.object(reference, "_acc_dtype", lambda x: x.dtype)


def budget_for(classes, B, D, dtype=torch.float64, device="cpu"):
    """A chunk budget (set_chunk_budget) whose chunks hold `classes` classes: the rule of
    csrc/chunked/plan.cpp ChunkWalk::chunk_size (exact below 256 classes, where it does not round
    the width to a multiple of 128). Per class: B + D values of the accumulation dtype, plus for
    16-bit inputs B 16-bit values on CUDA (the 16-bit P operand) or D float32 values on the CPU
    (the W chunk converted to float32); on the CPU every thread has its own buffers."""
    acc = reference._acc_dtype(torch.empty((), dtype=dtype)).itemsize
    per_class = (B + D) * acc
    if dtype in (torch.float16, torch.bfloat16):
        per_class += B * dtype.itemsize if torch.device(device).type == "cuda" else D * acc
    threads = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
    return classes * per_class * threads
