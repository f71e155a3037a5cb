"""Stage `surrogate`: the feature extractor UC clusters and attacks.

Weights come from `surrogate.weights`: `pretrain` (default; supervised training on the clean
training split, data-parallel through the communicator, with `surrogate.optimizer` adam or sgd), `imagenet` (torchvision's download)
or a PATH to a torchvision state dict. Its clean validation accuracy is measured and
reported: a weak surrogate gives clusters, and perturbations, that protect nothing.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from .atomic import OWNER_ONLY, load_torch, save_torch, write_json
from .comm import Comm
from .augment import victim_crop_flip
from .config import check_world, scaled_lr
from .errors import UserError
from .models import (SMALL_IMAGE_MAX, ResNetWithFeature, fold_batchnorm, imagenet_weights,
                     load_surrogate_weights)
from .reader import ShardedDataset
from .rundir import RunDir
from .training import MetricsLog, accuracy, predict, train_classifier


def build_surrogate(cfg: dict, manifest: dict) -> ResNetWithFeature:
    """An untrained ResNetWithFeature shaped for the dataset in ``manifest``."""
    s = cfg["surrogate"]
    size, input_size = manifest["image_size"], s["input_size"]
    small = s["stem"] == "small" or (s["stem"] == "auto" and input_size is None and size <= SMALL_IMAGE_MAX)
    return ResNetWithFeature(s["arch"], manifest["num_classes"], manifest["channels"],
                             small_stem=small, input_size=input_size)


def snapshot_epochs(epochs: int, snapshots: int) -> tuple[int, ...]:
    """The ``snapshots`` epochs (1-based, before the last) at which surrogate training keeps its
    weights, evenly spaced: 30 epochs, 4 snapshots -> 6, 12, 18, 24."""
    return tuple(round(i * epochs / (snapshots + 1)) for i in range(1, snapshots + 1))


def cpu_state(model: torch.nn.Module) -> dict:
    """A detached CPU copy of ``model``'s state dict."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def frozen(model: ResNetWithFeature, device: torch.device) -> ResNetWithFeature:
    """Fixed for UC: eval mode, no parameter gradients, BatchNorm folded into the convolutions,
    channels-last memory layout (same outputs, about 2x the speed)."""
    model = fold_batchnorm(model.eval()).requires_grad_(False)
    return model.to(device, memory_format=torch.channels_last)


def check_weights_file(cfg: dict, manifest: dict) -> None:
    """Fail early (before heavy work) when `surrogate.weights` is a path that won't load."""
    weights = cfg["surrogate"]["weights"]
    if weights in ("pretrain", "imagenet"):
        return
    if not Path(weights).is_file():
        raise UserError(f"surrogate.weights: {weights} is not a file (or use 'pretrain' / 'imagenet')")
    load_surrogate_weights(build_surrogate(cfg, manifest), weights)


def load_frozen_surrogate(cfg: dict, run: RunDir, manifest: dict, device: torch.device) -> ResNetWithFeature:
    """The trained surrogate, :func:`frozen`."""
    if not run.surrogate.is_file():
        raise UserError(f"{run.surrogate} is missing: run `hpc-uc surrogate` first")
    model = build_surrogate(cfg, manifest)
    model.load_state_dict(load_torch(run.surrogate))
    return frozen(model, device)


def load_trajectory(cfg: dict, run: RunDir, manifest: dict, device: torch.device,
                    snapshots: bool = True) -> list[ResNetWithFeature]:
    """The surrogate's kept earlier epochs (``surrogate.snapshots``) in training order, then the
    trained surrogate, each :func:`frozen`; the trained surrogate alone without snapshots (or
    ``snapshots`` False)."""
    models = []
    if snapshots and cfg["surrogate"]["snapshots"]:
        if not run.surrogate_snapshots.is_file():
            raise UserError(f"{run.surrogate_snapshots} is missing: run `hpc-uc surrogate` again")
        for snap in load_torch(run.surrogate_snapshots):
            model = build_surrogate(cfg, manifest)
            model.load_state_dict(snap["state"])
            models.append(frozen(model, device))
    return models + [load_frozen_surrogate(cfg, run, manifest, device)]


def run_surrogate(cfg: dict, comm: Comm, run: RunDir) -> dict:
    """Obtain the surrogate's weights, measure it, save RUN_DIR/surrogate.pt (rank 0)."""
    s = cfg["surrogate"]
    train = ShardedDataset(cfg["data_dir"], "train", comm, seed=cfg["seed"], cache=cfg["cache"])
    manifest = train.manifest
    torch.manual_seed(cfg["seed"])
    model = build_surrogate(cfg, manifest)
    info: dict = {"weights": s["weights"], "arch": s["arch"]}
    if s["weights"] == "pretrain":
        per_rank = check_world(cfg, comm.size, "surrogate.batch_size")
        log = MetricsLog(run.metrics, comm, "surrogate")
        keep = snapshot_epochs(s["epochs"], s["snapshots"])
        snapshots: list[dict] = []

        def on_epoch(epoch: int, loss: float) -> None:
            log.write(epoch=epoch + 1, loss=loss)
            if comm.is_root:
                print(f"surrogate: epoch {epoch + 1}/{s['epochs']} loss {loss:.4f}", flush=True)
                if epoch + 1 in keep:  # the ranks hold the same weights: rank 0 keeps them
                    snapshots.append({"epoch": epoch + 1, "state": cpu_state(model)})

        train_classifier(model, train, comm, epochs=s["epochs"],
                         lr=scaled_lr(cfg, s["lr"], s["batch_size"]), weight_decay=s["weight_decay"],
                         batch_per_rank=per_rank, task=manifest["task"],
                         warmup_epochs=cfg["warmup_epochs"], on_epoch=on_epoch, micro_batch=s["micro_batch"],
                         seed=cfg["seed"], augment=victim_crop_flip(cfg) if s["augment"] else None,
                         optimizer=s["optimizer"])
        info["epochs"] = s["epochs"]
        if keep:
            info["snapshot_epochs"] = list(keep)
            if comm.is_root:
                save_torch(run.surrogate_snapshots, snapshots, OWNER_ONLY)
    else:
        state = imagenet_weights(s["arch"]) if s["weights"] == "imagenet" else s["weights"]
        report = load_surrogate_weights(model, state)
        info["load_report"] = str(report)
    if comm.is_root and not s["snapshots"]:  # none kept by an earlier run of another config
        run.surrogate_snapshots.unlink(missing_ok=True)
    model.to(comm.device)
    val_split = "val" if "val" in manifest["splits"] else "test"
    val = ShardedDataset(cfg["data_dir"], val_split, comm, seed=cfg["seed"], cache=cfg["cache"], full=True)
    result = predict(model, val, comm)
    if comm.is_root:
        scores, labels = result
        info["val_split"] = val_split
        info["val_acc"] = accuracy(scores, labels, manifest["task"]) if s["weights"] != "imagenet" else None
        if info["val_acc"] is not None:
            print(f"surrogate: clean {val_split} accuracy {info['val_acc']:.3f}", flush=True)
            if info["val_acc"] < s["min_val_acc"]:
                print(f"WARNING: the surrogate is weak ({val_split} accuracy {info['val_acc']:.3f} < "
                      f"{s['min_val_acc']}): its clusters and perturbations may protect nothing. "
                      "Train it longer (surrogate.epochs) or give better weights.", file=sys.stderr, flush=True)
        save_torch(run.surrogate, cpu_state(model), OWNER_ONLY)
        write_json(run.surrogate_info, info)
    comm.barrier()
    return info
