"""One training step of ShardedNormFaceLoss on a 1-rank NCCL process group, against the
single-process NormFaceLoss with the same weight: same loss, same gradients (features, weight,
learned scale), for each GPU backend. With one rank the module runs no collectives, so the
collectives it uses (all-gather, reduce-scatter, all-reduce) are also run here directly on the
group: one GPU cannot hold two NCCL ranks.

    python3 scripts/gpu_smoke_nccl.py --device cuda                # NCCL, backends cuda,triton
    python scripts/gpu_smoke_nccl.py --device cpu --backends cpu  # the same with gloo on CPU

Prints `KEY ...` lines for the GPU check's summary; exit 1 on any mismatch.
"""

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist

import normface_kernels as nk
from normface_kernels.distributed import ShardedNormFaceLoss

B, C, D = 64, 5000, 128
SETTINGS = {"softmax": dict(), "arcface": dict(margins=(1.0, 0.5, 0.0), scale=30.0),
            "softmax+c_contrastive": dict(aux="c_contrastive")}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step(module, features, labels):
    f = features.clone().requires_grad_()
    loss = module(f, labels)
    loss.backward()
    grads = [f.grad, module.weight.grad]
    if isinstance(module.scale, torch.nn.Parameter):
        grads.append(module.scale.grad)
    return loss.detach(), grads


def compare(backend, name, kw, device):
    torch.manual_seed(0)
    single = nk.NormFaceLoss(D, C, backend=backend, device=device, **kw)
    sharded = ShardedNormFaceLoss(D, C, backend=backend, device=device, **kw)
    sharded.load_full_weight(single.weight.detach())
    features = torch.randn(B, D, device=device)
    labels = torch.randint(0, C, (B,), device=device)
    labels[5] = -100
    want, want_grads = step(single, features, labels)
    got, got_grads = step(sharded, features, labels)
    errors = []
    for what, a, b in [("loss", got, want)] + list(zip(("grad features", "grad weight",
                                                         "grad scale"), got_grads, want_grads)):
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            errors.append(f"{what}: max |diff| {(a - b).abs().max().item():.3g}")
    return errors


def collectives(device):
    """The flat collectives ShardedNormFaceLoss uses, on this group (world size 1)."""
    # torch >= 2.14 names them *_single (as normface_kernels.distributed does).
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    x = torch.arange(12.0, device=device).view(3, 4)
    results = []
    gathered = torch.empty_like(x)
    all_gather(gathered, x)
    results.append(("all_gather", gathered))
    if device.type == "cuda":  # older gloo has no reduce-scatter (the module falls back)
        scattered = torch.empty_like(x)
        reduce_scatter(scattered, x)
        results.append(("reduce_scatter", scattered))
    summed = x.clone()
    dist.all_reduce(summed)
    results.append(("all_reduce", summed))
    return [name for name, t in results if not torch.equal(t, x)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default="cuda,triton")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    pg = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(pg, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    failures, count = [], 0
    try:
        failures += [f"collective {name} gave a wrong result" for name in collectives(device)]
        for backend in args.backends.split(","):
            for name, kw in SETTINGS.items():
                count += 1
                try:
                    errors = compare(backend, name, kw, device)
                except Exception as error:  # noqa: BLE001 - reported, then fails
                    errors = [f"{type(error).__name__}: {error}"]
                failures += [f"{backend} {name}: {e}" for e in errors]
        if device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
    for failure in failures:
        print("MISMATCH", failure)
    print(f"KEY {pg} 1-rank: collectives + ShardedNormFaceLoss vs NormFaceLoss, {count} steps "
          f"({args.backends}; {', '.join(SETTINGS)}), {len(failures)} mismatches")
    for failure in failures[:4]:
        print(f"KEY   {failure[:160]}")
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    sys.exit(main())
