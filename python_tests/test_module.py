"""NormFaceLoss: learned scale, loss types, aux term, Proposition-3 distortion average."""

import pytest
import torch
from conftest import make_inputs

import normface_kernels as nk
from normface_kernels import reference


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


def test_scale_floor():
    module = nk.NormFaceLoss(5, 9, backend="cpu")
    with torch.no_grad():
        module.scale.fill_(-3.0)
    assert module.effective_scale.item() == pytest.approx(0.01)


def test_fixed_scale_is_a_buffer():
    module = nk.NormFaceLoss(5, 9, scale=30.0, backend="cpu")
    assert "scale" not in dict(module.named_parameters())
    assert module.scale.item() == 30.0


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
    assert module.mean_distortion == pytest.approx(float(first[[0, 2]].mean()))
    module.eval()
    module(f * 0 + 1, y)
    assert torch.equal(module.agent_distortion, first)


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
