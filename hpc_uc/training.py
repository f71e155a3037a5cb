"""Shared training pieces: LR schedule, progress, a data-parallel classifier loop, prediction."""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import append_jsonl
from .comm import Comm
from .shards import is_multilabel


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``peak`` down to ``floor``."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def progress(items: Iterable, comm: Comm, desc: str, total: int | None = None) -> Iterator:
    """tqdm on rank 0 when stderr is a terminal; the plain iterable otherwise."""
    if comm.is_root and sys.stderr.isatty():
        from tqdm import tqdm

        return iter(tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True))
    return iter(items)


def rate_line(done: int, total: int, seconds: float, unit: str) -> str:
    """"done/total unit (R unit/s, about T left)" for a progress line in a batch job's log."""
    rate = done / seconds if seconds > 0 else 0.0
    left = f"about {(total - done) / rate:.0f} s left" if rate > 0 and done < total else "done"
    return f"{done}/{total} {unit} ({rate:.1f} {unit}/s, {left})"


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Cross-entropy (single label, labels N×1) or BCE-with-logits (multi-label, N×L)."""
    if is_multilabel(task):
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    return F.cross_entropy(logits, labels[:, 0])


def micro_slices(n: int, micro_batch: int) -> list[slice]:
    """Pieces of at most ``micro_batch`` of ``n`` items (0, or >= n: one piece, the whole)."""
    if micro_batch <= 0 or micro_batch >= n:
        return [slice(0, n)]
    return [slice(i, min(i + micro_batch, n)) for i in range(0, n, micro_batch)]


class MetricsLog:
    """Rank 0 appends one JSON line per record to RUN_DIR/metrics.jsonl."""

    def __init__(self, path, comm: Comm, stage: str) -> None:
        self.path, self.comm, self.stage = path, comm, stage

    def write(self, **record) -> None:
        if self.comm.is_root:
            append_jsonl(self.path, {"stage": self.stage, "time": round(time.time(), 3), **record})


def train_classifier(model: torch.nn.Module, train_ds, comm: Comm, *, epochs: int, lr: float,
                     weight_decay: float, batch_per_rank: int, task: str,
                     warmup_epochs: int = 0, milestones: tuple[float, ...] | None = None,
                     on_epoch: Callable[[int, float], None] | None = None,
                     defense: Callable | None = None, seed: int = 0, optimizer: str = "adam",
                     momentum: float = 0.9,
                     augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                     micro_batch: int = 0) -> None:
    """Data-parallel supervised training (gradients averaged by the communicator).

    ``optimizer``: ``adam`` (MedMNIST's protocol) or ``sgd`` (momentum ``momentum``, the UE
    protocol's). ``milestones`` (fractions of training) switch to step decay x0.1 instead of
    cosine. ``augment(images, generator)`` runs on every batch first, with a generator seeded
    from (seed, rank, epoch) (hpc_uc.augment). ``defense(images, labels, task, model,
    generator) -> (images, loss_fn)`` transforms each batch after it (hpc_uc.defenses); its
    randomness comes from (seed, rank). ``micro_batch`` > 0: at most that many images per
    forward; gradients accumulate over the pieces of a rank's batch and cross the ranks once
    per optimizer step. The step equals the whole batch's except through batch statistics
    (BatchNorm normalises each piece by its own statistics, as in any gradient accumulation)
    and defenses that mix images (mixup/cutmix pair within a piece).
    """
    from .augment import epoch_generator

    model.to(comm.device)
    comm.broadcast_model(model)
    if optimizer == "sgd":
        base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        base = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    pieces = micro_slices(batch_per_rank, micro_batch)
    opt = comm.distributed_optimizer(base, model, backward_passes=len(pieces))
    steps_per_epoch = max(1, len(train_ds) // batch_per_rank)
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed * 1000 + comm.rank)
    step = 0
    for epoch in range(epochs):
        model.train()
        loss_sum = torch.zeros(2, dtype=torch.float64, device=comm.device)
        batches = train_ds.batches(batch_per_rank, epoch=epoch, shuffle=True, drop_last=True)
        aug_gen = epoch_generator(seed, comm.rank, epoch)
        for images, labels, _ in progress(batches, comm, f"epoch {epoch + 1}/{epochs}", steps_per_epoch):
            if augment is not None:
                images = augment(images, aug_gen)
            if milestones is not None:
                decay = sum(step >= m * total for m in milestones)
                set_lr(opt, lr * 0.1 ** decay)
            else:
                set_lr(opt, lr_at(step, total, warmup, lr))
            opt.zero_grad()
            for part in pieces:
                loss = _piece_loss(model, images[part], labels[part], task, defense, gen) * (
                    (part.stop - part.start) / len(images))
                loss.backward()
                loss_sum[0] += loss.detach().double() * len(images)  # on the device: no sync per step
            opt.step()
            loss_sum[1] += len(images)
            step += 1
        loss_sum = comm.allreduce(loss_sum, op="sum", name="classifier.loss").cpu()
        if on_epoch is not None:
            on_epoch(epoch, float(loss_sum[0] / max(1.0, loss_sum[1])))


def _piece_loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, task: str,
                defense: Callable | None, gen: torch.Generator) -> torch.Tensor:
    """The mean training loss of one (micro-)batch, after the defense if there is one."""
    if defense is not None:
        images, loss_fn = defense(images, labels, task, model, gen)
    else:
        loss_fn = lambda logits: classification_loss(logits, labels, task)  # noqa: E731
    out = model(images)
    return loss_fn(out[0] if isinstance(out, tuple) else out)


@torch.no_grad()
def predict(model: torch.nn.Module, full_ds, comm: Comm,
            batch_per_rank: int = 256) -> tuple[np.ndarray, np.ndarray] | None:
    """Scores and labels of every sample (each seen once across ranks), ordered by index.

    Returns (scores N×C, labels N×L) on rank 0, None elsewhere.
    """
    model.eval()
    scores, labels, index = [], [], []
    for images, y, idx in full_ds.batches(batch_per_rank, epoch=0, shuffle=False, drop_last=False):
        out = model(images)
        out = out[0] if isinstance(out, tuple) else out
        scores.append(out.float().cpu())
        labels.append(y.cpu())
        index.append(idx.cpu())
    local = (torch.cat(scores).numpy() if scores else np.zeros((0, 0), np.float32),
             torch.cat(labels).numpy() if labels else np.zeros((0, 1), np.int64),
             torch.cat(index).numpy() if index else np.zeros(0, np.int64))
    gathered = comm.gather_rows(local[:2], local[2])
    if gathered is None:
        return None
    (s, y), _ = gathered
    return s, y


def accuracy(scores: np.ndarray, labels: np.ndarray, task: str) -> float:
    """Top-1 accuracy (single label) or per-label accuracy at logit 0 (multi-label)."""
    if is_multilabel(task):
        return float(((scores > 0).astype(np.int64) == labels).mean())
    return float((scores.argmax(1) == labels[:, 0]).mean())
