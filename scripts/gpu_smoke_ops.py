"""A small, fast set of op calls -- every public op, forward and backward, at sizes that are not
multiples of any tile, with ignored rows -- for compute-sanitizer (memcheck, racecheck) in the
GPU check. Each result is compared with the float64 reference (loss and gradients), so a kernel
that reads or writes out of bounds, races, or computes garbage fails here.

    compute-sanitizer --tool memcheck python3 scripts/gpu_smoke_ops.py --device cuda --backends cuda
    python scripts/gpu_smoke_ops.py --device cpu --backends cpu          # the same calls on CPU

Prints `KEY ...` lines for the GPU check's summary; exit 1 on any mismatch.
"""

import argparse
import sys

import torch

import normface_kernels as nk
from normface_kernels import reference

B, C, D = 37, 1000, 72   # no tile divides them
IGNORED = (3, 20)

SOFTMAX = {
    "normface": dict(scale=16.0),
    "arcface": dict(scale=30.0, m2=0.5),
    "sphereface": dict(scale=20.0, m1=4.0, lam=5.0),
    "l_softmax_unnormalized": dict(scale=1.0, m1=2.0, normalize_features=False,
                                   normalize_weight=False),
}


def calls():
    """(name, fn(module, f, w, y) -> per-sample loss or a tensor), the module being the package
    with a fixed backend (_Backend) or `reference` (per-sample losses, no reduction argument)."""
    out = [(f"cosine_softmax/{name}", lambda m, f, w, y, kw=kw: m.cosine_softmax(f, w, y, **kw))
           for name, kw in SOFTMAX.items()]
    out += [
        ("c_contrastive", lambda m, f, w, y: m.c_contrastive(f, w, y)),
        ("c_triplet/hardest", lambda m, f, w, y: m.c_triplet(f, w, y)),
        ("c_triplet/all", lambda m, f, w, y: m.c_triplet(f, w, y, hardest_only=False,
                                                          center=True)),
        ("center_loss", lambda m, f, w, y: m.center_loss(f, w, y)),
        ("l2_normalize", lambda m, f, w, y: m.l2_normalize(f)),
        ("cosine_logits", lambda m, f, w, y: m.cosine_logits(f, w[:64], 8.0)),
    ]
    return out


def check(name, backend, dtype, device):
    g = torch.Generator().manual_seed(0)
    f64 = torch.randn(B, D, generator=g, dtype=torch.float64)
    w64 = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    y[list(IGNORED)] = -100
    fn = dict(calls())[name]
    f = f64.to(device=device, dtype=dtype).requires_grad_()
    w = w64.to(device=device, dtype=dtype).requires_grad_()
    out = fn(_Backend(backend), f, w, y.to(device))
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out.double() * weights.to(device)).sum().backward()
    fr, wr = f.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    ref = fn(reference, fr, wr, y)
    (ref * weights).sum().backward()
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    errors = []
    for what, got, want in (("value", out.detach(), ref.detach()), ("grad features", f.grad,
                            fr.grad), ("grad weight", w.grad, wr.grad)):
        if got is None or want is None:
            if (got is None) != (want is None):
                errors.append(f"{what}: {'missing' if got is None else 'unexpected'}")
            continue
        got = got.double().cpu()
        scale = want.abs().max().item() + 1e-6
        err = (got - want).abs().max().item() / scale
        if not err <= tol:  # NaN fails too
            errors.append(f"{what}: relative error {err:.3g} > {tol}")
    return errors


class _Backend:
    """nk's public functions with backend= fixed, the losses per sample (reduction="none")."""

    LOSSES = ("cosine_softmax", "c_contrastive", "c_triplet", "center_loss")

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        fn = getattr(nk, name)
        extra = dict(reduction="none") if name in self.LOSSES else {}
        return lambda *a, **k: fn(*a, backend=self.backend, **extra, **k)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default="cuda")
    parser.add_argument("--quick", action="store_true", help="bfloat16 only (racecheck is slow)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtypes = [torch.bfloat16] if args.quick else [torch.float32, torch.bfloat16]
    failures, count = [], 0
    for backend in args.backends.split(","):
        for dtype in dtypes:
            for name, _ in calls():
                errors = check(name, backend, dtype, device)
                count += 1
                for error in errors:
                    failures.append(f"{backend} {str(dtype)[6:]} {name}: {error}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    for failure in failures:
        print("MISMATCH", failure)
    print(f"KEY {count} op calls (fwd+bwd, B={B} C={C} D={D}, backends {args.backends}): "
          f"{len(failures)} mismatches")
    for failure in failures[:4]:
        print(f"KEY   {failure[:160]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
