"""Property-based fuzz of the public API against the reference (hypothesis).

- random valid inputs -- shapes, margins, normalization switches, dtypes, ignored rows, special
  rows (on the agent, opposite, zero), non-contiguous layouts -- on the cpu backend (its blocked
  kernels, and as "chunked" the chunked path's orchestration that backend="cuda" runs, with its CPU
  epilogues and chunks of a few classes), on the Triton ops (interpreter on CPU; tiny shapes) and
  on the CUDA kernels (GPU machines), losses and every gradient against the reference;
- exactness at huge norms: float64 (and float32) gradients where the softmax is exactly one-hot,
  so that any correct implementation is exact (contract: the backward recomputes each logit
  bit-identically to the forward);
- NaN and inf: in an ignored row they reach nothing (loss 0, no NaN in any gradient, the row's
  own grad_features 0); in a valid row or an agent they give NaN where the reference does.

The bad-input table is test_bad_input.py. Seeds are fixed (derandomize=True): a failure
reproduces, and hypothesis prints the shrunk example.

Tolerances: errors are measured against the *natural scale* of each quantity -- the size of the
terms it sums (e.g. s * max_j b_j / ||f_i|| per row of grad_features) -- so that cancellation
(a gradient through eq. 4 that is nearly zero) is not mistaken for a bug. In float64 an absolute
error of one rounding of the largest logit (1e-16 |z|) moves p = exp(z - lse) relatively by that
much in *every* correct implementation, so the float64 bound is
natural * (1e-9 + 1e-14 max|z|); it stays far below the O(1) errors of a real bug. In low
precision the contract's tolerance rule applies (docs/contract.md "Backends"):
error <= 2 x (plain PyTorch run in that precision) + atol.
"""

import contextlib
import math
import os
import sys
from types import SimpleNamespace

import pytest

_KERNELS_IMPORTED = "normface_kernels.triton" in sys.modules

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and not _KERNELS_IMPORTED:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

hypothesis = pytest.importorskip("hypothesis")
from conftest import assert_low_precision_close  # noqa: E402
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import normface_kernels as nk  # noqa: E402
from normface_kernels import reference  # noqa: E402
from normface_kernels.chunking import chunk_budget, cpu_path  # noqa: E402

# NaN and inf on purpose: numpy (the Triton interpreter) warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

TRITON_OK = nk.has_triton() and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1")
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="the Triton ops are not available")
# The C++ CUDA kernels (GPU machines): the same properties, CUDA dtypes (no float64 there).
needs_cuda = pytest.mark.skipif(not (HAS_CUDA and nk.has_cuda_kernels()),
                                reason="needs a CUDA device and the CUDA kernels")
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])
LOW = (torch.float16, torch.bfloat16)


def fuzz(examples):
    return settings(FUZZ, max_examples=examples)


AGENT_LOSSES = ("c_contrastive", "c_triplet", "center_loss")


# ---------------------------------------------------------------------------------------------
# Cases: everything one call needs, drawn by hypothesis (tensor values from a drawn seed).
# ---------------------------------------------------------------------------------------------

@st.composite
def margins(draw):
    m1 = draw(st.one_of(st.just(1.0), st.sampled_from([2.0, 3.0, 4.0]), st.floats(1.0, 4.0)))
    m2 = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.8)))
    m3 = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5)))
    lam = draw(st.one_of(st.just(0.0), st.floats(0.0, 10.0)))
    return dict(m1=m1, m2=m2, m3=m3, lam=lam)


@st.composite
def cases(draw, loss, dtypes, max_b=8, max_c=12, max_d=9, exps=(-3, 3)):
    """A random valid call of `loss` ("softmax" or an agent loss) on CPU float64 tensors (cast
    by the test): SimpleNamespace(f, w, y, kwargs, reduction, upstream, ignore_index, dtype)."""
    B, C, D = (draw(st.integers(1, n)) for n in (max_b, max_c, max_d))
    dtype = draw(st.sampled_from(dtypes))
    low = dtype in LOW
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    f_exp, w_exp = (0, 0) if low else (draw(st.integers(*exps)), draw(st.integers(*exps)))
    f = torch.randn(B, D, generator=g, dtype=torch.float64) * 10.0 ** f_exp
    w = torch.randn(C, D, generator=g, dtype=torch.float64) * 10.0 ** w_exp
    if not low and draw(st.booleans()):  # rows of very different norms in one batch
        f *= 10.0 ** (2 * torch.rand(B, 1, generator=g, dtype=torch.float64) - 1)
        w *= 10.0 ** (2 * torch.rand(C, 1, generator=g, dtype=torch.float64) - 1)
    y = torch.randint(0, C, (B,), generator=g)
    special = draw(st.sampled_from(["none", "on_agent", "opposite", "zero_feature",
                                    "zero_agent", "duplicate_agent"]))
    if special == "on_agent":
        f[0] = 2.0 * w[y[0]]
    elif special == "opposite":
        f[0] = -w[y[0]]
    elif special == "zero_feature":
        f[0] = 0.0
    elif special == "zero_agent":
        w[-1] = 0.0
    elif special == "duplicate_agent" and C > 1:
        w[1] = w[0]
    ignore_index = draw(st.sampled_from([-100, -1, C + 2]))
    ignored = draw(st.lists(st.integers(0, B - 1), max_size=B // 2, unique=True))
    y[ignored] = ignore_index
    if loss == "softmax":
        kwargs = dict(draw(margins()), normalize_features=draw(st.booleans()),
                      normalize_weight=draw(st.booleans()))
        kwargs["scale"] = draw(st.floats(0.5, 30.0 if low else 64.0))
        kwargs["learn_scale"] = draw(st.booleans())
    elif loss == "c_contrastive":
        kwargs = dict(pos_margin=draw(st.floats(-0.5, 1.0)), neg_margin=draw(st.floats(0.0, 4.5)))
    elif loss == "c_triplet":
        kwargs = dict(margin=draw(st.floats(-1.0, 3.0)), hardest_only=draw(st.booleans()),
                      center=draw(st.booleans()))
    else:
        kwargs = {}
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    upstream = 0.5 + torch.rand(B, generator=g, dtype=torch.float64)
    return SimpleNamespace(f=f, w=w, y=y, kwargs=kwargs, loss=loss, reduction=reduction,
                           upstream=upstream, ignore_index=ignore_index, dtype=dtype,
                           transposed=draw(st.booleans()))


# ---------------------------------------------------------------------------------------------
# Running a case, and the reference's own quantities for the tolerances
# ---------------------------------------------------------------------------------------------

def _public(loss):
    return {"softmax": nk.cosine_softmax, "c_contrastive": nk.c_contrastive,
            "c_triplet": nk.c_triplet, "center_loss": nk.center_loss}[loss]


def _reference(loss):
    return {"softmax": reference.cosine_softmax, "c_contrastive": reference.c_contrastive,
            "c_triplet": reference.c_triplet, "center_loss": reference.center_loss}[loss]


# "chunked": backend="cpu" on the chunked path (csrc/chunked with its CPU epilogues), in chunks of
# one to a few classes at these shapes, so that every call walks several chunks.
CHUNKED_BUDGET = 1024


def _kernels(backend):
    """The public API's backend name, and the context its calls (forward and backward) run in."""
    if backend == "chunked":
        stack = contextlib.ExitStack()
        stack.enter_context(cpu_path("chunked"))
        stack.enter_context(chunk_budget(CHUNKED_BUDGET))
        return "cpu", stack
    return backend, contextlib.nullcontext()


def run(case, backend, dtype=None, device="cpu", plain=False):
    """(loss, grad_features, grad_weight, grad_scale or None), all float64 on CPU. backend
    "reference" (with plain=True: the reference computed in the input precision itself, the
    tolerance rule's "plain PyTorch in low precision") or "chunked" (_kernels)."""
    dtype = dtype or case.dtype
    # Rounded to the case's dtype first: the float64 "exact" run sees the same numbers.
    f = case.f.to(case.dtype).to(device=device, dtype=dtype)
    w = case.w.to(case.dtype).to(device=device, dtype=dtype)
    if case.transposed:
        f = f.t().contiguous().t()
        w = torch.cat([w, w], dim=1)[:, ::2]
    f.requires_grad_()
    w.requires_grad_()
    y = case.y.to(device)
    kwargs = dict(case.kwargs)
    s = None
    if case.loss == "softmax":
        scale, learn = kwargs.pop("scale"), kwargs.pop("learn_scale")
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        s = torch.tensor(scale, dtype=acc, device=device, requires_grad=True) if learn else None
        kwargs["scale"] = s if learn else scale
    inputs = [t for t in (f, w, s) if t is not None]
    name, context = _kernels(backend)
    with context:  # the backward too runs the chunked path's ops
        if backend == "reference":
            with reference.input_precision() if plain else contextlib.nullcontext():
                per = _reference(case.loss)(f, w, y, ignore_index=case.ignore_index, **kwargs)
            out = reference.reduce_loss(per, y, case.ignore_index, case.reduction)
        else:
            out = _public(case.loss)(f, w, y, ignore_index=case.ignore_index,
                                     reduction=case.reduction, backend=name, **kwargs)
        total = out if case.reduction != "none" else (out * case.upstream.to(out)).sum()
        grads = torch.autograd.grad(total, inputs, allow_unused=True)
    grads = [None if g is None else g.detach().cpu().double() for g in grads]
    grads = (grads + [None])[:3]
    return (out.detach().cpu().double(),) + tuple(grads)


def softmax_logits(case, dtype=torch.float64):
    """z (B, C) of the contract, float64 (for tolerances and gaps), and the valid rows."""
    k = {key: v for key, v in case.kwargs.items() if key != "learn_scale"}
    f, w = case.f.to(dtype).double(), case.w.to(dtype).double()
    z, _, valid = reference.softmax_logits(f, w, case.y, ignore_index=case.ignore_index, **k)
    return z, valid


def natural_scales(case, dtype=torch.float64):
    """Per row of each output: the size of the terms it sums (module docstring)."""
    f, w = case.f.to(dtype).double(), case.w.to(dtype).double()
    B, C = f.shape[0], w.shape[0]
    valid = case.y != case.ignore_index
    u = {"none": case.upstream, "sum": torch.ones(B, dtype=torch.float64),
         "mean": torch.full((B,), 1.0 / max(1, int(valid.sum())), dtype=torch.float64)}
    u = u[case.reduction] * valid
    nf, nw = reference.norm(f)[:, 0], reference.norm(w)[:, 0]
    if case.loss == "softmax":
        k = case.kwargs
        z, _ = softmax_logits(case, dtype)
        zmax = z.abs().amax(dim=1) + math.log(C) + 1.0
        # |dt/dcos| <= m1 and |t| <= 2 m1 + 1 + m3: every term carries at most this factor.
        K = 3.0 * k["m1"] + 2.0 + k["m3"]
        a = torch.ones(B, dtype=torch.float64) if k["normalize_features"] else nf
        b = torch.ones(C, dtype=torch.float64) if k["normalize_weight"] else nw
        s = k["scale"]
        nat_f = 2 * u * s * b.max() * K / (nf if k["normalize_features"] else 1.0)
        nat_w = 2 * (u * a).sum() * s * K / (nw if k["normalize_weight"] else 1.0)
        nat_s = 2 * (u * a).sum() * b.max() * K
        return SimpleNamespace(loss=zmax, f=nat_f, w=nat_w, s=nat_s, zmax=zmax)
    # Agent losses: |dL/dcos_ij| <= 2 per hinge, at most 2 C in a row (C-triplet's target).
    margin = sum(abs(v) for v in case.kwargs.values() if not isinstance(v, bool))
    loss_scale = torch.full((B,), C * (4.0 + margin), dtype=torch.float64)
    gc = 2.0 * (C + 1)
    return SimpleNamespace(loss=loss_scale, f=u * gc / nf, w=(u * gc).sum() / nw,
                           s=None, zmax=torch.zeros(B, dtype=torch.float64))


def _per_row(x, like):
    return x.reshape(-1, *([1] * (like.dim() - 1))) if like.dim() > 0 else x.max()


def assert_close_natural(actual, expected, natural, rtol, what):
    """|actual - expected| <= rtol * natural (per row); NaN must match NaN."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    same_nan = torch.isnan(actual) == torch.isnan(expected)
    assert same_nan.all(), f"{what}: NaN where the reference has none (or the reverse)"
    if actual.numel() == 0:
        return
    if actual.dim() == 0:
        natural = natural.max() if torch.is_tensor(natural) else natural
    elif torch.is_tensor(natural) and natural.dim() == 1 and natural.shape[0] == actual.shape[0]:
        natural = _per_row(natural, actual)
    err = torch.where(torch.isnan(expected), torch.zeros_like(expected), actual - expected).abs()
    bound = rtol * natural + 1e-300
    worst = (err / bound).max().item()
    assert worst <= 1.0, (f"{what}: error {err.max().item():.3g} is {worst:.3g} x the bound "
                          f"(rtol {rtol:g} of the natural scale)")


def assert_reduced_natural(case, natural):
    """The natural scale of the loss output for the case's reduction."""
    if case.reduction == "none":
        return natural.loss
    valid = case.y != case.ignore_index
    total = (natural.loss * valid).sum()
    return total / max(1, int(valid.sum())) if case.reduction == "mean" else total


def check_against_reference(case, backend, device="cpu"):
    """The backend's loss and gradients against the float64 reference (module docstring)."""
    out = run(case, backend, device=device)
    exact = run(case, "reference", dtype=torch.float64)
    nat = natural_scales(case, case.dtype)
    names = ("loss", "grad_features", "grad_weight", "grad_scale")
    nats = (assert_reduced_natural(case, nat), nat.f, nat.w, nat.s)
    if case.dtype == torch.float64:
        floor = 1e-14 * nat.zmax.max().item()
        for what, a, r, n in zip(names, out, exact, nats):
            if r is not None:
                assert a is not None, what
                assert_close_natural(a, r, n, 1e-9 + floor, what)
        return
    plain = run(case, "reference", plain=True)
    atol = 1e-5 if case.dtype == torch.float32 else 3e-3
    for what, a, r, p, n in zip(names, out, exact, plain, nats):
        if r is None:
            continue
        n = n.max().item() if torch.is_tensor(n) else n
        floor, clamp_to = 0.0, None
        if what != "loss":  # gradients come back in the input dtype: rightly +-inf beyond it
            info = torch.finfo(case.dtype)
            clamp_to = case.dtype
            floor = 2 * info.smallest_normal * info.eps  # two steps of the subnormal grid
        # Plain half-precision PyTorch can fail outright (eps = 1e-12 underflows to 0, and a
        # zero row gives 0/0): only its finite errors count, the kernel gets no slack there.
        assert_low_precision_close(a, p, r, atol * n + floor,
                                   f"{what} ({case.dtype}, natural scale {n:.3g})",
                                   clamp_to=clamp_to)


def no_discontinuity(case):
    """False when a hinge or the hardest negative sits within rounding of its switch point in
    some valid row (then two correct implementations may pick different branches), or, with an
    angular margin, a target cosine within rounding of the clamp at +-(1 - 1e-7): d psi / d cos
    jumps there from sin(m1 theta + m2) / sin(theta) ~ 1e3 to 0 (the contract's clamp), so the
    float32 cosine of a kernel and the 16-bit one of plain PyTorch may land on either side."""
    delta = {torch.float64: 1e-7, torch.float32: 1e-3}.get(case.dtype, 3e-2)
    f, w = case.f.to(case.dtype).double(), case.w.to(case.dtype).double()
    d = 2.0 - 2.0 * reference.cosine_logits(f, w, 1.0)
    valid = case.y != case.ignore_index
    if not valid.any():
        return True
    d, y = d[valid], case.y[valid]
    d_y = d.gather(1, y[:, None])
    others = torch.ones_like(d, dtype=torch.bool).scatter(1, y[:, None], False)
    k = case.kwargs
    if case.loss == "softmax":
        if k["m1"] == 1.0 and k["m2"] == 0.0:
            return True  # no angular margin: psi = clamp(cos) - m3 is 1-Lipschitz
        # 1 - |cos| = d / 2 or 2 - d / 2; the band: float32 rounding, or 16-bit's resolution.
        band = {torch.float64: 1e-12, torch.float32: 1e-6}.get(case.dtype, 2e-3)
        gap = torch.minimum(d_y / 2, 2 - d_y / 2)
        return bool((gap > 1e-7 + band).all())
    if case.loss == "c_contrastive":
        return bool((d_y - k["pos_margin"]).abs().min() > delta) and bool(
            ((k["neg_margin"] - d).abs() > delta)[others].all())
    if case.loss == "c_triplet":
        if k["hardest_only"]:
            if d.shape[1] < 2:
                return True
            neg = torch.where(others, d, torch.full_like(d, math.inf)).sort(dim=1).values
            gap = neg[:, 1] - neg[:, 0]
            tie_ok = bool(((gap == 0) | (gap > delta) | torch.isinf(gap)).all())
            return tie_ok and bool(((k["margin"] + d_y[:, 0] - neg[:, 0]).abs() > delta).all())
        return bool(((k["margin"] + d_y - d).abs() > delta)[others].all())
    return True


# ---------------------------------------------------------------------------------------------
# Random valid inputs against the reference
# ---------------------------------------------------------------------------------------------

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@fuzz(250)
@given(cases("softmax", ALL_DTYPES))
def test_cpu_softmax_matches_reference(case):
    assume(no_discontinuity(case))
    check_against_reference(case, "cpu")


@fuzz(300)
@given(st.sampled_from(AGENT_LOSSES).flatmap(lambda loss: cases(loss, ALL_DTYPES)))
def test_cpu_agent_losses_match_reference(case):
    assume(no_discontinuity(case))
    check_against_reference(case, "cpu")


@fuzz(100)
@given(cases("softmax", ALL_DTYPES))
def test_chunked_softmax_matches_reference(case):
    assume(no_discontinuity(case))
    check_against_reference(case, "chunked")


@fuzz(100)
@given(st.sampled_from(AGENT_LOSSES).flatmap(lambda loss: cases(loss, ALL_DTYPES)))
def test_chunked_agent_losses_match_reference(case):
    assume(no_discontinuity(case))
    check_against_reference(case, "chunked")


@needs_triton
@fuzz(20)
@given(cases("softmax", [torch.float64, torch.float32, torch.float16], max_b=18, max_c=20,
             max_d=20))
def test_triton_softmax_matches_reference(case):
    assume(no_discontinuity(case))
    check_against_reference(case, "triton", device=TRITON_DEVICE)


@needs_triton
@fuzz(12)
@given(st.sampled_from(AGENT_LOSSES).flatmap(
    lambda loss: cases(loss, [torch.float64, torch.float32], max_b=18, max_c=20, max_d=20)))
def test_triton_agent_losses_match_reference(case):
    assume(no_discontinuity(case))
    check_against_reference(case, "triton", device=TRITON_DEVICE)


@needs_cuda
@fuzz(100)
@given(cases("softmax", CUDA_DTYPES, max_b=40, max_c=300, max_d=40))
def test_cuda_softmax_matches_reference(case):
    assume(no_discontinuity(case))
    check_against_reference(case, "cuda", device="cuda")


@needs_cuda
@fuzz(100)
@given(st.sampled_from(AGENT_LOSSES).flatmap(
    lambda loss: cases(loss, CUDA_DTYPES, max_b=40, max_c=300, max_d=40)))
def test_cuda_agent_losses_match_reference(case):
    assume(no_discontinuity(case))
    check_against_reference(case, "cuda", device="cuda")


# ---------------------------------------------------------------------------------------------
# Huge norms: exact gradients where the softmax is exactly one-hot
# ---------------------------------------------------------------------------------------------

@st.composite
def huge_cases(draw, dtypes):
    """Small-integer directions times 10^k (norms up to 1e18 in float64, 1e12 in float32) in
    the modes where a norm multiplies the logits; kept only when every valid row's largest
    logit is unique and at least 1000 above the next (assumed by the test), so that p is
    exactly one-hot and the exact gradients are short sums every implementation gets right."""
    B, C, D = draw(st.integers(1, 4)), draw(st.integers(2, 5)), draw(st.integers(2, 5))
    dtype = draw(st.sampled_from(dtypes))
    ints = st.lists(st.integers(-3, 3), min_size=D, max_size=D)

    def rows(n):
        m = torch.tensor(draw(st.lists(ints, min_size=n, max_size=n)), dtype=torch.float64)
        m[(m == 0).all(dim=1), 0] = 1.0
        return m

    nf, nw = draw(st.sampled_from([(False, False), (False, True), (True, False)]))
    f_top, w_top = (18, 9) if dtype == torch.float64 else (12, 6)
    f = rows(B) * 10.0 ** draw(st.integers(0 if nf else 6, f_top))
    w = rows(C) * 10.0 ** draw(st.integers(0 if nw else 6, w_top))
    y = torch.tensor(draw(st.lists(st.integers(0, C - 1), min_size=B, max_size=B)))
    kwargs = dict(draw(margins()), normalize_features=nf, normalize_weight=nw,
                  scale=draw(st.floats(1.0, 64.0)), learn_scale=draw(st.booleans()))
    upstream = torch.tensor(draw(st.lists(st.floats(0.5, 1.5), min_size=B, max_size=B)),
                            dtype=torch.float64)
    return SimpleNamespace(f=f, w=w, y=y, kwargs=kwargs, loss="softmax", reduction="none",
                           upstream=upstream, ignore_index=-100, dtype=dtype, transposed=False)


def one_hot_softmax(case):
    z, valid = softmax_logits(case, case.dtype)
    top = z[valid].topk(2, dim=1).values
    return bool((top[:, 0] - top[:, 1] > 1000.0 + 1e-4 * top[:, 0].abs()).all())


def check_huge(case, backend, device="cpu"):
    """float64: within 1e-9 of the natural scale (p is exact); float32: the tolerance rule (acos
    near the clamp alone moves t by ~1e-4 in float32, in every implementation)."""
    if case.dtype != torch.float64:
        return check_against_reference(case, backend, device)
    out = run(case, backend, device=device)
    exact = run(case, "reference", dtype=torch.float64)
    nat = natural_scales(case, case.dtype)
    for what, a, r, n in zip(("loss", "grad_features", "grad_weight", "grad_scale"), out, exact,
                             (nat.loss, nat.f, nat.w, nat.s)):
        if r is not None:
            assert torch.isfinite(a).all(), f"{what}: not finite: {a}"
            assert_close_natural(a, r, n, 1e-9, what)


def test_huge_norm_float64_reproducer():
    """The case first reported: ||f|| ~ 2e8, unnormalized; the exact gradient is [-6e9, 1.2e10]."""
    f = torch.tensor([[1e8, 2e8]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[3e8, -1e8], [2e8, 1e8]], dtype=torch.float64)
    loss = nk.cosine_softmax(f, w, torch.tensor([0]), 60.0, normalize_features=False,
                             normalize_weight=False, backend="cpu")
    (grad,) = torch.autograd.grad(loss, f)
    torch.testing.assert_close(grad, torch.tensor([[-6e9, 1.2e10]], dtype=torch.float64),
                               rtol=1e-12, atol=0)


@fuzz(150)
@given(huge_cases([torch.float64, torch.float32]))
def test_cpu_exact_at_huge_norms(case):
    assume(one_hot_softmax(case))
    check_huge(case, "cpu")


@fuzz(50)
@given(huge_cases([torch.float64, torch.float32]))
def test_chunked_exact_at_huge_norms(case):
    assume(one_hot_softmax(case))
    check_huge(case, "chunked")


@needs_triton
@fuzz(8)
@given(huge_cases([torch.float64, torch.float32]))
def test_triton_exact_at_huge_norms(case):
    assume(one_hot_softmax(case))
    check_huge(case, "triton", device=TRITON_DEVICE)


@needs_cuda
@fuzz(40)
@given(huge_cases([torch.float32]))
def test_cuda_exact_at_huge_norms(case):
    assume(one_hot_softmax(case))
    check_huge(case, "cuda", device="cuda")


# ---------------------------------------------------------------------------------------------
# NaN and inf
# ---------------------------------------------------------------------------------------------

POISONS = [math.nan, math.inf, -math.inf]


def _poison_dtypes(backend):
    return [torch.float32] if backend == "cuda" else [torch.float64, torch.float32]


@st.composite
def poisoned(draw, loss, target, max_b=6, max_c=8, max_d=6, dtypes=(torch.float64,)):
    """A float32/float64 case with NaN or +-inf put into `target`: "ignored" (rows whose label is
    ignore_index), "valid" (a row with a label) or "agent" (a row of W)."""
    case = draw(cases(loss, list(dtypes), max_b=max_b, max_c=max_c, max_d=max_d,
                      exps=(-1, 1)))
    B, D = case.f.shape
    value = draw(st.sampled_from(POISONS))
    whole = draw(st.booleans())
    if target == "agent":
        j = draw(st.integers(0, case.w.shape[0] - 1))
        case.w[j, slice(None) if whole else draw(st.integers(0, D - 1))] = value
        return case
    rows = draw(st.lists(st.integers(0, B - 1), min_size=1, max_size=B, unique=True))
    for i in rows:
        if target == "ignored":
            case.y[i] = case.ignore_index
        elif case.y[i] == case.ignore_index:
            case.y[i] = 0
        case.f[i, slice(None) if whole else draw(st.integers(0, D - 1))] = value
    return case


def _clean(case):
    """The case with its non-finite entries zeroed: only for natural scales and the gap test."""
    return SimpleNamespace(**{**vars(case), "f": torch.nan_to_num(case.f, 0.0, 0.0, 0.0),
                              "w": torch.nan_to_num(case.w, 0.0, 0.0, 0.0)})


def check_poisoned(case, backend, device="cpu"):
    """Losses NaN exactly where the reference's are, and close elsewhere. Gradients: every
    entry the reference has finite, the backend has finite and close (where the reference is
    NaN, 0 * NaN may or may not have spread). A NaN loss has no meaningful gradient (torch's
    relu passes one through NaN, the kernels' hinges do not): with some loss NaN only the
    grad_features rows of the samples whose loss is finite are compared."""
    out = run(case, backend, device=device)
    exact = run(case, "reference", dtype=torch.float64)
    nat = natural_scales(_clean(case), case.dtype)
    zmax = nat.zmax.max().item()
    rtol = 1e-9 + 1e-14 * zmax if case.dtype == torch.float64 else 1e-5 + 1e-6 * zmax
    assert torch.equal(torch.isnan(out[0]), torch.isnan(exact[0])), (out[0], exact[0])
    names = ("loss", "grad_features", "grad_weight", "grad_scale")
    nats = (assert_reduced_natural(case, nat), nat.f, nat.w, nat.s)
    compared = out
    if not torch.isfinite(exact[0]).all():
        if case.reduction != "none":
            return out
        rows = torch.isfinite(exact[0])
        compared, exact = (out[0], out[1][rows]), (exact[0], exact[1][rows])
        nats = (nats[0], nats[1][rows])
    for what, a, r, n in zip(names, compared, exact, nats):
        if r is None:
            continue
        finite = torch.isfinite(r)
        assert torch.isfinite(a[finite]).all(), f"{what}: not finite where the reference is"
        assert_close_natural(torch.where(finite, a, r), r, n, rtol, what)
    return out


BACKENDS = ["cpu", "chunked", pytest.param("triton", marks=needs_triton),
            pytest.param("cuda", marks=needs_cuda)]
DEVICES = {"cpu": "cpu", "chunked": "cpu", "triton": TRITON_DEVICE, "cuda": "cuda"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["softmax", "c_contrastive", "c_triplet", "center_loss"])
def test_nan_in_an_ignored_row_reaches_nothing(loss, backend):
    """contract: an ignored sample contributes nothing, even when its features are NaN or inf."""
    device = DEVICES[backend]

    @fuzz(3 if backend == "triton" else 30)
    @given(poisoned(loss, "ignored", dtypes=_poison_dtypes(backend)))
    def check(case):
        assume(no_discontinuity(_clean(case)))
        out = check_poisoned(case, backend, device)
        for what, x in zip(("loss", "grad_features", "grad_weight", "grad_scale"), out):
            assert x is None or torch.isfinite(x).all(), f"{what} is not finite: {x}"
        ignored = case.y == case.ignore_index
        assert (out[1][ignored] == 0).all(), "an ignored row's own grad_features must be 0"

    check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", ["valid", "agent"])
@pytest.mark.parametrize("loss", ["softmax", "c_contrastive", "c_triplet", "center_loss"])
def test_nan_in_a_valid_row_or_agent_gives_nan_where_the_reference_does(loss, target, backend):
    device = DEVICES[backend]

    @fuzz(2 if backend == "triton" else 40)
    @given(poisoned(loss, target, dtypes=_poison_dtypes(backend)))
    def check(case):
        assume(no_discontinuity(_clean(case)))
        out = check_poisoned(case, backend, device)
        # (C-triplet over all negatives with C = 1 sums nothing: 0, as in the reference.)
        if target == "valid" and case.reduction == "none" and loss != "c_triplet":
            bad = ~torch.isfinite(case.f).all(dim=1) & (case.y != case.ignore_index)
            assert torch.isnan(out[0][bad]).all(), "a NaN/inf row must have a NaN loss"

    check()
