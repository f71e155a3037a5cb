"""An attacker's re-fit of the victim's last layer on a few clean labelled images."""
from __future__ import annotations

import numpy as np
import pytest

from hpc_uc.metrics import medmnist_metrics
from hpc_uc.recalibrate import recalibrated_metrics, stratified_indices


def separable(n: int, classes: int, dim: int = 16, seed: int = 0):
    """Features that separate the classes (N x dim), labels N x 1, and the class centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y[:, None], centres


@pytest.mark.parametrize("task,classes", [("multi-class", 5), ("binary-class", 2), ("ordinal-regression", 4)])
def test_refit_restores_a_victim_whose_head_is_wrong(task, classes):
    x, y, centres = separable(700, classes, seed=1)
    val_x, val_y, test_x, test_y = x[:400], y[:400], x[400:], y[400:]
    wrong = np.roll(centres, 1, axis=0).T  # logit of class c = <x, centre of class c-1>
    victim = medmnist_metrics(task, test_y, test_x @ wrong)
    assert victim["acc"] < 0.2
    got = recalibrated_metrics(val_x, val_y, test_x, test_y, task, classes, samples=100)
    assert got["acc"] > 0.95 and got["auc"] > 0.95


def test_refit_on_multilabel_features():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, (600, 3))
    feats = (labels * 4.0 + rng.normal(size=labels.shape)).astype(np.float32)
    feats = np.concatenate([feats, rng.normal(size=(600, 5))], 1)
    got = recalibrated_metrics(feats[:300], labels[:300], feats[300:], labels[300:],
                               "multi-label, binary-class", 3, samples=100)
    assert got["acc"] > 0.95


def test_features_without_information_recover_nothing():
    rng = np.random.default_rng(4)
    y = (np.arange(600) % 2)[:, None]
    x = rng.normal(size=(600, 32)).astype(np.float32)
    got = recalibrated_metrics(x[:300], y[:300], x[300:], y[300:], "binary-class", 2, samples=100)
    assert abs(got["auc"] - 0.5) < 0.12


def test_one_class_in_the_sample_predicts_it():
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    y = np.zeros((50, 1), np.int64)
    test_y = np.array([[0], [1], [0], [2]])
    got = recalibrated_metrics(x, y, x[:4], test_y, "multi-class", 3, samples=10)
    assert got["acc"] == 0.5


def test_stratified_sample_keeps_class_shares_and_is_fixed():
    y = np.array([0] * 730 + [1] * 270)[:, None]
    pick = stratified_indices(y, 100, "binary-class", seed=0)
    assert len(pick) == 100 and len(set(pick)) == 100
    assert np.bincount(y[pick, 0]).tolist() == [73, 27]
    assert np.array_equal(pick, stratified_indices(y, 100, "binary-class", seed=0))
    rare = np.array([0] * 995 + [1] * 3 + [2] * 2)[:, None]
    counts = np.bincount(rare[stratified_indices(rare, 10, "multi-class"), 0], minlength=3)
    assert counts.sum() == 10 and counts.min() >= 1
    assert len(stratified_indices(y[:50], 100, "binary-class")) == 50
