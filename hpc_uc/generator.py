"""Stage `train`: one perturbation generator per cluster, trained data-parallel (UC step).

Generator k turns its fixed noise z_k into delta_k (|delta_k| <= epsilon). For a batch x,
x' = clamp(x + delta_k, 0, 1) goes through the frozen surrogate, and the loss is
KL(softmax(centroid_t) || softmax(features(x'))) with t = (k + offset) mod K.
`generator.train_on: all` trains every generator on every image (the reference);
`cluster` trains generator k only on the images of cluster k (K times less work).
Batches are data-parallel over ranks; the generators themselves are split over ranks
(`GeneratorBank`), with their gradients synchronised through d loss / d delta.
"""
from __future__ import annotations

import functools
import time
from typing import Callable

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .atomic import OWNER_ONLY, atomic_path, load_torch, owner_only_dir, save_torch
from .augment import crop_flip, epoch_generator
from .comm import Comm
from .config import check_world, scaled_lr
from .errors import UserError
from .models import Generator, perturbation
from .reader import ShardedDataset
from .shards import is_multilabel
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


TARGETS = ("next", "farthest", "cross_class")


def choose_targets(centroids: torch.Tensor, mode: str, offset: int = 1,
                   majority: np.ndarray | None = None) -> np.ndarray:
    """Target cluster t(k) of each generator k.

    ``next``: (k + offset) mod K (the reference). ``farthest``: the centroid farthest from k.
    ``cross_class``: the farthest centroid among clusters whose majority class differs from
    k's (``majority``), so that with class-pure clusters every target crosses classes; a
    cluster with no such other cluster falls back to ``farthest``.
    """
    k = len(centroids)
    if mode == "next":
        return ((np.arange(k) + offset) % k).astype(np.int64)
    dist = torch.cdist(centroids.double(), centroids.double()).numpy()
    np.fill_diagonal(dist, -np.inf)
    if mode == "cross_class" and majority is not None:
        other = majority[None, :] != majority[:, None]
        rows = other.any(1)
        dist[rows] = np.where(other[rows], dist[rows], -np.inf)
    return dist.argmax(1).astype(np.int64)


def cluster_majority(data: ShardedDataset, cluster_of: np.ndarray, k: int, comm: Comm) -> np.ndarray | None:
    """Majority class of each cluster over the whole training split (None for multi-label)."""
    if is_multilabel(data.task):
        return None
    counts = torch.zeros(k, data.num_classes, dtype=torch.float64)
    for _, labels, idx in data.batches(4096, epoch=0, shuffle=False, drop_last=False):
        c = torch.from_numpy(cluster_of[idx.cpu().numpy()])
        counts.index_put_((c, labels.view(-1).cpu()), torch.ones(len(c), dtype=torch.float64), accumulate=True)
    return comm.allreduce(counts, op="sum", name="cluster_majority").argmax(1).numpy()


class ClusterTargets:
    """Centroids, each training sample's cluster, and each generator's target distribution."""

    def __init__(self, path, offset: int, device: torch.device, mode: str = "next",
                 majority_of: "Callable[[np.ndarray, int], np.ndarray | None] | None" = None) -> None:
        with np.load(path) as data:
            centroids = torch.from_numpy(data["centroids"]).float()
        self.k = len(centroids)
        self.cluster_of = cluster_of_index(path)
        majority = majority_of(self.cluster_of, self.k) if (mode == "cross_class" and majority_of) else None
        self.targets = choose_targets(centroids, mode, offset, majority)
        self.target_probs = F.softmax(centroids[torch.from_numpy(self.targets)], dim=1).to(device)  # row k: generator k

    def clusters(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.cluster_of[index.cpu().numpy()]).to(index.device)


BOUNDARIES = ("clip", "reflect")


def add_perturbation(x: torch.Tensor, delta: torch.Tensor, boundary: str = "clip") -> torch.Tensor:
    """x + delta kept in [0, 1]. ``clip`` (the reference) cuts what leaves the range, so a
    negative delta vanishes on black pixels; ``reflect`` folds it back (-y below 0, 2 - y
    above 1), which keeps |result - x| <= |delta| and leaves a signal on dark backgrounds."""
    y = x + delta
    if boundary == "reflect":
        y = torch.where(y < 0, -y, y)
        y = torch.where(y > 1, 2 - y, y)
    return y.clamp(0, 1)


def kl_to_target(features: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(target || softmax(features)), target rows aligned with feature rows."""
    log_q = F.log_softmax(features.float(), dim=1)
    return (target_probs * (target_probs.clamp_min(1e-12).log() - log_q)).sum(1)


class GeneratorBank:
    """The K generators, their fixed noise, and their training split over ranks.

    Rank r owns (runs and updates) generators k with k % world_size == r; every rank holds
    all K perturbations for its batch. One step: owners compute their delta_k, an all-reduce
    (sum) assembles all K on every rank, each rank backpropagates its local loss to
    d loss / d delta (K x C x H x W), an all-reduce (mean) of that gradient gives each owner
    the gradient of the global mean loss, and owners backpropagate it through their own
    generators. Generator parameters never travel; their gradients are synchronised in this
    compact form (one delta-sized all-reduce instead of K generators' parameters), and each
    rank computes K / world_size generators instead of all K. One Adam per generator keeps
    the checkpoint independent of the world size.
    """

    def __init__(self, cfg: dict, k: int, channels: int, size: int, comm: Comm, lr: float) -> None:
        g = cfg["generator"]
        self.comm, self.k, self.epsilon, self.norm = comm, k, cfg["epsilon"], cfg["norm"]
        self.tile = cfg["tile"]
        torch.manual_seed(cfg["seed"])
        self.gens = nn.ModuleList(Generator(channels, g["base_filters"], g["n_down"], g["n_blocks"])
                                  for _ in range(k)).to(comm.device)
        noise = torch.rand(k, 1, channels, size, size, generator=torch.Generator().manual_seed(cfg["seed"] + 1))
        self.noise = noise.to(comm.device)
        self.owned = list(range(comm.rank, k, comm.size))
        self.opts = {i: torch.optim.Adam(self.gens[i].parameters(), lr=lr, weight_decay=g["weight_decay"])
                     for i in self.owned}

    def _own(self) -> torch.Tensor | None:
        if not self.owned:
            return None
        return torch.cat([perturbation(self.gens[i], self.noise[i], self.epsilon, self.norm, self.tile) for i in self.owned])

    def _assemble(self, own: torch.Tensor | None) -> torch.Tensor:
        full = torch.zeros(self.k, *self.noise.shape[2:], device=self.comm.device)
        if own is not None:
            full[self.owned] = own.detach()
        return self.comm.allreduce(full, op="sum", name="generator.deltas")

    def forward(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(this rank's deltas with their graph, all K deltas as a leaf that collects grads)."""
        own = self._own()
        return own, self._assemble(own).requires_grad_()

    def step(self, own: torch.Tensor | None, full: torch.Tensor, lr: float) -> None:
        """After ``loss.backward()``: average d loss / d delta over ranks, update own generators."""
        grad = full.grad if full.grad is not None else torch.zeros_like(full)
        grad = self.comm.allreduce(grad, op="mean", name="generator.delta_grads")
        for opt in self.opts.values():
            set_lr(opt, lr)
            opt.zero_grad()
        if own is not None:
            own.backward(grad[self.owned])
        for opt in self.opts.values():
            opt.step()

    @torch.no_grad()
    def deltas(self) -> torch.Tensor:
        """All K perturbations (K x C x H x W) on every rank."""
        self.gens.eval()
        return self._assemble(self._own())

    def state(self) -> dict | None:
        """Generators and optimizer states of every rank, merged on rank 0 (None elsewhere)."""
        mine = {i: ({n: t.detach().cpu() for n, t in self.gens[i].state_dict().items()},
                    self.opts[i].state_dict()) for i in self.owned}
        parts = self.comm.gather(mine)
        if parts is None:
            return None
        merged = {i: piece for part in parts for i, piece in part.items()}
        generators = {f"{i}.{n}": t for i in range(self.k) for n, t in merged[i][0].items()}
        return {"generators": generators, "optimizers": {i: merged[i][1] for i in range(self.k)}}

    def load(self, state: dict) -> None:
        self.gens.load_state_dict(state["generators"])
        for i, opt in self.opts.items():
            opt.load_state_dict(state["optimizers"][i])


def generator_loss(surrogate: nn.Module, x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor,
                   targets: ClusterTargets, train_on: str,
                   augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   boundary: str = "clip") -> torch.Tensor:
    """Mean KL over the local batch (summed over generators for train_on=all).

    ``augment`` (the victim's crop + flip, ``generator.augment``) transforms the perturbed
    images before the surrogate: the loss is then an expectation over the augmentations a
    victim will apply, so that delta survives them.
    """
    augment = augment or (lambda images: images)
    if train_on == "all":
        return _all_loss(surrogate, x, delta, targets, slice(None), augment, boundary)
    c = targets.clusters(idx)
    _, feats = surrogate(augment(add_perturbation(x, delta[c], boundary)))
    return kl_to_target(feats, targets.target_probs[c]).mean()


def accumulate_generator_loss(surrogate: nn.Module, x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor,
                              targets: ClusterTargets, train_on: str, micro_batch: int,
                              augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                              boundary: str = "clip", bf16: bool = False) -> torch.Tensor:
    """:func:`generator_loss` with its gradient accumulated into ``delta.grad`` over pieces of
    at most ``micro_batch`` images per surrogate forward (0: the whole local batch at once);
    returns the loss (detached). With ``train_on=all`` a piece is a block of (generator,
    sample) pairs, so K x the batch never goes through the surrogate at once. Without
    ``augment`` the gradient equals the un-chunked one (within float tolerance); with it, each
    piece draws its own crops."""
    b = x.shape[0]
    k = delta.shape[0] if train_on == "all" else 1
    if micro_batch <= 0 or micro_batch >= k * b:
        pieces = [(slice(None), slice(None))]
    else:
        per_gen = max(1, min(b, micro_batch))  # samples per piece; generators per piece if all of them fit
        gens = max(1, micro_batch // b) if per_gen == b else 1
        pieces = [(slice(g0, g0 + gens), slice(s0, s0 + per_gen)) for g0 in range(0, k, gens)
                  for s0 in range(0, b, per_gen)]
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for gens, samples in pieces:
        xs, ids = x[samples], idx[samples]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            if train_on == "all":
                part = _all_loss(surrogate, xs, delta, targets, gens, augment, boundary) * (len(xs) / b)
            else:
                part = generator_loss(surrogate, xs, ids, delta, targets, train_on, augment, boundary) * (len(xs) / b)
        part.backward()
        total += part.detach().double()
    return total


def _all_loss(surrogate, x, delta, targets: ClusterTargets, gens: slice, augment, boundary: str) -> torch.Tensor:
    """``train_on=all`` restricted to generators ``gens``: sum over them of the mean KL."""
    augment = augment or (lambda images: images)
    d, probs = delta[gens], targets.target_probs[gens]
    xp = augment(add_perturbation(x.unsqueeze(0), d.unsqueeze(1), boundary).flatten(0, 1))
    _, feats = surrogate(xp)
    return kl_to_target(feats, probs.repeat_interleave(x.shape[0], dim=0)).view(d.shape[0], -1).mean(1).sum()


CHECKPOINT_FORMAT = 2  # 2: one Adam per generator (world-size independent)


def run_train(cfg: dict, comm: Comm, run: RunDir) -> dict:
    """Train the generators; write the final perturbations to RUN_DIR/perturbations.h5."""
    g = cfg["generator"]
    per_rank = check_world(cfg, comm.size)
    data = ShardedDataset(cfg["data_dir"], "train", comm, seed=cfg["seed"], cache=cfg["cache"])
    if len(data) < per_rank:
        raise UserError(f"batch_size={cfg['batch_size']} needs {per_rank} samples per rank; "
                        f"each rank holds {len(data)}")
    surrogate = load_frozen_surrogate(cfg, run, data.manifest, comm.device)
    targets = ClusterTargets(run.clusters, cfg["target_offset"], comm.device, g["target"],
                             lambda cluster_of, k: cluster_majority(data, cluster_of, k, comm))
    if comm.is_root:
        print(f"train: generator targets ({g['target']}): "
              + ", ".join(f"{k}->{t}" for k, t in enumerate(targets.targets)), flush=True)
    lr = scaled_lr(cfg, g["lr"], cfg["batch_size"])
    bank = GeneratorBank(cfg, targets.k, data.channels, data.image_size, comm, lr)
    key, start = stage_key(cfg, "train"), 0
    if cfg["resume"] and run.checkpoint.is_file():
        try:
            state = load_torch(run.checkpoint)
        except UserError as exc:
            state = {}
            if comm.is_root:
                print(f"train: WARNING: {exc}; starting over", flush=True)
        if isinstance(state, dict) and state.get("key") == key and state.get("format") == CHECKPOINT_FORMAT:
            bank.load(state)
            start = int(state["epoch"]) + 1
        elif comm.is_root and state:
            print("train: the checkpoint was written for another config or format; starting over", flush=True)
    comm.broadcast_model(bank.gens)
    steps = len(data) // per_rank
    total, warmup = g["epochs"] * steps, cfg["warmup_epochs"] * steps
    log = MetricsLog(run.metrics, comm, "train")
    if comm.is_root and start:
        print(f"train: resuming after epoch {start}", flush=True)
    epochs = range(start, g["epochs"])
    state = None  # the owners' states merged on rank 0 (None on other ranks), gathered per epoch
    for epoch in epochs:
        bank.gens.train()
        began, loss_sum = time.perf_counter(), torch.zeros(2, dtype=torch.float64, device=comm.device)
        batches = data.batches(per_rank, epoch=epoch, shuffle=True, drop_last=True)
        aug_gen = epoch_generator(cfg["seed"] + 7919, comm.rank, epoch)
        augment = functools.partial(crop_flip, gen=aug_gen) if g["augment"] else None
        for i, (x, _, idx) in enumerate(progress(batches, comm, f"generators {epoch + 1}/{g['epochs']}", steps)):
            step_lr = lr_at(epoch * steps + i, total, warmup, lr, g["min_lr"])
            own, delta = bank.forward()
            loss = accumulate_generator_loss(surrogate, x, idx, delta, targets, g["train_on"], g["micro_batch"],
                                             augment, g["boundary"], g["bf16"])
            bank.step(own, delta, step_lr)
            loss_sum[0] += loss.detach().double()  # on the device: no sync per step
            loss_sum[1] += 1
        loss_sum = comm.allreduce(loss_sum, op="sum", name="generator.loss").cpu()
        seconds = time.perf_counter() - began
        record = {"epoch": epoch + 1, "loss": float(loss_sum[0] / loss_sum[1]), "lr": step_lr,
                  "seconds": round(seconds, 3), "images_per_s": round(steps * cfg["batch_size"] / seconds, 2)}
        log.write(**record)
        state = bank.state()
        if comm.is_root:
            print(f"train: epoch {epoch + 1}/{g['epochs']} loss {record['loss']:.4f} "
                  f"({record['images_per_s']:.1f} images/s)", flush=True)
            owner_only_dir(run.checkpoint.parent)
            save_torch(run.checkpoint, {"key": key, "format": CHECKPOINT_FORMAT, "epoch": epoch, **state}, OWNER_ONLY)
    final = bank.deltas().cpu()
    if not epochs:  # no epoch ran here (generator.epochs=0, or resumed after the last); a
        state = bank.state()  # collective, so the condition must agree on every rank
    if comm.is_root:
        save_perturbations(run.perturbations, final, cfg, targets.targets)
        owner_only_dir(run.generators.parent)
        save_torch(run.generators, state["generators"], OWNER_ONLY)
    comm.barrier()
    return {"clusters": targets.k, "epochs": g["epochs"]}


def save_perturbations(path, delta: torch.Tensor, cfg: dict, targets: np.ndarray | None = None,
                       extra: dict[str, np.ndarray] | None = None) -> None:
    """The secret: delta per cluster (anyone holding it can undo the protection), mode 0600,
    with each generator's target cluster and any method-specific arrays (``extra``: name -> array)."""
    with atomic_path(path, mode=OWNER_ONLY) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("delta", data=delta.numpy().astype(np.float32), track_times=False)
            if targets is not None:
                f.create_dataset("target", data=np.asarray(targets, np.int64), track_times=False)
            for name, array in (extra or {}).items():
                f.create_dataset(name, data=np.asarray(array), track_times=False)
            f.attrs.update({"epsilon": cfg["epsilon"], "norm": cfg["norm"], "seed": cfg["seed"],
                            "layout": "K x C x H x W, in image units [0, 1]"})


def load_perturbations(path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["delta"][()]


def load_targets(path) -> np.ndarray:
    """Each generator's target cluster, as training used it."""
    with h5py.File(path, "r") as f:
        if "target" not in f:
            raise UserError(f"{path} has no generator targets (written by an older hpc-uc): rerun `hpc-uc train`")
        return f["target"][()]
