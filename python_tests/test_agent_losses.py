"""Agent losses (paper section 4): c_contrastive, c_triplet, center_loss on the CPU kernels."""

import pytest
import torch
from conftest import assert_low_precision_close, grads, make_inputs

import normface_kernels as nk
from normface_kernels import reference

AGENT_CASES = {
    "c_contrastive": (nk.c_contrastive, reference.c_contrastive, dict()),
    "c_contrastive_margins": (nk.c_contrastive, reference.c_contrastive,
                              dict(pos_margin=0.1, neg_margin=1.6)),
    "c_triplet_hardest": (nk.c_triplet, reference.c_triplet, dict()),
    "c_triplet_hardest_center": (nk.c_triplet, reference.c_triplet, dict(center=True)),
    "c_triplet_all": (nk.c_triplet, reference.c_triplet, dict(hardest_only=False, margin=1.5)),
    "c_triplet_all_center": (nk.c_triplet, reference.c_triplet,
                             dict(hardest_only=False, center=True)),
    "center": (nk.center_loss, reference.center_loss, dict()),
}
SHAPES = [(1, 1, 3), (5, 7, 4), (9, 2100, 6)]


def _compare(name, f, w, y, rtol=1e-7, atol=1e-9):
    ours, ref, kwargs = AGENT_CASES[name]
    loss, g = grads(lambda: ours(f, w, y, reduction="none", backend="cpu", **kwargs), f, w)
    loss_ref, g_ref = grads(lambda: ref(f, w, y, **kwargs), f, w)
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=atol)
    for what, a, b in zip(("features", "weight"), g, g_ref):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", sorted(AGENT_CASES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_float64(name, shape):
    f, w, y = make_inputs(*shape, ignore=(2,) if shape[0] > 2 else ())
    _compare(name, f, w, y)


@pytest.mark.parametrize("name", sorted(AGENT_CASES))
def test_gradcheck(name):
    ours, _, kwargs = AGENT_CASES[name]
    f, w, y = make_inputs(4, 6, 3, ignore=(1,), seed=11)
    op = lambda f, w: ours(f, w, y, reduction="none", backend="cpu", **kwargs)  # noqa: E731
    assert torch.autograd.gradcheck(op, (f, w), eps=1e-6, atol=1e-6)


def test_c_triplet_ties_pick_the_first_agent():
    """Duplicate agents give equal distances: the first one is the hardest (torch.argmin)."""
    f, w, y = make_inputs(6, 5, 4, requires_grad=False)
    w[3] = w[1]
    w[4] = w[1]
    y[:] = 0
    w.requires_grad_()
    f.requires_grad_()
    _compare("c_triplet_hardest", f, w, y)
    _, hardest = torch.ops.normface.c_triplet_forward(f, w, y, 0.8, True, False, -100, 0, -1)
    d = reference._agent_distance(f, w, 1e-12).detach()
    d[:, 0] = float("inf")
    assert torch.equal(hardest, d.argmin(dim=1))


def test_c_triplet_single_class_has_no_negative():
    f, w, y = make_inputs(3, 1, 4)
    loss, hardest = torch.ops.normface.c_triplet_forward(f, w, y, 0.8, True, False, -100, 0, -1)
    assert torch.all(loss == 0) and torch.all(hardest == -1)


def test_shards_sum_to_the_full_c_contrastive():
    f, w, y = make_inputs(7, 19, 5, ignore=(3,))
    full = torch.ops.normface.c_contrastive(f, w, y, 0.0, 1.2, -100, 0, -1)
    parts = sum(torch.ops.normface.c_contrastive(f, w[a:b], y, 0.0, 1.2, -100, a, 19)
                for a, b in ((0, 5), (5, 12), (12, 19)))
    torch.testing.assert_close(parts, full)
    center = sum(torch.ops.normface.center_loss(f, w[a:b], y, -100, a, 19)
                 for a, b in ((0, 10), (10, 19)))
    torch.testing.assert_close(center, torch.ops.normface.center_loss(f, w, y, -100, 0, -1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(reduction):
    f, w, y = make_inputs(6, 8, 4, ignore=(0,))
    out = nk.c_contrastive(f, w, y, reduction=reduction, backend="cpu")
    per = reference.c_contrastive(f, w, y)
    torch.testing.assert_close(out, per.sum() / (5 if reduction == "mean" else 1))


@pytest.mark.parametrize("name", ["c_contrastive", "c_triplet_hardest", "center"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(name, dtype):
    ours, ref, kwargs = AGENT_CASES[name]
    f64, w64, y = make_inputs(12, 300, 16, seed=2, requires_grad=False)
    f, w = f64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_()
    ef, ew = f.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    lf, lw = f.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss, g = grads(lambda: ours(f, w, y, reduction="none", backend="cpu", **kwargs), f, w)
    exact, ge = grads(lambda: ref(ef, ew, y, **kwargs), ef, ew)
    # The reference accumulates in float32 for low-precision inputs: run a plain low-precision
    # version of d_ij = 2 - 2 cos_ij for the tolerance rule's comparison.
    orig = reference.cosine_logits
    try:
        reference.cosine_logits = lambda a, b, s=1.0, eps=1e-12: s * (
            (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).t())
        low, gl = grads(lambda: ref(lf, lw, y, **kwargs), lf, lw)
    finally:
        reference.cosine_logits = orig
    assert g[0].dtype == dtype and g[1].dtype == dtype
    assert_low_precision_close(loss, low, exact, 2e-3, "loss")
    assert_low_precision_close(g[0], gl[0], ge[0], 2e-3, "grad features")
    assert_low_precision_close(g[1], gl[1], ge[1], 2e-3, "grad weight")


@pytest.mark.parametrize("name", sorted(AGENT_CASES))
def test_nan_propagates_and_zero_vectors_are_fine(name):
    ours, ref, kwargs = AGENT_CASES[name]
    f, w, y = make_inputs(4, 6, 5, requires_grad=False)
    f[0] = 0.0
    w[5] = 0.0
    loss = ours(f, w, y, reduction="none", backend="cpu", **kwargs)
    torch.testing.assert_close(loss, ref(f, w, y, **kwargs))
    assert torch.isfinite(loss).all()
    f[2, 1] = float("nan")
    loss = ours(f, w, y, reduction="none", backend="cpu", **kwargs)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()
