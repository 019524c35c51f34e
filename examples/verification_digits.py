"""Verification on classes never seen in training: what each loss of the NormFace family buys.

Real data shipped inside scikit-learn (the 8x8 handwritten digits; nothing is downloaded):
a small CNN is trained on 7 digits with

    (a) plain softmax            neither normalized, no margin, s = 1 (paper eq. 1 with b = 0)
    (b) NormFace                 both normalized, learned scale (eq. 6)
    (c) CosFace                  both normalized, m3 = 0.35, s = 30
    (d) NormFace + 0.01 C-contr  the paper's best row of Table 2
    (e) C-triplet + center       agent losses only (section 4)

and verified on the 3 held-out digits, as faces of unseen people are: LFW-style pairs,
10-fold accuracy with a threshold chosen on the other 9 folds, TPR at FAR = 1%, with cosine,
raw Euclidean and cosine-after-PCA scores (PCA fitted on the training folds only).

It also draws the paper's Figure 2 (2-D features: softmax spreads them radially, normalized
features live on the circle) and reproduces Proposition 2: with the scale fixed to 1 on a
many-class problem the loss stalls at softmax_loss_bound(n, 1), a learned scale goes below it.

    python examples/verification_digits.py                # a few minutes on a CPU
    python examples/verification_digits.py --quick        # under a minute, for smoke tests
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn

try:
    import normface_kernels as nk
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import normface_kernels as nk
from normface_kernels import eval as nfe

# ---------------------------------------------------------------------------------------------
# Progress: tqdm when installed, else a line every 10%.
# ---------------------------------------------------------------------------------------------

try:
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover - depends on the environment
    _tqdm = None


class _Progress:
    """A minimal stand-in for tqdm: iterate, set_postfix_str, and print every tenth."""

    def __init__(self, iterable, total, desc):
        self.iterable, self.total, self.desc, self.postfix = iterable, total, desc, ""

    def set_postfix_str(self, text):
        self.postfix = text

    def __iter__(self):
        start, step = time.time(), max(1, self.total // 10)
        for i, item in enumerate(self.iterable, 1):
            yield item
            if i % step == 0 or i == self.total:
                print(f"{self.desc}: {i}/{self.total} {self.postfix} [{time.time() - start:.0f}s]",
                      file=sys.stderr, flush=True)


def progress(iterable, total, desc):
    if _tqdm is not None:
        return _tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return _Progress(iterable, total, desc)


# ---------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------

def load_digits_split(holdout):
    """sklearn digits as (N, 1, 8, 8) float in [0, 1]; split by class into train / held-out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    labels = torch.tensor(digits.target, dtype=torch.int64)
    held = torch.isin(labels, torch.tensor(sorted(holdout)))
    train_classes = sorted(set(range(10)) - set(holdout))
    # Training labels renumbered to 0..C-1 (the loss owns one agent per training class).
    remap = torch.full((10,), -1, dtype=torch.int64)
    remap[train_classes] = torch.arange(len(train_classes))
    return (images[~held], remap[labels[~held]]), (images[held], labels[held])


def random_shift(x, generator):
    """Translate each image by -1, 0 or +1 pixel in each direction (zero background)."""
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    h, w = x.shape[-2:]
    offsets = torch.randint(0, 3, (x.shape[0], 2), generator=generator)
    out = torch.empty_like(x)
    for dy in range(3):
        for dx in range(3):
            pick = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            out[pick] = padded[pick, :, dy:dy + h, dx:dx + w]
    return out


class SmallCNN(nn.Module):
    """8x8 image (B, 1, 8, 8) -> embedding (B, D). No normalization here: the loss decides."""

    def __init__(self, embedding_size):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(1, 32), *block(32, 32), nn.MaxPool2d(2),        # 4x4
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),       # 2x2
            nn.Flatten(), nn.Linear(64 * 4, 128), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
            nn.Linear(128, embedding_size))

    def forward(self, x):
        return self.body(x)


# ---------------------------------------------------------------------------------------------
# Losses: every row of the table is a NormFaceLoss
# ---------------------------------------------------------------------------------------------

def make_losses(embedding_size, num_classes, backend):
    common = dict(backend=backend)
    return {
        "softmax": lambda: nk.NormFaceLoss(
            embedding_size, num_classes, scale=1.0, normalize_features=False,
            normalize_weight=False, **common),
        "normface (learned s)": lambda: nk.NormFaceLoss(
            embedding_size, num_classes, scale="learn", **common),
        "cosface (m=0.35, s=30)": lambda: nk.NormFaceLoss(
            embedding_size, num_classes, scale=30.0, margins=(1.0, 0.0, 0.35), **common),
        "normface + 0.01 c-contr": lambda: nk.NormFaceLoss(
            embedding_size, num_classes, scale="learn", aux="c_contrastive", aux_weight=0.01,
            **common),
        "c-triplet + center": lambda: nk.NormFaceLoss(
            embedding_size, num_classes, loss="c_triplet", center=True, **common),
    }


def train(images, labels, criterion, *, embedding_size, epochs, batch_size, lr, seed, desc,
          init=None):
    """SGD with momentum and cosine decay; weight decay on the CNN only (not agents, not s).

    init: None (from scratch) or (model, agents) of a trained model to fine-tune from, as the
    paper fine-tunes softmax-pretrained networks; the agents start as the given class weights.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = SmallCNN(embedding_size)
    if init is not None:
        model.load_state_dict(init[0].state_dict())
        with torch.no_grad():
            criterion.weight.copy_(init[1])
    optimizer = torch.optim.SGD([
        {"params": model.parameters(), "weight_decay": 5e-4},
        {"params": criterion.parameters(), "weight_decay": 0.0},
    ], lr=lr, momentum=0.9)
    steps_per_epoch = math.ceil(images.shape[0] / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    model.train()
    bar = progress(range(epochs), epochs, desc)
    for _ in bar:
        order = torch.randperm(images.shape[0], generator=generator)
        total = 0.0
        for start in range(0, images.shape[0], batch_size):
            batch = order[start:start + batch_size]
            x = random_shift(images[batch], generator)
            loss = criterion(model(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * batch.numel()
        text = f"loss {total / images.shape[0]:.3f}"
        if isinstance(criterion.scale, nn.Parameter):
            text += f" s {float(criterion.effective_scale.detach()):.1f}"
        bar.set_postfix_str(text)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Verification table
# ---------------------------------------------------------------------------------------------

def verify(model, images, labels, *, num_pairs, pca_dim, mirror, seed):
    """LFW-style metrics on held-out classes: dict of plain floats."""
    features = nfe.embed(model, images, mirror=mirror)
    a_idx, b_idx, same = nfe.sample_pairs(labels.numpy(), num_pairs=num_pairs, folds=10,
                                          seed=seed)
    fa, fb = features[a_idx], features[b_idx]
    cosine = nfe.cosine_scores(fa, fb)
    acc, std, _ = nfe.kfold_accuracy(cosine, same)
    raw, _, _ = nfe.kfold_accuracy(nfe.euclidean_scores(fa, fb, normalize=False), same)
    pca, _, _ = nfe.kfold_verification(fa, fb, same, pca_dim=pca_dim)
    return dict(acc=acc, std=std, raw=raw, pca=pca, tpr=nfe.tpr_at_far(cosine, same, 0.01),
                auc=nfe.roc_auc(cosine, same))


def summarize(runs):
    """Per-seed metric dicts -> one row: mean over seeds, and the seed std of the accuracy."""
    row = {key: float(np.mean([r[key] for r in runs])) for key in runs[0] if key != "scale"}
    row["seed_std"] = float(np.std([r["acc"] for r in runs]))
    row["seconds"] = float(np.sum([r["seconds"] for r in runs]))
    scales = [r["scale"] for r in runs if r["scale"] is not None]
    row["scale"] = float(np.mean(scales)) if scales else None
    return row


def format_table(rows, pca_dim, seeds):
    head = (f"| loss | acc cosine (± std over {seeds} seeds) | fold std | acc raw L2 "
            f"| acc cosine+PCA{pca_dim} | TPR@FAR=1% | AUC | final s | train s |")
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    for name, r in rows:
        scale = "-" if r["scale"] is None else f"{r['scale']:.1f}"
        lines.append(
            f"| {name} | {100 * r['acc']:.2f} ± {100 * r['seed_std']:.2f} | {100 * r['std']:.2f} "
            f"| {100 * r['raw']:.2f} | {100 * r['pca']:.2f} | {100 * r['tpr']:.2f} "
            f"| {r['auc']:.3f} | {scale} | {r['seconds']:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figure 2: 2-D features, softmax (radial) vs normalized (on the circle)
# ---------------------------------------------------------------------------------------------

def figure2(args, backend, path):
    """Three panels on all 10 digits with a 2-D embedding: softmax features (radial), the same
    features normalized, and NormFace features (fine-tuned from the softmax model, as the paper
    fine-tunes softmax-pretrained networks; from scratch a 2-D NormFace often gets the classes'
    angular order wrong and stays stuck)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    labels = torch.tensor(digits.target, dtype=torch.int64)
    common = dict(embedding_size=2, batch_size=args.batch_size, seed=args.seed)
    softmax = nk.NormFaceLoss(2, 10, scale=1.0, normalize_features=False,
                              normalize_weight=False, backend=backend)
    base = train(images, labels, softmax, epochs=args.figure_epochs, lr=args.lr,
                 desc="figure 2: softmax, 2-D", **common)
    normface = nk.NormFaceLoss(2, 10, scale="learn", backend=backend)
    tuned = train(images, labels, normface, epochs=max(1, args.figure_epochs // 2),
                  lr=args.lr / 5, desc="figure 2: NormFace fine-tune", init=(base, softmax.weight),
                  **common)

    raw = nfe.embed(base, images)
    jitter = np.random.default_rng(0).uniform(0.96, 1.04, size=(raw.shape[0], 1))

    def on_circle(f):  # radial jitter only so that the points of one class stay visible
        return f / np.linalg.norm(f, axis=1, keepdims=True) * jitter

    panels = [("softmax: features spread radially", raw, None),
              ("the same features, normalized", on_circle(raw), None),
              (f"NormFace fine-tuned (s = {float(normface.effective_scale.detach()):.1f})",
               on_circle(nfe.embed(tuned, images)), normface.weight.detach().numpy())]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.4))
    for ax, (title, f, agents) in zip(axes, panels):
        scatter = ax.scatter(f[:, 0], f[:, 1], c=labels.numpy(), cmap="tab10", s=5, alpha=0.7,
                             vmin=-0.5, vmax=9.5)
        if agents is not None:   # class agents W_j, normalized: where each class is pulled
            for j, w in enumerate(agents / np.linalg.norm(agents, axis=1, keepdims=True)):
                ax.plot([0, 0.8 * w[0]], [0, 0.8 * w[1]], color=plt.cm.tab10(j), lw=2)
        ax.set_title(title)
        ax.set_aspect("equal")
        ax.axhline(0, color="0.85", lw=0.5)
        ax.axvline(0, color="0.85", lw=0.5)
    fig.colorbar(scatter, ax=axes, ticks=range(10), label="digit", shrink=0.8)
    fig.suptitle("Paper Figure 2 on sklearn digits: 2-D embeddings of all 10 classes")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Proposition 2: with s = 1 the normalized softmax cannot go below the bound
# ---------------------------------------------------------------------------------------------

def proposition2(num_classes, steps, backend, seed=0, input_size=64, embedding_size=32,
                 per_class=4, batch_size=512):
    """NormFace on n synthetic classes through a linear embedding, scale fixed to 1 vs learned
    (from 1). Returns {"fixed": (loss, s), "learned": (loss, s), "bound": bound(n, 1)}."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, input_size, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    inputs = prototypes[labels] + 0.3 * torch.randn(labels.numel(), input_size,
                                                    generator=generator)
    out = {"bound": nk.softmax_loss_bound(num_classes, 1.0)}
    for name, scale in (("fixed", 1.0), ("learned", "learn")):
        torch.manual_seed(seed)
        embedding = nn.Linear(input_size, embedding_size, bias=False)
        criterion = nk.NormFaceLoss(embedding_size, num_classes, scale=scale, backend=backend)
        with torch.no_grad():
            criterion.scale.fill_(1.0)   # both start at s = 1; only one may move
        optimizer = torch.optim.Adam([*embedding.parameters(), *criterion.parameters()], lr=0.05)
        order_gen = torch.Generator().manual_seed(seed)
        bar = progress(range(steps), steps, f"proposition 2, s {name}")
        for _ in bar:
            batch = torch.randint(0, labels.numel(), (batch_size,), generator=order_gen)
            loss = criterion(embedding(inputs[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix_str(f"loss {float(loss.detach()):.3f}")
        with torch.no_grad():
            final = float(criterion(embedding(inputs), labels))
        out[name] = (final, float(criterion.effective_scale.detach()))
    return out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=None, help="training epochs per loss "
                   "(default 20, 3 with --quick)")
    p.add_argument("--out", default="verification_digits_out",
                   help="folder for figure2_features.png and results.md")
    p.add_argument("--backend", default="auto", choices=nk.BACKENDS,
                   help="normface_kernels backend for every loss")
    p.add_argument("--quick", action="store_true", help="tiny run (smoke test, < 1 minute)")
    p.add_argument("--holdout", default="7,8,9", help="digits never seen in training")
    p.add_argument("--embedding-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--pairs", type=int, default=None, help="verification pairs, multiple of 20 "
                   "(default 6000, 600 with --quick)")
    p.add_argument("--pca-dim", type=int, default=16)
    p.add_argument("--mirror", action="store_true",
                   help="mirror-sum test features (the paper's trick for faces; digits are not "
                        "mirror-symmetric, so it is off by default)")
    p.add_argument("--prop2-classes", type=int, default=None, help="default 1000 (200 quick)")
    p.add_argument("--prop2-steps", type=int, default=None, help="default 300 (60 quick)")
    p.add_argument("--figure-epochs", type=int, default=None, help="default 30 (2 quick)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=None, help="training runs per loss, averaged "
                   "(default 3, 1 with --quick): on 10 classes the seed matters")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the CNN is tiny: "
                   "more threads mostly add overhead)")
    args = p.parse_args(argv)
    defaults = dict(epochs=(3, 20), seeds=(1, 3), pairs=(600, 6000), prop2_classes=(200, 1000),
                    prop2_steps=(60, 300), figure_epochs=(2, 30))
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    holdout = [int(d) for d in args.holdout.split(",")]
    (train_x, train_y), (test_x, test_y) = load_digits_split(holdout)
    num_classes = int(train_y.max()) + 1
    print(f"normface_kernels backend={args.backend} (C++ extension "
          f"{'loaded' if nk._cpp_error is None else 'not built: auto uses reference'})")
    print(f"training on digits {sorted(set(range(10)) - set(holdout))} ({train_x.shape[0]} "
          f"images), verifying on unseen digits {holdout} ({test_x.shape[0]} images, "
          f"{args.pairs} pairs, 10 folds)\n")

    rows = []
    seeds = range(args.seed, args.seed + args.seeds)
    for i, (name, factory) in enumerate(make_losses(args.embedding_size, num_classes,
                                                    args.backend).items()):
        name = f"({'abcde'[i]}) {name}"
        runs = []
        for seed in seeds:
            criterion = factory()
            start = time.time()
            model = train(train_x, train_y, criterion, embedding_size=args.embedding_size,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          seed=seed, desc=f"{name} seed {seed}")
            run = verify(model, test_x, test_y, num_pairs=args.pairs, pca_dim=args.pca_dim,
                         mirror=args.mirror, seed=args.seed)   # the same pairs for every run
            run["seconds"] = time.time() - start
            learned = criterion.loss == "softmax" and criterion.normalize_features
            run["scale"] = float(criterion.effective_scale.detach()) if learned else None
            runs.append(run)
        rows.append((name, summarize(runs)))
        print(f"{name}: accuracy {100 * rows[-1][1]['acc']:.2f}% "
              f"± {100 * rows[-1][1]['seed_std']:.2f} over {args.seeds} seed(s)", flush=True)

    table = format_table(rows, args.pca_dim, args.seeds)
    print("\nVerification on held-out digits (LFW protocol: 10 folds, threshold from the other 9)"
          "\n")
    print(table)

    figure = os.path.join(args.out, "figure2_features.png")
    figure2(args, args.backend, figure)
    print(f"\nFigure 2 (2-D features, softmax vs normalized) written to {figure}")

    p2 = proposition2(args.prop2_classes, args.prop2_steps, args.backend, seed=args.seed)
    n = args.prop2_classes
    (fixed_loss, _), (learned_loss, learned_s) = p2["fixed"], p2["learned"]
    prop2 = "\n".join([
        f"Proposition 2 on {n} synthetic classes ({args.prop2_steps} Adam steps, linear "
        f"embedding):",
        f"  bound softmax_loss_bound({n}, s=1)           = {p2['bound']:.3f}",
        f"  NormFace, s fixed to 1:   final loss         = {fixed_loss:.3f}  (stalls above the "
        f"bound)",
        f"  NormFace, s learned:      final loss         = {learned_loss:.3f}  "
        f"(s grew 1 -> {learned_s:.1f}; bound at that s = "
        f"{nk.softmax_loss_bound(n, learned_s):.3f})",
        f"  learned scale goes below the s=1 bound: {learned_loss < p2['bound']}",
    ])
    print("\n" + prop2)

    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"# verification_digits.py {' '.join(argv if argv is not None else sys.argv[1:])}"
                f"\n\n{table}\n\n```\n{prop2}\n```\n")
    return rows, p2


if __name__ == "__main__":
    main()
