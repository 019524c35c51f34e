"""Agent losses (paper section 4): c_contrastive, c_triplet, center_loss on every backend against
the reference (conftest's `backend` fixture: cpu, cpu_chunked, triton, cuda)."""

import math

import pytest
import torch
from conftest import AGENT_CASES, assert_low_precision_close, grads, make_inputs

from normface_kernels import reference

# The interpreter evaluates masked-off lanes too (log(0), inf - inf in padding): numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

# B = 1, C = 1, D = 1, sizes off every tile of every backend; the largest only compiled.
SHAPES = [(1, 1, 1), (1, 1, 3), (1, 2, 5), (3, 2, 16), (5, 7, 4), (5, 37, 20), (19, 50, 40),
          (66, 65, 33), (3, 700, 130), (9, 2100, 6)]


def _distances(f, w):
    """d_ij = 2 - 2 cos_ij, float64."""
    return 2.0 - 2.0 * reference.cosine_logits(f.double(), w.double())


def _compare(backend, name, f, w, y, tol):
    ours, ref, kwargs = AGENT_CASES[name]
    loss, g = grads(lambda: ours(f, w, y, reduction="none", backend=backend.api, **kwargs), f, w)
    loss_ref, g_ref = grads(lambda: ref(f, w, y, **kwargs), f, w)
    torch.testing.assert_close(loss.double(), loss_ref.double(), **tol)
    for what, a, b in zip(("features", "weight"), g, g_ref):
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", sorted(AGENT_CASES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, name, shape):
    B, C, D = shape
    if backend.interpreted and not (B <= 32 and C <= 64):
        pytest.skip("too large for the Triton interpreter")
    f, w, y = backend.inputs(B, C, D, ignore=(2,) if B > 2 else (), seed=C)
    _compare(backend, name, f, w, y, backend.tol())


@pytest.mark.backends("cpu", "cpu_chunked")
@pytest.mark.parametrize("name", sorted(AGENT_CASES))
def test_gradcheck(backend, name):
    ours, _, kwargs = AGENT_CASES[name]
    f, w, y = make_inputs(4, 6, 3, ignore=(1,), seed=11)
    op = lambda f, w: ours(f, w, y, reduction="none", backend=backend.api,  # noqa: E731
                           **kwargs)
    assert torch.autograd.gradcheck(op, (f, w), eps=1e-6, atol=1e-6)


def test_c_triplet_ties_pick_the_first_index(backend):
    """Duplicate agents (exactly equal distances) across tiles, splits and chunks: the hardest
    negative is the first of them, as torch.argmin; integer-valued inputs make the dots exact."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-2, 3, (40, 16), generator=g).double()
    w[0] += 3.0  # no zero rows
    w[33] = w[27] = w[5]     # three copies of one agent in different tiles / splits
    f = w[5] + 0.25 * torch.randint(-1, 2, (16,), generator=g).double()
    f = torch.stack([f, f, f, f]).to(backend.device, backend.dtype).requires_grad_()
    w = w.to(backend.device, backend.dtype).requires_grad_()
    y = torch.tensor([0, 1, 27, 5], device=backend.device)  # row 2: the target is a copy
    _, hardest = backend.op("c_triplet_forward")(f, w, y, 0.8, True, False, -100, 0, -1)
    d = _distances(f, w).detach()
    d[torch.arange(4), y] = math.inf
    assert hardest.tolist() == d.argmin(dim=1).tolist() == [5, 5, 5, 27]
    _compare(backend, "c_triplet_hardest", f, w, y, backend.tol())


def test_c_triplet_single_class_has_no_negative(backend):
    f, w, y = backend.inputs(3, 1, 4)
    loss, hardest = backend.op("c_triplet_forward")(f, w, y, 0.8, True, False, -100, 0, -1)
    assert torch.all(loss == 0) and torch.all(hardest == -1)


def test_class_shards(backend):
    """Shards [0, 12), [12, 20), [20, 45) of 45 classes (class_start / num_classes):
    c_contrastive and center_loss shards add up to the full loss and the full gradients; a
    c_triplet shard gives a row whose target is elsewhere loss 0 and its hardest local negative
    (the owning shard: the reference's loss and gradients with the shard's classes), and where
    the global hardest negative lies in the target's shard, the owner's loss is the full one."""
    f, w, y = backend.inputs(8, 45, 20, ignore=(2,), seed=13, requires_grad=False)
    y[0], y[1], y[5] = 19, 20, 44  # both sides of a boundary, the last class
    bounds = ((0, 12), (12, 20), (20, 45))
    tol = backend.tol()
    cot = torch.linspace(0.5, 1.5, 8, dtype=f.dtype, device=f.device)
    for fn, op, args in (("c_contrastive", backend.op("c_contrastive"), (0.1, 1.2)),
                         ("center_loss", backend.op("center_loss"), ())):
        fx, wx = f.clone().requires_grad_(), w.clone().requires_grad_()
        total = sum(op(fx, wx[a:b], y, *args, -100, a, 45) for a, b in bounds)
        full = op(fx, wx, y, *args, -100, 0, -1)
        got = torch.autograd.grad((total * cot).sum(), (fx, wx))
        kwargs = dict(pos_margin=0.1, neg_margin=1.2) if args else {}
        fr, wr = f.clone().requires_grad_(), w.clone().requires_grad_()
        ref = getattr(reference, fn)(fr, wr, y, **kwargs)
        want = torch.autograd.grad((ref * cot).sum(), (fr, wr))
        torch.testing.assert_close(total.double(), ref.double(), **tol, msg=fn)
        torch.testing.assert_close(total.double(), full.double(), **tol, msg=fn)
        for what, a, b in zip(("features", "weight"), got, want):
            torch.testing.assert_close(a.double(), b.double(), **tol,
                                       msg=lambda m: f"{fn} grad {what}: {m}")
    op = backend.op("c_triplet_forward")
    full_loss, full_hardest = op(f, w, y, 0.8, True, False, -100, 0, -1)
    owner_loss = torch.zeros_like(full_loss)
    for a, b in bounds:
        here = (y >= a) & (y < b)
        local = torch.where(here, y - a, torch.zeros_like(y))
        d = _distances(f, w[a:b])
        d[here, local[here]] = math.inf
        expected = torch.where(y == -100, torch.full_like(y, -1), d.argmin(dim=1))
        for hardest_only in (True, False):
            fx, wx = f.clone().requires_grad_(), w.clone().requires_grad_()
            loss, hardest = op(fx, wx[a:b], y, 0.8, hardest_only, True, -100, a, 45)
            got = torch.autograd.grad((loss * cot).sum(), (fx, wx))
            ref = reference.c_triplet(fx, wx[a:b], local, hardest_only=hardest_only,
                                      center=True)
            ref = torch.where(here, ref, torch.zeros_like(ref))
            want = torch.autograd.grad((ref * cot).sum(), (fx, wx))
            torch.testing.assert_close(loss.double(), ref.double(), **tol)
            for what, x, z in zip(("features", "weight"), got, want):
                torch.testing.assert_close(x.double(), z.double(), **tol,
                                           msg=lambda m: f"c_triplet shard grad {what}: {m}")
            if hardest_only:
                assert hardest.tolist() == expected.tolist()
        loss, _ = op(f, w[a:b], y, 0.8, True, False, -100, a, 45)
        owner_loss = torch.where(here, loss, owner_loss)
    lo = torch.tensor([a for a, _ in bounds], device=y.device)
    shard_of = lambda k: torch.bucketize(k, lo, right=True)  # noqa: E731
    same = (shard_of(full_hardest) == shard_of(y)) & (y != -100)
    assert same.any()
    torch.testing.assert_close(owner_loss[same], full_loss[same], **tol)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", ["c_contrastive", "c_triplet_hardest", "center"])
def test_reductions(backend, name, reduction):
    ours, ref, kwargs = AGENT_CASES[name]
    f, w, y = backend.inputs(6, 8, 4, ignore=(0,))
    out = ours(f, w, y, reduction=reduction, backend=backend.api, **kwargs)
    got = torch.autograd.grad(out, (f, w))
    per = ref(f, w, y, **kwargs)
    expected = per.sum() / (5 if reduction == "mean" else 1)
    want = torch.autograd.grad(expected, (f, w))
    torch.testing.assert_close(out.double(), expected.double(), **backend.tol())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), **backend.tol())


def test_all_ignored_gives_zero_and_zero_gradients(backend):
    f, w, y = backend.inputs(5, 30, 16, requires_grad=False)
    y[:] = -100
    for name, (ours, _, kwargs) in AGENT_CASES.items():
        fl, wl = f.clone().requires_grad_(), w.clone().requires_grad_()
        loss = ours(fl, wl, y, reduction="sum", backend=backend.api, **kwargs)
        loss.backward()
        assert loss.item() == 0.0 and (fl.grad == 0).all() and (wl.grad == 0).all(), name


@pytest.mark.parametrize("name", ["c_contrastive", "c_triplet_hardest", "c_triplet_all",
                                  "center"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_low_precision_inputs(backend, name, dtype):
    """The contract's tolerance rule against the float64 reference (atol relative to the size of
    each quantity)."""
    if dtype not in backend.low_dtypes + (torch.float32,):
        pytest.skip(f"{backend.name} has no {dtype} arithmetic")
    ours, ref, kwargs = AGENT_CASES[name]
    shape = (7, 33, 24) if backend.interpreted else (12, 300, 16)
    f64, w64, y = backend.inputs(*shape, seed=2, ignore=(1,), dtype=torch.float64,
                                 requires_grad=False)
    f, w = f64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_()
    ef, ew = f.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    lf, lw = f.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss, g = grads(lambda: ours(f, w, y, reduction="none", backend=backend.api, **kwargs), f, w)
    exact, ge = grads(lambda: ref(ef, ew, y, **kwargs), ef, ew)
    with reference.input_precision():
        low, gl = grads(lambda: ref(lf, lw, y, **kwargs), lf, lw)
    assert g[0].dtype == dtype and g[1].dtype == dtype
    for what, a, p, e in zip(("loss", "grad features", "grad weight"), (loss, *g), (low, *gl),
                             (exact, *ge)):
        size = max(e.abs().max().item(), 1.0)
        assert_low_precision_close(a, p, e, 2e-3 * size, what)


@pytest.mark.parametrize("name", sorted(AGENT_CASES))
def test_nan_propagates_and_zero_vectors_are_fine(backend, name):
    ours, ref, kwargs = AGENT_CASES[name]
    f, w, y = backend.inputs(6, 7, 5, requires_grad=False)
    y[5] = -100
    f[0] = 0.0
    w[6] = 0.0
    loss = ours(f, w, y, reduction="none", backend=backend.api, **kwargs)
    torch.testing.assert_close(loss.double(), ref(f, w, y, **kwargs).double(), **backend.tol())
    assert torch.isfinite(loss).all()
    f[2, 1] = float("nan")
    loss = ours(f, w, y, reduction="none", backend=backend.api, **kwargs)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4]]).all() and loss[5] == 0
