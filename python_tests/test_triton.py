"""What is particular to the Triton backend (normface_kernels/triton): its training ops
(torch.ops.normface.triton_*_train / *_backward_saved) and their saved statistics, the fp16
power-of-two scaling of the gradient operands, bit-identical recomputation of the logits,
l2_normalize / cosine_logits, opcheck, torch.compile, and the GPU tests at realistic sizes.
The scenarios every backend shares (every contract setting, odd shapes, shards, reductions,
ignored labels, margins at the ends of theta, 16-bit tolerance rule, NaN, ties, ...) run on
Triton through conftest's `backend` fixture in test_cosine_softmax.py and test_agent_losses.py.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set below before
anything imports the kernels): tiny shapes, fp32/fp16 (and fp64 for the margin edge cases and
the exactness tests; no bf16 arithmetic there). Interpreted blocks are 16 wide (triton/config.py),
so the shapes cross row-tile, class-tile and class-split boundaries; fp64 takes the D-chunked
cosine tile (16 wide) that fp32/fp64 use on a GPU, fp32/fp16 the whole-row tiles of 16-bit.
The backward is the closed form of docs/kernels.md (grad features, scale and norms from the
forward's U and R) plus the class-stationary grad_weight kernel: every test that differentiates
checks both against the reference.
The GPU tests at the end (realistic sizes, bf16/fp16 with the contract's tolerance rule) need CUDA.
Needs no C++ extension (the fixture below overrides conftest's check of it).
"""

import functools
import os
import sys

import pytest

_KERNELS_IMPORTED = "normface_kernels.triton" in sys.modules

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    if _KERNELS_IMPORTED:
        pytest.skip("normface_kernels.triton was imported without TRITON_INTERPRET=1 and there "
                    "is no CUDA device", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="the triton package is not installed")

from conftest import (  # noqa: E402
    AGENT_CASES,
    SPEC_SETTINGS,
    assert_low_precision_close,
    make_inputs,
)

import normface_kernels as nk  # noqa: E402
from normface_kernels import reference  # noqa: E402

if not nk.has_triton():
    pytest.skip("the Triton ops did not register", allow_module_level=True)

from normface_kernels import triton as nkt  # noqa: E402

ops = torch.ops.normface
# The interpreter evaluates masked-off lanes too (log(0), inf - inf in padding): numpy warns;
# triton 3.6's interpreter also converts 1-element arrays to loop bounds the deprecated way.
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter")]
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _require_extension():
    """Overrides conftest's check of the C++ extension: the Triton ops do not need it."""


_MARGIN_KEYS = ("m1", "m2", "m3", "lam", "normalize_features", "normalize_weight")


def _inputs(B, C, D, dtype=torch.float32, seed=0, ignore=(), device=DEVICE):
    """conftest's inputs, float32 on the test device, not requiring grad."""
    return make_inputs(B, C, D, dtype=dtype, seed=seed, ignore=ignore, device=device,
                       requires_grad=False)


def _weights(n, seed, dtype=torch.float64, device=DEVICE):
    """Fixed upstream gradients (a weighted sum exercises every row differently)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)


def _margins(setting):
    full = dict(m1=1.0, m2=0.0, m3=0.0, lam=0.0, normalize_features=True, normalize_weight=True)
    full.update({k: v for k, v in setting.items() if k in _MARGIN_KEYS})
    return full


def _assert_close(actual, expected, what, rtol, atol):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# A class-chunked fp64 version of the reference for the large GPU shapes
# ---------------------------------------------------------------------------------------------

def _exact_softmax_chunked(f, w, y, scale, wl, we, chunk=65536, **margins):
    """fp64 loss, lse and gradients of sum(wl * loss + we * lse), walking C in chunks (no B x C
    matrix beyond one chunk): pass 1 lse, pass 2 the surrogate sum (g + e) p z with p frozen,
    whose gradient is that of the lse terms, plus -g z_y for the target terms."""
    f64 = f.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    s64 = torch.tensor(float(scale), dtype=torch.float64, device=f.device, requires_grad=True)
    C = w.shape[0]
    chunks = [torch.arange(c0, min(c0 + chunk, C), device=f.device) for c0 in range(0, C, chunk)]

    def logits(cols):
        return reference.softmax_logits(f64, w64, y, s64, columns=cols, **margins)

    with torch.no_grad():
        lse = torch.logsumexp(torch.stack([torch.logsumexp(logits(c)[0], 1) for c in chunks]), 0)
    valid = y != -100
    g = torch.where(valid, wl.double(), torch.zeros_like(lse))
    ge = g + we.double()
    for cols in chunks:
        z, _, _ = logits(cols)
        p = torch.exp(z.detach() - lse[:, None])
        (ge[:, None] * p * z).sum().backward()
        del z, p
    _, z_y, _ = logits(chunks[0][:1])
    (-(g * z_y).sum()).backward()
    loss = torch.where(valid, lse - z_y.detach(), torch.zeros_like(lse))
    return loss, lse, f64.grad, w64.grad, s64.grad


def _softmax_op(f, w, y, s, class_start=0, num_classes=-1, **margins):
    m = _margins(margins)
    return ops.triton_cosine_softmax_forward(
        f, w, y, s, m["m1"], m["m2"], m["m3"], m["lam"], m["normalize_features"],
        m["normalize_weight"], -100, class_start, num_classes)


def test_exact_chunked_helper_matches_reference():
    """The class-chunked fp64 helper used by the large GPU tests is itself right."""
    f, w, y = _inputs(4, 13, 8, dtype=torch.float64, ignore=(1,), seed=9)
    wl, we = _weights(4, 3), _weights(4, 4) - 1.0
    for setting in (dict(m2=0.5), dict(m1=4.0, lam=2.0, normalize_weight=False)):
        margins = _margins(setting)
        loss, lse, gf, gw, gs = _exact_softmax_chunked(f, w, y, 7.0, wl, we, chunk=5, **margins)
        fr, wr = f.clone().requires_grad_(), w.clone().requires_grad_()
        sr = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
        loss_ref, lse_ref = reference.softmax_loss_lse(fr, wr, y, sr, **margins)
        ref = torch.autograd.grad((loss_ref * wl).sum() + (lse_ref * we).sum(), (fr, wr, sr))
        for what, a, b in zip(("loss", "lse", "f", "w", "s"), (loss, lse, gf, gw, gs),
                              (loss_ref, lse_ref, *ref)):
            _assert_close(a, b, what, 1e-10, 1e-10)


# ---------------------------------------------------------------------------------------------
# What the closed-form backward must keep exact: tiny gradients in fp16, logits recomputed
# bit-identically, the forward's statistics, the accumulator only when needed
# ---------------------------------------------------------------------------------------------

def test_softmax_float16_gradients_below_subnormals():
    """fp16 inputs whose per-element dL/dz (about 1e-9, like a mean over B = 1024 of p = 1e-6 at
    C = 1M) lies below fp16's smallest subnormal (6e-8), with agents of norm 5e-4, so that
    grad_weight is made of normal fp16 numbers: a kernel that rounds g p to fp16 loses every
    negative class; ours keeps every gradient to fp16's own rounding of the exact value."""
    f, w, y = _inputs(12, 40, 16, seed=21, ignore=(5,))
    f = f.half()
    w = (5e-4 * w / w.norm(dim=1, keepdim=True)).half()
    g = torch.full((12,), 5e-8, dtype=torch.float64, device=f.device)
    for setting in (dict(scale=30.0), dict(scale=64.0, m3=0.35)):
        margins = _margins(setting)
        fx, wx = f.clone().requires_grad_(), w.clone().requires_grad_()
        s = torch.tensor(setting["scale"], device=f.device)
        loss, _ = _softmax_op(fx, wx, y, s, **margins)
        grads = torch.autograd.grad((loss.double() * g).sum(), (fx, wx))
        f64, w64 = f.double().requires_grad_(), w.double().requires_grad_()
        ref, _ = reference.softmax_loss_lse(f64, w64, y, float(setting["scale"]), **margins)
        # dL/dz = g (p - [j = y]): below fp16's smallest subnormal, most of it far below.
        z = setting["scale"] * reference.cosine_logits(f64, w64).detach()
        gp = g[:, None] * torch.softmax(z, dim=1)
        assert gp.max().item() < 6e-8 and gp.median().item() < 6e-9
        exact = torch.autograd.grad((ref * g).sum(), (f64, w64))
        assert exact[1].abs().max().item() > 1e-4  # grad_weight: normal fp16 numbers
        for what, got, want in zip(("features", "weight"), grads, exact):
            rounding = (want.half().double() - want).abs()
            err = (got.double() - want).abs()
            bound = 2 * rounding + 1e-3 * want.abs().max()
            assert (err <= bound).all(), f"{setting} grad {what}: {(err - bound).max().item()}"


def test_float16_grad_weight_of_unnormalized_agents_with_a_zero_column():
    """fp16, agents not normalized: the target class's column of dL/dcos is all zero here
    (D = 1: cos is exactly 1 and the margin-free psi's slope is clamped to 0), so the column's
    power-of-two scale follows nothing, while eq. 4's term from ||W_j|| is not zero. Scaling that
    term by the column's power of two overflowed to -inf; it must come back finite and right."""
    f = torch.tensor([[0.6614]], device=DEVICE)
    w = torch.tensor([[0.2669], [0.0617]], device=DEVICE)
    y = torch.tensor([1], device=DEVICE)
    for scale in (1.0, 30.0):
        for m2 in (0.0, 0.5):
            margins = dict(m1=1.0, m2=m2, m3=0.0, lam=0.0, normalize_features=True,
                           normalize_weight=False)
            grads = []
            for dtype in (torch.float16, torch.float64):
                fx = f.to(torch.float16).to(dtype).requires_grad_()
                wx = w.to(torch.float16).to(dtype).requires_grad_()
                if dtype == torch.float16:
                    loss, _ = _softmax_op(fx, wx, y, torch.tensor(scale, device=DEVICE),
                                          **margins)
                else:
                    loss, _ = reference.softmax_loss_lse(fx, wx, y, scale, **margins)
                grads.append(torch.autograd.grad(loss.double().sum(), (fx, wx)))
            for what, got, want in zip(("features", "weight"), *grads):
                assert torch.isfinite(got).all(), f"s={scale} m2={m2} grad {what}: {got}"
                _assert_close(got.double(), want, f"s={scale} m2={m2} grad {what}", 2e-3, 2e-3)


def _recompute_identity(B, C, D, dtype, device):
    """Unnormalized logits of 1e4-1e6 (a softmax one-hot to the last bit), gradient of
    sum_i lse_i only. The logit is homogeneous of degree 1 in each W_j, so
    sum_j <grad W_j, W_j> = sum_ij p_ij z_ij = sum_i lse_i here; a recomputed logit one ulp off
    the forward's (0.06 at 1e6 in fp32) puts e^(+-ulp) into p and breaks it by that much --
    far more than the tolerance (16-bit: logits near 1e6, against grad W's own rounding)."""
    low = dtype in (torch.float16, torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    f = ((200 if low else 30) * torch.randn(B, D, generator=g)).to(device=device, dtype=dtype)
    w = ((200 if low else 30) * torch.randn(C, D, generator=g)).to(device=device, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    wx = w.clone().requires_grad_()
    _, lse = _softmax_op(f, wx, y, torch.tensor(1.0, device=device), normalize_features=False,
                         normalize_weight=False)
    (grad_w,) = torch.autograd.grad(lse.sum(), wx)
    lhs = (grad_w.double() * w.double()).sum().item()
    rhs = lse.double().sum().item()
    assert abs(lhs - rhs) <= (1e-2 if low else 1e-4) * abs(rhs), f"{dtype}: {lhs} vs {rhs}"


def test_logits_recomputed_bit_identically():
    _recompute_identity(24, 70, 32, torch.float32, DEVICE)
    _recompute_identity(24, 70, 32, torch.float64, DEVICE)


def test_softmax_training_op_outputs():
    """The training op's saved statistics are what docs/kernels.md says (norms, target terms,
    P + p_y = 1, Ubar and Rbar against their definitions), the (B, D) accumulator is only made
    when asked for, and its backward refuses a forward that did not make it."""
    f, w, y = _inputs(9, 30, 20, seed=2, ignore=(4,))
    y[2] = 29
    s = torch.tensor(12.0)
    margins = _margins(dict(m3=0.2))
    params = (margins["m1"], margins["m2"], margins["m3"], margins["lam"], True, True, -100, 0,
              -1)
    loss, lse, stats, ubar, nw = ops.triton_cosine_softmax_train(f, w, y, s, *params, True)
    st = dict(zip(nkt.cosine_softmax_fwd.STATS, stats))
    f64, w64 = f.double(), w.double()
    cols = torch.arange(30)
    z, z_y, valid = reference.softmax_logits(f64, w64, y, 12.0, **margins)
    p = torch.softmax(z, dim=1)
    hit = (y[:, None] == cols[None, :]) & valid[:, None]
    p_neg = torch.where(hit, torch.zeros_like(p), p)
    w_unit = w64 / w64.norm(dim=1, keepdim=True)
    cos = (f64 / f64.norm(dim=1, keepdim=True)) @ w_unit.t()
    expected = {"nf": f64.norm(dim=1), "p_neg": p_neg.sum(1), "p_y": (p * hit).sum(1),
                "r_bar": (p_neg * cos).sum(1), "zy": torch.where(valid, z_y, 0 * z_y)}
    for name, want in expected.items():
        _assert_close(st[name], want, name, 1e-5, 1e-6)
    _assert_close(st["p_neg"] + st["p_y"], torch.where(valid, 1.0, st["p_neg"].double()), "P",
                  1e-6, 1e-6)
    _assert_close(ubar, p_neg @ w_unit, "Ubar", 1e-5, 1e-6)
    _assert_close(nw, w64.norm(dim=1), "nw", 1e-6, 1e-6)
    _, _, _, empty, _ = ops.triton_cosine_softmax_train(f, w, y, s, *params, False)
    assert empty.shape == (0, 20)
    g = torch.ones(9)
    with pytest.raises(ValueError, match="need_grad"):
        ops.triton_cosine_softmax_backward_saved(g, g, f, w, y, s, lse, stats, empty, nw,
                                                 *params)
    with torch.no_grad():  # the public op under no_grad: the same losses, no accumulator
        _assert_close(_softmax_op(f, w, y, s, **margins)[0], loss, "no_grad loss", 0, 0)


def test_backward_op_on_its_own_matches_the_training_pair():
    """The C++-schema backward ops (inputs only, the forward's statistics recomputed) give the
    gradients of the training op pair."""
    f, w, y = _inputs(6, 25, 20, seed=4, ignore=(0,))
    s = torch.tensor(9.0)
    g, e = _weights(6, 1, torch.float32), _weights(6, 2, torch.float32) - 1.0
    params = (1.0, 0.4, 0.0, 0.0, True, False, -100, 0, -1)
    _, lse, stats, ubar, nw = ops.triton_cosine_softmax_train(f, w, y, s, *params, True)
    pair = ops.triton_cosine_softmax_backward_saved(g, e, f, w, y, s, lse, stats, ubar, nw,
                                                    *params)
    alone = ops.triton_cosine_softmax_backward(g, e, f, w, y, s, lse, *params)
    for a, b in zip(pair, alone):
        _assert_close(a, b, "softmax backward", 0, 0)
    loss, hardest, stats, v, nw = ops.triton_c_triplet_train(f, w, y, 0.8, True, True, -100, 0,
                                                             -1, True)
    pair = ops.triton_c_triplet_backward_saved(g, f, w, y, hardest, stats, v, nw, 0.8, True,
                                               True, -100, 0, -1)
    alone = ops.triton_c_triplet_backward(g, f, w, y, hardest, 0.8, True, True, -100, 0, -1)
    for a, b in zip(pair, alone):
        _assert_close(a, b, "c_triplet backward", 1e-6, 1e-7)


def test_hardest_outside_the_classes_reads_as_none_without_the_data_check():
    """Autograd calls the backward ops with check_data=False, which skips the data checks on GPU
    tensors: a hardest index outside [0, C) must then read as "no hardest negative", never be
    read out of bounds. On CPU tensors the op checks it whatever check_data says (as the C++
    ops do)."""
    from normface_kernels.triton import agents
    f, w, y = _inputs(5, 7, 16, seed=3)
    g = _weights(5, 1, torch.float32)
    bad = torch.tensor([1, 10**6, 2, 7, -5], device=DEVICE)
    none = torch.tensor([1, -1, 2, -1, -1], device=DEVICE)
    (stats_bad, nw), (stats_none, _) = (agents.hardest_hinge(f, w, y, k, 0.8, -100, 0)
                                        for k in (bad, none))
    _assert_close(stats_bad, stats_none, "hardest_hinge", 0, 0)
    v = stats_bad.new_empty((0, 16))
    grads = [agents.c_triplet_backward(g, f, w, y, k, stats, v, nw, 0.8, True, True, -100, 0)
             for k, stats in ((bad, stats_bad), (none, stats_none))]
    for a, b in zip(*grads):
        _assert_close(a, b, "c_triplet backward", 0, 0)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="hardest must be in"):
            ops.triton_c_triplet_backward(g, f, w, y, bad, 0.8, True, True, -100, 0, -1, False)
    else:
        alone = ops.triton_c_triplet_backward(g, f, w, y, bad, 0.8, True, True, -100, 0, -1,
                                              False)
        for a, b in zip(alone, grads[1]):
            _assert_close(a, b, "c_triplet backward op", 0, 0)


def test_float16_gradients_with_no_rows():
    """B = 0 in fp16: grad_weight is zeros (the fp16 power-of-two scale of a class that saw no
    row must stay finite: 0 * 2^150 = 0 * inf was NaN)."""
    for name in ("cosine_softmax", "c_contrastive"):
        f = torch.zeros(0, 16, dtype=torch.float16, device=DEVICE, requires_grad=True)
        w = torch.randn(3, 16, device=DEVICE).half().requires_grad_()
        y = torch.zeros(0, dtype=torch.int64, device=DEVICE)
        getattr(nk, name)(f, w, y, backend="triton", reduction="sum").backward()
        assert torch.equal(w.grad, torch.zeros_like(w)), (name, w.grad)
        assert f.grad.shape == (0, 16)


# ---------------------------------------------------------------------------------------------
# l2_normalize, cosine_logits
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7, 33), (2, 3, 70), (5,)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_l2_normalize(shape, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)
    x[..., 0] = 0.0 if x.dim() == 1 else x[..., 0]
    xk, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    out = nk.l2_normalize(xk, backend="triton")
    ref = reference.l2_normalize(xr)
    go = torch.randn(shape, generator=g).to(device=DEVICE)
    gk = torch.autograd.grad(out, xk, go.to(dtype))[0]
    gr = torch.autograd.grad(ref, xr, go.double())[0]
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert out.dtype == dtype and gk.dtype == dtype
    _assert_close(out, ref, "l2_normalize", tol, tol)
    _assert_close(gk, gr, "l2_normalize backward", tol, tol * 10)
    z = torch.zeros(3, 5, device=DEVICE, dtype=dtype)
    assert torch.equal(nk.l2_normalize(z, backend="triton"), z)  # zero vectors are fine (eps)


def test_cosine_logits():
    f, w, _ = _inputs(19, 37, 40, seed=3)
    f, w = f.requires_grad_(), w.requires_grad_()
    s = torch.tensor(4.0, device=f.device, requires_grad=True)
    out = nk.cosine_logits(f, w, s, backend="triton")
    assert out.shape == (19, 37) and out.dtype == f.dtype
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(f.device)
    gk = torch.autograd.grad(out, (f, w, s), go)
    s_ref = s.detach().clone().requires_grad_()
    ref = reference.cosine_logits(f, w, s_ref)
    gr = torch.autograd.grad(ref, (f, w, s_ref), go)
    _assert_close(out, ref, "logits", 1e-5, 1e-5)
    for what, a, b in zip(("features", "weight", "scale"), gk, gr):
        _assert_close(a, b, what, 1e-5, 1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------

def test_bad_labels_and_scale_are_named():
    f, w, y = _inputs(4, 9, 16)
    bad = y.clone()
    bad[2] = 9
    with pytest.raises(ValueError, match="labels"):
        nk.cosine_softmax(f, w, bad, backend="triton")
    bad[2] = -3
    for fn in (nk.c_contrastive, nk.c_triplet, nk.center_loss):
        with pytest.raises(ValueError, match="labels"):
            fn(f, w, bad, backend="triton")
    with pytest.raises(ValueError, match="scale"):
        nk.cosine_softmax(f, w, y, torch.tensor(float("inf"), device=f.device),
                          backend="triton")
    with pytest.raises(ValueError, match="scale"):
        _softmax_op(f, w, y, torch.tensor(float("nan"), device=f.device))
    with pytest.raises(ValueError, match="class_start"):
        _softmax_op(f, w, y, torch.tensor(1.0, device=f.device), class_start=3, num_classes=10)
    # A label of another shard is fine; one beyond num_classes is not.
    _softmax_op(f, w, y + 5, torch.tensor(1.0, device=f.device), class_start=0, num_classes=14)
    beyond = y + 5
    beyond[1] = 14
    with pytest.raises(ValueError, match="labels"):
        _softmax_op(f, w, beyond, torch.tensor(1.0, device=f.device), num_classes=14)



@functools.lru_cache(maxsize=None)
def _opcheck_cases():
    """Arguments of every op, made once (the saved tensors come from real forward calls)."""
    f, w, y = _inputs(5, 20, 16, ignore=(1,))
    f, w = f.requires_grad_(), w.requires_grad_()
    s = torch.tensor(8.0, device=f.device, requires_grad=True)
    g = _weights(5, 0, torch.float32)
    lse = _softmax_op(f, w, y, s)[1].detach()
    hardest = ops.triton_c_triplet_forward(f, w, y, 0.8, True, False, -100, 0, -1)[1]
    margins = (1.0, 0.3, 0.1, 0.0, True, True, -100, 0, -1)
    fd, wd = f.detach(), w.detach()
    _, _, stats, ubar, nw = ops.triton_cosine_softmax_train(fd, wd, y, s.detach(), *margins,
                                                           True)
    _, c_stats, v, c_nw = ops.triton_c_contrastive_train(fd, wd, y, 0.1, 1.2, -100, 0, -1, True)
    _, hard, t_stats, t_v, t_nw = ops.triton_c_triplet_train(fd, wd, y, 0.8, False, True, -100,
                                                             0, -1, True)
    return {
        "cosine_softmax_train": (f, w, y, s) + margins + (True,),
        "cosine_softmax_train_inference": (fd, wd, y, s.detach()) + margins + (False,),
        "cosine_softmax_backward_saved": (g, g, fd, wd, y, s.detach(), lse, stats, ubar, nw)
        + margins,
        "c_contrastive_train": (f, w, y, 0.1, 1.2, -100, 0, -1, True),
        "c_contrastive_backward_saved": (g, fd, wd, y, c_stats, v, c_nw, 0.1, 1.2, -100, 0, -1),
        "c_triplet_train": (f, w, y, 0.8, False, True, -100, 0, -1, True),
        "c_triplet_backward_saved": (g, fd, wd, y, hard, t_stats, t_v, t_nw, 0.8, False, True,
                                     -100, 0, -1),
        "l2_normalize": (f, 1e-12),
        "l2_normalize_backward": (g[:, None].expand(5, 16).contiguous(), f.detach(), 1e-12),
        "cosine_logits": (f, w, s, 1e-12),
        "cosine_logits_backward": (torch.ones(5, 20), f.detach(), w.detach(), s.detach(), 1e-12),
        "cosine_softmax_forward": (f, w, y, s) + margins,
        "cosine_softmax_backward": (g, g, f.detach(), w.detach(), y, s.detach(), lse) + margins,
        "c_contrastive": (f, w, y, 0.1, 1.2, -100, 0, -1),
        "c_contrastive_backward": (g, f.detach(), w.detach(), y, 0.1, 1.2, -100, 0, -1),
        "c_triplet_forward": (f, w, y, 0.8, False, True, -100, 0, -1),
        "c_triplet_backward": (g, f.detach(), w.detach(), y, hardest, 0.8, True, False, -100,
                               0, -1),
        "center_loss": (f, w, y, -100, 0, -1),
        "center_loss_backward": (g, f.detach(), w.detach(), y, -100, 0, -1),
        "center_loss_backward_saved": (g, f.detach(), w.detach(), y, -100, 0, -1),
    }


@pytest.mark.parametrize("name", [
    "l2_normalize", "l2_normalize_backward", "cosine_logits", "cosine_logits_backward",
    "cosine_softmax_forward", "cosine_softmax_backward", "cosine_softmax_train",
    "cosine_softmax_train_inference", "cosine_softmax_backward_saved", "c_contrastive",
    "c_contrastive_backward", "c_contrastive_train", "c_contrastive_backward_saved",
    "c_triplet_forward", "c_triplet_backward", "c_triplet_train", "c_triplet_backward_saved",
    "center_loss", "center_loss_backward", "center_loss_backward_saved"])
def test_opcheck(name):
    args = _opcheck_cases()[name]
    args = tuple(a.to(DEVICE) if torch.is_tensor(a) else a for a in args)
    torch.library.opcheck(getattr(ops, "triton_" + name.replace("_inference", "")), args)


def test_torch_compile_fullgraph():
    """The public API compiles without graph breaks. Under the interpreter the Triton ops are
    opaque custom ops and "aot_eager" runs them (Inductor cannot launch interpreted kernels);
    on a GPU Inductor traces into the triton_op bodies."""
    f, w, y = _inputs(6, 25, 20, ignore=(2,))
    backend = "inductor" if HAS_CUDA else "aot_eager"

    def step(f, w, y, s):
        return (nk.cosine_softmax(f, w, y, s, m2=0.3, backend="triton")
                + 0.01 * nk.c_contrastive(f, w, y, backend="triton")
                + nk.c_triplet(f, w, y, backend="triton")
                + nk.center_loss(f, w, y, backend="triton"))

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    results = []
    for fn in (compiled, step):
        fx, wx = f.clone().requires_grad_(), w.clone().requires_grad_()
        s = torch.tensor(12.0, device=f.device, requires_grad=True)
        loss = fn(fx, wx, y, s)
        results.append((loss, *torch.autograd.grad(loss, (fx, wx, s))))
    for what, a, b in zip(("loss", "features", "weight", "scale"), *results):
        _assert_close(a, b, f"compiled {what}", 1e-5, 1e-6)


# ---------------------------------------------------------------------------------------------
# GPU: realistic sizes, low precision (skipped without CUDA)
# ---------------------------------------------------------------------------------------------

def _gpu_softmax_rule(B, C, D, dtype, setting, seed=0, atol=None):
    """Kernel error vs class-chunked fp64 at most 2x that of plain PyTorch in `dtype`, + atol."""
    margins = _margins(setting)
    s = setting["scale"]
    f, w, y = _inputs(B, C, D, dtype=dtype, ignore=(3, 17), seed=seed, device="cuda")
    wl = _weights(B, 1, device="cuda") / B
    we = torch.zeros(B, dtype=torch.float64, device="cuda")
    fx, wx = f.clone().requires_grad_(), w.clone().requires_grad_()
    sx = torch.tensor(s, device="cuda", requires_grad=True)
    loss, _ = _softmax_op(fx, wx, y, sx, **margins)
    kernel = (loss, *torch.autograd.grad((loss.double() * wl).sum(), (fx, wx, sx)))
    fp, wp = f.clone().requires_grad_(), w.clone().requires_grad_()
    sp = torch.tensor(s, device="cuda", dtype=dtype, requires_grad=True)
    loss_p, _ = reference.softmax_loss_lse(fp, wp, y, sp, acc=dtype, **margins)
    plain = (loss_p, *torch.autograd.grad((loss_p.double() * wl).sum(), (fp, wp, sp)))
    del loss_p
    exact = _exact_softmax_chunked(f, w, y, s, wl, we, chunk=1 << 15, **margins)
    exact = (exact[0], exact[2], exact[3], exact[4])
    tol = atol if atol is not None else (1e-3 if dtype == torch.float16 else 1e-2)
    for what, k, p, e in zip(("loss", "grad features", "grad weight", "grad scale"), kernel,
                             plain, exact):
        assert_low_precision_close(k, p, e, tol, what)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["normface", "arcface", "a_softmax_weight_only"])
def test_gpu_softmax_realistic(dtype, name):
    _gpu_softmax_rule(512, 10_000, 256, dtype, SPEC_SETTINGS[name], atol=1e-5 if
                      dtype == torch.float32 else None)


@gpu
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C,D", [(100_000, 512), (1_000_000, 256)])
def test_gpu_softmax_large(dtype, C, D):
    _gpu_softmax_rule(1024, C, D, dtype, SPEC_SETTINGS["cosface"], seed=C)


@gpu
@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_no_batch_by_class_buffer():
    """Peak extra memory of forward + backward at B = 1024, C = 1M, D = 512 (bf16): the two
    gradients plus at most 2% of one fp32 (B, C) logits matrix (eager PyTorch holds several):
    the split partials of U and the B + C saved floats, no (B, C) and no (C, D) scratch."""
    B, C, D = 1024, 1_000_000, 512
    f, w, y = _inputs(B, C, D, dtype=torch.bfloat16, device="cuda")
    f, w = f.requires_grad_(), w.requires_grad_()
    s = torch.tensor(30.0, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = nk.cosine_softmax(f, w, y, s, m3=0.35, backend="triton")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = (B + C) * D * 2  # grad_f, grad_W in bf16
    assert extra < grads + 0.02 * B * C * 4, f"extra memory {extra / 2**20:.0f} MiB"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 512), (torch.float16, 128),
                                     (torch.float32, 512)], ids=str)
def test_gpu_logits_recomputed_bit_identically(dtype, D):
    """The tensor-core tile S = f W^T of the forward and S^T = W f^T of the backward agree to
    the last bit (fp32: the symmetric TF32x3 split of tiles.cos_dot)."""
    _recompute_identity(256, 4099, D, dtype, "cuda")


@gpu
@pytest.mark.gpu
def test_gpu_float16_gradients_below_subnormals():
    """Mean reduction at B = 1024, C = 100k: g p is about 1e-8, below fp16's subnormals, for
    almost every element. grad_weight keeps it (relative error of fp16's order), where rounding
    g p to fp16 would zero every negative class."""
    B, C, D = 1024, 100_000, 128
    f, w, y = _inputs(B, C, D, dtype=torch.float16, seed=1, device="cuda")
    w = (1e-3 * w / w.norm(dim=1, keepdim=True)).half()  # grad_weight of normal fp16 size
    wx = w.clone().requires_grad_()
    loss = nk.cosine_softmax(f, wx, y, 30.0, backend="triton")
    (grad_w,) = torch.autograd.grad(loss, wx)
    wl = torch.full((B,), 1.0 / B, dtype=torch.float64, device="cuda")
    exact = _exact_softmax_chunked(f, w, y, 30.0, wl, torch.zeros_like(wl), chunk=1 << 14,
                                   **_margins({}))[3]
    rel = ((grad_w.double() - exact).norm() / exact.norm()).item()
    assert rel < 5e-3, f"relative error {rel}"


@gpu
@pytest.mark.gpu
def test_gpu_training_step_makes_no_host_sync():
    """contract: with the data checks off, forward + backward of every loss makes no host-device
    synchronization (torch's sync debug mode raises on one)."""
    f, w, y = _inputs(256, 5000, 128, dtype=torch.bfloat16, ignore=(3,), device="cuda")
    fx, wx = f.clone().requires_grad_(), w.clone().requires_grad_()
    s = torch.tensor(30.0, device="cuda", requires_grad=True)
    steps = (lambda: nk.cosine_softmax(fx, wx, y, s, m2=0.5, backend="triton"),
             lambda: nk.c_contrastive(fx, wx, y, backend="triton"),
             lambda: nk.c_triplet(fx, wx, y, backend="triton"),
             lambda: nk.c_triplet(fx, wx, y, hardest_only=False, backend="triton"),
             lambda: nk.center_loss(fx, wx, y, backend="triton"))
    for step in steps:  # warm up: compiles, caches the SM count
        step().backward()
    previous = nk.set_data_checks(False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in steps:
            step().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        nk.set_data_checks(previous)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["c_contrastive", "c_triplet_hardest", "c_triplet_all"])
def test_gpu_agent_losses(dtype, name):
    public, ref, kwargs = AGENT_CASES[name]
    f, w, y = _inputs(256, 5000, 128, dtype=dtype, ignore=(3,), device="cuda")
    fx, wx = f.clone().requires_grad_(), w.clone().requires_grad_()
    loss = public(fx, wx, y, reduction="none", backend="triton", **kwargs)
    gk = torch.autograd.grad(loss.sum(), (fx, wx))
    f64, w64 = f.double().requires_grad_(), w.double().requires_grad_()
    exact = ref(f64, w64, y, **kwargs)
    ge = torch.autograd.grad(exact.sum(), (f64, w64))
    rel = ((loss.double() - exact).norm() / exact.norm()).item()
    assert rel < 2e-2, f"loss relative error {rel}"
    for what, a, b in zip(("features", "weight"), gk, ge):
        rel = ((a.double() - b).norm() / b.norm().clamp(min=1e-6)).item()
        assert rel < 5e-2, f"grad {what}: relative error {rel}"
