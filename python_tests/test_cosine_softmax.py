"""cosine_softmax (every row of the contract) on the CPU kernels against the reference."""

import math

import pytest
import torch
from conftest import (SPEC_SETTINGS, assert_low_precision_close, grads,
                      low_precision_reference, make_inputs)

import normface_kernels as nk
from normface_kernels import reference

SHAPES = [(1, 1, 3), (5, 7, 4), (9, 3001, 6)]  # B=1, C=1, C not a multiple of any block


def _kernel_and_reference(f, w, y, scale, setting, backend="cpu"):
    kwargs = {k: v for k, v in setting.items() if k != "scale"}
    s = torch.tensor(scale, dtype=f.dtype, requires_grad=True)
    s_ref = s.detach().clone().requires_grad_()
    out = grads(lambda: nk.cosine_softmax(f, w, y, s, reduction="none", backend=backend,
                                          **kwargs), f, w, s)
    ref = grads(lambda: reference.cosine_softmax(f, w, y, s_ref, **kwargs), f, w, s_ref)
    return out, ref


@pytest.mark.parametrize("name", sorted(SPEC_SETTINGS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_float64(name, shape):
    setting = SPEC_SETTINGS[name]
    B, C, D = shape
    f, w, y = make_inputs(B, C, D, ignore=(1,) if B > 2 else ())
    (loss, g), (loss_ref, g_ref) = _kernel_and_reference(f, w, y, setting["scale"], setting)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-9, atol=1e-9)
    for what, a, b in zip(("features", "weight", "scale"), g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", sorted(SPEC_SETTINGS))
def test_gradcheck(name):
    setting = dict(SPEC_SETTINGS[name])
    scale = torch.tensor(setting.pop("scale") / 4, dtype=torch.float64, requires_grad=True)
    f, w, y = make_inputs(4, 5, 3, ignore=(2,), seed=3)
    op = lambda f, w, s: nk.cosine_softmax(f, w, y, s, reduction="none", backend="cpu",  # noqa
                                           **setting)
    assert torch.autograd.gradcheck(op, (f, w, scale), eps=1e-6, atol=1e-6)


def test_gradcheck_through_op_with_lse():
    """Both outputs of the forward op are differentiable (the distributed loss uses lse)."""
    f, w, y = make_inputs(3, 6, 4, ignore=(0,), seed=5)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)

    def op(f, w, s):
        loss, lse = torch.ops.normface.cosine_softmax_forward(
            f, w, y, s, 1.0, 0.3, 0.1, 0.0, True, True, -100, 0, -1)
        return loss * 1.5 + lse * torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)

    assert torch.autograd.gradcheck(op, (f, w, s), eps=1e-6, atol=1e-6)


def test_lse_of_every_row_including_ignored():
    f, w, y = make_inputs(4, 9, 5, ignore=(1,))
    _, lse = torch.ops.normface.cosine_softmax_forward(
        f, w, y, torch.tensor(3.0, dtype=torch.float64), 1.0, 0.0, 0.0, 0.0, True, True, -100,
        0, -1)
    plain = torch.logsumexp(reference.cosine_logits(f, w, 3.0), dim=1)
    torch.testing.assert_close(lse[1], plain[1].detach())


def test_class_shards_merge_exactly():
    """lse over the full W equals the logsumexp of the shards' lse (class_start semantics)."""
    f, w, y = make_inputs(6, 23, 4, ignore=(2,))
    s = torch.tensor(5.0, dtype=torch.float64)
    args = (s, 1.0, 0.5, 0.0, 0.0, True, True, -100)
    loss, lse = torch.ops.normface.cosine_softmax_forward(f, w, y, *args, 0, -1)
    parts, target = [], torch.zeros(6, dtype=torch.float64)
    for start, end in ((0, 8), (8, 16), (16, 23)):
        l_r, lse_r = torch.ops.normface.cosine_softmax_forward(f, w[start:end], y, *args,
                                                              start, 23)
        parts.append(lse_r)
        owner = (y >= start) & (y < end)
        target += torch.where(owner, lse_r - l_r, torch.zeros_like(l_r))
        elsewhere = ~owner & (y != -100)     # target in another shard: no z_iy term here
        torch.testing.assert_close(l_r[elsewhere], lse_r[elsewhere])
        assert torch.all(l_r[y == -100] == 0)
    merged = torch.logsumexp(torch.stack(parts), dim=0)
    torch.testing.assert_close(merged, lse)
    valid = y != -100
    torch.testing.assert_close((merged - target)[valid], loss[valid])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_ignore_index(reduction):
    f, w, y = make_inputs(6, 10, 4, ignore=(0, 3))
    y[4] = 7
    kwargs = dict(scale=8.0, m3=0.2, ignore_index=-100)
    out = nk.cosine_softmax(f, w, y, reduction=reduction, backend="cpu", **kwargs)
    per = reference.cosine_softmax(f, w, y, 8.0, m3=0.2)
    assert per[0] == 0 and per[3] == 0
    expected = {"mean": per.sum() / 4, "sum": per.sum(), "none": per}[reduction]
    torch.testing.assert_close(out, expected)


def test_custom_ignore_index_and_all_ignored():
    f, w, y = make_inputs(3, 5, 4)
    y[:] = 2
    y[1] = 9
    torch.testing.assert_close(
        nk.cosine_softmax(f, w, torch.where(y == 9, -1, y), ignore_index=-1, backend="cpu"),
        reference.cosine_softmax(f, w, y, 30.0, ignore_index=9).sum() / 2)
    y[:] = -100
    loss = nk.cosine_softmax(f, w, y, backend="cpu")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(f.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("where", ["zero", "pi"])
def test_arcface_at_the_ends_of_theta(where):
    """theta = 0 (feature on its agent) and theta = pi (opposite): finite, matches reference."""
    f, w, y = make_inputs(4, 6, 5)
    with torch.no_grad():
        sign = 1.0 if where == "zero" else -1.0
        f.copy_(sign * 2.0 * w[y])
    setting = dict(scale=30.0, m2=0.5)
    (loss, g), (loss_ref, g_ref) = _kernel_and_reference(f, w, y, 30.0, setting)
    assert torch.isfinite(loss).all() and all(torch.isfinite(x).all() for x in g)
    torch.testing.assert_close(loss, loss_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_psi_is_monotone_and_continuous_over_theta():
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    for m1, m2 in ((1.0, 0.5), (4.0, 0.0), (2.0, 0.3)):
        values = reference.psi(torch.cos(theta), m1, m2)
        steps = values[1:] - values[:-1]
        assert torch.all(steps <= 1e-9), (m1, m2)
        assert steps.abs().max() < 0.05, (m1, m2)


def test_gradient_orthogonal_to_features():
    """Paper eq. 4 / appendix 8.5: <x, dL/dx> = 0 when features are normalized."""
    f, w, y = make_inputs(8, 20, 16, seed=1)
    nk.cosine_softmax(f, w, y, 16.0, m2=0.3, backend="cpu").backward()
    torch.testing.assert_close((f * f.grad).sum(dim=1), torch.zeros(8, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close((w * w.grad).sum(dim=1), torch.zeros(20, dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_proposition_2_bound_is_reached_by_the_simplex():
    """Features at their agents on a regular simplex reach log(1 + (n-1) e^{-n s/(n-1)})."""
    n = 5
    simplex = torch.eye(n, dtype=torch.float64) - 1.0 / n          # n points in an (n-1)-dim space
    labels = torch.arange(n)
    for s in (1.0, 4.0, 10.0):
        loss = nk.cosine_softmax(simplex, simplex, labels, s, backend="cpu")
        # rel 1e-6: the target cosine 1 is clamped to 1 - 1e-7 before psi (contract).
        assert loss.item() == pytest.approx(nk.softmax_loss_bound(n, s), rel=1e-6)
    assert nk.softmax_loss_bound(10575, 1) == pytest.approx(8.27, abs=0.005)
    s = nk.scale_for_loss(10575, 0.1)
    assert nk.softmax_loss_bound(10575, s) <= 0.1 + 1e-12
    assert nk.softmax_loss_bound(10575, s * 0.999) > 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    """fp16 with s = 64 and bf16: the contract's tolerance rule against the float64 reference."""
    f64, w64, y = make_inputs(16, 700, 32, seed=7, requires_grad=False)
    f, w = f64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_()
    exact_f, exact_w = f.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    low_f, low_w = f.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    setting = dict(m2=0.5)
    loss, (gf, gw) = grads(lambda: nk.cosine_softmax(f, w, y, 64.0, reduction="none",
                                                     backend="cpu", **setting), f, w)
    exact, (ef, ew) = grads(lambda: reference.cosine_softmax(exact_f, exact_w, y, 64.0,
                                                             **setting), exact_f, exact_w)

    def plain():
        with low_precision_reference():
            return reference.cosine_softmax(low_f, low_w, y, 64.0, **setting)

    low, (lf, lw) = grads(plain, low_f, low_w)
    assert loss.dtype == torch.float32 and gf.dtype == dtype and gw.dtype == dtype
    assert_low_precision_close(loss, low, exact, 1e-3, "loss")
    assert_low_precision_close(gf, lf, ef, 1e-3, "grad features")
    assert_low_precision_close(gw, lw, ew, 1e-3, "grad weight")


def test_float32_matches_reference():
    f, w, y = make_inputs(32, 2500, 24, dtype=torch.float32, ignore=(3,))
    (loss, g), (loss_ref, g_ref) = _kernel_and_reference(f, w, y, 30.0, dict(m2=0.5))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_non_contiguous_inputs():
    f, w, y = make_inputs(6, 11, 8, requires_grad=False)
    f_t = f.t().contiguous().t().requires_grad_()          # column-major
    w_s = torch.cat([w, w], dim=1)[:, ::2].requires_grad_()  # strided view: copy of w
    y_s = torch.stack([y, y], dim=1)[:, 0]
    (loss, g), (loss_ref, g_ref) = _kernel_and_reference(f_t, w_s, y_s, 10.0, dict(m3=0.2))
    torch.testing.assert_close(loss, loss_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_zero_vectors_are_fine_and_nan_propagates():
    f, w, y = make_inputs(4, 6, 5, requires_grad=False)
    f[0] = 0.0
    w[2] = 0.0
    loss = nk.cosine_softmax(f, w, y, 10.0, m2=0.5, reduction="none", backend="cpu")
    torch.testing.assert_close(loss, reference.cosine_softmax(f, w, y, 10.0, m2=0.5))
    assert torch.isfinite(loss).all()
    f[1, 2] = float("nan")
    loss = nk.cosine_softmax(f, w, y, 10.0, m2=0.5, reduction="none", backend="cpu")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
    w[4, 0] = float("nan")
    loss = nk.cosine_softmax(f, w, y, 10.0, reduction="none", backend="cpu")
    assert torch.isnan(loss).all()
