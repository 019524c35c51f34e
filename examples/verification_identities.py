"""Verification of identities never seen in training: what each loss of the NormFace family buys.

A many-identity task from data that ships inside scikit-learn (its 8x8 handwritten digits;
nothing is downloaded). An *identity* is a string of --digits digits (3: 1,000 identities), an
image of it is one handwritten sample of each digit rendered side by side (8 x 24 pixels), so
every identity has thousands of different images. The images of the digits are split in two
halves: training renders from one, testing from the other (new handwriting), and the
identities are split 70 / 30: a small MLP is trained on 700 identities and verified, LFW-style,
on pairs of images of the 300 others, as faces of unseen people are. Rows, as in the paper's
Table 2 plus the margin losses (each a NormFaceLoss with its default scale, same budget):

    (a) softmax                  neither normalized, no margin, s = 1 (eq. 1 with b = 0)
    (b) NormFace                 both normalized, learned scale (eq. 6)
    (c) CosFace                  m3 = 0.35         (d) ArcFace    m2 = 0.5
    (e) SphereFace               m1 = 4, lam annealed as in its paper
    (f) NormFace + 0.01 C-contr  the paper's best row
    (g) C-contrastive            (h) C-triplet + center    agent losses only (section 4)

Each row is trained from scratch with --seeds seeds; the table gives the mean and the std over
seeds, and the per-seed difference to (a) (the same seed draws the same initial network and
the same stream of training images for every row). The paper itself fine-tunes a
softmax-trained network with each loss; rows (a'), (g'), (h') do that: (a)'s network and
agents trained --finetune-epochs more with softmax (the control), C-contrastive and C-triplet +
center, at a tenth of the learning rate. It also draws the paper's Figure 2 (2-D features of
the 10 digits) and reproduces Proposition 2 (s fixed to 1 stalls at the bound).

    python examples/verification_identities.py            # a few minutes on 2 CPU cores
    python examples/verification_identities.py --quick    # under a minute (smoke test)
"""

import argparse
import copy
import math
import multiprocessing
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

HERE = os.path.dirname(os.path.abspath(__file__))
SPLIT_SEED = 1234  # the identity and handwriting splits: fixed, the same for every seed

# name -> NormFaceLoss keywords; "anneal": SphereFace's lam schedule.
ROWS = {
    "(a) softmax": dict(scale=1.0, normalize_features=False, normalize_weight=False),
    "(b) NormFace": dict(),
    "(c) CosFace m3=0.35": dict(margins=(1.0, 0.0, 0.35)),
    "(d) ArcFace m2=0.5": dict(margins=(1.0, 0.5, 0.0)),
    "(e) SphereFace m1=4": dict(margins=(4.0, 0.0, 0.0), anneal=True),
    "(f) NormFace + 0.01 C-contrastive": dict(aux="c_contrastive", aux_weight=0.01),
    "(g) C-contrastive": dict(loss="c_contrastive"),
    "(h) C-triplet + center": dict(loss="c_triplet", center=True),
}
# Fine-tuned from (a)'s network and agents, the paper's protocol; Δ against (a').
FINETUNED = {
    "(a') softmax, trained further": ROWS["(a) softmax"],
    "(g') C-contrastive, fine-tuned from (a)": ROWS["(g) C-contrastive"],
    "(h') C-triplet + center, fine-tuned from (a)": ROWS["(h) C-triplet + center"],
}
BASELINES = {**{name: "(a) softmax" for name in ROWS},
             **{name: "(a') softmax, trained further" for name in FINETUNED}}


# ---------------------------------------------------------------------------------------------
# Data: identities made of handwritten digits
# ---------------------------------------------------------------------------------------------

class DigitIdentities:
    """Identities of `digits` digits; train / test split of the identities and of the digit
    images (handwriting). render(...) draws fresh images of given identities."""

    def __init__(self, digits=3, train_fraction=0.7):
        from sklearn.datasets import load_digits

        data = load_digits()
        self.images = torch.tensor(data.images / 16.0, dtype=torch.float32)   # (1797, 8, 8)
        target = torch.tensor(data.target)
        g = torch.Generator().manual_seed(SPLIT_SEED)
        self.train_pool, self.test_pool = [], []   # per digit: indices into self.images
        for d in range(10):
            idx = torch.nonzero(target == d).flatten()
            idx = idx[torch.randperm(idx.numel(), generator=g)]
            self.train_pool.append(idx[: idx.numel() // 2])
            self.test_pool.append(idx[idx.numel() // 2:])
        everyone = torch.cartesian_prod(*[torch.arange(10)] * digits).reshape(-1, digits)
        everyone = everyone[torch.randperm(everyone.shape[0], generator=g)]
        cut = int(round(train_fraction * everyone.shape[0]))
        self.train_ids, self.test_ids = everyone[:cut], everyone[cut:]
        self.digits = digits

    def render(self, identities, per_identity, generator, pool, shift):
        """(N, 1, 8, 8 * digits) images and (N,) labels (row of `identities`), N = K * per."""
        labels = torch.arange(identities.shape[0]).repeat_interleave(per_identity)
        columns = []
        for position in range(self.digits):
            digit = identities[labels, position]
            pick = torch.empty_like(digit)
            for d in range(10):   # one random image of digit d for every slot showing d
                slots = digit == d
                choice = torch.randint(0, pool[d].numel(), (int(slots.sum()),),
                                       generator=generator)
                pick[slots] = pool[d][choice]
            columns.append(self.images[pick])
        images = torch.cat(columns, dim=2)[:, None]
        return (random_shift(images, generator) if shift else images), labels

    def train_batch_source(self, per_identity, generator):
        return lambda: self.render(self.train_ids, per_identity, generator, self.train_pool,
                                   shift=True)

    def test_set(self, per_identity):
        g = torch.Generator().manual_seed(SPLIT_SEED + 1)
        return self.render(self.test_ids, per_identity, g, self.test_pool, shift=False)


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


def mlp(in_features, embedding_size, hidden=256):
    """(B, 1, 8, W) images -> (B, D) embeddings; no normalization here: the loss decides."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, embedding_size))


# ---------------------------------------------------------------------------------------------
# Training and verification
# ---------------------------------------------------------------------------------------------

def train(model, criterion, batches, *, epochs, batch_size, lr, generator, anneal=False):
    """SGD with momentum and cosine decay; weight decay on the network only (not agents, not s).
    batches() renders one epoch of fresh (images, labels). Returns the last epoch's mean loss."""
    optimizer = torch.optim.SGD([
        {"params": model.parameters(), "weight_decay": 5e-4},
        {"params": criterion.parameters(), "weight_decay": 0.0},
    ], lr=lr, momentum=0.9)
    schedule, step, mean = None, 0, math.nan
    model.train()
    for _ in range(epochs):
        images, labels = batches()
        if schedule is None:
            per_epoch = math.ceil(labels.numel() / batch_size)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * per_epoch)
        order = torch.randperm(labels.numel(), generator=generator)
        total = 0.0
        for start in range(0, labels.numel(), batch_size):
            batch = order[start:start + batch_size]
            if anneal:
                criterion.lam = nk.sphereface_lambda(step)
            loss = criterion(model(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            total += float(loss.detach()) * batch.numel()
        mean = total / labels.numel()
    return mean


def verify(model, images, labels, *, num_pairs):
    """LFW protocol on held-out identities: 10-fold accuracy (threshold from the other 9
    folds), TPR at FAR = 1% and AUC of the cosine score; dict of floats."""
    features = nfe.embed(model, images)
    a, b, same = nfe.sample_pairs(labels.numpy(), num_pairs=num_pairs, folds=10, seed=0)
    cosine = nfe.cosine_scores(features[a], features[b])
    return dict(acc=nfe.kfold_accuracy(cosine, same)[0], tpr=nfe.tpr_at_far(cosine, same, 0.01),
                auc=nfe.roc_auc(cosine, same))


def fit(name, kwargs, model, data, args, seed, *, epochs, lr, agents=None, stream=0):
    """Train `model` with the NormFaceLoss of `kwargs` (agents: initial weight) and verify it:
    (metrics dict, the criterion). stream: which stream of training images of this seed."""
    kwargs = dict(kwargs)
    anneal = kwargs.pop("anneal", False)
    generator = torch.Generator().manual_seed(seed + 1000 * stream)
    criterion = nk.NormFaceLoss(args.embedding_size, data.train_ids.shape[0],
                                backend=args.backend, **kwargs)
    if agents is not None:
        with torch.no_grad():
            criterion.weight.copy_(agents)
    start = time.time()
    loss = train(model, criterion, data.train_batch_source(args.per_identity, generator),
                 epochs=epochs, batch_size=args.batch_size, lr=lr, generator=generator,
                 anneal=anneal)
    seconds = time.time() - start
    out = verify(model, *data.test_set(args.test_per_identity), num_pairs=args.pairs)
    learned = isinstance(criterion.scale, nn.Parameter) and criterion.loss == "softmax"
    out.update(name=name, seed=seed, loss=loss, seconds=seconds,
               scale=float(criterion.effective_scale.detach()) if learned else None)
    return out, criterion


def run_one(task):
    """One row and seed, in a worker process: [metrics dict]; for (a), also the rows
    fine-tuned from its network (same seed)."""
    name, seed, args = task
    torch.set_num_threads(1)   # small matrices: one thread per run, runs in parallel
    data = DigitIdentities(args.digits)
    torch.manual_seed(seed)
    model = mlp(64 * args.digits, args.embedding_size)
    out, criterion = fit(name, ROWS[name], model, data, args, seed, epochs=args.epochs,
                         lr=args.lr)
    outs = [out]
    if name == "(a) softmax" and args.finetune_epochs > 0:
        for tuned, kwargs in FINETUNED.items():
            outs.append(fit(tuned, kwargs, copy.deepcopy(model), data, args, seed,
                            epochs=args.finetune_epochs, lr=args.lr / 10,
                            agents=criterion.weight.detach(), stream=1)[0])
    return outs


def run_all(args):
    """Every (row, seed), in --jobs processes; {row: [per-seed dicts, in seed order]}."""
    seeds = range(args.seed, args.seed + args.seeds)
    tasks = [(name, seed, args) for seed in seeds for name in ROWS]
    names = list(ROWS) + (list(FINETUNED) if args.finetune_epochs > 0 else [])
    results = {name: {} for name in names}

    def record(outs):
        for out in outs:
            results[out["name"]][out["seed"]] = out
            scale = "" if out["scale"] is None else f", final s {out['scale']:.1f}"
            print(f"  {out['name']}, seed {out['seed']}: accuracy "
                  f"{100 * out['acc']:.2f}%, train loss {out['loss']:.3f}{scale}, "
                  f"{out['seconds']:.0f} s", flush=True)

    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for outs in pool.imap_unordered(run_one, tasks):
                record(outs)
    else:
        for task in tasks:
            record(run_one(task))
    return {name: [runs[s] for s in seeds] for name, runs in results.items()}


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

LEGEND = """Columns: accuracy = LFW-protocol 10-fold accuracy with cosine scores (%), mean ± std
over the seeds; Δ = per-seed difference to the softmax row of the same protocol, (a) or (a')
(same seed: same initial network, same training images), mean ± std over the seeds; TPR = true
accept rate at a 1% false accept rate (%); AUC = area under the ROC; final s = the learned scale
after training (mean over seeds; - for a fixed scale or a loss without one); train s = seconds
of training per run (mean; fine-tuned rows: the fine-tuning only)."""


def table(results):
    lines = ["| loss | accuracy | Δ | TPR@FAR=1% | AUC | final s | train s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        acc = np.array([r["acc"] for r in runs])
        base = BASELINES[name]
        delta = acc - np.array([r["acc"] for r in results[base]])
        scales = [r["scale"] for r in runs if r["scale"] is not None]
        lines.append(
            f"| {name} | {100 * acc.mean():.2f} ± {100 * acc.std():.2f} | "
            + ("-" if name == base else
               f"{100 * delta.mean():+.2f} ± {100 * delta.std():.2f}")
            + f" | {100 * np.mean([r['tpr'] for r in runs]):.2f} | "
            f"{np.mean([r['auc'] for r in runs]):.4f} | "
            + (f"{np.mean(scales):.1f}" if scales else "-")
            + f" | {np.mean([r['seconds'] for r in runs]):.1f} |")
    return "\n".join(lines)


def accuracy_figure(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    accs = [100 * np.array([r["acc"] for r in results[n]]) for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    y = np.arange(len(names))[::-1]
    ax.barh(y, [a.mean() for a in accs], xerr=[a.std() for a in accs], color="0.75",
            capsize=3)
    for yi, a in zip(y, accs):
        ax.plot(a, np.full_like(a, yi), "k.", ms=4)   # every seed
    ax.set_yticks(y, names)
    low = min(a.min() for a in accs)
    ax.set_xlim(math.floor(low - 1), 100)
    ax.set_xlabel("verification accuracy on unseen identities (%), mean ± std, dots: seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Figure 2 and Proposition 2
# ---------------------------------------------------------------------------------------------

def figure2(args, path):
    """The paper's Figure 2 on the 10 single digits with a 2-D embedding: softmax features
    spread radially, the same features normalized, and NormFace fine-tuned from the softmax
    model (the paper fine-tunes softmax-pretrained networks; from scratch a 2-D NormFace often
    gets the classes' angular order wrong and stays there)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    labels = torch.tensor(digits.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(args.seed)

    def batches():
        return random_shift(images, g), labels

    torch.manual_seed(args.seed)
    model = mlp(64, 2)
    softmax = nk.NormFaceLoss(2, 10, scale=1.0, normalize_features=False,
                              normalize_weight=False, backend=args.backend)
    train(model, softmax, batches, epochs=args.figure_epochs, batch_size=64, lr=args.lr,
          generator=g)
    raw = nfe.embed(model, images)
    normface = nk.NormFaceLoss(2, 10, backend=args.backend)
    with torch.no_grad():
        normface.weight.copy_(softmax.weight)
    train(model, normface, batches, epochs=max(1, args.figure_epochs // 2), batch_size=64,
          lr=args.lr / 5, generator=g)
    jitter = np.random.default_rng(0).uniform(0.96, 1.04, size=(raw.shape[0], 1))

    def on_circle(f):   # radial jitter only, so that the points of one class stay visible
        return f / np.linalg.norm(f, axis=1, keepdims=True) * jitter

    panels = [("softmax: features spread radially", raw, None),
              ("the same features, normalized", on_circle(raw), None),
              (f"NormFace fine-tuned (s = {float(normface.effective_scale.detach()):.1f})",
               on_circle(nfe.embed(model, images)), normface.weight.detach().numpy())]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.4))
    for ax, (title, f, agents) in zip(axes, panels):
        scatter = ax.scatter(f[:, 0], f[:, 1], c=labels.numpy(), cmap="tab10", s=5, alpha=0.7,
                             vmin=-0.5, vmax=9.5)
        if agents is not None:   # the class agents W_j, normalized
            for j, w in enumerate(agents / np.linalg.norm(agents, axis=1, keepdims=True)):
                ax.plot([0, 0.8 * w[0]], [0, 0.8 * w[1]], color=plt.cm.tab10(j), lw=2)
        ax.set_title(title)
        ax.set_aspect("equal")
    fig.colorbar(scatter, ax=axes, ticks=range(10), label="digit", shrink=0.8)
    fig.suptitle("Paper Figure 2 on sklearn digits: 2-D embeddings of the 10 digits")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def proposition2(num_classes, steps, backend, seed=0, input_size=64, embedding_size=32,
                 per_class=4, batch_size=512):
    """NormFace on n synthetic classes through a linear embedding, with s fixed to 1 and with
    the paper's learned layer started at 1. {"fixed": (loss, s), "learned": (loss, s),
    "bound": softmax_loss_bound(n, 1)}."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, input_size, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    inputs = prototypes[labels] + 0.3 * torch.randn(labels.numel(), input_size,
                                                    generator=generator)
    out = {"bound": nk.softmax_loss_bound(num_classes, 1.0)}
    for name, kwargs in (("fixed", dict(scale=1.0)),
                         ("learned", dict(scale_init=1.0, scale_floor=0.01))):
        torch.manual_seed(seed)
        embedding = nn.Linear(input_size, embedding_size, bias=False)
        criterion = nk.NormFaceLoss(embedding_size, num_classes, backend=backend, **kwargs)
        optimizer = torch.optim.Adam([*embedding.parameters(), *criterion.parameters()], lr=0.05)
        order = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            batch = torch.randint(0, labels.numel(), (batch_size,), generator=order)
            loss = criterion(embedding(inputs[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
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
    p.add_argument("--quick", action="store_true", help="a small run (smoke test, < 1 minute)")
    p.add_argument("--out", default=os.path.join(HERE, "runs", "verification_identities"),
                   help="folder for results.md and the figures (default examples/runs/..., "
                        "which git ignores; --out examples/results to commit a run)")
    p.add_argument("--backend", default="auto", choices=nk.BACKENDS)
    p.add_argument("--digits", type=int, default=3, help="digits per identity (3: 1,000)")
    p.add_argument("--epochs", type=int, default=None, help="default 8 (2 with --quick)")
    p.add_argument("--seeds", type=int, default=None, help="runs per row (default 5, quick 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--per-identity", type=int, default=10,
                   help="fresh training images per identity and epoch")
    p.add_argument("--test-per-identity", type=int, default=10)
    p.add_argument("--pairs", type=int, default=None,
                   help="verification pairs, a multiple of 20 (default 6000, quick 1000)")
    p.add_argument("--embedding-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="epochs of rows (a'), (g'), (h'), 0 to skip them (default 3, quick 1)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="parallel runs, one thread each (default: the cores, at most 4)")
    p.add_argument("--figure-epochs", type=int, default=None, help="default 30 (3 quick)")
    p.add_argument("--prop2-classes", type=int, default=None, help="default 1000 (200 quick)")
    p.add_argument("--prop2-steps", type=int, default=None, help="default 300 (60 quick)")
    args = p.parse_args(argv)
    defaults = dict(epochs=(2, 8), finetune_epochs=(1, 3), seeds=(1, 5), pairs=(1000, 6000),
                    figure_epochs=(3, 30),
                    prop2_classes=(200, 1000), prop2_steps=(60, 300))
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    data = DigitIdentities(args.digits)
    n_train, n_test = data.train_ids.shape[0], data.test_ids.shape[0]
    print(f"normface_kernels backend={args.backend}; identities of {args.digits} handwritten "
          f"digits: training on {n_train} ({args.per_identity} fresh images each per epoch, "
          f"{args.epochs} epochs), verifying on {n_test} unseen ones ({args.test_per_identity} "
          f"images each, new handwriting, {args.pairs} pairs, 10 folds); {args.seeds} seed(s), "
          f"{args.jobs} job(s); load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores\n", flush=True)
    results = run_all(args)
    text = table(results)
    train_wall = time.time() - start
    print(f"\nVerification on unseen identities ({train_wall:.0f} s)\n\n{text}\n\n{LEGEND}\n")

    figures = []
    try:
        accuracy_figure(results, os.path.join(args.out, "accuracy.png"))
        figure2(args, os.path.join(args.out, "figure2_features.png"))
        figures = ["accuracy.png", "figure2_features.png"]
        print(f"figures written to {args.out}: {', '.join(figures)}")
    except ImportError as error:   # matplotlib is optional
        print(f"no figures ({error})")

    p2 = proposition2(args.prop2_classes, args.prop2_steps, args.backend, seed=args.seed)
    n = args.prop2_classes
    (fixed, _), (learned, learned_s) = p2["fixed"], p2["learned"]
    prop2 = "\n".join([
        f"Proposition 2 on {n} synthetic classes ({args.prop2_steps} Adam steps, linear "
        f"embedding):",
        f"  bound softmax_loss_bound({n}, s=1)        = {p2['bound']:.3f}",
        f"  NormFace, s fixed to 1:  final loss        = {fixed:.3f}  (stalls above the bound)",
        f"  NormFace, s learned:     final loss        = {learned:.3f}  (s grew 1 -> "
        f"{learned_s:.1f}; bound there {nk.softmax_loss_bound(n, learned_s):.3f})",
        f"  learned scale goes below the s=1 bound: {learned < p2['bound']}",
    ])
    wall = time.time() - start
    print(f"\n{prop2}\n\ntotal wall time {wall:.0f} s (load average now "
          f"{os.getloadavg()[0]:.1f})")
    command = " ".join(["python examples/verification_identities.py"]
                       + (argv if argv is not None else sys.argv[1:]))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"# {command}\n\n{text}\n\n{LEGEND}\n\n"
                + "".join(f"![{p}]({p})\n\n" for p in figures)
                + f"```\n{prop2}\n```\n\nwall time {wall:.0f} s ({train_wall:.0f} s for the "
                f"table) with {args.jobs} job(s) on {os.cpu_count()} cores\n")
    return results, p2


if __name__ == "__main__":
    main()
