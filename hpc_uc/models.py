"""Networks of UC: the surrogate feature extractor, the perturbation generator, the victim.

Decisions (kept in one place):

* **Inputs are images in [0, 1].** Every ResNet here normalises inside ``forward``. The
  surrogate uses ImageNet statistics: mean (0.485, 0.456, 0.406) / std (0.229, 0.224,
  0.225) for 3 channels, their averages 0.449 / 0.226 for 1 channel, 0.5 / 0.5 otherwise,
  whether its weights come from ImageNet or from training on the clean split, so a
  checkpoint never depends on how the data was normalised. Victims trained from scratch
  default to MedMNIST's own 0.5 / 0.5 (``input_norm="medmnist"``), as its benchmark does. The constants are
  non-persistent buffers: state dicts hold only torchvision's keys (under ``backbone.``).
* **Small images** (<= 64 px) use the CIFAR/MedMNIST "ResNet-18 (28)" stem: conv1 3x3
  stride 1, no max-pool. Otherwise the standard 7x7 stem, optionally after an on-device
  bilinear resize to ``input_size``.
* **Generator norm layer: InstanceNorm** (CycleGAN's "instance" option, conv bias on).
  The generator always sees one fixed noise tensor (batch 1); BatchNorm would normalise
  with batch statistics in train mode and running statistics in eval mode, so the
  perturbation exported after training would differ from the one trained. InstanceNorm
  gives the same output in both modes.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .errors import UserError

ARCHS = ("resnet18", "resnet50")
SMALL_IMAGE_MAX = 64
_PREFIXES = ("module.", "backbone.")
log = logging.getLogger(__name__)


INPUT_NORMS = ("imagenet", "medmnist")


def normalisation(in_channels: int, kind: str = "imagenet") -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) applied to [0, 1] inputs inside every ResNet here."""
    if kind not in INPUT_NORMS:
        raise UserError(f"input normalisation must be one of {', '.join(INPUT_NORMS)}, not {kind!r}")
    if kind == "imagenet" and in_channels == 3:
        return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    if kind == "imagenet" and in_channels == 1:
        return [0.449], [0.226]
    return [0.5] * in_channels, [0.5] * in_channels


def _resnet(arch: str, num_classes: int, in_channels: int, small_stem: bool) -> torchvision.models.ResNet:
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if small_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net


class ResNetWithFeature(nn.Module):
    """A torchvision ResNet whose ``forward(x)`` returns ``(logits, pooled_features)``.

    ``x`` is a batch in [0, 1] (normalised inside, see the module docstring). Features are
    the flattened average-pool output: 512-d for resnet18, 2048-d for resnet50.
    """

    def __init__(self, arch: str = "resnet18", num_classes: int = 10, in_channels: int = 3,
                 small_stem: bool = False, input_size: int | None = None,
                 input_norm: str = "imagenet") -> None:
        super().__init__()
        self.arch, self.in_channels, self.input_size = arch, in_channels, input_size
        self.backbone = _resnet(arch, num_classes, in_channels, small_stem)
        self.feature_dim = self.backbone.fc.in_features
        mean, std = normalisation(in_channels, input_norm)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of a [0, 1] batch."""
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size,) * 2:
            shrink = min(x.shape[-2:]) > self.input_size
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=shrink)
        x = (x - self.mean) / self.std
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return torch.flatten(b.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(x)
        return self.backbone.fc(feats), feats


class ResNetClassifier(ResNetWithFeature):
    """The same network returning logits only (the victim)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.backbone.fc(self.features(x))


def victim_model(arch: str, num_classes: int, in_channels: int, image_size: int, stem: str = "auto",
                 input_norm: str = "medmnist") -> ResNetClassifier:
    """Victim trained from scratch: with ``stem="auto"`` the small stem for <= 64 px
    (MedMNIST's ResNet-18 (28)), torchvision's standard ResNet otherwise. Returns logits
    for [0, 1] inputs."""
    small = stem == "small" or (stem == "auto" and image_size <= SMALL_IMAGE_MAX)
    return ResNetClassifier(arch, num_classes, in_channels, small_stem=small, input_norm=input_norm)


def fold_batchnorm(model: ResNetWithFeature) -> ResNetWithFeature:
    """Fold every eval-mode BatchNorm of the backbone into the conv before it (in place).

    Only for a frozen network in eval mode: outputs equal the unfolded model's up to float
    rounding, with one pass over memory less per layer.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    b = model.backbone
    b.conv1, b.bn1 = fuse_conv_bn_eval(b.conv1, b.bn1), nn.Identity()
    for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
        for block in layer:
            for i in (1, 2, 3):
                conv, bn = getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None)
                if conv is not None:
                    setattr(block, f"conv{i}", fuse_conv_bn_eval(conv, bn))
                    setattr(block, f"bn{i}", nn.Identity())
            if block.downsample is not None:
                block.downsample = fuse_conv_bn_eval(block.downsample[0], block.downsample[1])
    return model


# ---- surrogate weights -------------------------------------------------------------------
@dataclass
class LoadReport:
    """What ``load_surrogate_weights`` did; ``str()`` is one log line."""

    source: str
    matched: int          # backbone tensors (fc excluded) loaded, adapted ones included
    total: int            # backbone tensors the model has
    missing: int          # backbone tensors absent from the checkpoint
    unexpected: int       # checkpoint tensors the model has no place for
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (f"surrogate weights {self.source}: {self.matched}/{self.total} backbone tensors loaded "
                f"({self.missing} missing, {self.unexpected} unexpected)")
        return "; ".join([text, *self.notes])


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _read_state(source: str | Path | Mapping) -> dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        state = source
    else:
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(f"surrogate weights {source}: file not found") from None
        except Exception as exc:
            raise UserError(f"surrogate weights {source}: not a weights-only torch state dict "
                            f"({type(exc).__name__})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not state or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"surrogate weights {source}: not a state dict (a dict of name -> tensor), "
                        f"found {type(state).__name__}")
    return {_strip(k): v for k, v in state.items()}


def _adapt_conv1(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor | None:
    """A checkpoint's conv1 for a model with other input channels (same kernel), or None."""
    if src.dim() != 4 or src.shape[0] != dst.shape[0] or src.shape[2:] != dst.shape[2:]:
        return None
    if dst.shape[1] == 1:
        return src.sum(dim=1, keepdim=True)
    if src.shape[1] == 1:
        return src.repeat(1, dst.shape[1], 1, 1) / dst.shape[1]
    return None


def load_surrogate_weights(model: nn.Module, source: str | Path | Mapping,
                           min_fraction: float = 0.9) -> LoadReport:
    """Load a torchvision-style ResNet state dict (keys may carry ``backbone.``/``module.``)
    into ``model`` (a ResNetWithFeature or a plain ResNet); never silently.

    conv1 from 3 channels into a 1-channel model is summed over input channels; a conv1 of
    another kernel (7x7 into a small stem) or an fc of another shape keeps the model's fresh
    layer, noted in the report. Raises UserError when the file is no state dict or fewer
    than ``min_fraction`` of the backbone tensors match.
    """
    name = "(state dict)" if isinstance(source, Mapping) else str(source)
    src = _read_state(source)
    target = getattr(model, "backbone", model)
    own = target.state_dict()
    keys = [k for k in own if not k.endswith("num_batches_tracked")]
    backbone = [k for k in keys if not k.startswith("fc.")]
    new, notes, matched, wrong_shape = dict(own), [], 0, 0
    for key in keys:
        if key not in src:
            continue
        value, dst = src[key], own[key]
        if value.shape != dst.shape and key == "conv1.weight":
            value = _adapt_conv1(value, dst)
            note = (f"conv1 adapted {tuple(src[key].shape)} -> {tuple(dst.shape)}" if value is not None else
                    f"conv1 kept freshly initialised (checkpoint {tuple(src[key].shape)}, model {tuple(dst.shape)})")
            notes.append(note)
            if value is None:
                continue
        elif value.shape != dst.shape:
            if key.startswith("fc."):
                if key == "fc.weight":
                    notes.append(f"fc kept freshly initialised (checkpoint {tuple(value.shape)}, "
                                 f"model {tuple(dst.shape)})")
            else:
                wrong_shape += 1
            continue
        new[key] = value.to(dst.dtype)
        matched += key in backbone
    for key in own:
        if key.endswith("num_batches_tracked") and key in src and src[key].shape == own[key].shape:
            new[key] = src[key].to(own[key].dtype)
    missing = sum(k not in src for k in backbone)
    unexpected = sum(k not in own for k in src if not k.endswith("num_batches_tracked"))
    report = LoadReport(name, matched, len(backbone), missing, unexpected, notes)
    if matched < min_fraction * len(backbone):
        raise UserError(f"surrogate weights {name}: only {matched}/{len(backbone)} backbone tensors match "
                        f"this {getattr(model, 'arch', 'ResNet')} ({missing} missing, {unexpected} unexpected, "
                        f"{wrong_shape} of another shape); expected a torchvision-style state dict")
    target.load_state_dict(new)
    log.info("%s", report)
    return report


def imagenet_weights(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet state dict (resnet18: IMAGENET1K_V1, resnet50: IMAGENET1K_V2);
    downloads into the torch hub cache, so it needs internet the first time."""
    enums = {"resnet18": ("ResNet18_Weights", "IMAGENET1K_V1"), "resnet50": ("ResNet50_Weights", "IMAGENET1K_V2")}
    if arch not in enums:
        raise UserError(f"no ImageNet weights for {arch!r}; choose one of {', '.join(enums)}")
    cls, tag = enums[arch]
    weights = getattr(getattr(torchvision.models, cls), tag)
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:
        raise UserError(f"could not download ImageNet weights for {arch} ({type(exc).__name__}: {exc}); "
                        "offline, set surrogate.weights: pretrain (train on the clean split) "
                        "or a local PATH to a state dict") from None


# ---- perturbation generator ---------------------------------------------------------------
class _ResidualBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Generator(nn.Module):
    """CycleGAN-style ResNet encoder/decoder: 7x7 conv, ``n_down`` stride-2 convs,
    ``n_blocks`` residual blocks, ``n_down`` transposed convs, 7x7 conv, tanh.

    Maps noise (B x C x H x W) to the same shape in [-1, 1]. Sizes not divisible by
    2**n_down are padded (replicate) on the way in and cropped on the way out.
    """

    def __init__(self, channels: int, base_filters: int = 64, n_down: int = 2, n_blocks: int = 6) -> None:
        super().__init__()
        self.n_down = n_down
        f = base_filters
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(channels, f, 7), nn.InstanceNorm2d(f), nn.ReLU(True)]
        for i in range(n_down):
            a, b = f * 2 ** i, f * 2 ** (i + 1)
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.InstanceNorm2d(b), nn.ReLU(True)]
        layers += [_ResidualBlock(f * 2 ** n_down) for _ in range(n_blocks)]
        for i in range(n_down, 0, -1):
            a, b = f * 2 ** i, f * 2 ** (i - 1)
            layers += [nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=1),
                       nn.InstanceNorm2d(b), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(f, channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h, w = z.shape[-2:]
        m = 2 ** self.n_down
        ph, pw = -h % m, -w % m
        if ph or pw:
            z = F.pad(z, (0, pw, 0, ph), mode="replicate")
        return self.net(z)[..., :h, :w]


def tile_pattern(pattern: torch.Tensor, period: int) -> torch.Tensor:
    """The top-left ``period`` x ``period`` corner of ``pattern`` (... x H x W) repeated over
    H x W (0, or a period >= the image: ``pattern`` unchanged). A periodic pattern stays the
    same pattern, only in another phase, under any shift or crop."""
    h, w = pattern.shape[-2:]
    if period <= 0 or period >= max(h, w):
        return pattern
    corner = pattern[..., :period, :period]
    reps = (-(-h // period), -(-w // period))
    return corner.repeat(*([1] * (pattern.dim() - 2)), *reps)[..., :h, :w]


def perturbation(generator: nn.Module, z: torch.Tensor, epsilon: float, norm: str = "linf",
                 tile: int = 0) -> torch.Tensor:
    """The perturbation delta of noise ``z``: ``linf`` -> epsilon * G(z) (|delta| <= epsilon);
    ``l2`` -> G(z) projected per sample onto the L2 ball of radius epsilon. ``tile`` > 0:
    G(z)'s corner repeated over the image first (:func:`tile_pattern`)."""
    raw = tile_pattern(generator(z), tile)
    if norm == "linf":
        return epsilon * raw
    if norm == "l2":
        size = raw.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (raw.dim() - 1)))
        return raw * torch.clamp(epsilon / size, max=1.0)
    raise UserError(f"perturbation norm must be 'linf' or 'l2', not {norm!r}")
