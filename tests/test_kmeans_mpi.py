"""Distributed K-means on 2 ranks: each rank holds a slice of the same data.

Run: mpirun -np 2 python tests/mpi_pytest.py tests/test_kmeans_mpi.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits

from hpc_uc.kmeans import kmeans

pytestmark = pytest.mark.mpi


def _digits() -> np.ndarray:
    return load_digits().data.astype(np.float32)


def _my_rows(n: int, comm) -> slice:
    """Uneven contiguous split: rank r gets a share growing with r (tests proportional sampling)."""
    weights = np.arange(1, comm.size + 1, dtype=float)
    bounds = np.concatenate([[0], np.round(np.cumsum(weights) / weights.sum() * n)]).astype(int)
    return slice(bounds[comm.rank], bounds[comm.rank + 1])


def test_inertia_within_2_percent_and_identical_centroids(comm):
    x = _digits()
    rows = _my_rows(len(x), comm)
    result = kmeans(torch.from_numpy(x[rows]), 10, comm, seed=0)
    reference = float(KMeans(n_clusters=10, n_init=1, random_state=0).fit(x).inertia_)
    assert result.inertia <= 1.02 * reference, (result.inertia, reference)
    assert len(result.assignments) == rows.stop - rows.start
    everyone = comm.allgather(result.centroids.numpy())
    assert all(np.array_equal(c, everyone[0]) for c in everyone)
    assert len(set(comm.allgather((result.inertia, result.iterations)))) == 1
    # global inertia is the sum of the local ones
    local = float(((x[rows] - result.centroids.numpy()[result.assignments.numpy()]).astype(np.float64) ** 2).sum())
    assert sum(comm.allgather(local)) == pytest.approx(result.inertia, rel=1e-6)


def test_two_ranks_equal_one_rank(comm):
    """With init_sample >= n every rank contributes all its rows, so the gathered k-means++
    sample is the full data in order: the same start as one process, the same clusters."""
    x = _digits()
    rows = _my_rows(len(x), comm)
    dist = kmeans(torch.from_numpy(x[rows]), 10, comm, seed=1, init_sample=len(x))
    alone = kmeans(torch.from_numpy(x), 10, None, seed=1, init_sample=len(x))
    assert torch.equal(dist.assignments, alone.assignments[rows])
    assert torch.allclose(dist.centroids, alone.centroids, atol=1e-5)
    assert dist.inertia == pytest.approx(alone.inertia, rel=1e-9)
    assert dist.iterations == alone.iterations


def test_rank_with_few_rows(comm):
    """A rank with fewer rows than k (here: rank 0 holds 3 rows) still clusters globally."""
    x = _digits()[:600]
    rows = slice(0, 3) if comm.rank == 0 else slice(3 + (comm.rank - 1) * 200, 3 + comm.rank * 200)
    result = kmeans(torch.from_numpy(x[rows]), 10, comm, seed=0)
    assert len(result.assignments) == rows.stop - rows.start
    everyone = comm.allgather(result.centroids.numpy())
    assert all(np.array_equal(c, everyone[0]) for c in everyone)
