"""The simplest victim: logistic regression on raw pixels, trained on a protected copy's training
split and read on the clean test split. Where it still separates the classes, the class signal
is linear and larger than the perturbation, and no deep victim needs to find a shortcut around
it (docs/efficacy.md, "The floor of the AUC reading").

    python bench/linear_victim.py data/digits runs/knobs-digits/seed0/em/protected [...]

Prints one row for the clean copy, then one per protected copy: training accuracy, clean test
ACC and AUC (one-vs-rest for several classes), and the same for δ alone (protected - clean),
which says whether the perturbation itself carries the labels.
"""
from __future__ import annotations

import argparse

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from hpc_uc.export import read_whole_split
from hpc_uc.shards import is_multilabel, read_manifest


def pixels(directory: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N × pixels float in [0, 1], labels N, sample ids N) of one split."""
    images, labels, index = read_whole_split(directory, split)
    return images.reshape(len(images), -1) / 255.0, labels[:, 0], index


def fit_and_read(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> str:
    model = LogisticRegression(max_iter=3000).fit(train_x, train_y)
    proba = model.predict_proba(test_x)
    auc = (roc_auc_score(test_y, proba[:, 1]) if proba.shape[1] == 2
           else roc_auc_score(test_y, proba, multi_class="ovr"))
    return f"{model.score(train_x, train_y):.3f} | {model.score(test_x, test_y):.3f} | {auc:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("protected", nargs="*", help="RUN_DIR/protected shard sets")
    args = parser.parse_args()
    if is_multilabel(read_manifest(args.data_dir)["task"]):
        raise SystemExit("hpc-uc: linear_victim reads single-label sets only")
    train_x, train_y, index = pixels(args.data_dir, "train")
    test_x, test_y, _ = pixels(args.data_dir, "test")
    print("| training copy | train ACC | clean test ACC | clean test AUC |")
    print("|---|---|---|---|")
    print(f"| {args.data_dir} (clean) | {fit_and_read(train_x, train_y, test_x, test_y)} |")
    for directory in args.protected:
        x, y, ids = pixels(directory, "train")
        if not (np.array_equal(ids, index) and np.array_equal(y, train_y)):
            raise SystemExit(f"hpc-uc: {directory} is not a protected copy of {args.data_dir}'s training split")
        print(f"| {directory} | {fit_and_read(x, y, test_x, test_y)} |")
        print(f"| {directory}: δ alone | {fit_and_read(x - train_x, y, test_x, test_y)} |")


if __name__ == "__main__":
    main()
