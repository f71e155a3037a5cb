"""Method ``ar``: autoregressive perturbations (Sandoval-Segura et al., "Autoregressive
Perturbations for Data Poisoning", NeurIPS 2022).

Each class c gets a fixed random AR process: per channel, a 3 x 3 window whose bottom-right
entry is the pixel being generated and whose other 8 coefficients are Gaussian, normalised to
sum to 1, redrawn until the process stays bounded on an image of this size. A perturbation is
made by starting from Gaussian values and filling every pixel outside the first two rows and
columns, in raster order, with the AR combination of its 8 already-generated neighbours; it is
generated CROP pixels larger than the image and its first CROP rows and columns are dropped
(the random start), then scaled into the budget (max |δ| = ε for ``linf``, ||δ||_2 = ε for
``l2``). As in the paper every training image gets a fresh draw from its class's process: its
start comes from (seed, sample id), so δ is deterministic and the same on any number of ranks.
Model-free: no surrogate, no training. What regenerates δ (the coefficients, the seed) stays
owner-only in RUN_DIR/perturbations.h5.
"""
from __future__ import annotations

import numpy as np
import torch

from .comm import Comm
from .errors import UserError
from .generator import save_perturbations
from .rundir import RunDir
from .shards import read_manifest

WINDOW = 3        # the AR window is WINDOW x WINDOW; its bottom-right entry is the pixel generated
CROP = 4          # generated this many pixels larger, then the first CROP rows and columns dropped
GROWTH_BOUND = 1.0  # a process is kept when a probe's RMS stays at most this (the start's is 1)
MAX_DRAWS = 10_000  # coefficient draws per channel before giving up (about 1 in 5 is kept)
CHUNK = 1024      # samples generated at a time (bounds the float64 working memory)

# the streams of randomness drawn from the seed (numpy SeedSequence entropy: [seed, stream, ...])
_COEFFICIENTS, _SAMPLE, _EXEMPLAR = 1, 2, 3

# (row, column) of each coefficient within the window, bottom-right (the generated pixel) left out
_OFFSETS = [(r, c) for r in range(WINDOW) for c in range(WINDOW)][:-1]


def ar_fill(coefficients: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Run the AR recurrence over ``start`` (N x C x H x W) with per-sample ``coefficients``
    (N x C x WINDOW x WINDOW; the bottom-right entry is ignored): every pixel outside the first
    WINDOW-1 rows and columns becomes the coefficient-weighted sum of the window above and to
    its left. Returns a new float64 array; the border keeps ``start``'s values.

    Every neighbour of pixel (i, j) has a smaller i + j, so each anti-diagonal is filled at once
    from the ones before it — the same values as the paper's pixel-by-pixel raster order."""
    x = np.array(start, dtype=np.float64)
    n, channels, height, width = x.shape
    b = np.asarray(coefficients, dtype=np.float64).reshape(n, channels, WINDOW * WINDOW)
    edge = WINDOW - 1
    for diagonal in range(2 * edge, height + width - 1):
        rows = np.arange(max(edge, diagonal - width + 1), min(height - 1, diagonal - edge) + 1)
        cols = diagonal - rows
        value = np.zeros((n, channels, rows.size))
        for k, (r, c) in enumerate(_OFFSETS):
            value += b[..., k, None] * x[:, :, rows - edge + r, cols - edge + c]
        x[:, :, rows, cols] = value
    return x


def ar_residual(coefficients: np.ndarray, x: np.ndarray) -> np.ndarray:
    """How far ``x`` (N x C x H x W) is from obeying its AR process: at every pixel with a full
    window, the coefficient-weighted sum of its neighbours minus the pixel (N x C x H-2 x W-2;
    zero wherever the recurrence holds, before or after scaling — it is linear)."""
    x = np.asarray(x, dtype=np.float64)
    b = np.asarray(coefficients, dtype=np.float64)
    edge = WINDOW - 1
    height, width = x.shape[2] - edge, x.shape[3] - edge
    out = -x[:, :, edge:, edge:].copy()
    for r, c in _OFFSETS:
        out += b[:, :, r, c, None, None] * x[:, :, r:r + height, c:c + width]
    return out


def ar_coefficients(num_classes: int, channels: int, size: int, seed: int) -> np.ndarray:
    """num_classes x C x WINDOW x WINDOW coefficients from ``seed`` alone: per class and
    channel, 8 Gaussian values normalised to sum to 1 (bottom-right 0), redrawn until a probe
    generated at this image size stays bounded (RMS at most GROWTH_BOUND, from a start of RMS 1)."""
    rng = np.random.default_rng([seed, _COEFFICIENTS])
    out = np.zeros((num_classes, channels, WINDOW, WINDOW))
    for cls in range(num_classes):
        for ch in range(channels):
            for _ in range(MAX_DRAWS):
                b = rng.standard_normal((WINDOW, WINDOW))
                b[-1, -1] = 0.0
                b /= b.sum()
                with np.errstate(over="ignore", invalid="ignore"):  # an unstable probe may overflow
                    probe = ar_fill(b[None, None], rng.standard_normal((1, 1, size + CROP, size + CROP)))
                    rms = float(np.sqrt(np.mean(probe[..., CROP:, CROP:] ** 2)))
                if np.isfinite(rms) and rms <= GROWTH_BOUND:
                    out[cls, ch] = b
                    break
            else:
                raise UserError(f"method=ar: no bounded AR process in {MAX_DRAWS} draws for class {cls} "
                                f"at image size {size}")
    return out


def scale_to_budget(x: np.ndarray, epsilon: float, norm: str) -> np.ndarray:
    """Each sample of ``x`` (N x ...) scaled to max |δ| = ε (``linf``) or ||δ||_2 = ε (``l2``)."""
    flat = x.reshape(len(x), -1)
    size = np.abs(flat).max(axis=1) if norm == "linf" else np.linalg.norm(flat, axis=1)
    if not np.all(np.isfinite(size) & (size > 0)):
        raise UserError("method=ar: a generated perturbation is zero or not finite; try another seed")
    return x * (epsilon / size).reshape(-1, *([1] * (x.ndim - 1)))


def ar_perturbations(coefficients: np.ndarray, labels: np.ndarray, keys: np.ndarray, size: int,
                     epsilon: float, norm: str, seed: int, stream: int = _SAMPLE) -> np.ndarray:
    """float32 N x C x size x size perturbations within the budget: sample n is a fresh draw
    from class ``labels[n]``'s process, its start from (seed, stream, ``keys[n]``) alone."""
    labels, keys = np.asarray(labels, np.int64).reshape(-1), np.asarray(keys, np.int64).reshape(-1)
    channels, padded = coefficients.shape[1], size + CROP
    out = np.empty((len(labels), channels, size, size), np.float32)
    for lo in range(0, len(labels), CHUNK):
        hi = min(lo + CHUNK, len(labels))
        start = np.stack([np.random.default_rng([seed, stream, int(k)]).standard_normal((channels, padded, padded))
                          for k in keys[lo:hi]])
        filled = ar_fill(coefficients[labels[lo:hi]], start)[..., CROP:, CROP:]
        out[lo:hi] = scale_to_budget(filled, epsilon, norm)
    return out


def load_coefficients(path) -> np.ndarray:
    """The AR coefficients the train stage wrote (K x C x WINDOW x WINDOW)."""
    import h5py

    with h5py.File(path, "r") as f:
        if "ar_coefficients" not in f:
            raise UserError(f"{path} holds no AR coefficients (not made by method=ar): rerun `hpc-uc train`")
        return f["ar_coefficients"][()]


def run_ar(cfg: dict, comm: Comm, run: RunDir) -> dict:
    """Draw each class's AR process; rank 0 writes RUN_DIR/perturbations.h5: the coefficients
    (what export draws each image's δ from) and, as ``delta``, one example draw per class."""
    manifest = read_manifest(cfg["data_dir"])
    k, size = manifest["num_classes"], manifest["image_size"]
    coefficients = ar_coefficients(k, manifest["channels"], size, cfg["seed"])
    if comm.is_root:
        classes = np.arange(k)
        examples = ar_perturbations(coefficients, classes, classes, size, cfg["epsilon"], cfg["norm"],
                                    cfg["seed"], stream=_EXEMPLAR)
        save_perturbations(run.perturbations, torch.from_numpy(examples), cfg,
                           extra={"ar_coefficients": coefficients})
        print(f"train: AR processes for {k} classes (seed {cfg['seed']})", flush=True)
    comm.barrier()
    return {"classes": k}
