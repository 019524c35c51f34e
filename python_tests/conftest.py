"""Shared helpers for the test suite: inputs, the contract settings, the tolerance rule, the
`backend` fixture the shared scenarios run on, and the chunk budget of the chunked path."""

import contextlib
import os
from dataclasses import dataclass

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. triton.jit reads TRITON_INTERPRET when
# a function is decorated -- triton's own tl.* helpers included -- so it must be set before any
# test module imports triton, whatever the collection order; tests that compile for a real
# target (the AOT check) run in a subprocess without it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import normface_kernels
from normface_kernels import checks, reference
from normface_kernels.chunking import chunk_budget, cpu_path

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

# The agent losses (paper section 4): name -> (public function, reference function, kwargs).
AGENT_CASES = {
    "c_contrastive": (normface_kernels.c_contrastive, reference.c_contrastive, dict()),
    "c_contrastive_margins": (normface_kernels.c_contrastive, reference.c_contrastive,
                              dict(pos_margin=0.1, neg_margin=1.6)),
    "c_triplet_hardest": (normface_kernels.c_triplet, reference.c_triplet, dict()),
    "c_triplet_hardest_center": (normface_kernels.c_triplet, reference.c_triplet,
                                 dict(center=True, margin=2.0)),
    "c_triplet_all": (normface_kernels.c_triplet, reference.c_triplet,
                      dict(hardest_only=False, margin=1.5)),
    "c_triplet_all_center": (normface_kernels.c_triplet, reference.c_triplet,
                             dict(hardest_only=False, center=True)),
    "center": (normface_kernels.center_loss, reference.center_loss, dict()),
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "backends(*names): run a test taking the `backend` fixture on these backends "
        "only (default: all of BACKENDS)")


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
    g = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)
    out = torch.autograd.grad((loss * g).sum(), tensors, allow_unused=True)
    return loss.detach(), [None if x is None else x.detach() for x in out]


# ---------------------------------------------------------------------------------------------
# The tolerance rule (docs/contract.md "Backends"): the one implementation every test uses
# ---------------------------------------------------------------------------------------------

def assert_low_precision_close(kernel, plain, exact, atol, what, *, clamp_to=None,
                               plain_fallback=None):
    """|kernel - exact| <= 2 |plain - exact| + atol, in max norms over the entries where the
    exact (float64) result is finite -- and there the kernel's must be finite too. `plain` is the
    reference computed in the inputs' own precision (reference.input_precision()).

    clamp_to: a dtype whose largest number every value is clamped to first (a gradient rightly
    overflows to +-inf in it where the exact one is beyond it). Where plain PyTorch breaks down
    (a non-finite entry: eps underflows, 0 / 0) it gives no slack there, or, with plain_fallback,
    its error is taken as plain_fallback instead."""
    # On the exact result's device: a GPU test's (C, D) gradients stay there (no host copies).
    kernel, plain, exact = (t.detach().to(device=exact.device, dtype=torch.float64)
                            for t in (kernel, plain, exact))
    assert kernel.shape == exact.shape, (
        f"{what}: shape {tuple(kernel.shape)} != {tuple(exact.shape)}")
    if clamp_to is not None:
        big = torch.finfo(clamp_to).max
        kernel, plain, exact = (t.clamp(-big, big) for t in (kernel, plain, exact))
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(kernel), finite), (
        f"{what}: not finite where the exact result is (or the reverse)")
    kernel, plain, exact = kernel[finite], plain[finite], exact[finite]
    if exact.numel() == 0:
        return
    err = (kernel - exact).abs().max().item()
    plain_err = (plain - exact).abs()
    if plain_fallback is not None and not torch.isfinite(plain_err).all():
        ref_err = plain_fallback
    else:
        ref_err = torch.nan_to_num(plain_err, nan=0.0, posinf=0.0).max().item()
    assert err <= 2 * ref_err + atol, (
        f"{what}: error {err:.3g} vs the reference-in-low-precision error {ref_err:.3g} "
        f"(+{atol:.3g})")


# ---------------------------------------------------------------------------------------------
# The `backend` fixture: every shared scenario runs once per backend
# ---------------------------------------------------------------------------------------------

BACKENDS = ("cpu", "cpu_chunked", "triton", "cuda")
HAS_CUDA = torch.cuda.is_available()
# A chunk budget that makes the chunked path walk several chunks at the scenarios' shapes: about
# 15 classes per chunk and thread at B = 9, D = 6 in float64 on 2 threads (budget_for).
SMALL_BUDGET = 4096


@dataclass(frozen=True)
class Backend:
    """One backend as the shared scenarios see it.

    name: "cpu" (blocked C++ kernels), "cpu_chunked" (the chunked path of csrc/chunked with its
    CPU epilogues, small chunks), "triton" (the interpreter on CPU tensors without a GPU), "cuda".
    api: the public API's backend=. dtype: the scenarios' dtype (float64 where the backend runs it
    at full speed, float32 for Triton -- its float32 tiles are those of a GPU's 16-bit -- and
    CUDA); exact_dtype: the most precise one it has. low_dtypes: the 16-bit dtypes it computes in.
    interpreted: the Triton interpreter, where shapes stay tiny."""
    name: str
    api: str
    device: str
    dtype: torch.dtype
    exact_dtype: torch.dtype
    low_dtypes: tuple
    interpreted: bool = False

    def op(self, name):
        """torch.ops.normface.<name> of this backend (the registry's: triton_<name> for triton)."""
        return normface_kernels.backends.get(self.api).op(name)

    def inputs(self, B, C, D, dtype=None, **kwargs):
        """make_inputs on this backend's device, in `dtype` (default self.dtype)."""
        return make_inputs(B, C, D, dtype=dtype or self.dtype, device=self.device, **kwargs)

    def scale(self, value, dtype=None, requires_grad=True):
        """A 0-dim scale tensor in the accumulation dtype of `dtype` inputs."""
        acc = checks.acc_dtype(dtype or self.dtype)
        return torch.tensor(float(value), dtype=acc, device=self.device,
                            requires_grad=requires_grad)

    def tol(self, dtype=None):
        """rtol / atol of a comparison with the float64 reference for `dtype` inputs."""
        dtype = dtype or self.dtype
        if dtype == torch.float64:
            return dict(rtol=1e-7, atol=1e-9)
        if self.name == "triton":
            return dict(rtol=2e-5, atol=2e-5)
        return dict(rtol=1e-3, atol=1e-4)


def _backend(name):
    if name in ("cpu", "cpu_chunked"):
        return Backend(name, "cpu", "cpu", torch.float64, torch.float64,
                       (torch.float16, torch.bfloat16))
    if name == "triton":
        device = "cuda" if HAS_CUDA else "cpu"
        triton = normface_kernels.backends.REGISTRY["triton"]
        if not triton.available():
            pytest.skip(triton.unavailable_reason())
        if not triton.accepts(torch.device(device)):
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
        # The interpreter has no bfloat16 arithmetic.
        low = (torch.float16, torch.bfloat16) if HAS_CUDA else (torch.float16,)
        return Backend(name, "triton", device, torch.float32, torch.float64, low,
                       interpreted=not HAS_CUDA)
    if name == "cuda":
        if not (HAS_CUDA and normface_kernels.has_cuda_kernels()):
            pytest.skip("needs a CUDA device and the CUDA kernels")
        return Backend(name, "cuda", "cuda", torch.float32, torch.float32,
                       (torch.float16, torch.bfloat16))
    raise ValueError(name)


def _parametrizes(metafunc, name):
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        names = names.split(",") if isinstance(names, str) else names
        if name in (n.strip() for n in names):
            return True
    return False


def pytest_generate_tests(metafunc):
    """A test taking `backend` runs once per backend (the `backends` marker narrows the list),
    unless it parametrizes `backend` itself."""
    if "backend" in metafunc.fixturenames and not _parametrizes(metafunc, "backend"):
        marker = metafunc.definition.get_closest_marker("backends")
        names = marker.args if marker else BACKENDS
        metafunc.parametrize("backend", names, indirect=True)


@pytest.fixture
def backend(request):
    """A Backend (above), set up: the chunked CPU path with small chunks for cpu_chunked, exact
    float32 matrix products (no TF32) for cuda; skipped where the backend is not available."""
    b = _backend(request.param)
    with contextlib.ExitStack() as stack:
        if b.name == "cpu_chunked":
            stack.enter_context(cpu_path("chunked"))
            stack.enter_context(chunk_budget(SMALL_BUDGET))
        if b.name == "cuda":
            saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            stack.callback(setattr, torch.backends.cuda.matmul, "allow_tf32", saved)
        yield b


def budget_for(classes, B, D, dtype=torch.float64, device="cpu"):
    """A chunk budget (set_chunk_budget) whose chunks hold `classes` classes: the rule of
    csrc/chunked/plan.cpp ChunkWalk::chunk_size (exact below 256 classes, where it does not round
    the width to a multiple of 128). Per class: B + D values of the accumulation dtype, plus for
    16-bit inputs B 16-bit values on CUDA (the 16-bit P operand) or D float32 values on the CPU
    (the W chunk converted to float32); on the CPU every thread has its own buffers."""
    acc = checks.acc_dtype(dtype).itemsize
    per_class = (B + D) * acc
    if dtype in (torch.float16, torch.bfloat16):
        per_class += B * dtype.itemsize if torch.device(device).type == "cuda" else D * acc
    threads = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
    return classes * per_class * threads
