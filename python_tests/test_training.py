"""Training out of the box: every configuration of the README trains on a learnable 2,000-class
toy (Gaussian clusters through a linear embedding, plain SGD), and a learned scale stays sane.

A learned scale that dies (the paper's layer with any margin: s falls to its 0.01 floor and the
loss stays at ln C = 7.6) fails these tests; test_paper_layer_with_a_margin_stalls keeps that
failure in view. `python python_tests/test_training.py` prints the table of the README.
"""

import math

import pytest
import torch

import normface_kernels as nk
from normface_kernels.distributed import ShardedNormFaceLoss

C, INPUT, D, PER_CLASS, NOISE = 2000, 32, 32, 4, 0.3
STEPS, BATCH = 300, 256
LN_C = math.log(C)
SCALE_MAX = 100.0  # sane: well above what any setting here needs (ArcFace's fixed 64)


# name -> (module keywords, SGD learning rate, anneal lam). The README's configurations first,
# then the rows of the contract's table that NormFaceLoss can express. The hinge losses: no scale
# in front of their gradient, so they get a larger step. Integer m1 on unnormalized features
# (A-Softmax, L-Softmax) trains only with SphereFace's lam annealing, as in its paper.
CONFIGS = {
    "normface": (dict(), 0.5, False),
    "normface + 0.01 c_contrastive": (dict(aux="c_contrastive", aux_weight=0.01), 0.5, False),
    "cosface": (dict(margins=(1.0, 0.0, 0.35)), 0.5, False),
    "cosface + 0.01 c_contrastive": (dict(margins=(1.0, 0.0, 0.35), aux="c_contrastive",
                                          aux_weight=0.01), 0.5, False),
    "arcface": (dict(margins=(1.0, 0.5, 0.0)), 0.5, False),
    "arcface, sharded, sample_rate 0.2": (dict(margins=(1.0, 0.5, 0.0), sample_rate=0.2),
                                          0.5, False),
    "sphereface (normalized, m1=4)": (dict(margins=(4.0, 0.0, 0.0)), 0.5, False),
    "c_contrastive": (dict(loss="c_contrastive"), 2.0, False),
    "c_triplet + center": (dict(loss="c_triplet", center=True), 2.0, False),
    "a-softmax (weight only normalized, m1=4)": (
        dict(margins=(4.0, 0.0, 0.0), normalize_features=False), 0.5, True),
    "l-softmax (neither normalized, m1=4, s=1)": (
        dict(margins=(4.0, 0.0, 0.0), normalize_features=False, normalize_weight=False,
             scale=1.0), 0.5, True),
    "plain softmax (neither normalized, s=1)": (
        dict(normalize_features=False, normalize_weight=False, scale=1.0), 0.5, False),
    "l2-softmax (features only normalized)": (dict(normalize_weight=False), 0.5, False),
}
SOFTMAX = [name for name, (kw, _, _) in CONFIGS.items() if kw.get("loss", "softmax") == "softmax"]


def toy_data(seed=0):
    """(inputs (C * PER_CLASS, INPUT), labels): one Gaussian cluster per class."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(C, INPUT, generator=g)
    labels = torch.arange(C).repeat_interleave(PER_CLASS)
    return prototypes[labels] + NOISE * torch.randn(labels.numel(), INPUT, generator=g), labels


def train_toy(kwargs, lr, anneal, *, data=None, steps=STEPS, seed=0):
    """SGD on a linear embedding and the loss module; returns (first loss, mean of the last 10
    losses, final effective scale, the module)."""
    inputs, labels = toy_data(seed) if data is None else data
    kwargs = dict(kwargs)
    sharded = "sample_rate" in kwargs
    torch.manual_seed(seed)
    embedding = torch.nn.Linear(INPUT, D, bias=False)
    criterion = (ShardedNormFaceLoss if sharded else nk.NormFaceLoss)(D, C, backend="cpu",
                                                                       **kwargs)
    optimizer = torch.optim.SGD([*embedding.parameters(), *criterion.parameters()], lr=lr)
    order = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        if anneal:
            criterion.lam = nk.sphereface_lambda(step)
        batch = torch.randint(0, labels.numel(), (BATCH,), generator=order)
        loss = criterion(embedding(inputs[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses[0], sum(losses[-10:]) / 10, float(criterion.effective_scale.detach()), criterion


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small matrices: a second thread only adds scheduling, and on a loaded machine a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return toy_data()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_configuration_trains(name, data):
    kwargs, lr, anneal = CONFIGS[name]
    first, last, scale, criterion = train_toy(kwargs, lr, anneal, data=data)
    assert last < 0.5 * first, f"{name}: loss {first:.3f} -> {last:.3f}"
    if name in SOFTMAX:
        # A dead scale leaves the loss at ln C; a trained one is far below it.
        assert last < LN_C - 1.0, f"{name}: loss {last:.3f}, ln C = {LN_C:.3f}"
    if isinstance(criterion.scale, torch.nn.Parameter):
        assert math.isfinite(scale) and criterion.scale_floor <= scale <= SCALE_MAX, (
            f"{name}: scale {scale}, floor {criterion.scale_floor}")


def test_margins_scale_rises_from_its_floor(data):
    """With a margin the loss first pushes s down to the floor; once the features are learned
    it pushes s up again, and the bound lets it go (a clamp would have held it there)."""
    kwargs, lr, anneal = CONFIGS["arcface"]
    _, _, scale, criterion = train_toy(kwargs, lr, anneal, data=data)
    assert scale > criterion.scale_floor * 1.2


def test_paper_layer_with_a_margin_stalls(data):
    """The paper's layer (start 10, floor 0.01) with ArcFace: s collapses to 0.01 and the loss
    stays at ln C -- what test_every_configuration_trains would report for the old default."""
    kwargs = dict(margins=(1.0, 0.5, 0.0), scale_init=10.0, scale_floor=0.01)
    first, last, scale, _ = train_toy(kwargs, 0.5, False, data=data)
    assert scale == pytest.approx(0.01, rel=1e-4)
    assert abs(last - LN_C) < 0.05 and last > 0.5 * first


def test_paper_layer_trains_normface_without_margin(data):
    first, last, scale, _ = train_toy(dict(scale_init=10.0, scale_floor=0.01), 0.5, False,
                                      data=data)
    assert last < 0.1 * first and 10.0 < scale <= SCALE_MAX


def main():
    """Print the README table: every configuration with the default scale and, where the scale
    is learned, with the paper's layer (start 10, floor 0.01: the previous default)."""
    data = toy_data()
    print(f"toy: C={C} Gaussian clusters ({PER_CLASS} samples each, noise {NOISE}) in "
          f"R^{INPUT}, linear embedding to D={D}, SGD, {STEPS} steps of {BATCH}; "
          f"ln C = {LN_C:.2f}; loss: first batch -> mean of the last 10\n")
    print("| configuration | lr | default: loss | final s (floor) | paper's layer: loss | "
          "final s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (kwargs, lr, anneal) in CONFIGS.items():
        first, last, scale, criterion = train_toy(kwargs, lr, anneal, data=data)
        learned = isinstance(criterion.scale, torch.nn.Parameter)
        if kwargs.get("loss", "softmax") != "softmax":
            shown, paper = "no scale", "| same | |"
        elif not learned:
            shown, paper = f"{scale:g} fixed", "| same | |"
        else:
            shown = f"{scale:.2f} ({criterion.scale_floor:.2f})"
            paper_kwargs = dict(kwargs, scale_init=10.0, scale_floor=0.01)
            p_first, p_last, p_scale, _ = train_toy(paper_kwargs, lr, anneal, data=data)
            paper = f"| {p_first:.2f} -> {p_last:.3f} | {p_scale:.2f} |"
        print(f"| {name}{', lam annealed' if anneal else ''} | {lr} | {first:.2f} -> "
              f"{last:.3f} | {shown} {paper}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
