"""Method ``em``: sample-wise error-minimising noise (Huang et al., "Unlearnable Examples:
Making Personal Data Unexploitable", ICLR 2021), trained data-parallel.

A classifier and one δ per training image are optimised together, both to *lower* the
training loss (min-min): each round trains the model for ``em.train_steps`` steps on x + δ
(gradients all-reduced across ranks), then runs ``em.pgd_steps`` projected signed-gradient
steps of the same loss on every image's δ (each rank its own images, no communication),
until the model's accuracy on the perturbed training split reaches ``em.stop_accuracy`` or
``em.rounds`` rounds have run. δ becomes the easiest feature to learn: a victim trained on the
protected copy fits the noise instead of the images. ``em.restart_every`` R > 0 re-initialises
the model (and its momentum and cosine schedule) every R rounds, so that δ is fitted by several
fresh models in turn (measured: no deeper on BreastMNIST or digits, docs/efficacy.md).
``em.augment``: the ue victim's crop and flip are drawn afresh inside both steps (an
expectation over the augmentation), so that δ stays a shortcut after it. ``em.patch`` P > 1
makes δ low-frequency: it starts constant on P x P blocks and every step moves a block as one
(the block's mean gradient), so only x + δ's clip to [0, 1] splits a block.
``em.objective``: ``min`` is the min-min above; ``targeted`` is adversarial poisoning (Fowl et al.,
NeurIPS 2021): the model trains on the clean images and every noise step lowers the loss of the
next class, y + 1 mod classes; ``auto``, the default, is ``targeted`` where each image has one
class and ``min`` on multi-label data (measured deeper on BreastMNIST, docs/efficacy.md).

δ starts uniform in [-ε, ε] from (seed, sample id) -- or, with ``em.init: classwise``, as its
class's random pattern (``method=classwise``'s, from the seed), a shortcut a victim takes at
once that the rounds then make survive the augmentation -- and is kept as whole grey levels
(truncated toward zero, so |δ| stays within ε under either norm), per rank in an owner-only
HDF5 file, one batch in memory. Rank 0 then merges the ranks' files, a chunk at a time, into
RUN_DIR/perturbations.h5 (``samples``: N x C x H x W int16 grey levels, ``index``: their
sample ids); export adds each image's own δ. The file is the secret: it undoes the protection.
"""
from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from .atomic import OWNER_ONLY, atomic_path, owner_only_dir
from .augment import crop_flip, epoch_generator
from .classwise import class_noise
from .comm import Comm
from .config import check_world, scaled_lr
from .errors import UserError
from .models import victim_model
from .reader import ShardedDataset, chunk_rows
from .refine import next_class, project
from .rundir import RunDir
from .shards import is_multilabel
from .training import MetricsLog, accuracy, classification_loss, lr_at, set_lr

UE_BATCH = 128        # the batch em.lr is given for (the UE paper's)
CROP_PADDING = 4      # em.augment's random crop (the UE paper's, and the ue victim's default)
CHUNK_BYTES = 2**24   # δ rows per read/write of the merge and the noise pass: ~16 MiB
_INIT, _AUGMENT, _RESTART = 11, 12, 13  # streams of randomness drawn from the seed


def grey_levels(delta: torch.Tensor) -> torch.Tensor:
    """δ in [0, 1] units -> whole grey levels (int16), truncated toward zero so that every
    |level| / 255 <= |δ| (the L∞ and the L2 bound both still hold)."""
    return torch.trunc(delta * 255.0 + delta.sign() * 1e-4).to(torch.int16)


def blocks_to_pixels(blocks: torch.Tensor, patch: int, size: tuple[int, int]) -> torch.Tensor:
    """N x C x h x w block values -> N x C x H x W pixels, each block repeated over its
    ``patch`` x ``patch`` pixels (the last row and column of blocks cut to ``size``)."""
    if patch == 1:
        return blocks
    return blocks.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :size[0], :size[1]]


def block_mean(grad: torch.Tensor, patch: int) -> torch.Tensor:
    """Each ``patch`` x ``patch`` block of ``grad`` replaced by its mean (edge blocks: the mean
    of their pixels inside the image); ``patch`` 1 returns ``grad``."""
    if patch == 1:
        return grad
    return blocks_to_pixels(nn.functional.avg_pool2d(grad, patch, ceil_mode=True), patch, grad.shape[-2:])


def initial_levels(index: np.ndarray, shape: tuple[int, ...], epsilon: float, norm: str, seed: int,
                   patch: int = 1) -> np.ndarray:
    """Uniform noise in [-ε, ε] (``linf``; scaled to ||δ||_2 = ε for ``l2``) per sample, from
    (seed, sample id) alone: the same on any number of ranks; with ``patch`` > 1, one draw per
    ``patch`` x ``patch`` block. int16 grey levels."""
    out = np.empty((len(index),) + shape, np.int16)
    blocks = (shape[0],) + tuple(-(-n // patch) for n in shape[1:])
    for n, key in enumerate(np.asarray(index, np.int64)):
        d = torch.from_numpy(np.random.default_rng([seed, _INIT, int(key)]).uniform(-1, 1, (1,) + blocks))
        d = blocks_to_pixels(d, patch, shape[1:])
        d = d * epsilon if norm == "linf" else d * (epsilon / d.norm())
        out[n] = grey_levels(d.float())[0].numpy()
    return out


def classwise_levels(labels: np.ndarray, pattern: torch.Tensor) -> np.ndarray:
    """Each sample's class pattern (``pattern``: classes x C x H x W, within the budget) as
    int16 grey levels; ``labels``: N x 1 class indices."""
    return grey_levels(pattern[torch.from_numpy(np.asarray(labels)[:, 0])]).numpy()


class NoiseStore:
    """This rank's δ as int16 grey levels in an owner-only HDF5 file: rows in the order of
    ``index`` (this rank's sample ids); reads and writes touch only the rows asked for."""

    def __init__(self, path: Path, index: np.ndarray, shape: tuple[int, ...]) -> None:
        self.path, self.index = Path(path), np.asarray(index, np.int64)
        self._order = np.argsort(self.index, kind="stable")
        self._sorted = self.index[self._order]
        owner_only_dir(self.path.parent)
        self.path.unlink(missing_ok=True)
        row_bytes = 2 * int(np.prod(shape))
        rows = max(1, min(len(index), CHUNK_BYTES // 16 // row_bytes))
        self.file = h5py.File(self.path, "w", rdcc_nbytes=CHUNK_BYTES)
        self.path.chmod(OWNER_ONLY)
        self.levels = self.file.create_dataset("levels", (len(index),) + shape, np.int16, chunks=(rows,) + shape)
        self.file.create_dataset("index", data=self.index)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row of each sample id (all must be this rank's)."""
        return self._order[np.searchsorted(self._sorted, np.asarray(ids, np.int64))]

    def read(self, rows: np.ndarray) -> np.ndarray:
        sort = np.argsort(rows)
        out = np.empty((len(rows),) + self.levels.shape[1:], np.int16)
        out[sort] = self.levels[rows[sort]]
        return out

    def write(self, rows: np.ndarray, levels: np.ndarray) -> None:
        sort = np.argsort(rows)
        self.levels[rows[sort]] = levels[sort]

    def close(self) -> None:
        self.file.close()


def minimise_noise(model: nn.Module, x: torch.Tensor, delta: torch.Tensor, labels: torch.Tensor, task: str,
                   epsilon: float, norm: str, steps: int, step_size: float,
                   augment_gen: torch.Generator | None = None, padding: int = 4, patch: int = 1) -> torch.Tensor:
    """``steps`` projected signed-gradient steps (``step_size`` x ε each) that lower the
    model's loss on x + δ, keeping δ within ε and x + δ in [0, 1]; with ``augment_gen`` each
    step sees a fresh crop and flip of x + δ; with ``patch`` > 1 each step follows the mean
    gradient of each ``patch`` x ``patch`` block."""
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        inputs = x + delta
        if augment_gen is not None:
            inputs = crop_flip(inputs, augment_gen, padding)
        grad, = torch.autograd.grad(classification_loss(model(inputs), labels, task), delta)
        grad = block_mean(grad, patch)
        with torch.no_grad():
            if norm == "linf":
                step = grad.sign()
            else:
                step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = project(delta - step * (step_size * epsilon), epsilon, norm)
            delta = (x + delta).clamp(0, 1) - x
    return delta.detach()


def model_cycles(rounds: int, restart_every: int) -> list[tuple[int, int]]:
    """(first round, rounds) of each model the em rounds train in turn: one model for all
    ``rounds`` when ``restart_every`` is 0, else a fresh one every ``restart_every`` rounds."""
    every = restart_every or max(1, rounds)
    return [(lo, min(every, rounds - lo)) for lo in range(0, rounds, every)]


def model_seed(seed: int, cycle: int) -> int:
    """torch seed of the ``cycle``-th model: ``seed`` itself for the first (as without restarts),
    then one drawn from (seed, cycle)."""
    if cycle == 0:
        return seed
    return int(np.random.SeedSequence([seed, _RESTART, cycle]).generate_state(1)[0])


def noise_model_optimizer(cfg: dict, model: nn.Module) -> tuple[torch.optim.Optimizer, float]:
    """em's model optimiser and its peak learning rate: ``sgd`` (momentum 0.9, ``em.lr``,
    ``em.weight_decay``) or ``adam`` (``em.adam_lr``, no weight decay: the medmnist victim's
    defaults), either rate given at global batch 128 and scaled to ``batch_size`` by lr_scaling.
    Only ``em`` keys: the train stage re-runs when one changes."""
    e = cfg["em"]
    if e["optimizer"] == "adam":
        lr = scaled_lr(cfg, e["adam_lr"], cfg["batch_size"], UE_BATCH)
        return torch.optim.Adam(model.parameters(), lr=lr), lr
    lr = scaled_lr(cfg, e["lr"], cfg["batch_size"], UE_BATCH)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=e["weight_decay"]), lr


def resolve_objective(objective: str, task: str) -> str:
    """``em.objective`` as it runs: ``auto`` is ``targeted`` where each image has one class and
    ``min`` on multi-label data (the next class is undefined there)."""
    if objective == "auto":
        return "min" if is_multilabel(task) else "targeted"
    return objective


def noise_targets(labels: torch.Tensor, num_classes: int, objective: str) -> torch.Tensor:
    """The labels δ lowers the loss of: each image's own (``min``) or the next class,
    y + 1 mod ``num_classes`` (``targeted``; single-label N x 1 labels)."""
    if objective == "targeted":
        if labels.shape[1] != 1:
            raise UserError("em.objective=targeted needs one class per image")
        return next_class(labels, num_classes)
    return labels


def _perturbed(x: torch.Tensor, levels: np.ndarray) -> torch.Tensor:
    return (x + torch.from_numpy(levels).to(x.device).float() / 255.0).clamp(0, 1)


def run_em(cfg: dict, comm: Comm, run: RunDir) -> dict:
    """Optimise the model and every image's δ together; write RUN_DIR/perturbations.h5."""
    e = cfg["em"]
    per_rank = check_world(cfg, comm.size)
    data = ShardedDataset(cfg["data_dir"], "train", comm, seed=cfg["seed"], cache=cfg["cache"],
                          full=True, spread=True)  # every image, each rank a random part of them
    if len(data) < per_rank:
        raise UserError(f"batch_size={cfg['batch_size']} needs {per_rank} samples per rank; "
                        f"each rank holds {len(data)}")
    shape = (data.channels, data.image_size, data.image_size)
    rows = min(per_rank * 4, chunk_rows(CHUNK_BYTES, int(np.prod(shape)), 4))  # noise-pass batch
    ids = data.local_index()
    store = NoiseStore(run.root / "em-parts" / f"part-{comm.rank:05d}.h5", ids, shape)
    if e["init"] == "classwise":  # the split's labels (no images read), looked up by sample id
        pattern = class_noise(data.num_classes, data.channels, data.image_size, cfg["epsilon"], cfg["norm"], cfg["seed"])
        labels, index = data.labels_by_index()
        mine = labels[np.searchsorted(index, ids)]
        start = lambda rows_: classwise_levels(mine[rows_], pattern)  # noqa: E731
    else:
        start = lambda rows_: initial_levels(ids[rows_], shape, cfg["epsilon"], cfg["norm"],  # noqa: E731
                                             cfg["seed"], e["patch"])
    for lo in range(0, len(ids), rows):
        store.levels[lo:lo + rows] = start(slice(lo, lo + rows))

    def fresh_model(cycle: int) -> nn.Module:
        torch.manual_seed(model_seed(cfg["seed"], cycle))
        return victim_model(e["arch"], data.num_classes, data.channels, data.image_size, e["stem"])

    model = fresh_model(0).to(comm.device)
    comm.broadcast_model(model)
    base, lr = noise_model_optimizer(cfg, model)
    opt = comm.distributed_optimizer(base, model)
    log = MetricsLog(run.metrics, comm, "train")
    objective = resolve_objective(e["objective"], data.task)
    targeted = objective == "targeted"  # the model learns clean images; δ aims at the next class
    log.write(objective=objective, objective_setting=e["objective"])  # auto resolved, in metrics.jsonl
    if comm.is_root:
        print(f"em: objective {objective}" + (f" (em.objective=auto, {data.task})" if e["objective"] == "auto" else ""),
              flush=True)
    padding = CROP_PADDING
    starts = {lo: (cycle, n * e["train_steps"])
              for cycle, (lo, n) in enumerate(model_cycles(e["rounds"], e["restart_every"]))}
    batches, epoch, step, acc, done, began = None, 0, 0, 0.0, 0, time.perf_counter()
    cycle, cycle_steps = 0, 0
    for round_ in range(e["rounds"]):
        if round_ in starts:  # a fresh model, optimizer state and schedule (round 0: the first)
            cycle, cycle_steps = starts[round_]
            if cycle:
                model.load_state_dict(fresh_model(cycle).state_dict())
                comm.broadcast_model(model)
                opt.state.clear()
            step = 0
        model.train()
        gen = epoch_generator(cfg["seed"] + _AUGMENT, comm.rank, round_) if e["augment"] else None
        for _ in range(e["train_steps"]):  # the same count on every rank: collectives stay in step
            batch = next(batches, None) if batches is not None else None
            if batch is None:
                batches = data.batches(per_rank, epoch=epoch, shuffle=True, drop_last=True)
                epoch, batch = epoch + 1, next(batches)
            x, y, idx = batch
            inputs = x if targeted else _perturbed(x, store.read(store.rows_of(idx.cpu().numpy())))
            if gen is not None:
                inputs = crop_flip(inputs, gen, padding)
            set_lr(opt, lr_at(step, cycle_steps, 0, lr))
            opt.zero_grad()
            classification_loss(model(inputs), y, data.task).backward()
            opt.step()
            step += 1
        model.eval()
        counts = torch.zeros(2, dtype=torch.float64)
        for lo, (images, labels, _) in zip(range(0, len(ids), rows), data.local_chunks(rows)):
            x = torch.from_numpy(images).to(comm.device).permute(0, 3, 1, 2).float() / 255.0
            y = noise_targets(torch.from_numpy(labels).to(comm.device), data.num_classes, objective)
            d = torch.from_numpy(store.levels[lo:lo + len(x)]).to(comm.device).float() / 255.0
            d = minimise_noise(model, x, d, y, data.task, cfg["epsilon"], cfg["norm"], e["pgd_steps"],
                               e["step_size"], gen, padding, e["patch"])
            levels = grey_levels(d).cpu()
            store.levels[lo:lo + len(x)] = levels.numpy()
            with torch.no_grad():
                scores = model(_perturbed(x, levels.numpy())).float().cpu().numpy()
            counts += torch.tensor([accuracy(scores, y.cpu().numpy(), data.task) * len(x), len(x)], dtype=torch.float64)
        counts = comm.allreduce(counts, op="sum", name="em.accuracy")
        acc, done = float(counts[0] / max(1.0, float(counts[1]))), round_ + 1
        log.write(round=round_ + 1, model=cycle + 1, train_accuracy_perturbed=acc,
                  seconds=round(time.perf_counter() - began, 3))
        if comm.is_root:
            print(f"train: em round {round_ + 1}/{e['rounds']}: model accuracy on the perturbed "
                  f"training split {acc:.3f}", flush=True)
        if acc >= e["stop_accuracy"]:  # the same value on every rank (all-reduced)
            break
    store.close()
    comm.barrier()
    if comm.is_root:
        merge_parts(run, comm.size, shape, cfg)
        print(f"train: em noise for {data.num_samples} images ({done} rounds, accuracy {acc:.3f})", flush=True)
    comm.barrier()
    return {"rounds": done, "train_accuracy_perturbed": acc}


def merge_parts(run: RunDir, parts: int, shape: tuple[int, ...], cfg: dict) -> None:
    """Rank 0: the ranks' δ files, a chunk at a time, into RUN_DIR/perturbations.h5 (owner-only,
    written atomically); the part files are removed."""
    paths = [run.root / "em-parts" / f"part-{r:05d}.h5" for r in range(parts)]
    counts = []
    for p in paths:
        with h5py.File(p, "r") as f:
            counts.append(f["levels"].shape[0])
    total, rows = sum(counts), max(1, CHUNK_BYTES // (2 * int(np.prod(shape))))
    with atomic_path(run.perturbations, mode=OWNER_ONLY) as tmp:
        with h5py.File(tmp, "w") as out:
            samples = out.create_dataset("samples", (total,) + shape, np.int16,
                                         chunks=(max(1, min(total, rows // 16)),) + shape)
            index = out.create_dataset("index", (total,), np.int64)
            at = 0
            for p, n in zip(paths, counts):
                with h5py.File(p, "r") as f:
                    for lo in range(0, n, rows):
                        samples[at + lo:at + min(n, lo + rows)] = f["levels"][lo:lo + rows]
                    index[at:at + n] = f["index"][()]
                at += n
            out.attrs.update({"epsilon": cfg["epsilon"], "norm": cfg["norm"], "seed": cfg["seed"],
                              "layout": "samples: N x C x H x W grey levels (δ x 255); index: their sample ids"})
    for p in paths:
        p.unlink()
    (run.root / "em-parts").rmdir()


class SampleNoise:
    """Each sample's δ from RUN_DIR/perturbations.h5 (method=em), by sample id; opened once."""

    def __init__(self, path) -> None:
        self.file = h5py.File(path, "r")
        if "samples" not in self.file:
            raise UserError(f"{path} holds no sample-wise noise (not made by method=em): rerun `hpc-uc train`")
        index = self.file["index"][()]
        self._order = np.argsort(index, kind="stable")
        self._sorted = index[self._order]

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """float32 N x C x H x W δ of the samples ``ids`` (each must be in the file)."""
        ids = np.asarray(ids, np.int64)
        where = np.minimum(np.searchsorted(self._sorted, ids), len(self._sorted) - 1)
        if len(ids) and not np.array_equal(self._sorted[where], ids):
            raise UserError("perturbations.h5 has no noise for some training images: rerun `hpc-uc train`")
        rows = self._order[where]
        sort = np.argsort(rows)
        out = np.empty((len(ids),) + self.file["samples"].shape[1:], np.float32)
        out[sort] = self.file["samples"][rows[sort]] / np.float32(255)
        return out
