"""Backends and peers, each as a Runner: a forward that returns a loss (with its autograd graph),
the leaves whose gradients the backward produces, and the gradient to start the backward from.

Names (the `backend` column):
    reference, cpu, triton, cuda   this package (reference = the eager PyTorch spec, builds B x C)
    cpu_chunked                    backend cpu on the chunked path (set_cpu_path("chunked")): the
                                   CUDA backend's orchestration with its CPU epilogues
    torch_compile                  torch.compile of the reference
    gemm_floor                     the three bare matmuls of the same shapes: f W^T (forward),
                                   G W and G^T f (backward); the floor any fused kernel chases
    torch_lce                      torch.nn.functional.linear_cross_entropy, chunked path
    liger_flce                     Liger-Kernel's fused linear cross-entropy
    cce                            Cut Cross-Entropy (apple/ml-cross-entropy)
    pml                            pytorch-metric-learning: NormalizedSoftmaxLoss / ArcFaceLoss /
                                   CosFaceLoss (own W parameter, builds B x C)
The linear-cross-entropy peers have no margins: they get features and weight pre-normalized, with
the scale folded into the features, so they compute NormFace with the same GEMM shapes; they are
run on the `normface` rows only.
"""

import dataclasses
import functools
import importlib.util
import math

import torch

from .. import backends, chunking, reference
from .. import functional as nf_functional
from .grid import OPS

# Our backends (the registry's order), each followed by its benchmark variants (cpu_chunked).
OURS = tuple(n for b in backends.REGISTRY.values() for n in (b.name, *b.variants))
PEERS = ("torch_compile", "gemm_floor", "torch_lce", "liger_flce", "cce", "pml")
ALL_BACKENDS = OURS + PEERS
KIND = {**{name: "ours" for name in OURS}, "gemm_floor": "floor",
        **{name: "peer" for name in PEERS if name != "gemm_floor"}}
LCE_PEERS = ("torch_lce", "liger_flce", "cce")
# What each peer computes where it differs from the row's op, for the notes column.
PEER_NOTES = {name: "NormFace on pre-normalized inputs, scale folded in (no margin)"
              for name in LCE_PEERS}


@dataclasses.dataclass
class Runner:
    name: str
    forward: callable                 # () -> Tensor with a graph (a loss, or the logits)
    leaves: list                      # tensors whose .grad the backward fills
    grad_output: torch.Tensor = None  # None: the forward returns a scalar loss
    note: str = ""
    setup_seconds: float = 0.0        # e.g. torch.compile's first call
    first_pass_s: float = None        # seconds of its first forward+backward (check.first_pass)

    def zero_grad(self):
        for leaf in self.leaves:
            leaf.grad = None

    def backward(self, out):
        out.backward(self.grad_output)


@dataclasses.dataclass
class CpuPathRunner(Runner):
    """A Runner whose forward and backward run under set_cpu_path(path)."""
    path: str = "chunked"

    def backward(self, out):
        with chunking.cpu_path(self.path):
            super().backward(out)


@dataclasses.dataclass
class Inputs:
    """The same inputs for every backend of a case (seeded: the memory worker rebuilds them)."""
    features: torch.Tensor   # (B, D) leaf
    weight: torch.Tensor     # (C, D) leaf
    labels: torch.Tensor     # (B,) int64

    @classmethod
    def make(cls, case, device, seed=0):
        # Drawn on the device itself (a GPU case can hold gigabytes), in float32, then cast.
        g = torch.Generator(device=device).manual_seed(seed)
        f = torch.randn(case.B, case.D, generator=g, device=device)
        w = torch.randn(case.C, case.D, generator=g, device=device)
        y = torch.randint(0, case.C, (case.B,), generator=g, device=device)
        dtype = case.torch_dtype
        return cls(f.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), y)

    def prenormalized(self, scale):
        """(s * f / ||f||, W / ||W||) as new leaves, for the linear-cross-entropy peers."""
        f = reference.l2_normalize(self.features.detach()) * scale
        w = reference.l2_normalize(self.weight.detach())
        return f.requires_grad_(), w.requires_grad_()


# ---------------------------------------------------------------------------------------------
# Availability: None when the backend can run on this device, else why not (shown as "skipped").
# ---------------------------------------------------------------------------------------------

def _installed(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def unavailable_reason(name, device_type):
    """Why `name` cannot run on `device_type` ("cpu" | "cuda"), or None when it can."""
    if name == "cpu_chunked":
        if device_type != "cpu":
            return "CPU tensors only (on CUDA the chunked path is backend cuda)"
        name = "cpu"
    if name in OURS:
        if name == "triton" and device_type == "cpu":
            return ("needs a CUDA device (TRITON_INTERPRET=1 runs it on CPU, but interpreted "
                    "kernels are not benchmarked)")
        try:
            backends.resolve(name, torch.device(device_type))
        except (RuntimeError, ValueError) as error:
            return str(error)
        return None
    if name == "torch_compile":
        return None
    if name == "gemm_floor":
        return None
    if name == "torch_lce":
        if not (hasattr(torch.nn.functional, "linear_cross_entropy")
                and hasattr(torch.nn, "LinearCrossEntropyOptions")):
            return f"not in this torch ({torch.__version__})"
        return None
    module = {"liger_flce": "liger_kernel", "cce": "cut_cross_entropy",
              "pml": "pytorch_metric_learning"}[name]
    if not _installed(module):
        return f"not installed (pip install {module.replace('_', '-')})"
    if name in ("liger_flce", "cce") and device_type != "cuda":
        return "needs a CUDA device (Triton kernels)"
    return None


def applies(name, op):
    """Whether backend `name` has a meaningful row for op `op` (e.g. no PML c_triplet)."""
    if name in LCE_PEERS:      # no margins: the NormFace rows only
        return op == "normface"
    if name == "pml":
        return op in ("normface", "arcface", "cosface")
    return True


# ---------------------------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------------------------

def _public(op, backend, inputs):
    spec = OPS[op]
    fn = getattr(nf_functional, spec.function)
    f, w, y = inputs.features, inputs.weight, inputs.labels
    return Runner(backend, lambda: fn(f, w, y, backend=backend, **spec.options), [f, w])


def _cpu_chunked(op, inputs):
    public = _public(op, "cpu", inputs)

    def forward():
        with chunking.cpu_path("chunked"):
            return public.forward()
    return CpuPathRunner("cpu_chunked", forward, public.leaves, path="chunked",
                         note="backend cpu on the chunked path (set_cpu_path('chunked'))")


def _reference_loss(function, options):
    """The reference's per-sample losses, mean-reduced: what torch.compile compiles."""
    ref = getattr(reference, function)

    def loss(f, w, y):
        return ref(f, w, y, **options).mean()
    return loss


@functools.lru_cache(maxsize=None)
def _compiled(op):
    spec = OPS[op]
    return torch.compile(_reference_loss(spec.function, spec.options))


def _torch_compile(op, inputs):
    compiled = _compiled(op)
    f, w, y = inputs.features, inputs.weight, inputs.labels
    return Runner("torch_compile", lambda: compiled(f, w, y), [f, w])


def _gemm_floor(op, inputs):
    f, w = inputs.features, inputs.weight
    # The forward's output is the (B, C) logits; its backward is exactly G W and G^T f.
    grad = torch.randn(f.shape[0], w.shape[0], device=f.device, dtype=f.dtype)
    return Runner("gemm_floor", lambda: f @ w.t(), [f, w], grad_output=grad,
                  note="3 bare matmuls: f W^T, G W, G^T f")


def _torch_lce(op, inputs):
    e, c = inputs.prenormalized(OPS[op].options["scale"])
    y = inputs.labels
    options = torch.nn.LinearCrossEntropyOptions()
    return Runner("torch_lce", lambda: torch.nn.functional.linear_cross_entropy(
        e, c, y, options=options), [e, c], note=PEER_NOTES["torch_lce"])


def _liger(op, inputs):
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    e, c = inputs.prenormalized(OPS[op].options["scale"])
    y = inputs.labels
    return Runner("liger_flce", lambda: LigerFusedLinearCrossEntropyFunction.apply(e, c, y)[0],
                  [e, c], note=PEER_NOTES["liger_flce"])


def _cce(op, inputs):
    from cut_cross_entropy import linear_cross_entropy
    e, c = inputs.prenormalized(OPS[op].options["scale"])
    y = inputs.labels
    return Runner("cce", lambda: linear_cross_entropy(e, c, y), [e, c], note=PEER_NOTES["cce"])


def _pml(op, inputs):
    from pytorch_metric_learning import losses
    options = OPS[op].options
    C, D = inputs.weight.shape
    scale = options["scale"]
    if op == "normface":
        module = losses.NormalizedSoftmaxLoss(C, D, temperature=1.0 / scale)
    elif op == "arcface":
        module = losses.ArcFaceLoss(C, D, margin=math.degrees(options["m2"]), scale=scale)
    else:
        module = losses.CosFaceLoss(C, D, margin=options["m3"], scale=scale)
    module = module.to(inputs.weight.device, inputs.weight.dtype)
    with torch.no_grad():
        module.W.copy_(inputs.weight.detach().t())   # PML keeps W as (D, C)
    f, y = inputs.features, inputs.labels
    return Runner("pml", lambda: module(f, y), [f, module.W],
                  note="pytorch_metric_learning.losses NormalizedSoftmaxLoss (normface), "
                       "ArcFaceLoss, CosFaceLoss (own W parameter, builds B x C)")


_FACTORIES = {"cpu_chunked": _cpu_chunked, "torch_compile": _torch_compile,
              "gemm_floor": _gemm_floor,
              "torch_lce": _torch_lce, "liger_flce": _liger, "cce": _cce, "pml": _pml}


def make_runner(name, op, inputs):
    if name in OURS and name not in _FACTORIES:
        return _public(op, name, inputs)
    return _FACTORIES[name](op, inputs)


# ---------------------------------------------------------------------------------------------
# The three passes, as (setup, timed) pairs: setup runs before each repetition, untimed.
# ---------------------------------------------------------------------------------------------

def pass_steps(runner, pass_name):
    """(setup, timed): `timed(setup())` is one repetition of the pass."""
    if pass_name == "fwd":
        def setup():
            runner.zero_grad()

        def timed(_):
            return runner.forward()
    elif pass_name == "bwd":
        def setup():
            runner.zero_grad()
            return runner.forward()

        def timed(out):
            runner.backward(out)
    elif pass_name == "fwd_bwd":
        def setup():
            runner.zero_grad()

        def timed(_):
            runner.backward(runner.forward())
    else:
        raise ValueError(f"pass must be one of fwd, bwd, fwd_bwd; got {pass_name!r}")
    return setup, timed


def estimated_bytes(name, case):
    """A rough upper estimate of a backend's extra memory, to skip what cannot fit."""
    elem = torch.empty((), dtype=case.torch_dtype).element_size()
    bc = case.B * case.C
    if name in ("reference", "torch_compile", "pml"):
        return 12 * bc * 4           # several float32 (B, C) matrices and their gradients
    if name == "gemm_floor":
        return 2 * bc * elem
    return 4 * (case.B + case.C) * case.D * 4

