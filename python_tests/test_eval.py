"""normface_kernels.eval: verification metrics on cases whose answer is known by hand, the
Proposition 2 behaviour at small size, and a smoke run of examples/verification_identities.py."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import normface_kernels as nk
from normface_kernels import eval as nfe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = "cpu" if nk._cpp_error is None else "reference"


# ---------------------------------------------------------------------------------------------
# k-fold accuracy (LFW protocol)
# ---------------------------------------------------------------------------------------------

# Three contiguous folds of four pairs; the thresholds and accuracies below were worked out by
# hand (sort the 8 training scores, count correct pairs at each candidate, take the lowest best,
# put the threshold in the middle of the gap below it).
HAND_SCORES = [0.9, 0.6, 0.4, 0.1,    0.8, 0.3, 0.5, 0.2,    0.7, 0.65, 0.35, 0.05]
HAND_SAME = [1, 1, 0, 0,              1, 1, 0, 0,            1, 0, 1, 0]


def test_kfold_threshold_protocol_by_hand():
    mean, std, thresholds = nfe.kfold_accuracy(HAND_SCORES, HAND_SAME, folds=3)
    # fold 0: train best 6/8 at score 0.3 -> threshold (0.2 + 0.3) / 2; test 3/4 (0.4 accepted)
    # fold 1: train best 6/8 at score 0.35 (lowest of 0.35, 0.6, 0.7) -> (0.1 + 0.35) / 2; 3/4
    # fold 2: train best 7/8 at score 0.6 -> (0.5 + 0.6) / 2; test 2/4 (0.65 and 0.35 wrong)
    assert thresholds == pytest.approx([0.25, 0.225, 0.55])
    assert mean == pytest.approx(2.0 / 3.0)
    assert std == pytest.approx(math.sqrt(1.0 / 72.0))       # population std of .75, .75, .5
    assert all(isinstance(x, float) for x in (mean, std, *thresholds))


def test_kfold_folds_are_contiguous_in_the_given_order():
    # Same pairs, folds reordered: each fold is a contiguous slice, so the result follows it.
    scores = np.array(HAND_SCORES).reshape(3, 4)[[2, 0, 1]].ravel()
    same = np.array(HAND_SAME).reshape(3, 4)[[2, 0, 1]].ravel()
    _, _, thresholds = nfe.kfold_accuracy(scores, same, folds=3)
    assert thresholds == pytest.approx([0.55, 0.25, 0.225])


def test_perfect_separation_gives_accuracy_one():
    rng = np.random.default_rng(0)
    same = np.tile([True] * 30 + [False] * 30, 10)
    scores = np.where(same, rng.uniform(0.5, 1.0, same.size), rng.uniform(-1.0, 0.4, same.size))
    mean, std, thresholds = nfe.kfold_accuracy(scores, same, folds=10)
    assert mean == 1.0 and std == 0.0
    assert all(scores[~same].max() < t <= scores[same].min() for t in thresholds)
    for t in thresholds:
        assert nfe.accuracy_at(scores, same, t) == 1.0


def test_kfold_accepts_torch_and_bool_or_int_labels():
    expected = nfe.kfold_accuracy(HAND_SCORES, HAND_SAME, folds=3)
    got = nfe.kfold_accuracy(torch.tensor(HAND_SCORES), torch.tensor(HAND_SAME).bool(), folds=3)
    assert got[0] == pytest.approx(expected[0]) and got[2] == pytest.approx(expected[2])


def test_best_threshold_ties_and_extremes():
    # Every threshold in (0.2, 0.8] separates perfectly: the gap's middle is returned.
    assert nfe.best_threshold([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == (pytest.approx(0.5), 1.0)
    # Only different pairs: predicting "different" for everything is best -> +inf.
    threshold, accuracy = nfe.best_threshold([0.3, 0.7], [0, 0])
    assert threshold == math.inf and accuracy == 1.0
    # Only same pairs: the lowest score accepts them all.
    assert nfe.best_threshold([0.3, 0.7], [1, 1]) == (pytest.approx(0.3), 1.0)
    # Ties in score enter together: at 0.5 both pairs are accepted.
    assert nfe.best_threshold([0.5, 0.5, 0.1], [1, 0, 0])[1] == pytest.approx(2.0 / 3.0)


def test_fold_indices_and_bad_input():
    folds = nfe.fold_indices(10, 5)
    assert [list(test) for _, test in folds] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert sorted(folds[2][0]) == [0, 1, 2, 3, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="folds"):
        nfe.kfold_accuracy([0.1, 0.2], [0, 1], folds=1)
    with pytest.raises(ValueError, match="pair per fold"):
        nfe.kfold_accuracy([0.1, 0.2], [0, 1], folds=10)
    with pytest.raises(ValueError, match="same length"):
        nfe.kfold_accuracy([0.1, 0.2, 0.3], [0, 1], folds=2)
    with pytest.raises(ValueError, match="finite"):
        nfe.kfold_accuracy([0.1, float("nan")], [0, 1], folds=2)
    with pytest.raises(ValueError, match="same"):
        nfe.kfold_accuracy([0.1, 0.2], [0, 2], folds=2)


# ---------------------------------------------------------------------------------------------
# ROC and TPR at FAR
# ---------------------------------------------------------------------------------------------

def test_roc_known_points():
    far, tpr, thresholds = nfe.roc_curve([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [1, 1, 0, 1, 0, 0])
    assert thresholds[0] == math.inf and list(thresholds[1:]) == [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    assert far == pytest.approx([0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    assert tpr == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    assert nfe.tpr_at_far([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [1, 1, 0, 1, 0, 0], 0.0) == \
        pytest.approx(2 / 3)
    assert nfe.tpr_at_far([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [1, 1, 0, 1, 0, 0], [0.34, 1.0]) == \
        pytest.approx([1.0, 1.0])
    assert nfe.roc_auc([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [1, 1, 0, 1, 0, 0]) == \
        pytest.approx(8 / 9)


def test_roc_ties_enter_together_and_perfect_curve():
    far, tpr, _ = nfe.roc_curve([0.5, 0.5, 0.1], [1, 0, 0])
    assert far == pytest.approx([0, 0.5, 1]) and tpr == pytest.approx([0, 1, 1])
    assert nfe.tpr_at_far([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0], 0.0) == 1.0
    assert nfe.roc_auc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    with pytest.raises(ValueError, match="both same and different"):
        nfe.roc_curve([0.1, 0.2], [1, 1])


def test_roc_monotone_and_matches_sklearn_when_present():
    rng = np.random.default_rng(1)
    same = rng.random(500) < 0.4
    scores = np.round(rng.normal(size=500) + same, 1)          # many ties
    far, tpr, thresholds = nfe.roc_curve(scores, same)
    assert np.all(np.diff(far) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.all(np.diff(thresholds) < 0)
    assert (far[0], tpr[0], far[-1], tpr[-1]) == (0, 0, 1, 1)
    targets = [0.0, 0.001, 0.01, 0.1, 0.5, 1.0]
    values = nfe.tpr_at_far(scores, same, targets)
    assert values == sorted(values) and values[-1] == 1.0
    for target, value in zip(targets, values):                 # the definition, by brute force
        best = max(np.mean(scores[same] >= t) for t in np.r_[np.inf, scores]
                   if np.mean(scores[~same] >= t) <= target)
        assert value == pytest.approx(best)
    metrics = pytest.importorskip("sklearn.metrics")
    sk_far, sk_tpr, _ = metrics.roc_curve(same, scores, drop_intermediate=False)
    np.testing.assert_allclose(far, sk_far)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert nfe.roc_auc(scores, same) == pytest.approx(metrics.roc_auc_score(same, scores))


# ---------------------------------------------------------------------------------------------
# Scores and test-time tricks
# ---------------------------------------------------------------------------------------------

def test_cosine_and_normalized_euclidean_scores():
    a = np.array([[3.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = np.array([[5.0, 0.0], [-2.0, -2.0], [1.0, 0.0]])
    cos = nfe.cosine_scores(a, b)
    assert cos == pytest.approx([1.0, -1.0, 0.0])
    assert nfe.euclidean_scores(a, b) == pytest.approx(-np.sqrt(2 - 2 * cos), abs=1e-6)
    assert nfe.euclidean_scores(a, b, normalize=False) == pytest.approx(
        [-2.0, -np.sqrt(18.0), -np.sqrt(5.0)])
    assert nfe.pair_scores(torch.tensor(a), torch.tensor(b), "euclidean") == pytest.approx(
        nfe.euclidean_scores(a, b))
    with pytest.raises(ValueError, match="metric"):
        nfe.pair_scores(a, b, "manhattan")


def test_mirror_sum_and_embed_with_mirror():
    images = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    flipped = nfe.flip_horizontal(images)
    assert torch.equal(flipped[..., 0], images[..., 2])
    assert np.array_equal(nfe.flip_horizontal(images.numpy()), flipped.numpy())
    assert nfe.mirror_sum([[1.0, 2.0]], [[3.0, -5.0]]) == pytest.approx(np.array([[4.0, -3.0]]))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 4))
    model.train()
    plain = nfe.embed(model, images)
    mirrored = nfe.embed(model, images, mirror=True, batch_size=1)
    with torch.no_grad():
        expected = model(images) + model(flipped)
    np.testing.assert_allclose(plain, model(images).detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(mirrored, expected.numpy(), rtol=1e-6)
    np.testing.assert_allclose(mirrored, nfe.mirror_sum(plain, nfe.embed(model, flipped)),
                               rtol=1e-6)
    assert model.training                               # the caller's mode is restored


def test_pca_is_fitted_on_training_folds_only(monkeypatch):
    rng = np.random.default_rng(2)
    n, d, folds = 40, 6, 4
    a = rng.normal(size=(n, d))
    b = a + rng.normal(scale=0.5, size=(n, d)) * np.repeat([0.2, 3.0], n // 2)[:, None]
    same = np.repeat([True, False], n // 2).reshape(2, -1).T.ravel()   # alternate same / diff
    seen = []
    real_fit = nfe.fit_pca
    monkeypatch.setattr(nfe, "fit_pca", lambda x, dim: seen.append(np.array(x)) or real_fit(x, dim))
    mean, _, thresholds = nfe.kfold_verification(a, b, same, folds=folds, pca_dim=3)
    assert len(seen) == folds
    for (train, _), rows in zip(nfe.fold_indices(n, folds), seen):
        np.testing.assert_array_equal(rows, np.concatenate([a[train], b[train]]))

    # The same thing by hand for fold 0.
    train, test = nfe.fold_indices(n, folds)[0]
    pca = real_fit(np.concatenate([a[train], b[train]]), 3)
    scores = nfe.cosine_scores(nfe.apply_pca(a, pca), nfe.apply_pca(b, pca))
    assert thresholds[0] == pytest.approx(nfe.best_threshold(scores[train], same[train])[0])

    # Changing a held-out fold's features cannot move its own threshold.
    a2 = a.copy()
    a2[test] = rng.normal(scale=100.0, size=(test.size, d))
    _, _, thresholds2 = nfe.kfold_verification(a2, b, same, folds=folds, pca_dim=3)
    assert thresholds2[0] == pytest.approx(thresholds[0])
    assert thresholds2[1:] != pytest.approx(thresholds[1:])


def test_pca_projection():
    x = np.array([[2.0, 0.0, 0.0], [-2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]) + 5.0
    mean, components = nfe.fit_pca(x, 2)
    assert mean == pytest.approx([5.0, 5.0, 5.0])
    np.testing.assert_allclose(np.abs(components), [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    assert np.abs(nfe.apply_pca(x, (mean, components))) == pytest.approx(
        np.array([[2, 0], [2, 0], [0, 1], [0, 1]]))
    with pytest.raises(ValueError, match="dim"):
        nfe.fit_pca(x, 4)


def test_kfold_verification_without_pca_is_kfold_accuracy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(60, 5)), rng.normal(size=(60, 5))
    same = rng.random(60) < 0.5
    assert nfe.kfold_verification(a, b, same, folds=6) == \
        nfe.kfold_accuracy(nfe.cosine_scores(a, b), same, folds=6)


def test_set_histogram_feature():
    rng = np.random.default_rng(4)
    h = nfe.set_histogram_feature(rng.normal(size=(7, 16)), torch.randn(5, 16))
    assert h.shape == (100,) and h.sum() == pytest.approx(1.0) and np.all(h >= 0)
    # Orthonormal frames against themselves: cos = 1 (last bin) twice, cos = 0 (bin 50) twice.
    eye = np.eye(2)
    h = nfe.set_histogram_feature(eye, eye)
    assert h[99] == pytest.approx(0.5) and h[50] == pytest.approx(0.5)
    assert nfe.set_histogram_feature(eye, -eye)[0] == pytest.approx(0.5)   # cos = -1: first bin
    with pytest.raises(ValueError, match="set_a"):
        nfe.set_histogram_feature(np.zeros((0, 2)), eye)


def test_sample_pairs_lfw_layout():
    labels = np.repeat(np.arange(4), 25)
    a, b, same = nfe.sample_pairs(labels, num_pairs=200, folds=10, seed=0)
    assert a.shape == b.shape == same.shape == (200,)
    assert np.all(a != b)
    assert np.array_equal(labels[a] == labels[b], same)
    assert np.all(same.reshape(10, 20).sum(axis=1) == 10)            # balanced in every fold
    assert len({(min(i, j), max(i, j)) for i, j in zip(a, b)}) == 200  # distinct pairs
    with pytest.raises(ValueError, match="multiple"):
        nfe.sample_pairs(labels, num_pairs=101)


# ---------------------------------------------------------------------------------------------
# Proposition 2: scale fixed to 1 stalls at the bound, a learned scale goes below it
# ---------------------------------------------------------------------------------------------

def _train_normface(num_classes, scale, steps=80, seed=0):
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, 32, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(4)
    inputs = prototypes[labels] + 0.3 * torch.randn(labels.numel(), 32, generator=generator)
    torch.manual_seed(seed)
    embedding = torch.nn.Linear(32, 16, bias=False)
    # Both runs start at s = 1; the learned one is the paper's layer (floor 0.01), so that only
    # the features and the scale decide where the loss goes.
    learned = dict(scale_init=1.0, scale_floor=0.01) if scale == "learn" else {}
    criterion = nk.NormFaceLoss(16, num_classes, scale=scale, backend=BACKEND, **learned)
    optimizer = torch.optim.Adam([*embedding.parameters(), *criterion.parameters()], lr=0.05)
    for _ in range(steps):
        loss = criterion(embedding(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(criterion(embedding(inputs), labels)), float(criterion.effective_scale)


def test_proposition2_fixed_scale_stalls_learned_scale_goes_below():
    n = 100
    bound = nk.softmax_loss_bound(n, 1.0)                        # log(1 + 99 e^{-100/99}) = 3.61
    fixed, fixed_scale = _train_normface(n, 1.0)
    learned, learned_scale = _train_normface(n, "learn")
    assert fixed_scale == 1.0
    assert bound <= fixed < min(bound + 0.15, math.log(n))        # trained, yet stuck at the bound
    assert learned < bound - 1.0 and learned_scale > 2.0


# ---------------------------------------------------------------------------------------------
# The example, end to end
# ---------------------------------------------------------------------------------------------

def test_example_quick_smoke(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(   # every row, the paper's fine-tuned rows, both figures
        [sys.executable, os.path.join(REPO, "examples", "verification_identities.py"), "--quick",
         "--out", str(tmp_path), "--backend", BACKEND],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    rows = [line for line in out.splitlines() if line.startswith("| (")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| (a) softmax", "| (b) NormFace", "| (c) CosFace m3=0.35", "| (d) ArcFace m2=0.5",
        "| (e) SphereFace m1=4", "| (f) NormFace + 0.01 C-contrastive", "| (g) C-contrastive",
        "| (h) C-triplet + center", "| (a') softmax, trained further",
        "| (g') C-contrastive, fine-tuned from (a)",
        "| (h') C-triplet + center, fine-tuned from (a)"]
    for row in rows:   # every run verified something: accuracy well above chance (50%)
        assert float(row.split(" | ")[1].split(" ± ")[0]) > 60.0, row
    assert "Columns: accuracy =" in out and "final s = " in out      # the legend
    assert "learned scale goes below the s=1 bound: True" in out
    for png in ("figure2_features.png", "accuracy.png"):
        with open(tmp_path / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results.md").read_text().count("|") > 60
