"""The correctness check: before a case is timed, each backend's forward+backward is compared
with an eager reference result of the same inputs, so that a fast but wrong kernel cannot give a
trusted-looking number.

The expected result is the op's reference function (normface_kernels.reference, mean-reduced as
runners._reference_loss does) on the case's inputs upcast to float32 (float64 stays float64): the
loss, and the gradients w.r.t. features and weight. What a runner is compared on (`compares`):
    "grad"   its leaves are the case's features and weight (ours, reference, torch_compile):
             the loss and both gradients
    "loss"   its leaves are other tensors (the linear-cross-entropy peers' pre-normalized copies,
             pml's own W parameter): the loss only
    None     its output is not a loss (gemm_floor's logits): "n/a"
Errors: the loss's relative error |l - l_ref| / |l_ref|; each gradient's normwise relative error
||g - g_ref|| / ||g_ref||, computed in float32 (float64), and grad_w's also over the classes that
are no sample's label (grad_w_neg: at large C the target rows dominate grad_w's norm).
Tolerances depend on the precision of the products only: the case's dtype (TOLERANCES), or TF32
for float32 where torch allows it.
"""

import dataclasses
import math
import time

import torch

from .. import checks, reference
from .grid import OPS

NOT_APPLICABLE = "n/a"     # the `check` of a runner whose output is not a loss
MISMATCH = "MISMATCH"      # how a `check` beyond the tolerance begins

# Bytes per (row, class) entry that the reference holds during its forward+backward: the
# estimate runners.estimated_bytes uses for it (several float32 (B, C) matrices and gradients).
REFERENCE_BYTES_PER_ENTRY = 12 * 4


@dataclasses.dataclass(frozen=True)
class Tolerance:
    loss: float   # relative error of the loss
    grad: float   # normwise relative error of each gradient


# A correct backend passes these with a margin of ten or more (measured on CPU, the Triton kernels
# interpreted, at up to B=4096, C=16k; the GPU's GEMMs estimated); a wrong gradient (doubled,
# zeroed, a chunk of classes left out) has a normwise error of 0.1 to 1 and fails every one.
#   float64: the CPU backends agree with the float64 reference to ~3e-15.
#   float32: ours compute in float32 like the reference: ~5e-7 (Triton's tl.dot runs TF32x3 on
#     GPUs, about float32). The linear-cross-entropy peers' Triton GEMMs (liger_flce, cce) run
#     plain TF32 whatever torch's flags say: ~1e-5 on the loss, their only comparison. A gradient
#     moves by ~1/sqrt(B) (0.03 at B=1024) when a sample's hardest negative in c_triplet flips
#     on a near-tie between two summation orders; float32 against float64 showed none at B=4096,
#     so the grad tolerance sits well above the rounding, not above one flip at small B.
#   bfloat16 / float16: ours compute in float32 from the same 16-bit inputs but round their
#     gradients (and the backward GEMMs' softmax gradient) to 16 bits: 2e-3 normwise (float16
#     3e-4), the loss ~3e-7; pml 2e-4 on the loss, a float32 cross-entropy of bfloat16 logits
#     5e-5. (torch_lce's bfloat16 loss is 2% to 10% off at C = 16k to 64k on CPU: a MISMATCH,
#     rightly.) Plain bfloat16 PyTorch, which rounds the logits too, is at 6e-3 to 3e-2 on the
#     gradients.
TOLERANCES = {
    torch.float64: Tolerance(loss=1e-9, grad=1e-9),
    torch.float32: Tolerance(loss=1e-3, grad=2e-2),
    torch.bfloat16: Tolerance(loss=1e-2, grad=5e-2),
    torch.float16: Tolerance(loss=1e-2, grad=5e-2),
}
# float32 on CUDA while torch lets cuBLAS multiply float32 in TF32 (allow_tf32, fp32_precision
# "tf32", float32_matmul_precision "high"): the CUDA backend, torch_compile and the reference
# (the expected result included) then round every product's inputs to 10 bits. ~4e-4 on the
# softmax gradients, but c_triplet's hardest negative flips for ~1e-3 of the samples: 0.02 to
# 0.05 normwise at B=512 to 4096 (measured with TF32-rounded inputs on CPU), hence 0.1.
TF32 = Tolerance(loss=1e-2, grad=1e-1)


def tf32_matmul():
    """Whether float32 matrix products on CUDA may run in TF32. Read through torch's
    fp32_precision (torch >= 2.9), which reflects the legacy allow_tf32 and
    set_float32_matmul_precision too; reading those instead raises once the new API was used."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:     # torch < 2.9: the legacy flag is the only one
        return bool(matmul.allow_tf32)
    if precision == "none":   # inherits the global setting
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"


def tolerance(dtype, device_type):
    if dtype == torch.float32 and device_type == "cuda" and tf32_matmul():
        return TF32
    return TOLERANCES[dtype]


@dataclasses.dataclass
class Expected:
    """The reference result of one case: the mean loss and its gradients (in acc dtype)."""
    loss: float
    grad_features: torch.Tensor
    grad_weight: torch.Tensor
    tolerance: Tolerance


def rows_per_chunk(B, C, budget_bytes):
    """How many samples the reference takes at once within `budget_bytes`: every loss is a mean
    of per-sample losses that depend on their own row only, so the rows can go in chunks (a GPU
    case at B=4096, C=1M would otherwise hold ~200 GB of (B, C) matrices)."""
    return max(1, int(min(B, budget_bytes / (REFERENCE_BYTES_PER_ENTRY * max(C, 1)))))


def expected(op, inputs, budget_bytes=math.inf):
    """The reference result for `inputs` (runners.Inputs) of op `op`."""
    spec = OPS[op]
    per_sample = getattr(reference, spec.function)
    acc = checks.acc_dtype(inputs.features.dtype)
    f = inputs.features.detach().to(acc)
    w = inputs.weight.detach().to(acc).requires_grad_()
    y = inputs.labels
    B = f.shape[0]
    rows = rows_per_chunk(B, w.shape[0], budget_bytes)
    grad_f = torch.empty_like(f)
    loss = torch.zeros((), dtype=acc, device=f.device)
    for start in range(0, B, rows):
        part = f[start:start + rows].detach().requires_grad_()
        # sum / B over the chunks is the mean (the benchmark's labels are never ignore_index)
        chunk_loss = per_sample(part, w, y[start:start + rows], **spec.options).sum() / B
        chunk_loss.backward()
        grad_f[start:start + rows] = part.grad
        loss += chunk_loss.detach()
    return Expected(loss.item(), grad_f, w.grad,
                    tolerance(inputs.features.dtype, inputs.features.device.type))


def compares(runner, inputs):
    """"grad", "loss" or None: what of `runner`'s result can be set against the reference."""
    if runner.grad_output is not None:
        return None
    leaves = runner.leaves
    if len(leaves) == 2 and leaves[0] is inputs.features and leaves[1] is inputs.weight:
        return "grad"
    return "loss"


def first_pass(runner):
    """One forward+backward from zeroed gradients, timed into runner.first_pass_s (the CPU
    timing's warm-up of the full pass). Returns the loss as a float; the gradients stay in the
    leaves until the caller zeroes them."""
    runner.zero_grad()
    t0 = time.perf_counter()
    out = runner.forward()
    runner.backward(out)
    runner.first_pass_s = time.perf_counter() - t0
    return out.detach().double().item()


def _relative(error, scale):
    """error / scale, or the error itself where the expected value is 0."""
    return error / scale if scale else error


def relative_error(got, want):
    return _relative(abs(got - want), abs(want))


def normwise_error(got, want):
    """||got - want|| / ||want|| in want's dtype; a missing gradient counts as zeros."""
    scale = torch.linalg.vector_norm(want).item()
    if got is None:
        return 1.0 if scale else 0.0
    diff = got.detach().to(want.dtype, copy=True).sub_(want)   # one temporary, not two
    return _relative(torch.linalg.vector_norm(diff).item(), scale)


def weight_errors(got, want, labels):
    """grad_w's normwise error over all classes, and over the classes that are no sample's label
    ("grad_w_neg", when there are any): at large C the B target rows carry most of grad_w's
    norm (the softmax spreads the rest as ~1/sqrt(C) of it), so a kernel that dropped every
    negative class would pass the first alone (0.002 at C = 1M)."""
    if got is None:
        return {"grad_w": 1.0, "grad_w_neg": 1.0}
    diff = got.detach().to(want.dtype, copy=True).sub_(want)
    diff_sq, want_sq = diff.square_().sum(1), want.square().sum(1)   # per class
    negative = torch.ones(want.shape[0], dtype=torch.bool, device=want.device)
    negative[labels] = False

    def ratio(d, w):
        return _relative(math.sqrt(d.sum().item()), math.sqrt(w.sum().item()))
    out = {"grad_w": ratio(diff_sq, want_sq)}
    if negative.any():
        out["grad_w_neg"] = ratio(diff_sq[negative], want_sq[negative])
    return out


def errors(runner, inputs, loss, want):
    """{quantity: error} for a runner after first_pass returned `loss`."""
    out = {"loss": relative_error(loss, want.loss)}
    if compares(runner, inputs) == "grad":
        out["grad_f"] = normwise_error(inputs.features.grad, want.grad_features)
        out.update(weight_errors(inputs.weight.grad, want.grad_weight, inputs.labels))
    return out


def verdict(errs, tolerance):
    """The `check` text: "ok loss 3e-05 grad 2e-03", "ok loss 1e-04 (loss only)" or
    "MISMATCH grad_w 1" (each quantity beyond its tolerance; NaN is beyond every tolerance)."""
    bad = [name for name, err in errs.items()
           if not err <= (tolerance.loss if name == "loss" else tolerance.grad)]
    if bad:
        return MISMATCH + " " + " ".join(f"{name} {errs[name]:.2g}" for name in bad)
    if "grad_w" not in errs:
        return f"ok loss {_short(errs['loss'])} (loss only)"
    grad = max(err for name, err in errs.items() if name.startswith("grad"))
    return f"ok loss {_short(errs['loss'])} grad {_short(grad)}"


def _short(x):
    return f"{x:.0e}" if x else "0"


def check_runner(runner, inputs, want):
    """Run `runner` once and compare it with `want` (an Expected); the `check` text. The
    gradients are zeroed again afterwards (a GPU case's are gigabytes)."""
    if compares(runner, inputs) is None:
        return NOT_APPLICABLE
    try:
        loss = first_pass(runner)
        return verdict(errors(runner, inputs, loss, want), want.tolerance)
    finally:
        runner.zero_grad()

