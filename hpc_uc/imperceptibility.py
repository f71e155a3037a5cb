"""How visible a protection is: PSNR, SSIM and the measured size of the perturbation.

All four numbers compare the stored uint8 images (N×H×W×C) in [0, 1] units (value / 255):

* ``psnr_db``: torchmetrics PSNR with data_range 1 over **all pixels of the set**,
  10·log10(1 / MSE); None when the sets are identical (infinite PSNR is not JSON).
* ``ssim``: SSIM as torchmetrics computes it (Gaussian 11×11, σ 1.5, data_range 1, reflect
  padding, mean over each image's whole map), mean over images -- here with the Gaussian
  applied as two 1-D float32 passes (:func:`ssim_per_image`): torchmetrics' float64 grouped
  11×11 convolution needs gigabytes per batch at 224 px and is several times slower.
* ``linf``: largest absolute pixel difference over the set.
* ``l2``: mean over images of the L2 norm of the whole-image difference (C·H·W values).

Each rank measures its own range of the training split and only six sums cross the ranks
(:func:`parallel_imperceptibility`), equal to :func:`imperceptibility` of the whole set; images
go through SSIM in batches of a bounded number of pixels, so memory stays bounded at any size.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .reader import chunk_rows

# Pixel values per SSIM batch: 20 images at 224 px RGB. Each value costs ~150 bytes of working
# memory in one batch (float64 copies and differences, five padded float32 maps blurred in two
# passes, SSIM's intermediates): ~160 MiB. 1 << 22 (83 images) peaked ranks at 2.3-2.7 GB.
BATCH_VALUES = 1 << 20


def _batch(images: np.ndarray, start: int, stop: int) -> torch.Tensor:
    """uint8 N×H×W×C slice → float64 N×C×H×W in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images[start:stop])).permute(0, 3, 1, 2).double() / 255.0


@functools.lru_cache(maxsize=None)
def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalised 1-D Gaussian window (made once; callers do not modify it)."""
    dist = torch.arange((1 - size) / 2, (1 + size) / 2, 1, dtype=torch.float64)
    g = torch.exp(-(dist / sigma) ** 2 / 2)
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian of a padded N×C×(H+k-1)×(W+k-1) tensor -> N×C×H×W (valid region)."""
    c, k = x.shape[1], len(g)
    along_w = g.to(x.dtype).view(1, 1, 1, k).repeat(c, 1, 1, 1)
    return F.conv2d(F.conv2d(x, along_w, groups=c), along_w.transpose(2, 3), groups=c)


def ssim_per_image(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM of each image pair (N×C×H×W), torchmetrics' definition and defaults, filtered in
    float32 (within 1e-8 of torchmetrics' float64) and averaged in float64."""
    g = _gaussian()
    pad = (len(g) - 1) // 2
    xp, yp = (F.pad(t.float(), (pad, pad, pad, pad), mode="reflect") for t in (x, y))
    mu_x, mu_y, xx, yy, xy = _blur(torch.cat([xp, yp, xp * xp, yp * yp, xp * yp]), g).split(len(x))
    var_x, var_y = (xx - mu_x ** 2).clamp_min(0), (yy - mu_y ** 2).clamp_min(0)
    cov = xy - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim.flatten(1).double().mean(1)


def _check(clean: np.ndarray, protected: np.ndarray) -> None:
    if clean.shape != protected.shape or clean.ndim != 4:
        raise UserError(f"need two N×H×W×C image sets of one shape, got {clean.shape} and {protected.shape}")
    if clean.dtype != np.uint8 or protected.dtype != np.uint8:
        raise UserError(f"images must be uint8, got {clean.dtype} and {protected.dtype}")


def imperceptibility_sums(clean: np.ndarray, protected: np.ndarray, batch_values: int = BATCH_VALUES) -> np.ndarray:
    """[squared error, pixel values, SSIM, images, L2, L-inf] of one part of a set (sums, and
    a maximum for L-inf): what ranks combine."""
    _check(clean, protected)
    sums = np.zeros(6)
    batch = chunk_rows(batch_values, int(np.prod(clean.shape[1:])), 1)
    for start in range(0, len(clean), batch):
        x, y = _batch(clean, start, start + batch), _batch(protected, start, start + batch)
        diff = (y - x).flatten(1)
        ssim = ssim_per_image(y, x)
        sums += [float((diff ** 2).sum()), diff.numel(), float(ssim.sum()), len(x),
                 float(diff.norm(dim=1).sum()), 0.0]
        sums[5] = max(sums[5], float(diff.abs().max()))
    return sums


def combine(parts: list[np.ndarray]) -> dict[str, float | None]:
    """{"psnr_db", "ssim", "linf", "l2"} from the sums of every part."""
    total = np.sum(parts, axis=0)
    if total[3] == 0:
        raise UserError("no images to compare")
    mse = total[0] / total[1]
    psnr = 10 * math.log10(1.0 / mse) if mse > 0 else None
    return {"psnr_db": psnr, "ssim": total[2] / total[3], "linf": float(max(p[5] for p in parts)),
            "l2": total[4] / total[3]}


def imperceptibility(clean: np.ndarray, protected: np.ndarray,
                     batch_values: int = BATCH_VALUES) -> dict[str, float | None]:
    """{"psnr_db", "ssim", "linf", "l2"} of ``protected`` against ``clean``, one process."""
    if len(clean) == 0:
        raise UserError("need two non-empty image sets")
    return combine([imperceptibility_sums(clean, protected, batch_values)])


def parallel_imperceptibility(clean_dir, protected_dir, comm, split: str = "train",
                              batch_values: int = BATCH_VALUES) -> dict[str, float | None]:
    """The same four numbers, each rank reading only its own range of both shard sets, one
    SSIM batch of each at a time (collective; every rank gets the result)."""
    from .reader import ShardedDataset

    clean = ShardedDataset(clean_dir, split, comm, full=True, cache="never")
    protected = ShardedDataset(protected_dir, split, comm, full=True, cache="never")
    rows = chunk_rows(batch_values, clean.image_size ** 2 * clean.channels, 1)
    sums, ok = np.zeros(6), len(clean) == len(protected)
    for (x, _, x_index), (y, _, y_index) in zip(clean.local_chunks(rows), protected.local_chunks(rows)):
        ok = ok and np.array_equal(x_index, y_index)
        if not ok:
            break
        part = imperceptibility_sums(x, y, batch_values)
        sums[:5] += part[:5]
        sums[5] = max(sums[5], part[5])
    sums = sums if ok else None
    parts = comm.allgather(sums)
    if any(p is None for p in parts):
        raise UserError(f"{protected_dir}: its {split} samples are not in the order of {clean_dir}'s "
                        f"(was it exported from other data?)")
    return combine(parts)
