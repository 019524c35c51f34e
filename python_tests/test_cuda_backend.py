"""The CUDA backend against the reference (normface_kernels/reference.py): the chunked path of
csrc/chunked (cuBLAS GEMMs over class chunks) with its CUDA epilogues (csrc/cuda).

What is particular to CUDA: every op and every gradient in fp32 / fp16 / bf16 at sizes off the
GPU tiles, TF32, across chunk boundaries (a tiny chunk budget), without a host sync when the data
checks are off, and (marked slow) at a realistic size with a million classes. Tolerance rule of
docs/contract.md "Backends" (conftest.assert_low_precision_close), with an atol relative to the
magnitude of the compared tensor. The scenarios every backend shares (shards, ties, NaN, ignored
labels and ignored rows holding NaN, margins at the ends of theta, non-contiguous inputs, 16-bit
inputs, float16 gradients below the subnormal range) run on CUDA through conftest's `backend`
fixture in test_cosine_softmax.py and test_agent_losses.py.

Skipped without a CUDA device. Run: pytest python_tests/test_cuda_backend.py [-m "not slow"]
"""

import math

import pytest
import torch
from conftest import assert_low_precision_close, budget_for

import normface_kernels as nk
from normface_kernels import reference as ref
from normface_kernels.chunking import chunk_budget

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# atol, relative to max |reference|, on top of 2x the plain low-precision error.
ATOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}
# Used instead of the plain error when the plain low-precision computation itself breaks down
# (overflow to inf / NaN in fp16), relative to max |reference|.
FALLBACK = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
ops = torch.ops.normface


@pytest.fixture(autouse=True)
def _cuda_kernels_and_exact_fp32():
    assert nk.has_cuda_kernels(), "normface_kernels._C was built without the CUDA kernels"
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means exact fp32 unless a test says so
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def check(name, out, exact, plain, dtype, floor=0.0):
    """The tolerance rule with atol = ATOL[dtype] * max(max |exact|, floor): `floor` is the
    natural size of the quantity (e.g. s g / ||f|| for a gradient), for results that cancel to ~0
    (a projection when D = 1); where plain PyTorch breaks down, FALLBACK[dtype] * max |exact|
    stands for its error."""
    exact_d = exact.detach().double()
    finite = torch.isfinite(exact_d)
    mag = exact_d[finite].abs().max().item() if finite.any() else 0.0
    assert_low_precision_close(out, plain, exact, ATOL[dtype] * max(mag, floor) + 1e-12,
                               f"{name} ({dtype})", plain_fallback=FALLBACK[dtype] * mag)


def make_inputs(B, C, D, dtype, *, seed=0, ignore=0, near=0.5, feature_scale=3.0):
    """Features partly aligned with their class agent (so targets matter), odd norms."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(C, D, device="cuda", generator=g) * 0.05
    y = torch.randint(0, C, (B,), device="cuda", generator=g)
    noise = torch.randn(B, D, device="cuda", generator=g)
    f = near * w[y] / w[y].norm(dim=1, keepdim=True) * math.sqrt(D) + noise
    f = f * feature_scale * torch.rand(B, 1, device="cuda", generator=g).add(0.5)
    if ignore:
        y[torch.randperm(B, device="cuda", generator=g)[:ignore]] = -100
    return f.to(dtype), w.to(dtype), y


def leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def upstream(B, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.rand(B, device="cuda", generator=g) + 0.5


def per_sample_grads(loss_fn, f, w, gl, scale=None):
    """Per-sample losses and the gradients of sum_i gl_i loss_i w.r.t. f, w (and scale)."""
    leaves = [f, w] + ([scale] if scale is not None else [])
    loss = loss_fn(*leaves)
    (loss * gl.to(loss.dtype)).sum().backward()
    return [loss.detach()] + [t.grad for t in leaves]


# ---------------------------------------------------------------------------------------------
# l2_normalize
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (3, 5, 64), (130, 512), (4, 0)])
def test_l2_normalize(dtype, shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(shape, device="cuda", generator=g) * 4).to(dtype)
    grad = torch.randn(shape, device="cuda", generator=g).to(dtype)
    if x.numel():
        # A zero vector is fine (eps); its gradient, g / sqrt(eps), would overflow fp16: g = 0.
        x.view(-1, shape[-1])[0] = 0
        grad.view(-1, shape[-1])[0] = 0
    out = ops.l2_normalize(x, 1e-12)
    back = ops.l2_normalize_backward(grad, x, 1e-12)
    x64 = leaf(x, torch.float64)
    exact = ref.l2_normalize(x64)
    exact.backward(grad.double())
    with ref.input_precision():
        xl = leaf(x)
        plain = ref.l2_normalize(xl)
        plain.backward(grad)
    tol_dtype = torch.float32 if dtype == torch.float64 else dtype
    assert out.dtype == dtype and back.dtype == dtype
    norms = x.double().norm(dim=-1)
    norms = norms[norms > 0]
    floor = grad.double().abs().max().item() / norms.min().item() if norms.numel() else 0.0
    check("l2_normalize", out, exact, plain, tol_dtype)
    check("l2_normalize grad", back, x64.grad, xl.grad, tol_dtype, floor)


def test_l2_normalize_autograd():
    x = leaf(torch.randn(9, 17, device="cuda"))
    nk.l2_normalize(x, backend="cuda").pow(3).sum().backward()
    x64 = leaf(x, torch.float64)
    ref.l2_normalize(x64).pow(3).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# cosine_softmax: loss, lse and every gradient
# ---------------------------------------------------------------------------------------------

MARGINS = {
    "normface": dict(),
    "cosface": dict(m3=0.35),
    "arcface": dict(m2=0.5),
    "sphereface": dict(m1=4.0, lam=5.0),
    "combined": dict(m1=1.0, m2=0.3, m3=0.2),
}
NORMALIZE = {
    "both": (True, True),
    "weight_only": (False, True),    # A-Softmax
    "features_only": (True, False),  # L2-softmax
    "neither": (False, False),       # L-Softmax / plain softmax
}


def softmax_grad_floors(f, w, scale, g, normalize_features=True, normalize_weight=True):
    """Natural sizes of (loss, grad_f, grad_w, grad_s): s g a b / ||x|| for the gradients."""
    nf, nw = f.double().norm(dim=1), w.double().norm(dim=1)
    a = 1.0 if normalize_features else nf.max().item()
    b = 1.0 if normalize_weight else nw.max().item()
    gmax = g.abs().max().item() * a * b
    return (0.0, scale * gmax / max(nf.min().item(), 1e-6),
            scale * gmax / max(nw.min().item(), 1e-6), gmax)


def run_softmax_case(B, C, D, dtype, margins, normalize, *, ignore=0, seed=0, scale=30.0,
                     feature_scale=3.0):
    nf_, nw_ = normalize
    f, w, y = make_inputs(B, C, D, dtype, seed=seed, ignore=ignore, feature_scale=feature_scale)
    if not nf_ or not nw_:
        scale = 1.0 if not (nf_ or nw_) else 4.0  # unnormalized logits are already large
    kw = dict(margins, normalize_features=nf_, normalize_weight=nw_)
    params = (float(margins.get("m1", 1.0)), float(margins.get("m2", 0.0)),
              float(margins.get("m3", 0.0)), float(margins.get("lam", 0.0)), nf_, nw_)
    gl, ge = upstream(B, 1), upstream(B, 2) - 1.0

    def kernel(fl, wl, sl):
        loss, lse = ops.cosine_softmax_forward(fl, wl, y, sl, *params, -100, 0, -1)
        return loss + lse * (ge / gl)  # so that sum(gl * .) = sum(gl loss + ge lse)

    def exact_fn(acc):
        def fn(fl, wl, sl):
            loss, lse = ref.softmax_loss_lse(fl, wl, y, sl, acc=acc, **kw)
            return loss + lse * (ge / gl).to(acc)
        return fn

    s32 = torch.tensor(scale, device="cuda")
    out = per_sample_grads(kernel, leaf(f), leaf(w), gl, leaf(s32))
    exact = per_sample_grads(exact_fn(torch.float64), leaf(f), leaf(w), gl,
                             leaf(s32, torch.float64))
    plain = per_sample_grads(exact_fn(dtype), leaf(f), leaf(w), gl, leaf(s32, dtype))
    floors = softmax_grad_floors(f, w, scale, gl.abs() + ge.abs(), nf_, nw_)
    for name, o, e, p, floor in zip(("loss+lse", "grad_features", "grad_weight", "grad_scale"),
                                    out, exact, plain, floors):
        check(name, o, e, p, dtype, floor)
    assert out[1].dtype == dtype and out[2].dtype == dtype and out[3].dtype == torch.float32

    # The op's own loss and lse, and the public loss against reference.py itself.
    loss, lse = ops.cosine_softmax_forward(f, w, y, s32, *params, -100, 0, -1)
    e_loss, e_lse = ref.softmax_loss_lse(f, w, y, s32, acc=torch.float64, **kw)
    p_loss, p_lse = ref.softmax_loss_lse(f, w, y, s32, acc=dtype, **kw)
    check("loss", loss, e_loss, p_loss, dtype)
    check("lse", lse, e_lse, p_lse, dtype)
    assert loss.dtype == torch.float32 and lse.dtype == torch.float32
    spec = ref.cosine_softmax(f.double(), w.double(), y, scale, **kw)
    check("loss vs reference.py", loss, spec, p_loss, dtype)
    return loss, lse, y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", list(MARGINS))
def test_cosine_softmax_margins(dtype, margin):
    run_softmax_case(37, 203, 96, dtype, MARGINS[margin], NORMALIZE["both"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", list(NORMALIZE))
def test_cosine_softmax_normalization_modes(dtype, normalize):
    margins = MARGINS["sphereface"] if normalize != "features_only" else MARGINS["cosface"]
    run_softmax_case(29, 130, 64, dtype, margins, NORMALIZE[normalize], feature_scale=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,D", [(1, 1, 1), (1, 2, 3), (2, 65, 7), (65, 64, 33), (64, 129, 130),
                                   (130, 1000, 24), (3, 5000, 520)])
def test_cosine_softmax_odd_sizes(dtype, B, C, D):
    run_softmax_case(B, C, D, dtype, MARGINS["arcface"], NORMALIZE["both"], scale=16.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_softmax_ignore_index(dtype):
    loss, lse, y = run_softmax_case(70, 300, 64, dtype, MARGINS["cosface"], NORMALIZE["both"],
                                    ignore=25)
    ignored = y == -100
    assert torch.all(loss[ignored] == 0)
    assert torch.all(torch.isfinite(lse[ignored]))  # lse is still computed for ignored rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_softmax_tf32(dtype):
    # fp32 with TF32 allowed runs on tensor cores; the plain fp32 baseline uses TF32 as well.
    torch.backends.cuda.matmul.allow_tf32 = True
    run_softmax_case(45, 333, 128, dtype, MARGINS["arcface"], NORMALIZE["both"])


def test_float64_is_a_clear_error():
    f, w, y = make_inputs(4, 10, 8, torch.float64)
    with pytest.raises(ValueError, match="float64"):
        ops.cosine_softmax_forward(f, w, y, torch.tensor(1.0, device="cuda"), 1.0, 0.0, 0.0,
                                   0.0, True, True, -100, 0, -1)
    with pytest.raises(ValueError, match="float64"):
        ops.c_contrastive(f, w, y)


def test_bad_labels_raise():
    f, w, y = make_inputs(4, 10, 8, torch.float32)
    y[2] = 10
    with pytest.raises(ValueError, match="labels"):
        nk.cosine_softmax(f, w, y, backend="cuda")
    with pytest.raises(ValueError, match="labels"):
        nk.c_triplet(f, w, y, backend="cuda")


# ---------------------------------------------------------------------------------------------
# Agent losses
# ---------------------------------------------------------------------------------------------

AGENT_CASES = {
    "c_contrastive": dict(pos_margin=0.0, neg_margin=1.0),
    "c_contrastive_wide": dict(pos_margin=0.2, neg_margin=2.2),  # about half the negatives active
    "c_triplet_hardest": dict(margin=0.8, hardest_only=True, center=False),
    "c_triplet_hardest_center": dict(margin=0.8, hardest_only=True, center=True),
    "c_triplet_all": dict(margin=0.3, hardest_only=False, center=False),
    "c_triplet_all_center": dict(margin=0.3, hardest_only=False, center=True),
    "center_loss": dict(),
}


def agent_fn(case):
    name = case.rsplit("_wide", 1)[0]
    if name.startswith("c_triplet"):
        name = "c_triplet"
    elif name.startswith("c_contrastive"):
        name = "c_contrastive"
    return name, AGENT_CASES[case]


def run_agent_case(case, B, C, D, dtype, *, ignore=0, seed=0):
    name, kw = agent_fn(case)
    f, w, y = make_inputs(B, C, D, dtype, seed=seed, ignore=ignore, near=1.5)
    gl = upstream(B)
    public = getattr(nk, name)
    reference = getattr(ref, name)
    out = per_sample_grads(lambda fl, wl: public(fl, wl, y, reduction="none", backend="cuda",
                                                 **kw), leaf(f), leaf(w), gl)
    exact = per_sample_grads(lambda fl, wl: reference(fl, wl, y, **kw),
                             leaf(f, torch.float64), leaf(w, torch.float64), gl)
    with ref.input_precision():
        plain = per_sample_grads(lambda fl, wl: reference(fl, wl, y, **kw), leaf(f), leaf(w), gl)
    floors = softmax_grad_floors(f, w, 2.0, gl)[:3]  # dL/dcos = -2 dL/dd per pair
    for what, o, e, p, floor in zip(("loss", "grad_features", "grad_weight"), out, exact, plain,
                                    floors):
        check(f"{case} {what}", o, e, p, dtype, floor)
    assert out[0].dtype == torch.float32 and out[1].dtype == dtype and out[2].dtype == dtype
    return f, w, y, out[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_c_triplet_hardest_index(dtype):
    f, w, y = make_inputs(50, 200, 64, dtype, near=1.5, ignore=5)
    loss, hardest = ops.c_triplet_forward(f, w, y, 0.8, True, True, -100, 0, -1)
    valid = y != -100
    assert hardest.dtype == torch.int64 and (hardest[~valid] == -1).all()  # ignored rows: -1
    f, y, hardest = f[valid], y[valid], hardest[valid]
    d = 2.0 - 2.0 * ref.cosine_logits(f.double(), w.double())
    d_neg = d.scatter(1, y[:, None], math.inf)
    assert (hardest >= 0).all() and (hardest != y).all()
    chosen = d_neg.gather(1, hardest[:, None])[:, 0]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (chosen - d_neg.min(dim=1).values).abs().max().item() <= tol


# ---------------------------------------------------------------------------------------------
# opcheck: schemas, fake kernels and autograd registration on CUDA tensors
# ---------------------------------------------------------------------------------------------

def test_opcheck_cuda():
    f, w, y = make_inputs(9, 20, 16, torch.float32, near=1.5)
    s = torch.tensor(10.0, device="cuda")
    fr, wr = leaf(f), leaf(w)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    cases = [
        (ops.l2_normalize, (fr, 1e-12)),
        (ops.cosine_softmax_forward, (fr, wr, y, s, 1.0, 0.5, 0.0, 0.0, True, True, -100, 0, -1)),
        (ops.c_contrastive, (fr, wr, y, 0.0, 1.0, -100, 0, -1)),
        (ops.c_triplet_forward, (fr, wr, y, 0.8, True, False, -100, 0, -1)),
        (ops.c_triplet_forward, (fr, wr, y, 0.8, False, True, -100, 0, -1)),
        (ops.center_loss, (fr, wr, y, -100, 0, -1)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=utils)


# ---------------------------------------------------------------------------------------------
# Realistic sizes: a million classes (slow; the fp64 reference needs several GB)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", ["arcface", "cosface"])
def test_cosine_softmax_million_classes(dtype, margin):
    run_softmax_case(96, 1_000_003, 512, dtype, MARGINS[margin], NORMALIZE["both"], ignore=7,
                     scale=64.0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_cosine_softmax_realistic_batch(dtype):
    run_softmax_case(512, 100_000, 512, dtype, MARGINS["arcface"], NORMALIZE["both"], ignore=3)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("case", ["c_contrastive_wide", "c_triplet_hardest", "c_triplet_all",
                                  "center_loss"])
def test_agent_losses_million_classes(case, dtype):
    run_agent_case(case, 64, 1_000_003, 512, dtype, ignore=5)


# ---------------------------------------------------------------------------------------------
# The chunked path: chunk boundaries, ignored rows holding NaN, no host sync, float16 scaling
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [1, 7, 64])
def test_chunk_boundaries(dtype, classes):
    # C not a multiple of the chunk: the last chunk is partial; one class per chunk at worst.
    with chunk_budget(budget_for(classes, 37, 48, dtype, "cuda")):
        run_softmax_case(37, 203, 48, dtype, MARGINS["combined"], NORMALIZE["both"], ignore=4)
        for case in ("c_contrastive_wide", "c_triplet_all_center", "c_triplet_hardest"):
            run_agent_case(case, 37, 203, 48, dtype, ignore=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_class_in_tiny_chunks(dtype):
    with chunk_budget(1):
        run_softmax_case(5, 1, 16, dtype, MARGINS["arcface"], NORMALIZE["both"])
        run_agent_case("c_triplet_hardest_center", 5, 1, 16, dtype)
        run_softmax_case(5, 9, 16, dtype, MARGINS["sphereface"], NORMALIZE["neither"])


LOSSES = {
    "arcface": lambda f, w, y, s: nk.cosine_softmax(f, w, y, s, m2=0.5, reduction="sum",
                                                    backend="cuda"),
    "l_softmax": lambda f, w, y, s: nk.cosine_softmax(
        f, w, y, s, m1=2.0, normalize_features=False, normalize_weight=False, reduction="sum",
        backend="cuda"),
    **{case: (lambda name, kw: lambda f, w, y, s: getattr(nk, name)(
        f, w, y, reduction="sum", backend="cuda", **kw) * s)(*agent_fn(case))
       for case in AGENT_CASES},
}


@pytest.mark.parametrize("case", ["arcface", "c_contrastive", "c_triplet_hardest_center",
                                  "c_triplet_all", "center_loss"])
def test_training_step_makes_no_host_sync_with_data_checks_off(case):
    """Data checks off: forward + backward make no host-device synchronization (a CUDA graph can
    capture the step); torch's sync debug mode turns any sync into an error."""
    f, w, y = make_inputs(40, 300, 64, torch.bfloat16, ignore=3, near=1.5)
    fl, wl = leaf(f), leaf(w)
    s = leaf(torch.tensor(20.0, device="cuda"))
    torch.cuda.synchronize()
    previous = nk.set_data_checks(False)
    try:
        with chunk_budget(budget_for(64, 40, 64, torch.bfloat16, "cuda")):
            torch.cuda.set_sync_debug_mode("error")
            try:
                LOSSES[case](fl, wl, y, s).backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        nk.set_data_checks(previous)
    assert torch.isfinite(fl.grad.float()).all() and torch.isfinite(wl.grad.float()).all()
