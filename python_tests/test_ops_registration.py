"""Op registration: opcheck on every op, torch.compile(fullgraph=True), l2_normalize, logits."""

import pytest
import torch
from conftest import make_inputs

import normface_kernels as nk
from normface_kernels import reference

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")


def _op_samples():
    f, w, y = make_inputs(5, 7, 4, dtype=torch.float32, ignore=(1,))
    s = torch.tensor(8.0, requires_grad=True)
    f64, w64, y64 = make_inputs(3, 4, 5)
    _, hardest = torch.ops.normface.c_triplet_forward(f, w, y, 0.8, True, False, -100, 0, -1)
    g = torch.rand(5)
    loss, lse = torch.ops.normface.cosine_softmax_forward(
        f, w, y, s, 1.0, 0.5, 0.0, 0.0, True, True, -100, 0, -1)
    softmax_params = (1.0, 0.5, 0.0, 0.0, True, True, -100, 0, -1)
    return [
        ("l2_normalize", (f, 1e-12)),
        ("l2_normalize", (f64[:, None, :].expand(3, 2, 5).contiguous(), 1e-12)),
        ("l2_normalize_backward", (f.detach(), w.detach()[:5], 1e-12)),
        ("cosine_softmax_forward", (f, w, y, s, *softmax_params)),
        ("cosine_softmax_forward", (f64, w64, y64, torch.tensor(2.0, dtype=torch.float64),
                                    4.0, 0.0, 0.0, 1.0, False, True, -100, 0, -1)),
        ("cosine_softmax_forward", (f, w[2:6], y, s, *softmax_params[:-2], 2, 7)),
        ("cosine_softmax_backward", (g, g, f.detach(), w.detach(), y, s.detach(),
                                     lse.detach(), *softmax_params)),
        ("cosine_softmax", (f, w, y, s)),
        ("cosine_logits", (f, w, s)),
        ("c_contrastive", (f, w, y, 0.0, 1.0, -100, 0, -1)),
        ("c_contrastive_backward", (g, f.detach(), w.detach(), y, 0.0, 1.0, -100, 0, -1)),
        ("c_triplet_forward", (f, w, y, 0.8, True, True, -100, 0, -1)),
        ("c_triplet_forward", (f, w, y, 0.8, False, False, -100, 0, -1)),
        ("c_triplet_backward", (g, f.detach(), w.detach(), y, hardest, 0.8, True, False, -100,
                                0, -1)),
        ("c_triplet", (f, w, y)),
        ("center_loss", (f, w, y, -100, 0, -1)),
        ("center_loss_backward", (g, f.detach(), w.detach(), y, -100, 0, -1)),
    ]


@pytest.mark.parametrize("index", range(len(_op_samples())),
                         ids=[f"{name}-{i}" for i, (name, _) in enumerate(_op_samples())])
def test_opcheck(index):
    name, args = _op_samples()[index]
    torch.library.opcheck(getattr(torch.ops.normface, name), args, test_utils=OPCHECK_TESTS)


def test_every_op_has_a_cpu_kernel():
    for name in ("l2_normalize", "l2_normalize_backward", "cosine_softmax_forward",
                 "cosine_softmax_backward", "c_contrastive", "c_contrastive_backward",
                 "c_triplet_forward", "c_triplet_backward", "center_loss",
                 "center_loss_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"normface::{name}", "CPU"), name


def test_op_is_differentiable_when_called_directly():
    f, w, y = make_inputs(4, 6, 3)
    s = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    loss = torch.ops.normface.cosine_softmax(f, w, y, s, 1.0, 0.4, 0.0, 0.0, True, True, -100)
    ref = reference.cosine_softmax(f, w, y, s, m2=0.4)
    torch.testing.assert_close(loss, ref)
    g = torch.autograd.grad(loss.sum(), (f, w, s))
    g_ref = torch.autograd.grad(ref.sum(), (f, w, s))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("fn, kwargs", [
    (nk.cosine_softmax, dict(scale=20.0, m2=0.5)),
    (nk.cosine_softmax, dict(m3=0.35, normalize_features=False)),
    (nk.c_contrastive, dict()),
    (nk.c_triplet, dict(center=True)),
    (nk.center_loss, dict()),
])
def test_torch_compile_fullgraph(fn, kwargs):
    f, w, y = make_inputs(6, 9, 5, dtype=torch.float32, ignore=(2,))
    compiled = torch.compile(lambda f, w, y: fn(f, w, y, backend="cpu", **kwargs),
                             fullgraph=True, backend="aot_eager")
    loss = compiled(f, w, y)
    g = torch.autograd.grad(loss, (f, w))
    eager = fn(f, w, y, backend="cpu", **kwargs)
    g_eager = torch.autograd.grad(eager, (f, w))
    torch.testing.assert_close(loss, eager)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


def test_torch_compile_module_with_learned_scale():
    torch.manual_seed(0)
    module = nk.NormFaceLoss(5, 9, margins=(1.0, 0.3, 0.0), aux="c_contrastive", backend="cpu")
    f, _, y = make_inputs(6, 9, 5, dtype=torch.float32)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    loss = compiled(f, y)
    loss.backward()
    assert module.scale.grad is not None and module.weight.grad is not None
    eager = module(f, y)
    torch.testing.assert_close(loss, eager)


def test_l2_normalize_matches_reference_and_eq4():
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    out = nk.l2_normalize(x)
    torch.testing.assert_close(out, reference.l2_normalize(x))
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, g)
    xn = out.detach()
    eq4 = (g - xn * (g * xn).sum(-1, keepdim=True)) / x.detach().norm(dim=-1, keepdim=True)
    torch.testing.assert_close(grad, eq4)
    torch.testing.assert_close((grad * x).sum(-1), torch.zeros(3, 4, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(nk.l2_normalize, (x,))
    zero = torch.zeros(2, 5)
    assert torch.equal(nk.l2_normalize(zero), zero)
    for dtype in (torch.float16, torch.bfloat16):
        xl = x.detach().to(dtype)
        torch.testing.assert_close(nk.l2_normalize(xl), reference.l2_normalize(xl))


def test_cosine_logits():
    f, w, _ = make_inputs(4, 6, 5)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    out = nk.cosine_logits(f, w, s)
    ref = reference.cosine_logits(f, w, s)
    torch.testing.assert_close(out, ref)
    g = torch.autograd.grad(out.sum(), (f, w, s))
    g_ref = torch.autograd.grad(ref.sum(), (f, w, s))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    assert nk.cosine_logits(f.float(), w.float()).dtype == torch.float32
