"""Attacker-side defenses: shapes/ranges, JPEG, grayscale, CutMix/MixUp losses, PGD, registry."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpc_uc.defenses import build_defense, cutmix, grayscale, jpeg, mixup, pgd_adversarial
from hpc_uc.errors import UserError

MULTI, MULTILABEL = "multi-class", "multi-label, binary-class"
NAMES = ["none", "jpeg10", "jpeg50", "grayscale", "cutmix", "mixup", "pgd"]


def _model(channels: int = 3, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, classes))


def _batch(n: int = 6, channels: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, 8, 8, generator=g), torch.randint(0, 3, (n, 1), generator=g)


def _smooth(n: int = 4, channels: int = 3, size: int = 16) -> torch.Tensor:
    ramp = torch.linspace(0.1, 0.9, size)
    planes = [ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size),
              (ramp.view(1, -1) + ramp.view(-1, 1)).expand(size, size) / 2]
    return torch.stack(planes[:channels]).expand(n, channels, size, size).clone()


def _gen(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels,task", [(3, MULTI), (1, MULTILABEL)])
def test_shapes_ranges_and_loss(name, channels, task):
    images, labels = _batch(channels=channels)
    if task == MULTILABEL:
        labels = (torch.rand(6, 3, generator=_gen(1)) < 0.5).long()
    model = _model(channels)
    out, loss_fn = build_defense(name, {})(images, labels, task, model, _gen())
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    loss = loss_fn(model(out))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model[0].weight.grad is not None


def test_jpeg_changes_images_and_quality_100_is_close():
    images = _smooth()
    labels = torch.zeros(4, 1, dtype=torch.long)
    low, _ = jpeg(10)(images, labels, MULTI, nn.Identity(), _gen())
    high, _ = jpeg(100)(images, labels, MULTI, nn.Identity(), _gen())
    assert (low - images).abs().mean() > 2 / 255
    assert (high - images).abs().mean() < 2 / 255  # chroma subsampling leaves a little
    gray = images[:, :1]
    high_gray, _ = jpeg(100)(gray, labels, MULTI, nn.Identity(), _gen())
    assert high_gray.shape == gray.shape and (high_gray - gray).abs().max() <= 1 / 255 + 1e-6


def test_grayscale_luminance():
    images, labels = _batch()
    images[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    out, _ = grayscale()(images, labels, MULTI, nn.Identity(), _gen())
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    assert out[0, 0, 0, 0] == pytest.approx(0.2989, abs=1e-6)
    one, _ = _batch(channels=1)
    assert torch.equal(grayscale()(one, labels, MULTI, nn.Identity(), _gen())[0], one)


def _hand_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -logits.log_softmax(1)[torch.arange(len(target)), target].mean()


def test_mixup_images_and_loss():
    images, labels = _batch()
    out, loss_fn = mixup()(images, labels, MULTI, nn.Identity(), _gen())
    lam, perm = loss_fn.lam, loss_fn.perm
    assert 0 < lam < 1 and sorted(perm.tolist()) == list(range(6))
    assert torch.allclose(out, lam * images + (1 - lam) * images[perm])
    logits = torch.randn(6, 3, generator=_gen(9))
    want = lam * _hand_ce(logits, labels[:, 0]) + (1 - lam) * _hand_ce(logits, labels[perm, 0])
    assert loss_fn(logits).item() == pytest.approx(want.item(), rel=1e-6)
    again, loss_again = mixup()(images, labels, MULTI, nn.Identity(), _gen())
    assert torch.equal(again, out) and loss_again.lam == lam  # the generator fixes lam and perm
    _, other = mixup()(images, labels, MULTI, nn.Identity(), _gen(4))
    assert other.lam != lam


def test_mixup_multilabel_mixes_bce_targets():
    images, _ = _batch()
    labels = (torch.rand(6, 3, generator=_gen(1)) < 0.5).long()
    _, loss_fn = mixup()(images, labels, MULTILABEL, nn.Identity(), _gen())
    logits = torch.randn(6, 3, generator=_gen(9))
    mixed = loss_fn.lam * labels.float() + (1 - loss_fn.lam) * labels[loss_fn.perm].float()
    want = F.binary_cross_entropy_with_logits(logits, mixed)
    assert loss_fn(logits).item() == pytest.approx(want.item(), rel=1e-6)


def test_cutmix_box_and_loss():
    images = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 16, 16) / 10  # constant per image
    labels = torch.arange(6).remainder(3).view(6, 1)
    seed = next(s for s in range(20) if 0.1 < cutmix()(images, labels, MULTI, None, _gen(s))[1].lam < 0.9)
    out, loss_fn = cutmix()(images, labels, MULTI, None, _gen(seed))
    lam, perm = loss_fn.lam, loss_fn.perm
    pasted = out != images
    moved = perm != torch.arange(6)
    assert torch.equal(pasted[moved], pasted[moved][:1].expand_as(pasted[moved]))  # one box for all
    assert pasted[moved][0].float().mean().item() == pytest.approx(1 - lam)
    assert torch.equal(out[pasted], images[perm].expand_as(out)[pasted])
    logits = torch.randn(6, 3, generator=_gen(9))
    want = lam * _hand_ce(logits, labels[:, 0]) + (1 - lam) * _hand_ce(logits, labels[perm, 0])
    assert loss_fn(logits).item() == pytest.approx(want.item(), rel=1e-6)


def test_pgd_within_epsilon_and_raises_loss():
    images, labels = _batch(n=16)
    model = _model()
    model.train()
    stats = model[1].running_mean.clone()
    eps = 4 / 255
    out, loss_fn = pgd_adversarial(eps, steps=5, step_size=1 / 255)(images, labels, MULTI, model, _gen())
    assert (out - images).abs().max() <= eps + 1e-6 and out.min() >= 0 and out.max() <= 1
    assert model.training and torch.equal(model[1].running_mean, stats)  # attack ran in eval mode
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert loss_fn(model(out)) > loss_fn(model(images)) + 1e-3
    again, _ = pgd_adversarial(eps, steps=5, step_size=1 / 255)(images, labels, MULTI, model, _gen())
    assert torch.equal(again, out)


def test_registry():
    images, labels = _batch()
    out, _ = build_defense("pgd", {"pgd_epsilon": 1 / 255, "pgd_steps": 2})(
        images, labels, MULTI, _model(), _gen())
    assert (out - images).abs().max() <= 1 / 255 + 1e-6
    for bad in ("jpeg0", "jpeg101", "jpegx", "blur"):
        with pytest.raises(UserError, match="jpeg" if bad.startswith("jpeg") else "choose one of"):
            build_defense(bad, {})
    with pytest.raises(UserError, match="grayscale, cutmix, mixup, pgd"):
        build_defense("blur", {})
    with pytest.raises(UserError, match="pgd_steps must be a number"):
        build_defense("pgd", {"pgd_steps": "many"})
    assert callable(build_defense("pgd", {"pgd_epsilon": None}))  # None: the default 8/255
