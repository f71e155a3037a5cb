"""What an attacker recovers: re-fit only the victim's last layer on a few clean labelled images.

The victim's penultimate (pooled) features are frozen; a logistic regression (multinomial for
multi-class/ordinal, binary for binary-class, one per label for multi-label) is fitted on
``n`` class-stratified clean images and replaces the victim's head. Its test scores go through
the same MedMNIST metrics as the victim's own.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from .metrics import medmnist_metrics
from .shards import is_multilabel

_CONSTANT_LOGIT = 30.0  # a label that the few samples never vary: predict it with certainty


def stratified_indices(labels: np.ndarray, n: int, task: str, seed: int = 0) -> np.ndarray:
    """``n`` indices (all when there are fewer) drawn with a fixed seed, each class taking its
    share of ``n`` (at least one per present class; multi-label: a plain random draw)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if n >= len(labels):
        return np.arange(len(labels))
    if is_multilabel(task):
        return np.sort(rng.choice(len(labels), n, replace=False))
    y = labels[:, 0]
    classes, counts = np.unique(y, return_counts=True)
    share = np.maximum(1, np.floor(counts / counts.sum() * n)).astype(int)
    share = np.minimum(share, counts)
    order = np.argsort(-(counts / counts.sum() * n - share), kind="stable")
    i = 0
    while share.sum() < n:  # hand out the remainder to the largest fractional parts
        c = order[i % len(order)]
        if share[c] < counts[c]:
            share[c] += 1
        i += 1
    while share.sum() > n:  # more classes than n: drop from the largest
        share[np.argmax(share)] -= 1
    picked = [rng.choice(np.flatnonzero(y == c), k, replace=False) for c, k in zip(classes, share) if k]
    return np.sort(np.concatenate(picked))


def _fit_column(x: np.ndarray, y: np.ndarray, seed: int) -> LogisticRegression | float:
    """A fitted binary/multinomial model, or a constant logit when ``y`` has one value."""
    if len(np.unique(y)) < 2:
        return float(y[0])
    model = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def refit_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, task: str,
                 num_classes: int, seed: int = 0) -> np.ndarray:
    """Test scores (logits for MedMNIST's metrics, N x C) of the re-fitted head."""
    scaler = StandardScaler().fit(train_x)
    a, b = scaler.transform(train_x), scaler.transform(test_x)
    if is_multilabel(task):
        cols = []
        for j in range(train_y.shape[1]):
            fit = _fit_column(a, train_y[:, j], seed)
            cols.append(np.full(len(b), _CONSTANT_LOGIT * (2 * fit - 1)) if isinstance(fit, float)
                        else fit.decision_function(b))
        return np.stack(cols, 1).astype(np.float32)
    fit = _fit_column(a, train_y[:, 0], seed)
    scores = np.full((len(b), num_classes), -_CONSTANT_LOGIT, dtype=np.float32)
    if isinstance(fit, float):
        scores[:, int(fit)] = _CONSTANT_LOGIT
        return scores
    scores[:, fit.classes_.astype(int)] = np.log(np.clip(fit.predict_proba(b), np.exp(-_CONSTANT_LOGIT), 1.0))
    return scores


def recalibrated_metrics(val_feats: np.ndarray, val_labels: np.ndarray, test_feats: np.ndarray,
                         test_labels: np.ndarray, task: str, num_classes: int, samples: int,
                         seed: int = 0) -> dict[str, float | None]:
    """{"acc", "auc"} on the test split after re-fitting the head on ``samples`` val images."""
    pick = stratified_indices(val_labels, samples, task, seed)
    scores = refit_scores(val_feats[pick], val_labels[pick], test_feats, task, num_classes, seed)
    return medmnist_metrics(task, test_labels, scores)
