"""Per-sample refinement of the cluster perturbation (`refine.steps` > 0, at export).

Starting from delta_k of the image's cluster, a few projected signed-gradient steps lower the
same loss UC trains its generators on -- KL(softmax(centroid_t(k)) || softmax(f(x + delta)))
through the frozen surrogate -- for each image alone, then project back into the budget
(|delta| <= epsilon for linf, ||delta||_2 <= epsilon for l2). Each
image's result depends only on that image, its cluster's delta and the surrogate, so it is
the same on any number of ranks.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .generator import add_perturbation, kl_to_target


def project(delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """Into the epsilon ball, per image."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    size = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return delta * (epsilon / size).clamp(max=1.0)


def refine(surrogate: nn.Module, images: np.ndarray, delta: np.ndarray, target_probs: torch.Tensor,
           clusters: np.ndarray, epsilon: float, norm: str, steps: int, step_size: float,
           device: torch.device, batch: int = 256, boundary: str = "clip") -> np.ndarray:
    """Refined N x H x W x C perturbations for uint8 N x H x W x C ``images``.

    ``delta`` holds each image's cluster perturbation (N x H x W x C), ``target_probs`` row k
    the target distribution of cluster k, ``step_size`` a fraction of epsilon per step. The
    result is the delta itself (within the ball); export adds it under ``boundary``.
    """
    out = np.empty_like(delta, dtype=np.float32)
    for lo in range(0, len(images), batch):
        x = torch.from_numpy(images[lo:lo + batch]).to(device).permute(0, 3, 1, 2).float() / 255.0
        d = torch.from_numpy(np.ascontiguousarray(delta[lo:lo + batch])).to(device).permute(0, 3, 1, 2).float()
        target = target_probs[torch.from_numpy(clusters[lo:lo + batch]).to(device)]
        d = project(d, epsilon, norm)
        for _ in range(steps):
            d.requires_grad_(True)
            _, feats = surrogate(add_perturbation(x, d, boundary))
            grad, = torch.autograd.grad(kl_to_target(feats, target).sum(), d)
            with torch.no_grad():
                if norm == "linf":
                    step = grad.sign() * (step_size * epsilon)
                else:
                    step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) * (step_size * epsilon)
                d = project(d - step, epsilon, norm)
        out[lo:lo + batch] = d.detach().permute(0, 2, 3, 1).cpu().numpy()
    return out
