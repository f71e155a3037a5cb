"""Stage `cluster`: surrogate features of every training image, distributed K-means.

Each rank extracts features of its own range; K-means sums and counts are all-reduced;
rank 0 holds the final centroids and broadcasts them (mpi4py). Saves RUN_DIR/clusters.npz
(centroids, global sample index, cluster of each sample) and reports cluster purity.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from .atomic import OWNER_ONLY, atomic_path, read_json
from .comm import Comm
from .errors import UserError
from .kmeans import cluster_purity, kmeans
from .reader import ShardedDataset
from .rundir import RunDir
from .surrogate import load_frozen_surrogate

# Warn when purity closes less than this share of the gap between random clusters (purity =
# majority-class rate) and the best K clusters can do (the K largest classes' share).
PURITY_WARN_SHARE = 0.3


@torch.no_grad()
def local_features(surrogate, data: ShardedDataset, batch: int = 256):
    """(features n_local x D float32, labels n_local x L, index n_local) of this rank's range."""
    feats, labels, index = [], [], []
    for x, y, idx in data.batches(batch, epoch=0, shuffle=False, drop_last=False):
        feats.append(surrogate(x)[1].float())
        labels.append(y.cpu())
        index.append(idx.cpu())
    if not feats:
        raise UserError("this rank has no training samples: use fewer ranks")
    return torch.cat(feats), torch.cat(labels).numpy(), torch.cat(index).numpy()


def run_cluster(cfg: dict, comm: Comm, run: RunDir) -> dict:
    """Cluster the training split in surrogate feature space; rank 0 writes clusters.npz."""
    data = ShardedDataset(cfg["data_dir"], "train", comm, seed=cfg["seed"], cache=cfg["cache"], full=True)
    surrogate = load_frozen_surrogate(cfg, run, data.manifest, comm.device)
    feats, labels, index = local_features(surrogate, data)
    km = cfg["kmeans"]
    result = kmeans(feats, cfg["clusters"], comm, seed=cfg["seed"], iters=km["iters"], tol=km["tol"],
                    init_sample=km["init_sample"])
    gathered = comm.gather_rows((result.assignments.cpu().numpy(), labels), index)
    info = {"inertia": result.inertia, "iterations": result.iterations}
    if comm.is_root:
        (assignment, labels), index = gathered
        sizes = np.bincount(assignment, minlength=cfg["clusters"])
        purity = cluster_purity(assignment, labels, cfg["clusters"])
        majority, best = _purity_bounds(labels, cfg["clusters"])
        info.update(purity=purity, majority_rate=majority, sizes=sizes.tolist())
        with atomic_path(run.clusters, OWNER_ONLY) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, centroids=result.centroids.cpu().numpy(), index=index, assignment=assignment,
                         sizes=sizes, purity=np.float64(purity))
        print(f"cluster: K={cfg['clusters']} sizes {sizes.tolist()}, purity {purity:.3f} "
              f"(majority class {majority:.3f}), inertia {result.inertia:.4g}", flush=True)
        if purity < majority + PURITY_WARN_SHARE * (best - majority):
            _warn_weak(purity, majority, run)
    comm.barrier()
    return info


def _purity_bounds(labels: np.ndarray, k: int) -> tuple[float, float]:
    """Purity of random clusters (majority-class rate) and the best purity K clusters reach."""
    y = labels[:, 0] if labels.ndim == 2 else labels
    rates = np.sort(np.bincount(y.astype(np.int64)))[::-1] / len(y)
    return float(rates[0]), float(min(1.0, rates[:k].sum()))


def _warn_weak(purity: float, majority: float, run: RunDir) -> None:
    """Near-random clusters mean near-zero protection: say so loudly."""
    val_acc = read_json(run.surrogate_info).get("val_acc") if run.surrogate_info.is_file() else None
    print(f"WARNING: clusters are near-random (purity {purity:.3f} vs majority class {majority:.3f}; "
          f"surrogate val accuracy {val_acc}). Perturbations from such clusters gave NO protection "
          "in our measurements: train the surrogate longer or give it better weights.",
          file=sys.stderr, flush=True)
