"""Batched, seeded training augmentation of the UE victim protocol (and of UC's EOT loss).

Images <= 64 px: random crop with ``padding`` px of zero padding, then a horizontal flip with
probability 1/2 (the CIFAR recipe of the Unlearnable Examples papers). Larger images:
RandomResizedCrop (scale 0.08-1, aspect 3/4-4/3, bilinear) and the same flip. Every random
number comes from a CPU ``torch.Generator``, so a batch augments identically on any device;
the pixels are moved on the device, the whole batch at once.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .models import SMALL_IMAGE_MAX


def epoch_generator(seed: int, rank: int, epoch: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, rank, epoch)."""
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def random_flip(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(len(images), generator=gen) < 0.5).to(images.device)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def random_crop(images: torch.Tensor, gen: torch.Generator, padding: int) -> torch.Tensor:
    """Each image shifted by its own offset inside a zero border of ``padding`` px."""
    if padding <= 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(images.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(images.device)
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
    aspect = log_r.exp()
    sw = (area * aspect).sqrt().clamp(max=1.0)   # crop width / image width
    sh = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sw)  # centre in [-1, 1] coordinates
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sh)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw, cx, sh, cy
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def crop_flip(images: torch.Tensor, gen: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The UE protocol's augmentation of one [0, 1] batch (N x C x H x W)."""
    if images.shape[-1] <= SMALL_IMAGE_MAX:
        images = random_crop(images, gen, padding)
    else:
        images = random_resized_crop(images, gen)
    return random_flip(images, gen)
