"""Test-set metrics exactly as MedMNIST reports them, and the chance level they compare with.

MedMNIST's recipe (``medmnist/evaluator.py`` getACC/getAUC, fed by its training script):

* **Scores**: the network's logits go through ``softmax`` (multi-class, binary-class,
  ordinal-regression) or ``sigmoid`` (multi-label), in float32 torch as MedMNIST's
  training script does, before any metric.
* **ACC**: multi-class/ordinal -- top-1 of the softmax; binary-class -- softmax of the last
  (positive) class > 0.5; multi-label -- sigmoid > 0.5 per label, accuracy per label,
  averaged over labels.
* **AUC**: multi-class/ordinal -- one-vs-rest ROC AUC of each class column, averaged over
  columns; binary-class -- ROC AUC of the last column; multi-label -- ROC AUC per label,
  averaged.

Where MedMNIST would give NaN (a class with no positive or no negative sample in the
split), ``auc`` is None, so that results stay JSON-safe.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import roc_auc_score

from .errors import UserError
from .shards import is_multilabel

TASKS = ("multi-class", "binary-class", "multi-label, binary-class", "ordinal-regression")
THRESHOLD = 0.5


def _check(task: str, labels: np.ndarray, scores: np.ndarray | None = None) -> None:
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if labels.ndim != 2 or len(labels) == 0:
        raise UserError(f"labels must be a non-empty N×L array, got shape {labels.shape}")
    multilabel = is_multilabel(task)
    if not multilabel and labels.shape[1] != 1:
        raise UserError(f"{task} labels must be N×1, got shape {labels.shape}")
    if scores is None:
        return
    if scores.ndim != 2 or len(scores) != len(labels):
        raise UserError(f"scores {scores.shape} do not match labels {labels.shape}")
    if multilabel and scores.shape[1] != labels.shape[1]:
        raise UserError(f"multi-label scores need one column per label: {scores.shape} vs {labels.shape}")
    if not multilabel and scores.shape[1] < 2:
        raise UserError(f"{task} scores need one column per class (>= 2), got {scores.shape[1]}")


def probabilities(task: str, scores: np.ndarray) -> np.ndarray:
    """Logits → MedMNIST's scores: sigmoid for multi-label, softmax over classes otherwise."""
    logits = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
    if is_multilabel(task):
        return torch.sigmoid(logits).numpy()
    return torch.softmax(logits, dim=1).numpy()


def _acc(task: str, labels: np.ndarray, probs: np.ndarray) -> float:
    if is_multilabel(task):
        return float(np.mean([np.mean(labels[:, i] == (probs[:, i] > THRESHOLD))
                              for i in range(labels.shape[1])]))
    y = labels[:, 0]
    if task == "binary-class":
        return float(np.mean(y == (probs[:, -1] > THRESHOLD)))
    return float(np.mean(y == probs.argmax(axis=1)))


def _auc(task: str, labels: np.ndarray, probs: np.ndarray) -> float | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        if is_multilabel(task):
            per_column = [roc_auc_score(labels[:, i], probs[:, i]) for i in range(probs.shape[1])]
        elif task == "binary-class":
            per_column = [roc_auc_score(labels[:, 0], probs[:, -1])]
        else:
            per_column = [roc_auc_score((labels[:, 0] == i).astype(float), probs[:, i])
                          for i in range(probs.shape[1])]
    auc = float(np.mean(per_column))
    return None if np.isnan(auc) else auc


def medmnist_metrics(task: str, labels: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
    """{"acc", "auc"} of logits ``scores`` (N×C) against ``labels`` (N×L), as MedMNIST computes them."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    _check(task, labels, scores)
    probs = probabilities(task, scores)
    return {"acc": _acc(task, labels, probs), "auc": _auc(task, labels, probs)}


def chance_accuracy(labels: np.ndarray, task: str) -> float:
    """Accuracy of always guessing the split's own majority class.

    Single-label tasks: the largest class frequency. Multi-label: for each label the larger
    of its positive and negative rates, averaged over labels (the multi-label ACC above of a
    constant guess). Measured on the split itself, so it is what the best constant predictor
    reaches there.
    """
    labels = np.asarray(labels)
    _check(task, labels)
    if is_multilabel(task):
        positive = (labels == 1).mean(axis=0)
        return float(np.maximum(positive, 1.0 - positive).mean())
    _, counts = np.unique(labels[:, 0], return_counts=True)
    return float(counts.max() / len(labels))


def prior_loss(labels: np.ndarray, task: str, num_classes: int) -> float:
    """The training loss of always predicting the split's class frequencies: the entropy of the
    label distribution (nats; multi-label: the mean binary entropy over labels), what the
    victims' cross-entropy / BCE reaches by learning nothing about the images."""
    labels = np.asarray(labels)
    _check(task, labels)
    if is_multilabel(task):
        p = np.clip((labels == 1).mean(axis=0), 1e-12, 1 - 1e-12)
        return float((-(p * np.log(p) + (1 - p) * np.log(1 - p))).mean())
    p = np.bincount(labels[:, 0], minlength=num_classes) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())
