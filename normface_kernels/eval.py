"""Face-verification evaluation: what a loss buys in verification accuracy (paper section 5).

The LFW protocol (k-fold accuracy with a threshold chosen on the other folds), ROC and TPR at a
given FAR, and the paper's test-time tricks: summing the features of an image and its mirror,
PCA fitted on the training folds only, cosine / normalized-Euclidean scores, and the video-set
feature of section 5.3 (a histogram of pairwise cosine scores between two sets of frames).

Inputs are NumPy arrays or torch tensors (any device; they are copied to CPU float64). Scalar
results are plain Python floats; curves and features are NumPy float64 arrays.

Every score is "higher means more alike": a pair is predicted *same* when score >= threshold.
Distances are therefore returned negated (``euclidean_scores``).

    from normface_kernels import eval as nfe
    fa, fb = nfe.embed(model, images_a, mirror=True), nfe.embed(model, images_b, mirror=True)
    mean, std, thresholds = nfe.kfold_accuracy(nfe.cosine_scores(fa, fb), same, folds=10)
"""

import numpy as np
import torch

from .checks import EPS

# Section 5.3: the video feature is a 100-bin histogram of cosine scores over [-1, 1].
SET_HISTOGRAM_BINS = 100


# ---------------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------------

def _as_array(x, name, ndim, dtype=np.float64):
    """x (NumPy, torch or sequence) as a NumPy array of rank `ndim`; ValueError naming `name`."""
    if torch.is_tensor(x):
        x = x.detach().to("cpu")
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        x = x.numpy()
    x = np.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    if dtype is bool:
        if x.dtype != bool and not np.all((x == 0) | (x == 1)):
            raise ValueError(f"{name} must be boolean or 0/1, got values {np.unique(x)[:5]}")
        return x.astype(bool)
    return x.astype(dtype)


def _scores_and_same(scores, same):
    scores = _as_array(scores, "scores", 1)
    same = _as_array(same, "same", 1, bool)
    if scores.shape != same.shape:
        raise ValueError(f"scores and same must have the same length, got {scores.shape[0]} "
                         f"and {same.shape[0]}")
    if scores.size == 0:
        raise ValueError("scores must not be empty")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite (NaN or inf found)")
    return scores, same


def _pair_features(a, b):
    a = _as_array(a, "features_a", 2)
    b = _as_array(b, "features_b", 2)
    if a.shape != b.shape:
        raise ValueError(f"features_a and features_b must have the same shape (N, D), got "
                         f"{a.shape} and {b.shape}")
    return a, b


def _normalize_rows(x):
    """x / sqrt(sum x^2 + eps) row-wise (paper eq. 3), (N, D) -> (N, D)."""
    return x / np.sqrt((x * x).sum(axis=1, keepdims=True) + EPS)


# ---------------------------------------------------------------------------------------------
# Scores and test-time features
# ---------------------------------------------------------------------------------------------

def cosine_scores(features_a, features_b):
    """Cosine similarity of each pair: features_a (N, D), features_b (N, D) -> (N,) in [-1, 1]."""
    a, b = _pair_features(features_a, features_b)
    return (_normalize_rows(a) * _normalize_rows(b)).sum(axis=1)


def euclidean_scores(features_a, features_b, normalize=True):
    """Negated Euclidean distance of each pair, (N, D) x (N, D) -> (N,); higher = more alike.

    normalize=True (the paper's normalized Euclidean distance) compares f / ||f||; then
    score = -sqrt(2 - 2 cos), which ranks pairs exactly like ``cosine_scores``.
    normalize=False compares the raw features, as a softmax-trained model is often used.
    """
    a, b = _pair_features(features_a, features_b)
    if normalize:
        a, b = _normalize_rows(a), _normalize_rows(b)
    return -np.sqrt(((a - b) ** 2).sum(axis=1))


def pair_scores(features_a, features_b, metric="cosine"):
    """Scores (N,) of pairs (N, D) x (N, D) by `metric`: "cosine", "euclidean" (normalized) or
    "euclidean_raw" (unnormalized)."""
    if metric == "cosine":
        return cosine_scores(features_a, features_b)
    if metric == "euclidean":
        return euclidean_scores(features_a, features_b, normalize=True)
    if metric == "euclidean_raw":
        return euclidean_scores(features_a, features_b, normalize=False)
    raise ValueError(f"metric must be 'cosine', 'euclidean' or 'euclidean_raw', got {metric!r}")


def flip_horizontal(images):
    """Mirror images along their last (width) axis: (N, ..., W) -> same shape, same type."""
    if torch.is_tensor(images):
        return torch.flip(images, dims=(-1,))
    return np.ascontiguousarray(np.asarray(images)[..., ::-1])


def mirror_sum(features, mirrored_features):
    """The paper's mirror trick: feature of an image plus feature of its mirror, (N, D) -> (N, D).

    Summed before any normalization, as in the paper's evaluation code.
    """
    a = _as_array(features, "features", 2)
    b = _as_array(mirrored_features, "mirrored_features", 2)
    if a.shape != b.shape:
        raise ValueError(f"features and mirrored_features must have the same shape, got "
                         f"{a.shape} and {b.shape}")
    return a + b


@torch.no_grad()
def embed(model, images, *, mirror=False, batch_size=256):
    """Features of `images` (N, ...) through `model` in eval mode -> (N, D) NumPy float64.

    mirror=True returns mirror_sum(model(x), model(flip_horizontal(x))). The model is put back
    in the training mode it had.
    """
    was_training = model.training
    model.eval()
    try:
        images = images if torch.is_tensor(images) else torch.as_tensor(np.asarray(images))
        device = next(iter(model.parameters()), torch.empty(0)).device
        out = []
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
            f = model(x)
            if mirror:
                f = f + model(flip_horizontal(x))
            out.append(f.float().cpu())
        return torch.cat(out).numpy().astype(np.float64)
    finally:
        model.train(was_training)


def fit_pca(features, dim):
    """PCA of features (N, D): returns (mean (D,), components (dim, D)), rows orthonormal."""
    x = _as_array(features, "features", 2)
    if not 1 <= dim <= min(x.shape):
        raise ValueError(f"dim must be in [1, min(N, D) = {min(x.shape)}], got {dim}")
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:dim]


def apply_pca(features, pca):
    """Project features (N, D) with pca = (mean (D,), components (k, D)) -> (N, k)."""
    mean, components = pca
    return (_as_array(features, "features", 2) - mean) @ components.T


def set_histogram_feature(set_a, set_b, bins=SET_HISTOGRAM_BINS):
    """Video-set feature of section 5.3: histogram of all pairwise cosine scores between frames.

    set_a: (Na, D), set_b: (Nb, D) frame features. Returns (bins,) float64 over [-1, 1],
    normalized to sum to 1 (the input of the paper's SVM on YouTube Faces).
    """
    a = _normalize_rows(_as_array(set_a, "set_a", 2))
    b = _normalize_rows(_as_array(set_b, "set_b", 2))
    if a.shape[0] == 0 or b.shape[0] == 0 or a.shape[1] != b.shape[1]:
        raise ValueError(f"set_a and set_b must be non-empty with the same D, got {a.shape} "
                         f"and {b.shape}")
    cos = np.clip(a @ b.T, -1.0, 1.0).ravel()
    hist, _ = np.histogram(cos, bins=bins, range=(-1.0, 1.0))
    return hist / hist.sum()


# ---------------------------------------------------------------------------------------------
# Thresholds and the k-fold protocol
# ---------------------------------------------------------------------------------------------

def accuracy_at(scores, same, threshold):
    """Fraction of pairs classified right by "same iff score >= threshold"; scores, same (N,)."""
    scores, same = _scores_and_same(scores, same)
    return float(np.mean((scores >= threshold) == same))


def best_threshold(scores, same):
    """The threshold maximising accuracy on (scores (N,), same (N,)) -> (threshold, accuracy).

    Candidates are the distinct scores (and +inf: everything "different"). The lowest candidate
    reaching the best accuracy wins; the threshold returned is the middle of the gap between it
    and the next lower score (any value in that gap gives the same accuracy), or the lowest
    score itself when it is the lowest candidate.
    """
    scores, same = _scores_and_same(scores, same)
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], same[order]
    distinct, first = np.unique(s, return_index=True)      # first: index of each value in s
    same_below = np.concatenate([[0], np.cumsum(y)])        # same_below[i]: same among s[:i]
    n, n_same = s.size, int(y.sum())
    # threshold distinct[k]: pairs s[first[k]:] are "same", s[:first[k]] are "different".
    correct = (n_same - same_below[first]) + (first - same_below[first])
    k = int(np.argmax(correct))                              # first maximum: lowest threshold
    if n - n_same > correct[k]:
        return float("inf"), (n - n_same) / n
    threshold = distinct[k]
    if k > 0:
        middle = 0.5 * (distinct[k - 1] + distinct[k])
        threshold = middle if middle > distinct[k - 1] else distinct[k]
    return float(threshold), float(correct[k]) / n


def fold_indices(num_pairs, folds=10):
    """LFW folds: contiguous slices of range(num_pairs) in order -> list of (train, test) index
    arrays. Folds are equal when folds divides num_pairs; otherwise the first num_pairs % folds
    folds hold one pair more (numpy.array_split)."""
    if int(folds) != folds or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds}")
    if num_pairs < folds:
        raise ValueError(f"need at least one pair per fold, got {num_pairs} pairs for "
                         f"{folds} folds")
    tests = np.array_split(np.arange(num_pairs), int(folds))
    return [(np.concatenate(tests[:i] + tests[i + 1:]), test) for i, test in enumerate(tests)]


def kfold_accuracy(scores, same, folds=10):
    """LFW protocol: scores (N,), same (N,) bool -> (mean accuracy, std, thresholds per fold).

    For each contiguous fold, the threshold maximising accuracy on the other folds
    (``best_threshold``) is applied to the held-out fold. std is the population std over folds
    (ddof=0), as the usual LFW scripts report it. Returns (float, float, list of `folds` floats).
    """
    scores, same = _scores_and_same(scores, same)
    accuracies, thresholds = [], []
    for train, test in fold_indices(scores.size, folds):
        threshold, _ = best_threshold(scores[train], same[train])
        thresholds.append(threshold)
        accuracies.append(np.mean((scores[test] >= threshold) == same[test]))
    return float(np.mean(accuracies)), float(np.std(accuracies)), thresholds


def kfold_verification(features_a, features_b, same, folds=10, *, metric="cosine",
                       pca_dim=None):
    """k-fold accuracy from pair features, optionally with PCA fitted on the training folds.

    features_a, features_b: (N, D) the two sides of each pair; same: (N,) bool. With pca_dim,
    each fold fits PCA on the features of its training pairs only (both sides stacked, 2 * N_train
    rows), projects every pair to pca_dim dimensions, then scores by `metric` (``pair_scores``).
    Returns (mean, std, thresholds) as ``kfold_accuracy``.
    """
    a, b = _pair_features(features_a, features_b)
    same = _as_array(same, "same", 1, bool)
    if same.shape[0] != a.shape[0]:
        raise ValueError(f"same must have one entry per pair, got {same.shape[0]} for "
                         f"{a.shape[0]} pairs")
    if pca_dim is None:
        return kfold_accuracy(pair_scores(a, b, metric), same, folds)
    accuracies, thresholds = [], []
    for train, test in fold_indices(a.shape[0], folds):
        pca = fit_pca(np.concatenate([a[train], b[train]]), pca_dim)
        scores = pair_scores(apply_pca(a, pca), apply_pca(b, pca), metric)
        threshold, _ = best_threshold(scores[train], same[train])
        thresholds.append(threshold)
        accuracies.append(np.mean((scores[test] >= threshold) == same[test]))
    return float(np.mean(accuracies)), float(np.std(accuracies)), thresholds


# ---------------------------------------------------------------------------------------------
# ROC
# ---------------------------------------------------------------------------------------------

def roc_curve(scores, same):
    """ROC of "same iff score >= t" over every distinct score t -> (far, tpr, thresholds).

    scores, same: (N,). Returns NumPy arrays of length (distinct scores + 1): thresholds
    decreasing from +inf (far = tpr = 0) to the lowest score (far = tpr = 1); far (false accept
    rate, over the different pairs) and tpr (over the same pairs) non-decreasing.
    Needs at least one same and one different pair.
    """
    scores, same = _scores_and_same(scores, same)
    n_same = int(same.sum())
    n_diff = same.size - n_same
    if n_same == 0 or n_diff == 0:
        raise ValueError(f"roc needs both same and different pairs, got {n_same} same and "
                         f"{n_diff} different")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], same[order]
    # last index of each distinct value in the descending order: all ties enter together.
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    far = np.r_[0.0, fp / n_diff]
    tpr = np.r_[0.0, tp / n_same]
    return far, tpr, np.r_[np.inf, s[last]]


def tpr_at_far(scores, same, far):
    """Highest true accept rate with false accept rate <= `far` (no interpolation).

    scores, same: (N,); far: float in [0, 1] (or a sequence -> list of floats). Returns float.
    """
    curve_far, curve_tpr, _ = roc_curve(scores, same)
    targets = np.atleast_1d(np.asarray(far, dtype=np.float64))
    if np.any((targets < 0) | (targets > 1)) or not np.all(np.isfinite(targets)):
        raise ValueError(f"far must be in [0, 1], got {far}")
    # far and tpr both increase along the curve: the answer is the last point with far <= target.
    out = [float(curve_tpr[np.searchsorted(curve_far, t * (1 + 1e-12), side="right") - 1])
           for t in targets]
    return out if np.ndim(far) else out[0]


def roc_auc(scores, same):
    """Area under the ROC curve (trapezoids), scores, same (N,) -> float."""
    far, tpr, _ = roc_curve(scores, same)
    return float(np.sum(np.diff(far) * (tpr[1:] + tpr[:-1]) / 2.0))


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------

def sample_pairs(labels, num_pairs=6000, folds=10, seed=0):
    """LFW-style pairs from labeled samples: labels (M,) -> (idx_a (N,), idx_b (N,), same (N,)).

    num_pairs must be a multiple of 2 * folds; each contiguous fold holds as many same as
    different pairs (same first, like the LFW pairs file). Unordered pairs are distinct and
    never pair a sample with itself.
    """
    labels = _as_array(labels, "labels", 1, np.int64)
    if num_pairs <= 0 or num_pairs % (2 * folds):
        raise ValueError(f"num_pairs must be a positive multiple of 2 * folds = {2 * folds}, "
                         f"got {num_pairs}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    members = {c: np.flatnonzero(labels == c) for c in classes}
    same_classes = classes[counts >= 2]
    if same_classes.size == 0 or classes.size < 2:
        raise ValueError("labels need a class with 2 samples and at least 2 classes")
    max_same = int(sum(n * (n - 1) // 2 for n in counts))
    max_diff = labels.size * (labels.size - 1) // 2 - max_same
    half = num_pairs // 2
    if half > max_same or half > max_diff:
        raise ValueError(f"cannot draw {half} distinct same and different pairs from "
                         f"{labels.size} samples")
    seen = set()

    def draw(want_same):
        while True:
            if want_same:
                i, j = rng.choice(members[rng.choice(same_classes)], size=2, replace=False)
            else:
                ca, cb = rng.choice(classes, size=2, replace=False)
                i, j = rng.choice(members[ca]), rng.choice(members[cb])
            key = (min(i, j), max(i, j))
            if key not in seen:
                seen.add(key)
                return int(i), int(j)

    per_fold = num_pairs // folds
    pairs = []
    for _ in range(folds):
        pairs += [draw(True) + (True,) for _ in range(per_fold // 2)]
        pairs += [draw(False) + (False,) for _ in range(per_fold // 2)]
    idx_a, idx_b, same = (np.array(column) for column in zip(*pairs))
    return idx_a, idx_b, same.astype(bool)
