"""Metrics of predictions gathered from 2 ranks by sample id (as evaluate gathers them),
each rank holding a slice, equal the single-process metrics of the whole arrays."""
from __future__ import annotations

import numpy as np
import pytest

from hpc_uc.metrics import medmnist_metrics

pytestmark = pytest.mark.mpi

TASKS = [("multi-class", 4), ("binary-class", 2), ("multi-label, binary-class", 3),
         ("ordinal-regression", 5)]


def _full(task: str, classes: int, n: int = 23) -> tuple[np.ndarray, np.ndarray]:
    """The same hand-made predictions on every rank (fixed seed)."""
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(n, classes)).astype(np.float32)
    if task.startswith("multi-label"):
        labels = (logits + rng.normal(size=logits.shape) > 0).astype(np.int64)
    else:
        labels = (np.arange(n) % classes)[:, None].astype(np.int64)
        logits[np.arange(n), labels[:, 0]] += 1.0
    return labels, logits


def gathered_metrics(comm, task: str, labels: np.ndarray, logits: np.ndarray, index: np.ndarray):
    """The metrics of every rank's rows, gathered to rank 0 in sample order (None elsewhere)."""
    gathered = comm.gather_rows((labels, logits), index)
    return None if gathered is None else medmnist_metrics(task, *gathered[0])


@pytest.mark.parametrize("task,classes", TASKS)
def test_gathered_equals_single_process(comm, task, classes):
    labels, logits = _full(task, classes)
    mine = np.array_split(np.arange(len(labels)), comm.size)[comm.rank]  # 12 + 11 samples
    got = gathered_metrics(comm, task, labels[mine], logits[mine], mine)
    if comm.is_root:
        assert got == medmnist_metrics(task, labels, logits)
    else:
        assert got is None


def test_empty_rank_is_skipped(comm):
    labels, logits = _full("multi-class", 4)
    mine = slice(None) if comm.is_root else slice(0, 0)
    got = gathered_metrics(comm, "multi-class", labels[mine], logits[mine], np.arange(len(labels))[mine])
    if comm.is_root:
        assert got == medmnist_metrics("multi-class", labels, logits)
