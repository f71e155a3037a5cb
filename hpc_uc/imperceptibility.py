"""How visible a protection is: PSNR, SSIM and the measured size of the perturbation.

All four numbers compare the stored uint8 images (N×H×W×C) in [0, 1] units (value / 255):

* ``psnr_db``: torchmetrics PSNR with data_range 1 over **all pixels of the set**,
  10·log10(1 / MSE); None when the sets are identical (infinite PSNR is not JSON).
* ``ssim``: torchmetrics SSIM (Gaussian 11×11, σ 1.5, data_range 1), mean over images.
* ``linf``: largest absolute pixel difference over the set.
* ``l2``: mean over images of the L2 norm of the whole-image difference (C·H·W values).

Images are processed ``batch_size`` at a time so memory stays bounded.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from .errors import UserError


def _batch(images: np.ndarray, start: int, stop: int) -> torch.Tensor:
    """uint8 N×H×W×C slice → float64 N×C×H×W in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images[start:stop])).permute(0, 3, 1, 2).double() / 255.0


def imperceptibility(clean: np.ndarray, protected: np.ndarray,
                     batch_size: int = 256) -> dict[str, float | None]:
    """{"psnr_db", "ssim", "linf", "l2"} of ``protected`` against ``clean`` (see module doc)."""
    if clean.shape != protected.shape or clean.ndim != 4 or len(clean) == 0:
        raise UserError(f"need two non-empty N×H×W×C image sets of one shape, "
                        f"got {clean.shape} and {protected.shape}")
    if clean.dtype != np.uint8 or protected.dtype != np.uint8:
        raise UserError(f"images must be uint8, got {clean.dtype} and {protected.dtype}")
    # Computed by one process on the whole set: no torch.distributed sync (it would wait for
    # ranks that never call it).
    psnr = PeakSignalNoiseRatio(data_range=1.0, sync_on_compute=False).double()
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False).double()
    linf, l2_sum = 0.0, 0.0
    for start in range(0, len(clean), batch_size):
        x = _batch(clean, start, start + batch_size)
        y = _batch(protected, start, start + batch_size)
        psnr.update(y, x)
        ssim.update(y, x)
        diff = (y - x).flatten(1)
        linf = max(linf, float(diff.abs().max()))
        l2_sum += float(diff.norm(dim=1).sum())
    psnr_db = float(psnr.compute())
    return {"psnr_db": psnr_db if math.isfinite(psnr_db) else None,
            "ssim": float(ssim.compute()),
            "linf": linf,
            "l2": l2_sum / len(clean)}
