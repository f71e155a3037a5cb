"""Per-sample refinement of the cluster perturbation at export (`refine.*`; by default 200
targeted steps where each image has one class, docs/algorithm.md step 4).

Starting from delta_k of the image's cluster, projected signed-gradient steps lower a
per-image loss through the frozen surrogate, then project back into the budget (|delta| <=
epsilon for linf, ||delta||_2 <= epsilon for l2). The loss (`refine.objective`) is either the
one UC trains its generators on -- KL(softmax(centroid_t(k)) || softmax(f(x + delta))) -- or
the surrogate's cross-entropy of the *next* class, y + 1 mod classes: adversarial poisoning
(Fowl et al., NeurIPS 2021) on top of the cluster perturbation, with the surrogate UC already
trained on the clean images as the attacked model (with ``surrogate.snapshots``, the
surrogate at several epochs of its training in turn, then the trained one). With `refine.augment` every step sees
x + delta through the ue victim's crop and flip, drawn from (seed, sample id, step). Each
image's result depends only on that image, its label or cluster, its sample id, its cluster's
delta, the seed and the surrogate(s), so it is the same on any number of ranks (up to float
rounding in the surrogate's batched convolutions).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import augment_keys, keyed_crop_flip
from .generator import add_perturbation, kl_to_target
from .reader import chunk_rows
from .shards import is_multilabel
from .stages import head_trained_on_labels

AUTO_STEPS = 200  # refine.steps=auto where the targeted objective applies (docs/efficacy.md)
BATCH = 256       # images per forward-backward at most (or surrogate.micro_batch, when set)

# (logits, features, rows) -> each image's loss; rows: the chunk's slice the batch came from
ImageLoss = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]
# (x + delta, rows, step) -> the batch as the surrogate sees it at that step
StepAugment = Callable[[torch.Tensor, slice, int], torch.Tensor]


def targeted_applies(cfg: dict, task: str) -> bool:
    """Whether the next-class objective is defined here: method=uc, one class per image, and a
    surrogate whose head was trained on these labels (not surrogate.weights=imagenet's)."""
    return cfg["method"] == "uc" and not is_multilabel(task) and head_trained_on_labels(cfg)


def resolve_refinement(cfg: dict, task: str) -> tuple[int, str]:
    """(steps, objective) as export runs them: ``refine.objective=auto`` is ``targeted`` where
    :func:`targeted_applies`, else ``uc``; ``refine.steps=auto`` is :data:`AUTO_STEPS` for
    method=uc with an objective given or resolved to ``targeted``, else 0 (UC's cluster delta
    alone: auto refines nothing on multi-label data or with surrogate.weights=imagenet)."""
    r = cfg["refine"]
    objective = r["objective"]
    if objective == "auto":
        objective = "targeted" if targeted_applies(cfg, task) else "uc"
    steps = r["steps"]
    if steps == "auto":  # refines where the objective was asked for or auto found it defined
        steps = AUTO_STEPS if cfg["method"] == "uc" and (r["objective"] != "auto" or objective == "targeted") else 0
    return steps, objective


def cluster_target_loss(target_probs: torch.Tensor, clusters: np.ndarray) -> ImageLoss:
    """UC's loss: KL from row ``clusters[i]`` of ``target_probs`` to the surrogate's features."""
    def loss(logits: torch.Tensor, feats: torch.Tensor, rows: slice) -> torch.Tensor:
        return kl_to_target(feats, target_probs[torch.from_numpy(clusters[rows]).to(feats.device)])
    return loss


def next_class(labels, num_classes: int):
    """Adversarial poisoning's target of each image: the next class, y + 1 mod ``num_classes``
    (an array or tensor of class indices)."""
    return (labels + 1) % num_classes


def next_class_loss(labels: np.ndarray, num_classes: int) -> ImageLoss:
    """Adversarial poisoning's loss: the surrogate's cross-entropy of :func:`next_class`
    (``labels`` N x 1, one class per image)."""
    targets = torch.from_numpy(next_class(np.asarray(labels)[:, 0], num_classes)).long()

    def loss(logits: torch.Tensor, feats: torch.Tensor, rows: slice) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets[rows].to(logits.device), reduction="none")
    return loss


def project(delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """Into the epsilon ball, per image."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    size = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return delta * (epsilon / size).clamp(max=1.0)


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """What a forward pass of ``model`` on ``x`` keeps for the backward to ``x``: the bytes of
    autograd's saved tensors (a tensor counted each time it is saved)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.requires_grad_(True))
    return total


def activation_bytes(model: nn.Module, shape: tuple[int, int, int], device: torch.device) -> int:
    """What one more image of ``shape`` (C x H x W) adds to the tensors a forward pass of
    ``model`` keeps for the backward to its input: :func:`saved_bytes` for 2 images less 1
    (the weights it also saves cancel)."""
    one, two = (saved_bytes(model, torch.zeros((n, *shape), device=device)) for n in (1, 2))
    return max(1, two - one)


def fitting_batch(model: nn.Module, shape: tuple[int, int, int], device: torch.device, budget_mib: float,
                  cap: int = BATCH) -> int:
    """Images per refinement forward-backward: as many as keep the saved activations within
    ``budget_mib`` (:func:`activation_bytes`), at least 1 and at most ``cap``."""
    return min(cap, chunk_rows(budget_mib * 2**20, activation_bytes(model, shape, device), 1))


def model_at(models: Sequence[nn.Module], step: int, steps: int) -> nn.Module:
    """The model step ``step`` of ``steps`` attacks: ``models`` (a surrogate's training
    trajectory, oldest first) in equal blocks of steps, in order -- as em's noise meets its model
    round after round."""
    return models[step * len(models) // steps]


def refine(models: Sequence[nn.Module], images: np.ndarray, delta: np.ndarray, image_loss: ImageLoss,
           epsilon: float, norm: str, steps: int, step_size: float,
           device: torch.device, batch: int = BATCH, boundary: str = "clip",
           augment: StepAugment | None = None, momentum: float = 0.0,
           on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Refined N x H x W x C perturbations for uint8 N x H x W x C ``images``.

    ``models``: the frozen surrogate alone, or its training trajectory (:func:`model_at`).
    ``delta`` holds each image's cluster perturbation (N x H x W x C), ``image_loss`` the loss
    each step lowers (:func:`cluster_target_loss`, :func:`next_class_loss`), ``step_size`` a
    fraction of epsilon per step. The result is the delta itself (within the ball); export adds
    it under ``boundary``. ``augment`` (:func:`keyed_augment`), if given, transforms x + delta
    before every step's forward pass: the loss is then an expectation over the augmentation.
    ``momentum`` > 0 steps along the sign of a running sum of the L1-normalised gradients, each
    step's sum ``momentum`` times the last plus the new one (MI-FGSM, Dong et al., CVPR 2018):
    a steadier direction where the augmentation or the trajectory makes the gradients noisy.
    ``on_batch``, if given, hears how many images each finished batch held (for progress).
    """
    out = np.empty_like(delta, dtype=np.float32)
    for lo in range(0, len(images), batch):
        x = torch.from_numpy(images[lo:lo + batch]).to(device).permute(0, 3, 1, 2).float() / 255.0
        d = torch.from_numpy(np.ascontiguousarray(delta[lo:lo + batch])).to(device).permute(0, 3, 1, 2).float()
        rows = slice(lo, lo + len(x))
        d = project(d, epsilon, norm)
        velocity = torch.zeros_like(d)
        for step in range(steps):
            d.requires_grad_(True)
            inputs = add_perturbation(x, d, boundary)
            logits, feats = model_at(models, step, steps)(inputs if augment is None else augment(inputs, rows, step))
            grad, = torch.autograd.grad(image_loss(logits, feats, rows).sum(), d)
            with torch.no_grad():
                if momentum:
                    velocity = momentum * velocity + grad / grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1, 1)
                    grad = velocity
                if norm == "linf":
                    move = grad.sign() * (step_size * epsilon)
                else:
                    move = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) * (step_size * epsilon)
                d = project(d - move, epsilon, norm)
        out[lo:lo + batch] = d.detach().permute(0, 2, 3, 1).cpu().numpy()
        if on_batch is not None:
            on_batch(len(x))
    return out


def keyed_augment(index: np.ndarray, seed: int, padding: int) -> StepAugment:
    """The ue victim's crop and flip for :func:`refine`, image ``index[i]``'s draws at each step
    from (``seed``, its sample id, the step) alone, so that refinement stays the same on any
    number of ranks (``index``: the chunk's sample ids)."""
    def augment(inputs: torch.Tensor, rows: slice, step: int) -> torch.Tensor:
        return keyed_crop_flip(inputs, augment_keys(seed, index[rows], step), padding)
    return augment
