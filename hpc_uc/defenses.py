"""What an attacker tries in order to learn from protected data anyway: batch transforms
applied while a victim trains on the protected split.

Every defense is called the same way by the training loop::

    images, loss_fn = defense(images, labels, task, model, gen)
    loss = loss_fn(model(images))

``images`` is a float N×C×H×W batch in [0, 1], ``labels`` N×L int64 on the same device,
``task`` MedMNIST's task string, ``model`` the victim being trained, ``gen`` a CPU
``torch.Generator`` (all randomness comes from it). ``loss_fn(logits)`` is the training loss:
plain cross-entropy / BCE (:func:`hpc_uc.training.classification_loss`) unless the defense
mixes targets.

Names for :func:`build_defense`: ``none``, ``jpeg<Q>`` (quality 1-100, e.g. jpeg10, jpeg50),
``grayscale``, ``cutmix``, ``mixup`` (Beta(1, 1) mixing), ``pgd`` (config keys
``pgd_epsilon`` = 8/255, ``pgd_steps`` = 5, ``pgd_step_size`` = 2/255 by default).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

from .errors import UserError
from .training import classification_loss

LossFn = Callable[[torch.Tensor], torch.Tensor]
Defense = Callable[[torch.Tensor, torch.Tensor, str, nn.Module, torch.Generator],
                   tuple[torch.Tensor, LossFn]]
NAMES = ("none", "jpeg<Q>", "grayscale", "cutmix", "mixup", "pgd")
PGD_DEFAULTS = {"pgd_epsilon": 8 / 255, "pgd_steps": 5, "pgd_step_size": 2 / 255}


def plain_loss(labels: torch.Tensor, task: str) -> LossFn:
    """The unchanged training loss: CE (single label) or BCE-with-logits (multi-label)."""
    return partial(classification_loss, labels=labels, task=task)


@dataclass
class MixedLoss:
    """lam·L(labels) + (1 − lam)·L(labels[perm]) for the plain loss L.

    For multi-label BCE this equals BCE against the linearly mixed targets.
    """

    labels: torch.Tensor
    perm: torch.Tensor
    lam: float
    task: str

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        a = classification_loss(logits, self.labels, self.task)
        b = classification_loss(logits, self.labels[self.perm], self.task)
        return self.lam * a + (1.0 - self.lam) * b


def identity() -> Defense:
    """No defense: images and loss unchanged."""
    def apply(images, labels, task, model, gen):
        return images, plain_loss(labels, task)
    return apply


def _jpeg_roundtrip(pixels: np.ndarray, quality: int) -> np.ndarray:
    """Encode one uint8 H×W×C image (C = 1 or 3) as JPEG and decode it again."""
    image = Image.fromarray(np.ascontiguousarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(buffer))
    return decoded.reshape(pixels.shape)


def jpeg(quality: int) -> Defense:
    """JPEG re-compression of each image at ``quality`` (Pillow's libjpeg, default 4:2:0
    chroma subsampling for colour), on the CPU; grayscale images stay one channel."""
    if not 1 <= quality <= 100:
        raise UserError(f"JPEG quality must be 1-100 (e.g. jpeg10, jpeg50), not {quality}")

    def apply(images, labels, task, model, gen):
        if images.shape[1] not in (1, 3):
            raise UserError(f"JPEG needs 1 or 3 channels, not {images.shape[1]}")
        pixels = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
        out = np.stack([_jpeg_roundtrip(p, quality) for p in pixels])
        out = torch.from_numpy(out).permute(0, 3, 1, 2).to(device=images.device, dtype=images.dtype) / 255
        return out, plain_loss(labels, task)
    return apply


def grayscale() -> Defense:
    """RGB → luminance (torchvision's weights 0.2989, 0.587, 0.114) replicated to 3 channels;
    1-channel images pass unchanged."""
    def apply(images, labels, task, model, gen):
        if images.shape[1] == 3:
            images = TF.rgb_to_grayscale(images, num_output_channels=3)
        return images, plain_loss(labels, task)
    return apply


def _beta(alpha: float, gen: torch.Generator) -> float:
    """One Beta(alpha, alpha) draw, seeded from ``gen``."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _perm(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=gen).to(device)


def mixup(alpha: float = 1.0) -> Defense:
    """MixUp: lam·x + (1 − lam)·x[perm], lam ~ Beta(alpha, alpha), loss mixed alike."""
    if alpha <= 0:
        raise UserError(f"mixup alpha must be positive, not {alpha}")

    def apply(images, labels, task, model, gen):
        lam = _beta(alpha, gen)
        perm = _perm(len(images), gen, images.device)
        mixed = lam * images + (1.0 - lam) * images[perm]
        return mixed, MixedLoss(labels, perm.to(labels.device), lam, task)
    return apply


def cutmix(alpha: float = 1.0) -> Defense:
    """CutMix: a box of x[perm] pasted into x (area ≈ 1 − lam, lam ~ Beta(alpha, alpha));
    lam is then set to the exact kept fraction of pixels and the loss mixed by it."""
    if alpha <= 0:
        raise UserError(f"cutmix alpha must be positive, not {alpha}")

    def apply(images, labels, task, model, gen):
        lam = _beta(alpha, gen)
        perm = _perm(len(images), gen, images.device)
        h, w = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        cy, cx = (int(torch.randint(0, size, (1,), generator=gen)) for size in (h, w))
        y0, y1 = max(cy - int(h * cut) // 2, 0), min(cy + int(h * cut) // 2, h)
        x0, x1 = max(cx - int(w * cut) // 2, 0), min(cx + int(w * cut) // 2, w)
        mixed = images.clone()
        mixed[:, :, y0:y1, x0:x1] = images[perm, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        return mixed, MixedLoss(labels, perm.to(labels.device), lam, task)
    return apply


def pgd_adversarial(epsilon: float = 8 / 255, steps: int = 5, step_size: float = 2 / 255) -> Defense:
    """L∞ PGD adversarial training (Madry et al.): train on x' with ‖x' − x‖∞ ≤ epsilon.

    Random start uniform in the ε-ball (from ``gen``), then ``steps`` signed-gradient ascent
    steps on the plain loss, each projected to the ball and to [0, 1]. The attack runs with
    the model in **eval mode** (BatchNorm statistics are neither used from nor written by the
    attack batches), then restores its mode; parameter gradients are not touched.
    """
    if epsilon < 0 or steps < 0 or step_size < 0:
        raise UserError(f"PGD needs epsilon, steps, step_size >= 0, got {epsilon}, {steps}, {step_size}")

    def apply(images, labels, task, model, gen):
        x = images.detach()
        start = (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1) * epsilon
        adv = (x + start.to(x.device)).clamp(0, 1)
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                for _ in range(steps):
                    adv.requires_grad_(True)
                    out = model(adv)
                    loss = classification_loss(out[0] if isinstance(out, tuple) else out, labels, task)
                    grad, = torch.autograd.grad(loss, adv)
                    adv = adv.detach() + step_size * grad.sign()
                    adv = torch.min(torch.max(adv, x - epsilon), x + epsilon).clamp(0, 1)
        finally:
            model.train(was_training)
        return adv.detach(), plain_loss(labels, task)
    return apply


def _setting(cfg: dict[str, Any], key: str, kind: type) -> Any:
    """cfg[key] as ``kind``; PGD_DEFAULTS[key] when missing or None."""
    value = cfg.get(key)
    if value is None:
        return PGD_DEFAULTS[key]
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{key} must be a number, not {value!r}") from None


def build_defense(name: str, cfg: dict[str, Any] | None = None) -> Defense:
    """The defense called ``name`` (see the module doc); ``cfg`` supplies the PGD settings."""
    if name == "none":
        return identity()
    if name == "grayscale":
        return grayscale()
    if name == "cutmix":
        return cutmix()
    if name == "mixup":
        return mixup()
    if name == "pgd":
        cfg = cfg or {}
        return pgd_adversarial(_setting(cfg, "pgd_epsilon", float), _setting(cfg, "pgd_steps", int),
                               _setting(cfg, "pgd_step_size", float))
    if name.startswith("jpeg") and name[4:].isdigit():
        return jpeg(int(name[4:]))
    raise UserError(f"unknown defense {name!r}; choose one of {', '.join(NAMES)} "
                    f"(jpeg<Q> with quality Q 1-100, e.g. jpeg10, jpeg50)")
