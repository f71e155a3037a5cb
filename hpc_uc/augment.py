"""Batched, seeded training augmentation of the UE victim protocol (and of UC's EOT loss).

Images <= 64 px: random crop with ``padding`` px of zero padding, then a horizontal flip with
probability 1/2 (the CIFAR recipe of the Unlearnable Examples papers). Larger images:
RandomResizedCrop (scale 0.08-1, aspect 3/4-4/3, bilinear) and the same flip. Every random
number comes from a CPU ``torch.Generator``, so a batch augments identically on any device;
the pixels are moved on the device, the whole batch at once.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .models import SMALL_IMAGE_MAX


def epoch_generator(seed: int, rank: int, epoch: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, rank, epoch)."""
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def random_flip(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return flipped_where(images, torch.rand(len(images), generator=gen) < 0.5)


def flipped_where(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Image i flipped horizontally where ``flip[i]``."""
    return torch.where(flip.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)


def random_crop(images: torch.Tensor, gen: torch.Generator, padding: int) -> torch.Tensor:
    """Each image shifted by its own offset inside a zero border of ``padding`` px."""
    if padding <= 0:
        return images
    n = len(images)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    return shifted_crop(images, dy, dx, padding)


def shifted_crop(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, padding: int) -> torch.Tensor:
    """Image i's window at offset (``dy[i]``, ``dx[i]``) in 0..2 * ``padding`` of its zero-padded copy."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy, dx = dy.to(images.device), dx.to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chan = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_resized_crop(images: torch.Tensor, gen: torch.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop drawn per image, resampled to the same size (bilinear)."""
    n = len(images)
    area = torch.empty(n).uniform_(*scale, generator=gen)
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    return resized_crop(images, area, log_r.exp(), torch.rand(n, generator=gen), torch.rand(n, generator=gen))


def resized_crop(images: torch.Tensor, area: torch.Tensor, aspect: torch.Tensor,
                 ux: torch.Tensor, uy: torch.Tensor) -> torch.Tensor:
    """Image i's crop of ``area[i]`` of the image at ``aspect[i]``, its centre placed by
    ``ux[i]``, ``uy[i]`` in [0, 1), resampled to the same size (bilinear)."""
    n = len(images)
    sw = (area * aspect).sqrt().clamp(max=1.0)   # crop width / image width
    sh = (area / aspect).sqrt().clamp(max=1.0)
    cx = (ux * 2 - 1) * (1 - sw)  # centre in [-1, 1] coordinates
    cy = (uy * 2 - 1) * (1 - sh)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw, cx, sh, cy
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def victim_crop_flip(cfg: dict) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """The ue victim's :func:`crop_flip` at ``victim.ue.crop_padding``, as training's ``augment``."""
    return functools.partial(crop_flip, padding=cfg["victim"]["ue"]["crop_padding"])


def crop_flip(images: torch.Tensor, gen: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The UE protocol's augmentation of one [0, 1] batch (N x C x H x W)."""
    if images.shape[-1] <= SMALL_IMAGE_MAX:
        images = random_crop(images, gen, padding)
    else:
        images = random_resized_crop(images, gen)
    return random_flip(images, gen)


_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def keyed_uniforms(keys: np.ndarray, count: int) -> torch.Tensor:
    """``count`` uniforms in [0, 1) per key (N x count), a pure function of each uint64 key
    (splitmix64), so that an image's draws do not depend on the batch it is in."""
    with np.errstate(over="ignore"):
        out = np.empty((len(keys), count))
        state = keys.astype(np.uint64)
        for j in range(count):
            state = state + np.uint64(_MIX[0])
            z = (state ^ (state >> np.uint64(30))) * np.uint64(_MIX[1])
            z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX[2])
            out[:, j] = (z ^ (z >> np.uint64(31))) >> np.uint64(11)
    return torch.from_numpy(out * 2.0**-53)


def augment_keys(seed: int, ids: np.ndarray, step: int) -> np.ndarray:
    """One key per (``seed``, sample id, ``step``): the draws of image ``ids[i]`` at ``step``."""
    with np.errstate(over="ignore"):
        return (np.asarray(ids, dtype=np.uint64) * np.uint64(_MIX[1])
                ^ np.uint64(seed) * np.uint64(_MIX[2]) ^ np.uint64(step) * np.uint64(_MIX[0]))


def keyed_crop_flip(images: torch.Tensor, keys: np.ndarray, padding: int = 4,
                    scale: tuple[float, float] = (0.08, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """:func:`crop_flip`'s augmentation with image i's draws from ``keys[i]`` alone
    (:func:`augment_keys`), the same on any number of ranks and in any batch."""
    u = keyed_uniforms(keys, 5)
    if images.shape[-1] <= SMALL_IMAGE_MAX:
        span = 2 * padding + 1
        images = shifted_crop(images, (u[:, 0] * span).long(), (u[:, 1] * span).long(), padding)
    else:
        area = scale[0] + u[:, 0] * (scale[1] - scale[0])
        aspect = (math.log(ratio[0]) + u[:, 1] * (math.log(ratio[1]) - math.log(ratio[0]))).exp()
        images = resized_crop(images, area.float(), aspect.float(), u[:, 2].float(), u[:, 3].float())
    return flipped_where(images, u[:, 4] < 0.5)
