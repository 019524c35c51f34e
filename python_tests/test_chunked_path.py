"""The chunked path (csrc/chunked) on CPU tensors: the orchestration backend="cuda" runs, here with
its CPU epilogues (set_cpu_path("chunked")), against the reference.

Every CPU test of the loss ops (test_cosine_softmax, test_agent_losses, test_ops_registration:
every contract setting, every agent loss and reduction, shards, gradcheck, float32/16-bit tolerance,
NaN, non-contiguous inputs, opcheck, torch.compile) runs again here on the chunked path with a
small chunk budget, so that every call walks several chunks. The tests written below add what is
particular to the chunked path: chunk boundaries, grad_lse, ignored rows holding NaN, a feature of
norm 1e8 in float64, float16 gradients below float16's subnormal range, the switches.
"""

import pytest
import torch
from conftest import SPEC_SETTINGS, budget_for, grads, make_inputs
from test_agent_losses import *  # noqa: F401,F403  (re-run on the chunked path)
from test_agent_losses import AGENT_CASES
from test_cosine_softmax import *  # noqa: F401,F403
from test_ops_registration import *  # noqa: F401,F403

import normface_kernels as nk
from normface_kernels import reference
from normface_kernels.chunking import chunk_budget, cpu_path

ops = torch.ops.normface
# About 15 classes per chunk and thread at B = 9, D = 6 in float64 on 2 threads (budget_for).
SMALL_BUDGET = 4096


@pytest.fixture(autouse=True)
def _chunked_cpu():
    with cpu_path("chunked"), chunk_budget(SMALL_BUDGET):
        yield


def test_switches_return_the_previous_setting():
    assert nk.set_cpu_path("chunked") == "chunked"
    assert nk.set_cpu_path("blocked") == "chunked"
    assert nk.set_cpu_path("chunked") == "blocked"
    assert nk.set_chunk_budget(123) == SMALL_BUDGET
    assert nk.set_chunk_budget(SMALL_BUDGET) == 123
    with pytest.raises(ValueError, match="path"):
        nk.set_cpu_path("tiled")
    with pytest.raises(ValueError, match="nbytes"):
        nk.set_chunk_budget(-1)
    with pytest.raises(RuntimeError, match="path"):
        ops.set_cpu_path("tiled")


def test_the_chunked_kernels_are_the_ones_that_run():
    table = torch._C._dispatch_dump_table("normface::cosine_softmax_forward")
    cpu = [line for line in table.splitlines() if line.startswith("CPU")]
    assert cpu and "chunked" in cpu[0]
    with cpu_path("blocked"):
        table = torch._C._dispatch_dump_table("normface::cosine_softmax_forward")
        cpu = [line for line in table.splitlines() if line.startswith("CPU")]
        assert cpu and "chunked" not in cpu[0]


# ---------------------------------------------------------------------------------------------
# Chunk boundaries: one class per chunk, a few, a partial last chunk, one chunk; C = 1
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [1, 3, 7, 1000])
@pytest.mark.parametrize("C", [1, 2, 17])
def test_chunk_boundaries(classes, C):
    B, D = 5, 4
    f, w, y = make_inputs(B, C, D, ignore=(1,), seed=C)
    setting = dict(SPEC_SETTINGS["combined_margins"])
    s = torch.tensor(setting.pop("scale"), dtype=torch.float64, requires_grad=True)
    with chunk_budget(budget_for(classes, B, D)):
        loss, g = grads(lambda: nk.cosine_softmax(f, w, y, s, reduction="none", **setting),
                        f, w, s)
        for name, (ours, _, kwargs) in AGENT_CASES.items():
            a_loss, a_g = grads(lambda: ours(f, w, y, reduction="none", **kwargs), f, w)
            e_loss, e_g = grads(lambda: AGENT_CASES[name][1](f, w, y, **kwargs), f, w)
            torch.testing.assert_close(a_loss, e_loss, rtol=1e-9, atol=1e-10)
            for a, b in zip(a_g, e_g):
                torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)
    s_ref = s.detach().clone().requires_grad_()
    e_loss, e_g = grads(lambda: reference.cosine_softmax(f, w, y, s_ref, **setting), f, w, s_ref)
    torch.testing.assert_close(loss, e_loss, rtol=1e-9, atol=1e-10)
    for a, b in zip(g, e_g):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Shards and grad_lse through the ops
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["arcface", "sphereface_normalized", "l_softmax",
                                  "l2_softmax_features_only", "a_softmax_weight_only"])
@pytest.mark.parametrize("shard", [(0, 23), (5, 14), (14, 23)])
def test_softmax_shard_with_grad_lse(name, shard):
    setting = dict(SPEC_SETTINGS[name])
    scale = setting.pop("scale")
    start, end = shard
    f, w_full, y = make_inputs(9, 23, 6, ignore=(4,), seed=start)
    w = w_full[start:end].detach().clone().requires_grad_()
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    params = (setting.get("m1", 1.0), setting.get("m2", 0.0), setting.get("m3", 0.0),
              setting.get("lam", 0.0), setting.get("normalize_features", True),
              setting.get("normalize_weight", True))
    gl = torch.linspace(0.5, 1.5, 9, dtype=torch.float64)
    ge = torch.linspace(-0.7, 0.4, 9, dtype=torch.float64)

    def ours():
        loss, lse = ops.cosine_softmax_forward(f, w, y, s, *params, -100, start, 23)
        return (loss * gl + lse * ge).sum(), loss, lse

    def exact():
        loss, lse = reference.softmax_loss_lse(f, w, y, s, class_start=start, **setting)
        return (loss * gl + lse * ge).sum(), loss, lse

    total, loss, lse = ours()
    g = torch.autograd.grad(total, (f, w, s))
    e_total, e_loss, e_lse = exact()
    e_g = torch.autograd.grad(e_total, (f, w, s))
    torch.testing.assert_close(loss, e_loss.detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(lse, e_lse.detach(), rtol=1e-9, atol=1e-10)
    for what, a, b in zip(("features", "weight", "scale"), g, e_g):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=what)


def test_agent_shards():
    f, w, y = make_inputs(8, 21, 5, ignore=(2,))
    y[5] = 20
    kwargs = (0.8, True, False, -100)
    full_loss, full_hardest = ops.c_triplet_forward(f, w, y, *kwargs, 0, -1)
    owner_loss = torch.zeros_like(full_loss)
    for start, end in ((0, 9), (9, 21)):
        loss, hardest = ops.c_triplet_forward(f, w[start:end], y, *kwargs, start, 21)
        owns = (y >= start) & (y < end)
        assert torch.all(loss[~owns] == 0)
        valid = y != -100
        assert torch.all(hardest[~valid] == -1) and torch.all(hardest[valid] >= 0)
        owner_loss = torch.where(owns, loss, owner_loss)
    # The local hardest of the owning shard is the global one only when it lies there: the
    # losses agree on the rows whose global hardest is in their own shard.
    same = ((full_hardest < 9) == (y < 9)) & (y != -100)
    torch.testing.assert_close(owner_loss[same], full_loss[same])
    gl = torch.rand(8, dtype=torch.float64)
    for hardest_only in (True, False):
        parts = [torch.autograd.grad((ops.c_triplet_forward(
            f, w[a:b], y, 0.8, hardest_only, True, -100, a, 21)[0] * gl).sum(), f)[0]
            for a, b in ((0, 9), (9, 21))]
        assert all(torch.isfinite(p).all() for p in parts)


# ---------------------------------------------------------------------------------------------
# Bad input the chunked path must meet itself (contract "Bad input")
# ---------------------------------------------------------------------------------------------

LOSSES = {
    "normface": lambda f, w, y, s: nk.cosine_softmax(f, w, y, s, reduction="sum"),
    "l_softmax": lambda f, w, y, s: nk.cosine_softmax(
        f, w, y, s, m1=2.0, normalize_features=False, normalize_weight=False, reduction="sum"),
    "l2_softmax": lambda f, w, y, s: nk.cosine_softmax(f, w, y, s, normalize_weight=False,
                                                       m3=0.2, reduction="sum"),
    **{name: (lambda ours, kw: lambda f, w, y, s: ours(f, w, y, reduction="sum", **kw) * s)(
        ours, kwargs) for name, (ours, _, kwargs) in AGENT_CASES.items()},
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ignored_rows_holding_nan_contribute_nothing(name, bad):
    """Rows with label ignore_index whose features are NaN or inf: the loss, grad_weight and
    grad_scale are those of the batch without them, and their own gradient is exactly 0."""
    f, w, y = make_inputs(7, 19, 5, ignore=(1, 4), requires_grad=False)
    f[1, 2] = bad
    f[4] = bad
    keep = y != -100
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    fl, wl = f.clone().requires_grad_(), w.clone().requires_grad_()
    loss = LOSSES[name](fl, wl, y, s)
    loss.backward()
    f2, w2, s2 = (f[keep].clone().requires_grad_(), w.clone().requires_grad_(),
                  s.detach().clone().requires_grad_())
    expect = LOSSES[name](f2, w2, y[keep], s2)
    expect.backward()
    torch.testing.assert_close(loss, expect)
    torch.testing.assert_close(wl.grad, w2.grad)
    torch.testing.assert_close(fl.grad[keep], f2.grad)
    assert torch.all(fl.grad[~keep] == 0)
    torch.testing.assert_close(s.grad, s2.grad)


@pytest.mark.parametrize("name", ["plain_softmax", "l_softmax", "a_softmax_weight_only",
                                  "normface"])
def test_unnormalized_feature_of_norm_1e8_float64(name):
    """The backward recomputes each logit bit-identically to the forward: a feature of norm 1e8
    (logits ~1e8) keeps an exact gradient."""
    setting = dict(SPEC_SETTINGS[name])
    scale = setting.pop("scale")
    f, w, y = make_inputs(6, 13, 5, requires_grad=False, seed=4)
    f[2] *= 1e8 / f[2].norm()
    f[3] *= 1e-3
    f.requires_grad_()
    w.requires_grad_()
    loss, g = grads(lambda: nk.cosine_softmax(f, w, y, scale, reduction="none", **setting), f, w)
    e_loss, e_g = grads(lambda: reference.cosine_softmax(f, w, y, scale, **setting), f, w)
    torch.testing.assert_close(loss, e_loss, rtol=1e-9, atol=1e-6)
    for a, b in zip(g, e_g):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9 * b.abs().max().item())


def test_float16_gradients_below_the_subnormal_range():
    """float16, s = 64: each dL/dz of a wrong class is ~1e-8, below float16's smallest subnormal
    (6e-8), but C of them add up -- coherently here: the wrong agents share the direction e_3 --
    to the whole e_3 component of grad_features. The gradient operand's power-of-two scaling keeps
    them (cast unscaled, they would round to 0 and so would that component)."""
    B, C, D = 4, 10_000, 16
    g = torch.Generator().manual_seed(0)
    e = torch.eye(D, dtype=torch.float64)
    w = e[3] + 0.002 * torch.randn(C, D, generator=g, dtype=torch.float64)
    w[0] = e[1]
    y = torch.zeros(B, dtype=torch.int64)
    f = 0.35 * e[1] + 0.937 * e[2] + 0.001 * torch.randn(B, D, generator=g,
                                                         dtype=torch.float64)
    f16, w16 = f.half().requires_grad_(), w.half().requires_grad_()
    f64, w64 = f16.detach().double().requires_grad_(), w16.detach().double().requires_grad_()
    nk.cosine_softmax(f16, w16, y, 64.0, reduction="sum").backward()
    reference.cosine_softmax(f64, w64, y, 64.0).sum().backward()
    p_wrong = torch.softmax(64.0 * reference.cosine_logits(f64, w64), dim=1)[:, 1:]
    assert (64.0 * p_wrong).max() < 3e-8            # each rounds to 0 in float16
    exact, ours = f64.grad[:, 3], f16.grad[:, 3].double()
    assert exact.abs().min() > 0.5 * f64.grad.abs().max()  # a leading component
    err = ((ours - exact).abs() / exact.abs()).max().item()
    assert err < 1e-2, f"grad_features e_3 component: relative error {err:.3g}"


def test_results_do_not_depend_on_the_chunk_width():
    """Many chunks or one: the same losses and gradients up to rounding (float64)."""
    f, w, y = make_inputs(6, 40, 8, ignore=(0,))
    with chunk_budget(budget_for(5, 6, 8)):
        loss, g = grads(lambda: nk.cosine_softmax(f, w, y, 20.0, m2=0.4, reduction="none"), f, w)
    with chunk_budget(budget_for(40, 6, 8)):
        loss1, g1 = grads(lambda: nk.cosine_softmax(f, w, y, 20.0, m2=0.4, reduction="none"),
                          f, w)
    torch.testing.assert_close(loss, loss1, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
