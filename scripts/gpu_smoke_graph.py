"""contract: with the data checks off, a CUDA training step (forward + backward + optimizer step)
makes no host-device synchronization, so it can be captured in a CUDA graph. For each GPU
backend and a few loss settings:
  1. a step under torch.cuda.set_sync_debug_mode("error") (any synchronization raises);
  2. the step captured in a CUDA graph and replayed on new data, against the same model trained
     eagerly on the same data: same losses and parameters.

    python3 scripts/gpu_smoke_graph.py [--backends cuda,triton]

Prints `KEY ...` lines for the GPU check's summary; exit 1 on any failure.
"""

import argparse
import sys
import traceback

import torch
from torch import nn

import normface_kernels as nk

B, IN, D, C = 256, 64, 128, 20_000
STEPS = 3
SETTINGS = {"softmax (learned scale)": dict(),
            "arcface": dict(margins=(1.0, 0.5, 0.0), scale=30.0),
            "softmax+c_contrastive": dict(aux="c_contrastive")}


def make(backend, kw, device):
    torch.manual_seed(0)
    backbone = nn.Linear(IN, D).to(device)
    head = nk.NormFaceLoss(D, C, backend=backend, device=device, **kw)
    params = list(backbone.parameters()) + list(head.parameters())
    return backbone, head, torch.optim.SGD(params, lr=0.05)


def batches(device, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, IN, generator=g).to(device),
             torch.randint(0, C, (B,), generator=g).to(device)) for _ in range(n)]


def train_step(model, x, y):
    backbone, head, opt = model
    opt.zero_grad(set_to_none=True)
    loss = head(backbone(x), y)
    loss.backward()
    opt.step()
    return loss


def sync_free_step(backend, kw, device):
    model = make(backend, kw, device)
    data = batches(device, 3)
    for x, y in data[:2]:  # warm-up: kernels compiled, allocator and cuBLAS ready
        train_step(model, x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(model, *data[2])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def graph_replay(backend, kw, device):
    """Max relative difference between graph replays and eager steps on the same data."""
    graphed, eager = make(backend, kw, device), make(backend, kw, device)
    warm = batches(device, 3, seed=2)
    static_x, static_y = (t.clone() for t in warm[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in warm:
            static_x.copy_(x)
            static_y.copy_(y)
            train_step(graphed, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in warm:
        train_step(eager, x, y)
    graph = torch.cuda.CUDAGraph()
    backbone, head, opt = graphed
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = head(backbone(static_x), static_y)
        static_loss.backward()
        opt.step()
    worst = 0.0
    for x, y in batches(device, STEPS, seed=3):
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        loss = train_step(eager, x, y)
        worst = max(worst, _rel(static_loss, loss))
    for a, b in zip(_params(graphed), _params(eager)):
        worst = max(worst, _rel(a, b))
    return worst


def _params(model):
    backbone, head, _ = model
    return list(backbone.parameters()) + list(head.parameters())


def _rel(a, b):
    return ((a.detach() - b.detach()).abs().max() / (b.detach().abs().max() + 1e-6)).item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="cuda,triton")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke_graph: needs a CUDA GPU")
        return 2
    device = torch.device("cuda", 0)
    nk.set_data_checks(False)
    failures, count = [], 0
    for backend in args.backends.split(","):
        for name, kw in SETTINGS.items():
            count += 1
            try:
                sync_free_step(backend, kw, device)
            except Exception as error:  # noqa: BLE001 - reported, then fails
                failures.append(f"{backend} {name}: synchronization in a training step: "
                                f"{type(error).__name__}: {str(error)[:300]}")
                traceback.print_exc()
            try:
                diff = graph_replay(backend, kw, device)
                print(f"{backend} {name}: graph replay vs eager, max relative difference "
                      f"{diff:.2e}")
                if not diff <= args.tolerance:
                    failures.append(f"{backend} {name}: graph replay differs from eager by "
                                    f"{diff:.2e}")
            except Exception as error:  # noqa: BLE001
                failures.append(f"{backend} {name}: CUDA graph capture/replay: "
                                f"{type(error).__name__}: {str(error)[:300]}")
                traceback.print_exc()
    for failure in failures:
        print("FAILURE", failure)
    print(f"KEY sync-free step + CUDA graph: {count} settings ({args.backends}; "
          f"{', '.join(SETTINGS)}), {len(failures)} failures")
    for failure in failures[:4]:
        print(f"KEY   {failure[:160]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
