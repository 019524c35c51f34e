"""Step 1 of the AOT check: run the public API on fake CUDA tensors and record every launch that
the launchers make through tiles.launch (kernel, arguments, constexprs, num_warps, num_stages)."""

import contextlib
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch

B, C = 1024, 1_000_000
DIMS = (128, 512)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Target:
    """A GPU to compile for: compute capability, SM count (for the launchers' grid splits) and
    the largest shared memory one block may use (the opt-in limit)."""
    name: str
    capability: int
    sm_count: int
    max_shared: int
    device_name: str


TARGETS = {
    "sm90": Target("sm90", 90, 132, 227 * 1024, "NVIDIA H200 (AOT target sm_90)"),
    "sm80": Target("sm80", 80, 108, 163 * 1024, "NVIDIA A100 (AOT target sm_80)"),
}


# ---------------------------------------------------------------------------------------------
# 1. Record the launches
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorArg:
    """What the Triton binder reads from a tensor argument: its dtype and data_ptr (for the
    16-byte alignment specialization; allocations are 256-byte aligned, so only the storage
    offset matters)."""
    dtype: torch.dtype
    offset_bytes: int

    def data_ptr(self):
        return self.offset_bytes


def _tensor_arg(t):
    return TensorArg(t.dtype, t.storage_offset() * t.element_size())


def _freeze(arg):
    """A hashable, picklable stand-in for a launch argument (tensors keep dtype + alignment)."""
    if isinstance(arg, torch.Tensor):
        return _tensor_arg(arg)
    if isinstance(arg, (list, tuple)):
        return type(arg)(_freeze(a) for a in arg)
    return arg


def _unwrap(kernel):
    """torch.library.wrap_triton's wrapper -> the Triton kernel (JITFunction, Heuristics or
    Autotuner)."""
    return getattr(kernel, "kernel", kernel)


@dataclass
class Launch:
    kernel: object           # triton JITFunction / Heuristics / Autotuner
    args: tuple
    kwargs: dict
    scenario: str


class Recorder:
    """Replaces tiles.launch for the duration of a `with`: launches are recorded, not run."""

    def __init__(self):
        self.launches = []
        self.scenario = ""
        self._patched = []

    def __call__(self, kernel, grid, *args, **kwargs):
        self.launches.append(Launch(_unwrap(kernel), tuple(_freeze(a) for a in args),
                                    {k: _freeze(v) for k, v in kwargs.items()}, self.scenario))

    def __enter__(self):
        from .. import tiles
        original = tiles.launch
        for name, module in list(sys.modules.items()):
            if (name.startswith("normface_kernels") and module is not None
                    and getattr(module, "launch", None) is original):
                self._patched.append((module, original))
                module.launch = self
        return self

    def __exit__(self, *exc):
        for module, original in self._patched:
            module.launch = original
        self._patched.clear()


def _from_our_code(depth=2):
    caller = sys._getframe(depth).f_globals.get("__name__", "")
    return caller.startswith("normface_kernels") and ".aot_check" not in caller


@contextlib.contextmanager
def as_target_gpu(target):
    """Our launchers' queries of the GPU answer as `target` does; torch's own calls are left
    alone (torch must keep seeing no GPU, or fake CUDA tensors would try to reach a driver)."""
    props = SimpleNamespace(multi_processor_count=target.sm_count, name=target.device_name,
                            major=target.capability // 10, minor=target.capability % 10,
                            shared_memory_per_block_optin=target.max_shared,
                            total_memory=141 * 2 ** 30, L2_cache_size=60 * 2 ** 20)
    cuda = torch.cuda
    originals = {name: getattr(cuda, name) for name in (
        "is_available", "device_count", "current_device", "get_device_properties",
        "get_device_capability", "get_device_name")}
    fakes = {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "get_device_properties": lambda *a, **k: props,
        "get_device_capability": lambda *a, **k: (props.major, props.minor),
        "get_device_name": lambda *a, **k: props.name,
    }

    def routed(name):
        def query(*args, **kwargs):
            if _from_our_code():
                return fakes[name](*args, **kwargs)
            return originals[name](*args, **kwargs)
        return query

    for name in originals:
        setattr(cuda, name, routed(name))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(cuda, name, fn)


def _clear_caches():
    """functools caches of our modules may hold answers about the GPU (the SM count)."""
    for name, module in list(sys.modules.items()):
        if name.startswith("normface_kernels") and module is not None:
            for value in vars(module).values():
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()


def scenarios(nk):
    """(name, fn(features, weight, labels) -> a tensor to differentiate): every public loss and
    op, with the switches that can change a kernel's constexprs."""
    softmax = {
        "normface": dict(scale=30.0),
        "normface_learned_scale": dict(scale="learned"),
        "cosface": dict(scale=30.0, m3=0.35),
        "arcface": dict(scale=64.0, m2=0.5),
        "sphereface": dict(scale=20.0, m1=4.0, lam=5.0),
        "a_softmax_weight_only": dict(scale=1.0, m1=4.0, normalize_features=False),
        "l2_softmax_features_only": dict(scale=16.0, normalize_weight=False),
        "l_softmax_unnormalized": dict(scale=1.0, m1=2.0, normalize_features=False,
                                       normalize_weight=False),
        "combined_margins": dict(scale=24.0, m1=1.5, m2=0.2, m3=0.1),
    }
    out = []
    for name, kw in softmax.items():
        def run(f, w, y, kw=kw):
            kw = dict(kw)
            if kw["scale"] == "learned":
                kw["scale"] = torch.full((), 10.0, device=f.device, requires_grad=True)
            return nk.cosine_softmax(f, w, y, backend="triton", reduction="sum", **kw)
        out.append((f"cosine_softmax/{name}", run))
    out += [
        ("c_contrastive", lambda f, w, y: nk.c_contrastive(f, w, y, backend="triton",
                                                            reduction="sum")),
        ("center_loss", lambda f, w, y: nk.center_loss(f, w, y, backend="triton",
                                                        reduction="sum")),
        ("l2_normalize", lambda f, w, y: nk.l2_normalize(f).sum()),
    ]
    for hardest in (True, False):
        for center in (False, True):
            out.append((f"c_triplet/hardest={hardest},center={center}",
                        lambda f, w, y, h=hardest, c=center: nk.c_triplet(
                            f, w, y, hardest_only=h, center=c, backend="triton",
                            reduction="sum")))
    out.append(("cosine_logits", lambda f, w, y: nk.cosine_logits(
        f, w, 30.0, backend="triton").sum()))
    return out


def backward(loss):
    """loss.backward() without torch's autograd engine, which needs a CUDA driver for CUDA
    tensors (even fake ones): the graph's nodes are called in dependency order, each with the
    sum of the gradients that reached it. Returns [(leaf, gradient)]; leaves are not written."""
    root = loss.grad_fn
    pending, seen, stack = {}, {root}, [root]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is not None:
                pending[child] = pending.get(child, 0) + 1
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
    inputs = {root: [torch.ones_like(loss)]}
    ready, leaves = [root], []
    while ready:
        node = ready.pop()
        grads = inputs.pop(node)
        if type(node).__name__ == "AccumulateGrad":
            leaves.append((node.variable, grads[0]))
            continue
        # C++ nodes are callable; a Python autograd.Function's node runs through apply().
        outs = node(*grads) if callable(node) else node.apply(*grads)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for (child, index), grad in zip(node.next_functions, outs):
            if child is None:
                continue
            slot = inputs.setdefault(child, [None] * len(child._input_metadata))
            if grad is not None:
                slot[index] = grad if slot[index] is None else slot[index] + grad
            pending[child] -= 1
            if pending[child] == 0:
                ready.append(child)
    return leaves


def record(target, dims=DIMS, dtypes=DTYPES, batch=B, classes=C):
    """Runs every scenario on fake CUDA tensors; returns (launches, failures)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import normface_kernels as nk

    nk.backends.load_triton()  # raises why not
    failures = []
    previous_checks = nk.set_data_checks(False)
    _clear_caches()
    try:
        with as_target_gpu(target), Recorder() as recorder, \
                FakeTensorMode(allow_non_fake_inputs=True):
            for dtype in dtypes:
                for dim in dims:
                    f = torch.empty((batch, dim), dtype=dtype, device="cuda", requires_grad=True)
                    w = torch.empty((classes, dim), dtype=dtype, device="cuda",
                                    requires_grad=True)
                    y = torch.zeros((batch,), dtype=torch.int64, device="cuda")
                    for name, fn in scenarios(nk):
                        tag = f"{name} {str(dtype).replace('torch.', '')} D={dim}"
                        recorder.scenario = tag
                        try:
                            backward(fn(f, w, y))
                        except Exception as error:  # noqa: BLE001 - reported, then fails
                            failures.append((tag, f"{type(error).__name__}: {error}"))
    finally:
        nk.set_data_checks(previous_checks)
        _clear_caches()
    return recorder.launches, failures
