"""cosine_softmax (every row of the contract) on every backend against the reference.

Each scenario is written once and runs on every backend through conftest's `backend` fixture
(cpu, cpu_chunked, triton, cuda; skipped where unavailable): float64 on the C++ CPU kernels,
float32 on Triton (tiny shapes in the interpreter) and CUDA, and the contract's tolerance rule
for 16-bit inputs. The last scenario, ignored rows holding NaN, covers the agent losses too.
"""

import contextlib
import math

import pytest
import torch
from conftest import (
    AGENT_CASES,
    SPEC_SETTINGS,
    assert_low_precision_close,
    budget_for,
    grads,
    make_inputs,
)

import normface_kernels as nk
from normface_kernels import reference
from normface_kernels.chunking import chunk_budget

# The interpreter evaluates masked-off lanes too (log(0), inf - inf in padding): numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

# B = 1, C = 1, sizes off every tile of every backend; the largest only compiled.
SHAPES = [(1, 1, 3), (1, 2, 5), (5, 7, 4), (4, 3, 33), (5, 37, 20), (19, 50, 40),
          (66, 65, 33), (9, 3001, 6)]
_PARAMS = ("m1", "m2", "m3", "lam", "normalize_features", "normalize_weight")


def _tiny(shape):
    """Shapes the Triton interpreter runs in reasonable time."""
    B, C, D = shape
    return B <= 32 and C <= 64


def _params(setting):
    """The positional margin arguments of the forward op for a SPEC_SETTINGS row."""
    full = dict(m1=1.0, m2=0.0, m3=0.0, lam=0.0, normalize_features=True,
                normalize_weight=True)
    full.update({k: v for k, v in setting.items() if k in _PARAMS})
    return tuple(full[k] for k in _PARAMS)


def _margins(setting):
    return {k: v for k, v in setting.items() if k != "scale"}


def _upstream(n, seed, device, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=torch.float64) + 0.5 + shift).to(device)


def _op_vs_reference(backend, f, w, y, setting, scale, tol, class_start=0, num_classes=-1):
    """Both outputs of the forward op (loss, lse) and the gradients of a weighted sum of both
    (features, weight, scale) against reference.softmax_loss_lse. Returns (loss, lse)."""
    f, w = f.detach().requires_grad_(), w.detach().requires_grad_()
    s = backend.scale(scale, f.dtype)
    gl, ge = _upstream(f.shape[0], 7, f.device), _upstream(f.shape[0], 8, f.device, -1.0)
    loss, lse = backend.op("cosine_softmax_forward")(f, w, y, s, *_params(setting), -100,
                                                     class_start, num_classes)
    out = torch.autograd.grad((loss * gl).sum() + (lse * ge).sum(), (f, w, s))
    s_ref = s.detach().clone().requires_grad_()
    loss_ref, lse_ref = reference.softmax_loss_lse(f, w, y, s_ref, class_start=class_start,
                                                   **_margins(setting))
    ref = torch.autograd.grad((loss_ref * gl).sum() + (lse_ref * ge).sum(), (f, w, s_ref))
    for what, a, b in zip(("loss", "lse", "grad features", "grad weight", "grad scale"),
                          (loss, lse, *out), (loss_ref, lse_ref, *ref)):
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m: f"{what}: {m}")
    return loss.detach(), lse.detach()


@pytest.mark.parametrize("name", sorted(SPEC_SETTINGS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, name, shape):
    if backend.interpreted and not _tiny(shape):
        pytest.skip("too large for the Triton interpreter")
    B, C, D = shape
    f, w, y = backend.inputs(B, C, D, ignore=(1,) if B > 2 else (), seed=B + C)
    setting = SPEC_SETTINGS[name]
    _op_vs_reference(backend, f, w, y, setting, setting["scale"], backend.tol())


@pytest.mark.backends("cpu", "cpu_chunked")
def test_float32_matches_reference(backend):
    f, w, y = make_inputs(32, 2500, 24, dtype=torch.float32, ignore=(3,))
    _op_vs_reference(backend, f, w, y, dict(m2=0.5), 30.0, dict(rtol=1e-3, atol=1e-4))


@pytest.mark.backends("cpu", "cpu_chunked")
@pytest.mark.parametrize("name", sorted(SPEC_SETTINGS))
def test_gradcheck(backend, name):
    setting = dict(SPEC_SETTINGS[name])
    scale = torch.tensor(setting.pop("scale") / 4, dtype=torch.float64, requires_grad=True)
    f, w, y = make_inputs(4, 5, 3, ignore=(2,), seed=3)
    op = lambda f, w, s: nk.cosine_softmax(f, w, y, s, reduction="none",  # noqa: E731
                                           backend=backend.api, **setting)
    assert torch.autograd.gradcheck(op, (f, w, scale), eps=1e-6, atol=1e-6)


@pytest.mark.backends("cpu", "cpu_chunked")
def test_gradcheck_through_op_with_lse(backend):
    """Both outputs of the forward op are differentiable (the distributed loss uses lse)."""
    f, w, y = make_inputs(3, 6, 4, ignore=(0,), seed=5)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)

    def op(f, w, s):
        loss, lse = backend.op("cosine_softmax_forward")(
            f, w, y, s, 1.0, 0.3, 0.1, 0.0, True, True, -100, 0, -1)
        return loss * 1.5 + lse * torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)

    assert torch.autograd.gradcheck(op, (f, w, s), eps=1e-6, atol=1e-6)


def test_lse_of_every_row_including_ignored(backend):
    f, w, y = backend.inputs(4, 9, 5, ignore=(1,), requires_grad=False)
    loss, lse = backend.op("cosine_softmax_forward")(
        f, w, y, backend.scale(3.0, requires_grad=False), 1.0, 0.0, 0.0, 0.0, True, True, -100,
        0, -1)
    plain = torch.logsumexp(reference.cosine_logits(f, w, 3.0), dim=1)
    assert loss[1] == 0
    torch.testing.assert_close(lse[1].double(), plain[1].double(), **backend.tol())


# ---------------------------------------------------------------------------------------------
# Class shards (class_start / num_classes)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["combined_margins", "arcface", "sphereface_normalized",
                                  "l_softmax", "a_softmax_weight_only",
                                  "l2_softmax_features_only"])
def test_class_shards_merge(backend, name):
    """Shards [0, 23), [23, 37), [37, 50) of 50 classes, in every normalization mode: each
    shard's loss and lse, and the gradients through both, are the reference's for that shard
    (the loss of a row whose target is elsewhere is its shard's lse, an ignored row's is 0); the
    shards' lse merge to the full lse, and the merged loss and its gradients are the full ones."""
    setting = SPEC_SETTINGS[name]
    f, w, y = backend.inputs(7, 50, 24, ignore=(4,), seed=11, requires_grad=False)
    y[0], y[1] = 22, 23  # both sides of a boundary
    tol = backend.tol()
    op = backend.op("cosine_softmax_forward")
    bounds = ((0, 23), (23, 37), (37, 50))
    for a, b in bounds:
        loss, lse = _op_vs_reference(backend, f, w[a:b], y, setting, setting["scale"], tol,
                                     class_start=a, num_classes=50)
        elsewhere = (y != -100) & ((y < a) | (y >= b))
        assert torch.equal(loss[elsewhere], lse[elsewhere])
        assert torch.all(loss[y == -100] == 0)
    fx, wx = f.clone().requires_grad_(), w.clone().requires_grad_()
    s = backend.scale(setting["scale"])
    parts = [op(fx, wx[a:b], y, s, *_params(setting), -100, a, 50) for a, b in bounds]
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), 0)
    z_y = sum(p[1] - p[0] for p in parts)  # lse_k - loss_k = z_y in the shard holding y
    valid = y != -100
    loss = torch.where(valid, lse - z_y, torch.zeros_like(lse))
    full_loss, full_lse = op(f, w, y, s.detach(), *_params(setting), -100, 0, -1)
    torch.testing.assert_close(lse, full_lse, **tol)
    torch.testing.assert_close(loss[valid], full_loss[valid], **tol)
    wl = _upstream(7, 1, f.device).to(loss.dtype)
    out = torch.autograd.grad((loss * wl).sum(), (fx, wx, s))
    s_ref = s.detach().clone().requires_grad_()
    loss_ref, _ = reference.softmax_loss_lse(fx, wx, y, s_ref, **_margins(setting))
    ref = torch.autograd.grad((loss_ref * wl).sum(), (fx, wx, s_ref))
    for what, a, b in zip(("features", "weight", "scale"), out, ref):
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# The public API: reductions, ignore_index, a learned scale
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["cosface", "l_softmax", "l2_softmax_features_only"])
def test_reductions_and_ignore_index(backend, name, reduction):
    """Every reduction through the public API, values and gradients (features, weight and a
    learned scale) against the reference's."""
    f, w, y = backend.inputs(6, 21, 18, ignore=(0, 3), requires_grad=False)
    y[4] = 7
    setting = SPEC_SETTINGS[name]
    out = []
    for api in (backend.api, "reference"):
        fx, wx = f.clone().requires_grad_(), w.clone().requires_grad_()
        s = backend.scale(setting["scale"])
        loss = nk.cosine_softmax(fx, wx, y, s, reduction=reduction, backend=api,
                                 **_margins(setting))
        cot = _upstream(loss.numel(), 3, f.device).to(loss.dtype).reshape(loss.shape)
        out.append((loss, *torch.autograd.grad((loss * cot).sum(), (fx, wx, s))))
    if reduction == "none":
        assert out[0][0][0] == 0 and out[0][0][3] == 0
    for what, a, b in zip(("loss", "features", "weight", "scale"), *out):
        torch.testing.assert_close(a.double(), b.double(), **backend.tol(),
                                   msg=lambda m: f"{what}: {m}")


def test_custom_ignore_index_and_all_ignored(backend):
    f, w, y = backend.inputs(3, 5, 4)
    y[:] = 2
    y[1] = 9
    torch.testing.assert_close(
        nk.cosine_softmax(f, w, torch.where(y == 9, -1, y), ignore_index=-1,
                          backend=backend.api).double(),
        reference.cosine_softmax(f, w, y, 30.0, ignore_index=9).sum().double() / 2,
        **backend.tol())
    y[:] = -100
    loss = nk.cosine_softmax(f, w, y, backend=backend.api)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(f.grad == 0) and torch.all(w.grad == 0)


# ---------------------------------------------------------------------------------------------
# Margins at the ends of their range
# ---------------------------------------------------------------------------------------------

def _angle_features(w, y, theta, seed=0):
    """Rows f_i at angle theta_i from W_{y_i} (and random norms)."""
    g = torch.Generator().manual_seed(seed)
    u = w[y] / w[y].norm(dim=1, keepdim=True)
    v = torch.randn(u.shape, generator=g, dtype=u.dtype).to(u.device)
    v = v - (v * u).sum(1, keepdim=True) * u
    v = v / v.norm(dim=1, keepdim=True)
    radius = 0.5 + torch.rand(u.shape[0], 1, generator=g, dtype=u.dtype).to(u.device)
    return radius * (torch.cos(theta)[:, None] * u + torch.sin(theta)[:, None] * v)


def _low_precision_vs_reference(backend, f, w, y, scale, setting, atol, what, relative=False):
    """The tolerance rule for the op's loss and gradients (features, weight, scale): kernel in
    f's dtype, plain PyTorch in f's dtype, exact float64; with `relative`, atol is relative to
    each quantity's size (at least 1)."""
    dtype = f.dtype
    wl = _upstream(f.shape[0], 2, f.device)
    results = []
    for impl in ("kernel", "plain", "exact"):
        fx = f.detach().to(torch.float64 if impl == "exact" else dtype).requires_grad_()
        wx = w.detach().to(fx.dtype).requires_grad_()
        s = torch.tensor(float(scale), device=f.device, requires_grad=True,
                         dtype={"kernel": reference.acc_dtype(f), "plain": dtype,
                                "exact": torch.float64}[impl])
        if impl == "kernel":
            loss, _ = backend.op("cosine_softmax_forward")(fx, wx, y, s, *_params(setting), -100,
                                                           0, -1)
        else:
            with reference.input_precision() if impl == "plain" else contextlib.nullcontext():
                loss, _ = reference.softmax_loss_lse(fx, wx, y, s, **_margins(setting))
        results.append((loss, *torch.autograd.grad((loss.double() * wl).sum(), (fx, wx, s))))
    assert results[0][0].dtype == torch.float32 or dtype == torch.float64
    assert results[0][1].dtype == dtype and results[0][2].dtype == dtype
    for name, kernel, plain, exact in zip(("loss", "grad features", "grad weight", "grad scale"),
                                          *results):
        size = max(exact.detach().abs().max().item(), 1.0) if relative else 1.0
        assert_low_precision_close(kernel, plain, exact, atol * size, f"{what} {name}")


def test_arcface_at_the_ends_of_theta(backend):
    """theta = 0 (feature on its agent) and theta = pi (opposite) sit on the clamp of arccos:
    finite, and in float64 the reference's values and gradients."""
    dtype = backend.exact_dtype
    f, w, y = backend.inputs(8, 20, 32, dtype=dtype, requires_grad=False)
    f = torch.cat([2.0 * w[y[:4]], -3.0 * w[y[4:]]]).requires_grad_()
    w.requires_grad_()
    setting = dict(m2=0.5)
    s = backend.scale(30.0, dtype)
    s_ref = s.detach().clone().requires_grad_()
    loss, g = grads(lambda: nk.cosine_softmax(f, w, y, s, reduction="none", backend=backend.api,
                                              **setting), f, w, s)
    loss_ref, g_ref = grads(lambda: reference.cosine_softmax(f, w, y, s_ref, **setting), f, w,
                            s_ref)
    assert torch.isfinite(loss).all() and all(torch.isfinite(x).all() for x in g)
    if dtype == torch.float64:
        torch.testing.assert_close(loss, loss_ref)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    else:  # float32 cosines land on either side of the clamp: only the loss is well-conditioned
        torch.testing.assert_close(loss.double(), loss_ref.double(), rtol=1e-4, atol=1e-3)


THETAS = [1e-3, 2e-2, 0.3, math.pi / 2, math.pi - 0.6, math.pi - 0.5 - 1e-3,
          math.pi - 0.5 + 1e-3, math.pi - 0.5, math.pi - 0.05, math.pi - 1e-2, 1.0, 2.5]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
def test_arcface_angles_near_zero_and_near_pi_minus_m2(backend, dtype):
    """theta + m2 near pi switches the k branch of psi; theta near 0 is steep in arccos. In
    float64 within rounding of the reference, in other dtypes the tolerance rule."""
    if dtype not in (backend.exact_dtype, torch.float32) + backend.low_dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    _, w, _ = backend.inputs(1, 23, 17, dtype=torch.float64, seed=3, requires_grad=False)
    y = torch.tensor([0, 5, 9, 16, 22, 3, 11, 7, 1, 2, 4, 5], device=w.device)
    thetas = THETAS
    if dtype == torch.float32 and w.device.type == "cuda":
        # theta = 1e-3 in float32: cos is within a few ulps of the clamp, where d psi / d cos is
        # ~1e3 and the kernel's and plain PyTorch's roundings are both the whole error; the
        # GEMM libraries round differently from the CPU, so only the CPU backends run it.
        thetas = [t for t in THETAS if t > 1e-2]
        y = y[1:]
    theta = torch.tensor(thetas, dtype=torch.float64, device=w.device)
    f = _angle_features(w, y, theta)
    if dtype == torch.float64:
        _op_vs_reference(backend, f, w, y, dict(m2=0.5), 30.0, dict(rtol=1e-9, atol=1e-9))
    else:
        atol = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}[dtype]
        _low_precision_vs_reference(backend, f.to(dtype), w.to(dtype), y, 20.0, dict(m2=0.5),
                                    atol, "arcface", relative=True)


def test_sphereface_branches(backend):
    """m1 = 4 with lam: every k branch of psi (theta around multiples of pi / 4)."""
    dtype = backend.exact_dtype
    _, w, _ = backend.inputs(1, 19, 16, dtype=dtype, seed=4, requires_grad=False)
    y = torch.arange(9, device=w.device) * 2
    theta = torch.tensor([0.1, math.pi / 4 - 1e-3, math.pi / 4 + 1e-3, 1.2, math.pi / 2 + 1e-3,
                          2.0, 3 * math.pi / 4 + 1e-3, 2.9, math.pi - 1e-3],
                         dtype=dtype, device=w.device)
    f = _angle_features(w, y, theta, seed=1)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    for lam in (0.0, 5.0):
        _op_vs_reference(backend, f, w, y, dict(m1=4.0, lam=lam), 20.0, tol)


def test_psi_is_monotone_and_continuous_over_theta():
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    for m1, m2 in ((1.0, 0.5), (4.0, 0.0), (2.0, 0.3)):
        values = reference.psi(torch.cos(theta), m1, m2)
        steps = values[1:] - values[:-1]
        assert torch.all(steps <= 1e-9), (m1, m2)
        assert steps.abs().max() < 0.05, (m1, m2)


@pytest.mark.backends("cpu", "cpu_chunked")
def test_gradient_orthogonal_to_features(backend):
    """Paper eq. 4 / appendix 8.5: <x, dL/dx> = 0 when features are normalized."""
    f, w, y = make_inputs(8, 20, 16, seed=1)
    nk.cosine_softmax(f, w, y, 16.0, m2=0.3, backend=backend.api).backward()
    torch.testing.assert_close((f * f.grad).sum(dim=1), torch.zeros(8, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close((w * w.grad).sum(dim=1), torch.zeros(20, dtype=torch.float64),
                               atol=1e-12, rtol=0)


@pytest.mark.backends("cpu", "cpu_chunked")
def test_proposition_2_bound_is_reached_by_the_simplex(backend):
    """Features at their agents on a regular simplex reach log(1 + (n-1) e^{-n s/(n-1)})."""
    n = 5
    simplex = torch.eye(n, dtype=torch.float64) - 1.0 / n          # n points in an (n-1)-dim space
    labels = torch.arange(n)
    for s in (1.0, 4.0, 10.0):
        loss = nk.cosine_softmax(simplex, simplex, labels, s, backend=backend.api)
        # rel 1e-6: the target cosine 1 is clamped to 1 - 1e-7 before psi (contract).
        assert loss.item() == pytest.approx(nk.softmax_loss_bound(n, s), rel=1e-6)
    assert nk.softmax_loss_bound(10575, 1) == pytest.approx(8.27, abs=0.005)
    s = nk.scale_for_loss(10575, 0.1)
    assert nk.softmax_loss_bound(10575, s) <= 0.1 + 1e-12
    assert nk.softmax_loss_bound(10575, s * 0.999) > 0.1


# ---------------------------------------------------------------------------------------------
# 16-bit inputs, layouts, zero vectors, NaN
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["arcface_s64", "normface", "l2_softmax_features_only"])
def test_low_precision_inputs(backend, name, dtype):
    """float16 / bfloat16 (float16 with s = 64 among them): the contract's tolerance rule
    against the float64 reference."""
    if dtype not in backend.low_dtypes:
        pytest.skip(f"{backend.name} has no {dtype} arithmetic")
    setting = dict(scale=64.0, m2=0.5) if name == "arcface_s64" else SPEC_SETTINGS[name]
    shape = (9, 45, 40) if backend.interpreted else (16, 700, 32)
    f, w, y = backend.inputs(*shape, dtype=dtype, seed=7, ignore=(3,), requires_grad=False)
    _low_precision_vs_reference(backend, f, w, y, setting["scale"], setting, 1e-3, name)


def test_non_contiguous_inputs(backend):
    f_big, w_t, y = backend.inputs(11, 30, 40, seed=2, requires_grad=False)
    f = f_big[::2, ::2]                          # strided rows and columns (6, 20)
    w = w_t[:, :20].t().contiguous().t()         # column-major (30, 20)
    y = torch.stack([y, y], dim=1)[:6, 0]        # strided labels
    assert not f.is_contiguous() and not w.is_contiguous() and not y.is_contiguous()
    _op_vs_reference(backend, f, w, y, dict(m2=0.2), 10.0, backend.tol())


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16], ids=str)
def test_zero_vectors_are_fine_and_nan_propagates(backend, dtype):
    if dtype is not None and dtype not in backend.low_dtypes:
        pytest.skip(f"{backend.name} has no {dtype} arithmetic")
    f, w, y = backend.inputs(6, 20, 16, dtype=dtype, requires_grad=False)
    y[5] = -100
    f[0] = 0.0
    w[2] = 0.0
    loss = nk.cosine_softmax(f, w, y, 10.0, m2=0.5, reduction="none", backend=backend.api)
    tol = backend.tol() if dtype is None else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss.double(),
                               reference.cosine_softmax(f, w, y, 10.0, m2=0.5).double(), **tol)
    assert torch.isfinite(loss).all()
    f[1, 2] = float("nan")
    loss = nk.cosine_softmax(f, w, y, 10.0, m2=0.5, reduction="none", backend=backend.api)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3, 4]]).all() and loss[5] == 0
    w[4, 0] = float("nan")
    loss = nk.cosine_softmax(f, w, y, 10.0, reduction="none", backend=backend.api)
    assert torch.isnan(loss[:5]).all() and loss[5] == 0


@pytest.mark.parametrize("name", ["plain_softmax", "l_softmax", "a_softmax_weight_only",
                                  "normface"])
def test_float64_huge_norms_are_exact(backend, name):
    """The backward recomputes each logit bit-identically to the forward: a feature of norm 1e8
    (logits ~1e8) keeps an exact gradient; with every row of norm 1e8 and neither normalized
    (logits ~1e16) a recomputed logit one ulp off the forward's would put e^(+-2) into the
    softmax, yet the float64 gradients are exact."""
    if backend.exact_dtype != torch.float64:
        pytest.skip(f"{backend.name} has no float64")
    setting = dict(SPEC_SETTINGS[name])
    scale = setting.pop("scale")
    f, w, y = backend.inputs(6, 13, 5, dtype=torch.float64, requires_grad=False, seed=4)
    f[2] *= 1e8 / f[2].norm()
    f[3] *= 1e-3
    f.requires_grad_()
    w.requires_grad_()
    loss, g = grads(lambda: nk.cosine_softmax(f, w, y, scale, reduction="none",
                                              backend=backend.api, **setting), f, w)
    e_loss, e_g = grads(lambda: reference.cosine_softmax(f, w, y, scale, **setting), f, w)
    torch.testing.assert_close(loss, e_loss, rtol=1e-9, atol=1e-6)
    for a, b in zip(g, e_g):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9 * b.abs().max().item())
    if not (setting.get("normalize_features", True) or setting.get("normalize_weight", True)):
        f, w, y = backend.inputs(9, 37, 24, dtype=torch.float64, seed=5, ignore=(2,),
                                 requires_grad=False)
        f = 1e8 * f / f.norm(dim=1, keepdim=True)
        w = 1e8 * w / w.norm(dim=1, keepdim=True)
        _op_vs_reference(backend, f, w, y, setting, 1.0, dict(rtol=1e-9, atol=1e-9))


@pytest.mark.backends("cpu", "cpu_chunked", "cuda")
def test_float16_gradients_below_the_subnormal_range(backend):
    """float16, s = 64: each dL/dz of a wrong class is ~1e-8, below float16's smallest subnormal
    (6e-8), but C of them add up -- coherently here: the wrong agents share the direction e_3 --
    to the whole e_3 component of grad_features. The gradient operand's power-of-two scaling keeps
    them (cast unscaled, they would round to 0 and so would that component)."""
    B, C, D = 4, 10_000, 16
    g = torch.Generator().manual_seed(0)
    e = torch.eye(D, dtype=torch.float64)
    w = e[3] + 0.002 * torch.randn(C, D, generator=g, dtype=torch.float64)
    w[0] = e[1]
    y = torch.zeros(B, dtype=torch.int64, device=backend.device)
    f = 0.35 * e[1] + 0.937 * e[2] + 0.001 * torch.randn(B, D, generator=g,
                                                         dtype=torch.float64)
    f16 = f.half().to(backend.device).requires_grad_()
    w16 = w.half().to(backend.device).requires_grad_()
    f64, w64 = f16.detach().double().requires_grad_(), w16.detach().double().requires_grad_()
    nk.cosine_softmax(f16, w16, y, 64.0, reduction="sum", backend=backend.api).backward()
    reference.cosine_softmax(f64, w64, y, 64.0).sum().backward()
    p_wrong = torch.softmax(64.0 * reference.cosine_logits(f64, w64), dim=1)[:, 1:]
    assert (64.0 * p_wrong).max() < 3e-8            # each rounds to 0 in float16
    exact, ours = f64.grad[:, 3], f16.grad[:, 3].double()
    assert exact.abs().min() > 0.5 * f64.grad.abs().max()  # a leading component
    err = ((ours - exact).abs() / exact.abs()).max().item()
    assert err < 1e-2, f"grad_features e_3 component: relative error {err:.3g}"


# ---------------------------------------------------------------------------------------------
# Ignored rows holding NaN or inf: every loss
# ---------------------------------------------------------------------------------------------

def _sum_loss(name):
    """sum-reduced loss(f, w, y, s, backend) of a SPEC setting or an agent case (times s)."""
    if name in SPEC_SETTINGS:
        margins = _margins(SPEC_SETTINGS[name])
        return lambda f, w, y, s, api: nk.cosine_softmax(f, w, y, s, reduction="sum",
                                                         backend=api, **margins)
    public, _, kwargs = AGENT_CASES[name]
    return lambda f, w, y, s, api: public(f, w, y, reduction="sum", backend=api, **kwargs) * s


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["normface", "arcface", "l_softmax", "l2_softmax_features_only",
                                  *sorted(AGENT_CASES)])
def test_ignored_rows_holding_nan_contribute_nothing(backend, name, bad):
    """contract: rows with label ignore_index whose features are NaN or inf contribute nothing:
    the loss, grad_weight and grad_scale are those of the batch without them, and their own
    gradient is exactly 0 (several chunks on the chunked paths)."""
    B, C, D = 8, 40, 16
    f, w, y = backend.inputs(B, C, D, ignore=(1, 4), requires_grad=False)
    f[1, 2] = bad
    f[4] = bad
    keep = y != -100
    loss_fn = _sum_loss(name)
    on_cuda = backend.name == "cuda"  # the chunked CPU path has small chunks already
    chunks = (chunk_budget(budget_for(16, B, D, f.dtype, "cuda")) if on_cuda
              else contextlib.nullcontext())
    with chunks:
        s = backend.scale(3.0)
        fl, wl = f.clone().requires_grad_(), w.clone().requires_grad_()
        loss = loss_fn(fl, wl, y, s, backend.api)
        loss.backward()
        f2, w2 = f[keep].clone().requires_grad_(), w.clone().requires_grad_()
        s2 = s.detach().clone().requires_grad_()
        expect = loss_fn(f2, w2, y[keep], s2, backend.api)
        expect.backward()
    torch.testing.assert_close(loss, expect)
    torch.testing.assert_close(wl.grad, w2.grad)
    torch.testing.assert_close(fl.grad[keep], f2.grad)
    assert torch.all(fl.grad[~keep] == 0)
    torch.testing.assert_close(s.grad, s2.grad)
