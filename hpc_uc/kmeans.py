"""Distributed K-means (Lloyd) over rows split across MPI ranks.

* **Initialisation**: every rank draws a uniform sample of its rows (RNG from (seed, rank)),
  sized in proportion to its share so the total is about ``init_sample``; rank 0 gathers
  the samples in rank order, runs greedy k-means++ (RNG from seed) on them, and broadcasts
  the initial centroids with ``comm.broadcast``.
* **Lloyd iterations**: each rank assigns its rows to the nearest centroid (squared
  distances by the ||x||^2 - 2 x.c + ||c||^2 expansion, in float64, in row chunks); per-cluster
  sums, counts and the inertia travel in one ``comm.allreduce(op="sum")``.
* **Empty clusters** are re-seeded deterministically: the e empty clusters (in index order)
  take the e rows farthest from their nearest centroid, found globally by allgathering each
  rank's e best candidates and ordering by (distance desc, rank, local row index).
* **Stopping** (scikit-learn's rule): the summed squared centroid shift <= tol times the
  mean per-feature variance of the data, or ``iters`` iterations. Rank 0 decides and
  broadcasts centroids and the decision each iteration, so ranks never diverge; after the
  last update every rank assigns once more and the global inertia is all-reduced.
  The final centroids are rank 0's, broadcast with ``comm.broadcast`` (bit-identical).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .comm import Comm
from .errors import UserError

CHUNK_ROWS = 16384


@dataclass
class KMeansResult:
    centroids: torch.Tensor    # K x D float32, identical on every rank
    assignments: torch.Tensor  # n_local int64: cluster of each local row
    inertia: float             # global sum of squared distances to the assigned centroid
    iterations: int            # Lloyd updates run

    @property
    def assignments_local(self) -> torch.Tensor:
        return self.assignments


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeds (2 + log k candidates per step, as scikit-learn): k x D float64."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < k:
        raise UserError(f"k-means++ needs at least k={k} points, got {n}")
    trials = 2 + int(math.log(k))
    sq = np.einsum("ij,ij->i", x, x)
    centers = np.empty((k, x.shape[1]))
    first = rng.integers(n)
    centers[0] = x[first]
    d2 = np.maximum(sq - 2 * x @ x[first] + sq[first], 0)
    for c in range(1, k):
        total = d2.sum()
        if total > 0:
            cand = np.searchsorted(np.cumsum(d2), rng.random(trials) * total, side="right")
            cand = np.minimum(cand, n - 1)
        else:  # all points coincide with chosen centers
            cand = rng.integers(n, size=trials)
        cand_d2 = np.maximum(sq[None] - 2 * x[cand] @ x.T + sq[cand, None], 0)
        cand_d2 = np.minimum(d2[None], cand_d2)
        best = int(np.argmin(cand_d2.sum(axis=1)))
        d2, centers[c] = cand_d2[best], x[cand[best]]
    return centers


def _assign(x: torch.Tensor, sq: torch.Tensor, c: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest centroid and squared distance of each row, and per-cluster row sums (float64)."""
    k = len(c)
    csq = (c * c).sum(1)
    labels, dist = [], []
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, len(x), CHUNK_ROWS):
        xc = x[start:start + CHUNK_ROWS].to(torch.float64)
        d = (sq[start:start + CHUNK_ROWS, None] - 2 * xc @ c.T + csq[None]).clamp_min_(0)
        dmin, a = d.min(dim=1)
        sums += torch.nn.functional.one_hot(a, k).to(torch.float64).T @ xc
        labels.append(a)
        dist.append(dmin)
    if not labels:
        return torch.empty(0, dtype=torch.int64, device=x.device), sq, sums
    return torch.cat(labels), torch.cat(dist), sums


def _row_norms_and_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared norm of each row, and the column sums and sums of squares (2D), in float64."""
    sq = torch.empty(len(x), dtype=torch.float64, device=x.device)
    moments = torch.zeros(2 * x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, len(x), CHUNK_ROWS):
        xc = x[start:start + CHUNK_ROWS].to(torch.float64)
        sq[start:start + CHUNK_ROWS] = (xc * xc).sum(1)
        moments += torch.cat([xc.sum(0), (xc * xc).sum(0)])
    return sq, moments


def _initial_centroids(x: torch.Tensor, n_total: int, k: int, comm, seed: int, init_sample: int) -> np.ndarray:
    n = len(x)
    want = min(n, math.ceil(max(init_sample, k) * n / n_total))
    rows = np.sort(np.random.default_rng([seed, comm.rank]).choice(n, size=want, replace=False))
    sample = x[torch.from_numpy(rows).to(x.device)].to(torch.float64).cpu().numpy()
    parts = comm.gather(sample, root=0)
    centers = None
    if comm.rank == 0:
        centers = kmeans_plusplus(np.concatenate(parts), k, np.random.default_rng(seed))
    return comm.broadcast(centers, root=0)


def _reseed_empty(x: torch.Tensor, dist: torch.Tensor, empty: list[int], comm) -> torch.Tensor:
    """Rows for the empty clusters: the globally farthest rows from their centroids."""
    e = min(len(empty), len(x))
    top = torch.topk(dist, e).indices.tolist() if e else []
    mine = [(float(dist[i]), comm.rank, i, x[i].to(torch.float64).cpu().numpy()) for i in top]
    pool = sorted((c for part in comm.allgather(mine) for c in part), key=lambda c: (-c[0], c[1], c[2]))
    return torch.from_numpy(np.stack([c[3] for c in pool[:len(empty)]])).to(x.device)


def kmeans(features_local: torch.Tensor, k: int, comm=None, seed: int = 0, iters: int = 100,
           tol: float = 1e-4, init_sample: int = 10000) -> KMeansResult:
    """Cluster the rows of all ranks' ``features_local`` (n_local x D) into ``k`` clusters.

    Collective: every rank of ``comm`` must call it (``comm=None``: this process alone).
    """
    comm = comm or Comm.local()
    x = features_local.detach()
    if x.dim() != 2:
        raise UserError(f"k-means needs a 2-D feature matrix, got shape {tuple(x.shape)}")
    dev = x.device
    d = x.shape[1]
    sq, moments = _row_norms_and_moments(x)
    stats = comm.allreduce(torch.cat([moments, torch.tensor([float(len(x))], dtype=torch.float64,
                                                            device=dev)]), op="sum", name="kmeans.moments")
    n_total = int(stats[-1])
    if n_total < k:
        raise UserError(f"k-means with k={k} needs at least {k} samples, got {n_total}")
    mean = stats[:d] / n_total
    tol_abs = tol * float((stats[d:2 * d] / n_total - mean * mean).clamp_min(0).mean())

    c = torch.from_numpy(_initial_centroids(x, n_total, k, comm, seed, init_sample)).to(dev)
    it = 0
    for it in range(1, iters + 1):
        a, dist, sums = _assign(x, sq, c)
        packed = torch.cat([sums.flatten(),
                            torch.bincount(a, minlength=k).to(torch.float64)])
        packed = comm.allreduce(packed, op="sum", name="kmeans.sums")
        sums, counts = packed[:k * d].view(k, d), packed[k * d:]
        new = sums / counts.clamp_min(1)[:, None]
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            new[empty] = _reseed_empty(x, dist, empty, comm)
        done = None
        if comm.rank == 0:
            done = (not empty) and float(((new - c) ** 2).sum()) <= tol_abs
        new_np, done = comm.broadcast((new.cpu().numpy(), done), root=0)
        c = torch.from_numpy(new_np).to(dev)
        if done:
            break
    c = torch.from_numpy(comm.broadcast(c.to(torch.float32).cpu().numpy(), root=0)).to(dev)
    a, dist, _ = _assign(x, sq, c.to(torch.float64))
    inertia = float(comm.allreduce(dist.sum().reshape(1), op="sum", name="kmeans.inertia")[0])
    return KMeansResult(c, a, inertia, it)


def cluster_purity(assignments: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of samples whose cluster's majority label is their own label.

    ``labels`` is (n,) or (n, L); with L > 1 (multi-label) each distinct label row is one
    class (the label combination), with L = 1 the single column.
    """
    a = np.asarray(assignments).astype(np.int64).ravel()
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if len(a) != len(y):
        raise ValueError(f"{len(a)} assignments but {len(y)} labels")
    if len(a) == 0:
        return 0.0
    _, cls = np.unique(y, axis=0 if y.ndim == 2 else None, return_inverse=True)
    cls = cls.ravel()
    n_cls = int(cls.max()) + 1
    table = np.bincount(a * n_cls + cls, minlength=k * n_cls).reshape(-1, n_cls)
    return float(table.max(axis=1).sum() / len(a))
