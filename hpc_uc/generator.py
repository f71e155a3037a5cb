"""Stage `train`: one perturbation generator per cluster, trained data-parallel (UC step).

Generator k turns its fixed noise z_k into delta_k (|delta_k| <= epsilon). For a batch x,
x' = clamp(x + delta_k, 0, 1) goes through the frozen surrogate, and the loss is
KL(softmax(centroid_t) || softmax(features(x'))) with t = (k + offset) mod K.
`generator.train_on: all` trains every generator on every image (the reference);
`cluster` trains generator k only on the images of cluster k (K times less work).
"""
from __future__ import annotations

import time

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_path, load_torch, save_torch
from .comm import Comm
from .config import check_world, scaled_lr
from .errors import UserError
from .models import Generator, perturbation
from .reader import ShardedDataset
from .rundir import RunDir, stage_key
from .surrogate import load_frozen_surrogate
from .training import MetricsLog, lr_at, progress, set_lr


def cluster_of_index(path) -> np.ndarray:
    """Lookup table from clusters.npz: entry i is the cluster of global sample id i (-1: none)."""
    with np.load(path) as data:
        index, assignment = data["index"], data["assignment"]
    table = np.full(int(index.max()) + 1, -1, dtype=np.int64)
    table[index] = assignment
    return table


class ClusterTargets:
    """Centroids, each training sample's cluster, and each generator's target distribution."""

    def __init__(self, path, offset: int, device: torch.device) -> None:
        with np.load(path) as data:
            centroids = torch.from_numpy(data["centroids"]).float()
        self.k = len(centroids)
        self.cluster_of = cluster_of_index(path)
        targets = (torch.arange(self.k) + offset) % self.k
        self.target_probs = F.softmax(centroids[targets], dim=1).to(device)  # row k: generator k

    def clusters(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.cluster_of[index.cpu().numpy()]).to(index.device)


def kl_to_target(features: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(target || softmax(features)), target rows aligned with feature rows."""
    log_q = F.log_softmax(features.float(), dim=1)
    return (target_probs * (target_probs.clamp_min(1e-12).log() - log_q)).sum(1)


def build_generators(cfg: dict, k: int, channels: int, size: int, device: torch.device):
    """K generators and their fixed uniform noise, both from the config's seed."""
    g = cfg["generator"]
    torch.manual_seed(cfg["seed"])
    gens = nn.ModuleList(Generator(channels, g["base_filters"], g["n_down"], g["n_blocks"]) for _ in range(k))
    noise = torch.rand(k, 1, channels, size, size, generator=torch.Generator().manual_seed(cfg["seed"] + 1))
    return gens.to(device), noise.to(device)


def deltas(gens: nn.ModuleList, noise: torch.Tensor, cfg: dict) -> torch.Tensor:
    """K x C x H x W perturbations, one per cluster."""
    return torch.cat([perturbation(g, z, cfg["epsilon"], cfg["norm"]) for g, z in zip(gens, noise)])


def generator_loss(surrogate: nn.Module, x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor,
                   targets: ClusterTargets, train_on: str) -> torch.Tensor:
    """Mean KL over the local batch (summed over generators for train_on=all)."""
    if train_on == "all":
        k, b = delta.shape[0], x.shape[0]
        xp = (x.unsqueeze(0) + delta.unsqueeze(1)).clamp(0, 1).flatten(0, 1)
        _, feats = surrogate(xp)
        target = targets.target_probs.repeat_interleave(b, dim=0)
        return kl_to_target(feats, target).view(k, b).mean(1).sum()
    c = targets.clusters(idx)
    _, feats = surrogate((x + delta[c]).clamp(0, 1))
    return kl_to_target(feats, targets.target_probs[c]).mean()


def run_train(cfg: dict, comm: Comm, run: RunDir) -> dict:
    """Train the generators; write the final perturbations to RUN_DIR/perturbations.h5."""
    g = cfg["generator"]
    per_rank = check_world(cfg, comm.size)
    data = ShardedDataset(cfg["data_dir"], "train", comm, seed=cfg["seed"], cache=cfg["cache"])
    if len(data) < per_rank:
        raise UserError(f"batch_size={cfg['batch_size']} needs {per_rank} samples per rank; "
                        f"each rank holds {len(data)}")
    surrogate = load_frozen_surrogate(cfg, run, data.manifest, comm.device)
    targets = ClusterTargets(run.clusters, cfg["target_offset"], comm.device)
    gens, noise = build_generators(cfg, targets.k, data.channels, data.image_size, comm.device)
    lr = scaled_lr(cfg, g["lr"], cfg["batch_size"])
    opt = torch.optim.Adam(gens.parameters(), lr=lr, weight_decay=g["weight_decay"])
    key, start = stage_key(cfg, "train"), 0
    if cfg["resume"] and run.checkpoint.is_file():
        state = load_torch(run.checkpoint)
        if state["key"] == key:
            gens.load_state_dict(state["generators"])
            opt.load_state_dict(state["optimizer"])
            start = int(state["epoch"]) + 1
    comm.broadcast_model(gens)
    opt = comm.distributed_optimizer(opt, gens)
    steps = len(data) // per_rank
    total, warmup = g["epochs"] * steps, cfg["warmup_epochs"] * steps
    log = MetricsLog(run.metrics, comm, "train")
    if comm.is_root and start:
        print(f"train: resuming after epoch {start}", flush=True)
    for epoch in range(start, g["epochs"]):
        gens.train()
        began, loss_sum = time.perf_counter(), torch.zeros(2, dtype=torch.float64)
        batches = data.batches(per_rank, epoch=epoch, shuffle=True, drop_last=True)
        for i, (x, _, idx) in enumerate(progress(batches, comm, f"generators {epoch + 1}/{g['epochs']}", steps)):
            step_lr = lr_at(epoch * steps + i, total, warmup, lr, g["min_lr"])
            set_lr(opt, step_lr)
            opt.zero_grad()
            with torch.autocast(comm.device.type, dtype=torch.bfloat16, enabled=g["bf16"]):
                loss = generator_loss(surrogate, x, idx, deltas(gens, noise, cfg), targets, g["train_on"])
            loss.backward()
            opt.step()
            loss_sum += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
        loss_sum = comm.allreduce(loss_sum, op="sum")
        seconds = time.perf_counter() - began
        record = {"epoch": epoch + 1, "loss": float(loss_sum[0] / loss_sum[1]), "lr": step_lr,
                  "seconds": round(seconds, 3), "images_per_s": round(steps * cfg["batch_size"] / seconds, 2)}
        log.write(**record)
        if comm.is_root:
            print(f"train: epoch {epoch + 1}/{g['epochs']} loss {record['loss']:.4f} "
                  f"({record['images_per_s']:.1f} images/s)", flush=True)
            save_torch(run.checkpoint, {"key": key, "epoch": epoch, "generators": gens.state_dict(),
                                        "optimizer": opt.state_dict()})
    with torch.no_grad():
        gens.eval()
        final = deltas(gens, noise, cfg).cpu()
    if comm.is_root:
        save_perturbations(run.perturbations, final, cfg)
        save_torch(run.generators, gens.state_dict())
    comm.barrier()
    return {"clusters": targets.k, "epochs": g["epochs"]}


def save_perturbations(path, delta: torch.Tensor, cfg: dict) -> None:
    """The secret: delta per cluster (anyone holding it can undo the protection), mode 0600."""
    with atomic_path(path, mode=0o600) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("delta", data=delta.numpy().astype(np.float32), track_times=False)
            f.attrs.update({"epsilon": cfg["epsilon"], "norm": cfg["norm"], "seed": cfg["seed"],
                            "layout": "K x C x H x W, in image units [0, 1]"})


def load_perturbations(path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["delta"][()]
