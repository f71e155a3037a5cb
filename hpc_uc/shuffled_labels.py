"""A training split whose labels are shuffled: the floor victim of ``evaluate.floor``.

Each sample keeps its images and takes the label of another sample, by a permutation of the
whole split seeded by ``seed`` (the class counts stay; the labels carry nothing about the
images). The permutation is over sample ids, so every rank, whatever its part, sees the same
label for the same image. Only the labels of the split are held (N x L integers), never its
images.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .reader import ShardedDataset


class ShuffledLabels:
    """``train``'s batches with each label replaced by its permuted one (``len``, ``manifest``
    and ``batches`` as the wrapped :class:`ShardedDataset`)."""

    def __init__(self, train: ShardedDataset, seed: int) -> None:
        with ShardedDataset(train.root, "train", None, full=True, verify=False) as whole:
            labels, self.index = whole.labels_by_index()
        self.labels = labels[np.random.default_rng(seed).permutation(len(labels))]
        self.train, self.manifest = train, train.manifest

    def __len__(self) -> int:
        return len(self.train)

    def labels_of(self, index: np.ndarray) -> np.ndarray:
        """The shuffled labels (N x L) of sample ids ``index``."""
        return self.labels[np.searchsorted(self.index, index)]

    def batches(self, *args, **kwargs) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for images, labels, index in self.train.batches(*args, **kwargs):
            yield images, torch.from_numpy(self.labels_of(index.cpu().numpy())).to(labels.device), index
