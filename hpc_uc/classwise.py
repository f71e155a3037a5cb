"""Method ``classwise``: random class-wise noise within the budget.

The sanity baseline every unlearnable-examples paper reports (Huang et al., ICLR 2021, the
"class-wise" random noise): each class c gets one fixed perturbation δ_c drawn from the seed
— uniform in [-ε, ε] per value for ``norm: linf``, a Gaussian scaled to L2 norm ε for ``l2``
— and every training image of class c gets δ_c. No surrogate and no training: a shortcut a
victim can learn instead of the images, if the noise is easier than the task. Same export,
verify, evaluate and report as UC; δ (and the seed that regenerates it) stays owner-only.
"""
from __future__ import annotations

import torch

from .comm import Comm
from .generator import save_perturbations
from .models import tile_pattern
from .rundir import RunDir
from .shards import read_manifest


def class_noise(num_classes: int, channels: int, size: int, epsilon: float, norm: str, seed: int,
                tile: int = 0) -> torch.Tensor:
    """num_classes x C x H x W perturbations within the budget, from ``seed`` alone
    (``tile`` > 0: one tile x tile pattern per class, repeated over the image)."""
    gen = torch.Generator().manual_seed(seed)
    if norm == "linf":
        return tile_pattern((torch.rand(num_classes, channels, size, size, generator=gen) * 2 - 1) * epsilon, tile)
    noise = tile_pattern(torch.randn(num_classes, channels, size, size, generator=gen), tile)
    return noise * (epsilon / noise.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)


def run_classwise(cfg: dict, comm: Comm, run: RunDir) -> dict:
    """Draw δ per class; rank 0 writes RUN_DIR/perturbations.h5 (one row per class)."""
    manifest = read_manifest(cfg["data_dir"])
    delta = class_noise(manifest["num_classes"], manifest["channels"], manifest["image_size"],
                        cfg["epsilon"], cfg["norm"], cfg["seed"], cfg["tile"])
    if comm.is_root:
        save_perturbations(run.perturbations, delta, cfg)
        print(f"train: class-wise noise for {manifest['num_classes']} classes (seed {cfg['seed']})", flush=True)
    comm.barrier()
    return {"classes": manifest["num_classes"]}
