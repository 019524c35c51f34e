"""NormFaceLoss: learned scale (floor, projected gradient), fixed scale, loss types, aux term,
Proposition-3 distortion average. Training from scratch is in test_training.py."""

import math

import pytest
import torch
from conftest import make_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import normface_kernels as nk
from normface_kernels import reference
from normface_kernels.distributed import ShardedNormFaceLoss
from normface_kernels.modules import update_agent_distortion
from normface_kernels.scale import learned_scale_floor, target_at_zero


def test_learned_scale_starts_at_10_and_gets_a_gradient():
    module = nk.NormFaceLoss(5, 9, backend="cpu", dtype=torch.float64)
    assert module.scale.item() == 10.0 and module.scale.requires_grad
    f, _, y = make_inputs(6, 9, 5)
    loss = module(f, y)
    expected = reference.cosine_softmax(f, module.weight, y, module.scale).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    s_ref = module.scale.detach().clone().requires_grad_()
    reference.cosine_softmax(f, module.weight.detach(), y, s_ref).mean().backward()
    torch.testing.assert_close(module.scale.grad, s_ref.grad)


@pytest.mark.parametrize("C, margins, lam", [
    (2000, (1.0, 0.0, 0.0), 0.0), (50_000, (1.0, 0.0, 0.35), 0.0), (2000, (1.0, 0.5, 0.0), 0.0),
    (2000, (4.0, 0.0, 0.0), 0.0), (10, (1.5, 0.2, 0.1), 2.0), (2, (1.0, 0.0, 0.9), 0.0)])
def test_default_floor_is_proposition2_with_the_margin(C, margins, lam):
    module = nk.NormFaceLoss(4, C, margins=margins, lam=lam, backend="cpu")
    floor = module.scale_floor
    assert floor == learned_scale_floor(C, margins, lam)
    assert module.scale.item() == pytest.approx(max(10.0, floor))
    # At Proposition 2's optimum (features on their agents, agents on a simplex) the loss
    # with these margins is exactly the target at the floor.
    t0 = target_at_zero(*margins, lam)
    optimum = math.log1p((C - 1) * math.exp(-floor * (t0 + 1 / (C - 1))))
    assert optimum == pytest.approx(0.1, rel=1e-9)
    if margins == (1.0, 0.0, 0.0):
        assert floor == pytest.approx(nk.scale_for_loss(C, 0.1))
    assert t0 == pytest.approx((lam + math.cos(margins[1]) - margins[2]) / (1 + lam))


def test_floor_of_an_unnormalized_side_is_the_papers():
    module = nk.NormFaceLoss(4, 2000, margins=(4.0, 0.0, 0.0), normalize_features=False,
                             backend="cpu")
    assert module.scale_floor == 0.01 and module.scale.item() == 10.0


def test_margins_that_no_scale_can_train_are_refused():
    # t0 = 1 - 1.5 < -1/99; ArcFace past pi takes the contract's k = 1 branch: -cos(3.5) - 2 < 0.
    for margins in ((1.0, 0.0, 1.5), (1.0, 3.5, 0.0)):
        with pytest.raises(ValueError, match="no learned scale"):
            nk.NormFaceLoss(4, 100, margins=margins, backend="cpu")
    assert target_at_zero(1.0, 3.5, 0.0) == pytest.approx(-math.cos(3.5) - 2.0)
    nk.NormFaceLoss(4, 100, margins=(1.0, 0.0, 1.5), scale=30.0, backend="cpu")   # fixed: ok


def _scale_gradient(module, aligned):
    """scale.grad of one loss on inputs that prefer a larger scale (features on their agents)
    or a smaller one (random features with an ArcFace margin)."""
    y = torch.arange(module.weight.shape[0]).repeat(2)
    f = module.weight.detach()[y] if aligned else torch.randn(y.numel(), 4)
    module.scale.grad = None
    module(f, y).backward()
    return module.scale.grad.item()


def test_learned_scale_bound_is_not_a_dead_zone():
    torch.manual_seed(0)
    module = nk.NormFaceLoss(4, 8, margins=(1.0, 0.5, 0.0), backend="cpu", scale_floor=5.0)
    optimizer = torch.optim.SGD([module.scale], lr=1.0)
    with torch.no_grad():
        module.scale.fill_(-3.0)                       # far below the floor
    assert module.effective_scale.item() == 5.0
    # The loss prefers a larger scale: the gradient arrives and a step raises the parameter.
    grad = _scale_gradient(module, aligned=True)
    assert grad < 0
    optimizer.step()
    assert module.scale.item() == pytest.approx(-3.0 - grad)
    # The loss prefers a smaller scale: nothing pushes the parameter further below the floor.
    with torch.no_grad():
        module.scale.fill_(5.0)
    assert _scale_gradient(module, aligned=False) == 0.0
    # Above the floor every gradient passes, whatever its sign: it is the reference's.
    with torch.no_grad():
        module.scale.fill_(7.0)
    y = torch.arange(8).repeat(2)
    f = torch.randn(16, 4)
    s = torch.tensor(7.0, requires_grad=True)
    reference.cosine_softmax(f, module.weight.detach(), y, s, m2=0.5).mean().backward()
    module.scale.grad = None
    module(f, y).backward()
    assert s.grad.item() > 0
    torch.testing.assert_close(module.scale.grad, s.grad)


def test_sharded_loss_has_the_same_scale():
    for kwargs in (dict(), dict(margins=(1.0, 0.0, 0.35)), dict(scale=30.0),
                   dict(scale_init=12.0, scale_floor=0.5)):
        single = nk.NormFaceLoss(4, 300, backend="cpu", **kwargs)
        sharded = ShardedNormFaceLoss(4, 300, backend="cpu", **kwargs)
        assert single.scale_floor == sharded.scale_floor
        assert single.effective_scale.item() == sharded.effective_scale.item()


@pytest.mark.parametrize("scale", [30.0, 0.001, 64])
def test_fixed_scale_is_a_buffer_used_as_given(scale):
    module = nk.NormFaceLoss(5, 9, scale=scale, backend="cpu", dtype=torch.float64)
    assert "scale" not in dict(module.named_parameters())
    assert module.scale.item() == pytest.approx(scale, rel=1e-7)   # a float32 buffer
    assert module.effective_scale is module.scale and module.scale_floor is None
    f, _, y = make_inputs(6, 9, 5)
    torch.testing.assert_close(module(f, y),
                               reference.cosine_softmax(f, module.weight, y, module.scale).mean())


@pytest.mark.parametrize("kwargs, match", [
    (dict(scale=-5.0), "scale must be finite and > 0"),
    (dict(scale=0.0), "scale must be finite and > 0"),
    (dict(scale=math.nan), "scale must be finite and > 0"),
    (dict(scale=math.inf), "scale must be finite and > 0"),
    (dict(scale=True), "scale must be a real number"),
    (dict(scale="learned"), "scale must be 'learn'"),
    (dict(scale=30.0, scale_floor=1.0), "apply to scale='learn' only"),
    (dict(scale_floor=0.0), "scale_floor must be finite and > 0"),
    (dict(scale_init=math.inf), "scale_init must be finite and > 0"),
    (dict(scale_init=2.0, scale_floor=5.0), "scale_init .* must be >= scale_floor"),
    (dict(margins=(1.0, math.inf, 0.0)), "m2 must be finite"),
])
def test_bad_scale_arguments_raise(kwargs, match):
    for module in (nk.NormFaceLoss, ShardedNormFaceLoss):
        with pytest.raises(ValueError, match=match):
            module(5, 9, backend="cpu", **kwargs)


@pytest.mark.parametrize("loss, aux, expected", [
    ("softmax", "c_contrastive",
     lambda f, w, y, s: reference.cosine_softmax(f, w, y, s, m2=0.5).mean()
     + 0.01 * reference.c_contrastive(f, w, y).mean()),
    ("c_contrastive", None, lambda f, w, y, s: reference.c_contrastive(f, w, y).mean()),
    ("c_triplet", "center",
     lambda f, w, y, s: reference.c_triplet(f, w, y).mean()
     + 0.01 * reference.center_loss(f, w, y).mean()),
])
def test_loss_kinds_and_aux(loss, aux, expected):
    module = nk.NormFaceLoss(5, 9, loss=loss, aux=aux, margins=(1.0, 0.5, 0.0),
                             backend="cpu", dtype=torch.float64)
    f, _, y = make_inputs(6, 9, 5)
    torch.testing.assert_close(module(f, y), expected(f, module.weight, y, module.scale))


def test_distortion_moving_average():
    module = nk.NormFaceLoss(4, 3, backend="cpu", distortion_momentum=0.5,
                             dtype=torch.float64)
    assert math.isnan(module.mean_distortion) and module.distortion_per_class.isnan().all()
    f = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 2, 2, -100])
    module(f, y)
    d = reference.center_loss(f, module.weight, y).detach()
    first = module.agent_distortion.clone()
    torch.testing.assert_close(first[0], ((d[0] + d[1]) / 2).float())
    torch.testing.assert_close(first[2], ((d[2] + d[3]) / 2).float())
    assert first[1] == 0 and not module.distortion_seen[1]
    module(f[:2], y[:2])
    torch.testing.assert_close(module.agent_distortion[0], first[0])  # same batch mean
    assert module.agent_distortion[2] == first[2]
    per_class = module.distortion_per_class
    assert per_class.shape == (3,) and math.isnan(per_class[1])   # class 1 never seen
    assert torch.equal(per_class[[0, 2]], first[[0, 2]])
    assert module.mean_distortion == pytest.approx(float(first[[0, 2]].mean()))
    module.eval()
    module(f * 0 + 1, y)
    assert torch.equal(module.agent_distortion, first)


def test_distortion_update_skips_invalid_samples_without_indexing_by_them():
    """Samples outside `valid` (ignored, or a label out of range let through with the data
    checks off) are neither counted nor used as an index; their distance (NaN, inf) is not read."""
    module = nk.NormFaceLoss(4, 3, backend="cpu", distortion_momentum=0.5)
    y = torch.tensor([0, 10 ** 6, -100, 2, 0])
    d = torch.tensor([1.0, math.nan, math.inf, 3.0, 2.0])
    update_agent_distortion(module, y, d, torch.tensor([True, False, False, True, True]))
    torch.testing.assert_close(module.agent_distortion, torch.tensor([1.5, 0.0, 3.0]))
    assert module.distortion_seen.tolist() == [True, False, True]


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
    y = torch.randint(0, 20, (256,))
    f = centers[y] + 0.3 * torch.randn(256, 8)
    module = nk.NormFaceLoss(8, 20, margins=(1.0, 0.2, 0.0), backend="cpu")
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = module(f, y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.5 * first
    assert module.scale.grad is not None and module.scale.item() != 10.0


class HostReads(TorchDispatchMode):
    """Records the ops that read tensor data on the host -- a host-device synchronization on
    CUDA tensors: .item(), bool(t), nonzero, boolean-mask indexing -- or build a tensor from
    Python data (torch.tensor(x, device=cuda): a pageable host-to-device copy, not allowed in
    CUDA-graph capture). On CPU tensors they cost nothing, but they are the same calls: a test
    on CPU finds the Python code that would synchronize on CUDA. (The C++ and Triton ops are
    seen as one call each: their own data checks are not recorded here.)"""

    READS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal",
             "lift_fresh", "unique", "_unique2", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        masked = name in ("index", "index_put", "index_put_") and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in args[1] if i is not None)
        if name in self.READS or masked:
            self.reads.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("kw", [
    dict(), dict(margins=(1.0, 0.5, 0.0), scale=30.0), dict(aux="c_contrastive"),
    dict(loss="c_triplet", aux="center"), dict(loss="c_contrastive", reduction="sum")])
def test_a_training_step_reads_no_tensor_data_on_the_host(kw):
    """contract: with the data checks off a CUDA training step makes no host-device sync (so
    that it can be captured in a CUDA graph); scripts/gpu_smoke_graph.py checks it on a GPU.
    Here: the module's own Python code (the distortion update included) and the functional API
    in a forward + backward."""
    module = nk.NormFaceLoss(5, 9, backend="cpu", **kw)
    f, _, y = make_inputs(6, 9, 5, dtype=torch.float32, ignore=(1,))
    previous = nk.set_data_checks(False)
    try:
        with HostReads() as recorder:
            module(f, y).backward()
    finally:
        nk.set_data_checks(previous)
    assert recorder.reads == []
    assert module.distortion_seen[y[y != -100]].all()


@pytest.mark.parametrize("loss", ["cosine_softmax", "c_contrastive", "c_triplet", "center_loss"])
def test_a_functional_call_reads_no_tensor_data_on_the_host(loss):
    """The same for the functional API with a Python float scale (made a tensor on the device
    by a fill, not by a copy from the host)."""
    f, w, y = make_inputs(6, 9, 5, dtype=torch.float32, ignore=(1,))
    kwargs = dict(scale=30.0, m2=0.5) if loss == "cosine_softmax" else {}
    previous = nk.set_data_checks(False)
    try:
        with HostReads() as recorder:
            getattr(nk, loss)(f, w, y, backend="cpu", **kwargs).backward()
    finally:
        nk.set_data_checks(previous)
    assert recorder.reads == []


def test_host_reads_are_recorded():
    """The recorder of the test above sees each kind of read it looks for."""
    x = torch.arange(4.0)
    with HostReads() as recorder:
        x.sum().item()
        bool(x.any())
        x[x > 1]
        torch.tensor(2.0)
    assert len(recorder.reads) == 4, recorder.reads


def test_sphereface_lambda_is_the_papers_schedule():
    """lam = max(5, 1000 / (1 + 0.12 step)): 1000 at the start, decreasing, 5 from step 1659."""
    lams = [nk.sphereface_lambda(step) for step in range(0, 3000, 7)]
    assert lams[0] == 1000.0 and lams[-1] == 5.0
    assert all(a >= b for a, b in zip(lams, lams[1:]))
    assert nk.sphereface_lambda(100) == pytest.approx(1000.0 / 13.0)
    assert nk.sphereface_lambda(1658) > 5.0 == nk.sphereface_lambda(1659)
