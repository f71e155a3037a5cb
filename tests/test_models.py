"""Surrogate/victim ResNets, generator bounds and surrogate weight loading (single process)."""
from __future__ import annotations

import threading

import pytest
import torch
import torchvision

from hpc_uc.errors import UserError
from hpc_uc.models import (Generator, ResNetWithFeature, imagenet_weights, load_surrogate_weights,
                           perturbation, victim_model)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("channels", [1, 3])
def test_resnet18_small_stem_28px(channels):
    model = ResNetWithFeature("resnet18", num_classes=7, in_channels=channels, small_stem=True).eval()
    assert model.backbone.conv1.kernel_size == (3, 3) and model.backbone.conv1.stride == (1, 1)
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)
    with torch.no_grad():
        logits, feats = model(torch.rand(2, channels, 28, 28))
    assert logits.shape == (2, 7) and feats.shape == (2, 512) and model.feature_dim == 512


def test_resnet18_resize_path():
    model = ResNetWithFeature("resnet18", num_classes=3, in_channels=1, input_size=64).eval()
    assert model.backbone.conv1.kernel_size == (7, 7) and model.backbone.conv1.in_channels == 1
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    logits, feats = model(x)
    assert logits.shape == (2, 3) and feats.shape == (2, 512)
    feats.sum().backward()  # generators need gradients through the resize
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_resnet50_32px():
    model = ResNetWithFeature("resnet50", num_classes=5, in_channels=3, small_stem=True).eval()
    with torch.no_grad():
        logits, feats = model(torch.rand(1, 3, 32, 32))
    assert logits.shape == (1, 5) and feats.shape == (1, 2048)


def test_normalisation_not_in_state_dict():
    model = ResNetWithFeature("resnet18", num_classes=2, in_channels=3, small_stem=True)
    keys = set(model.state_dict())
    assert all(k.startswith("backbone.") for k in keys)
    assert {k[len("backbone."):] for k in keys} == set(torchvision.models.resnet18(num_classes=2).state_dict())


def test_unknown_arch():
    with pytest.raises(UserError, match="resnet18"):
        ResNetWithFeature("vgg16")


def test_victim_model():
    small = victim_model("resnet18", num_classes=4, in_channels=1, image_size=28).eval()
    assert small.backbone.conv1.kernel_size == (3, 3)
    with torch.no_grad():
        out = small(torch.rand(2, 1, 28, 28))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4)
    big = victim_model("resnet18", num_classes=4, in_channels=3, image_size=128)
    assert big.backbone.conv1.kernel_size == (7, 7)
    assert not isinstance(big.backbone.maxpool, torch.nn.Identity)
    forced = victim_model("resnet18", num_classes=4, in_channels=1, image_size=28, stem="standard")
    assert forced.backbone.conv1.kernel_size == (7, 7)


def test_victim_input_normalisation():
    """Victims default to MedMNIST's 0.5 / 0.5; the surrogate keeps ImageNet statistics."""
    victim = victim_model("resnet18", num_classes=2, in_channels=1, image_size=28)
    assert victim.mean.tolist() == [[[[0.5]]]] and victim.std.tolist() == [[[[0.5]]]]
    imagenet = victim_model("resnet18", 2, 3, 28, input_norm="imagenet")
    assert imagenet.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert ResNetWithFeature("resnet18", 2, 1).mean.item() == pytest.approx(0.449)
    with pytest.raises(UserError, match="medmnist"):
        victim_model("resnet18", 2, 1, 28, input_norm="zscore")


@pytest.mark.parametrize("size", [28, 32, 30])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_shape_and_range(size, channels):
    gen = Generator(channels, base_filters=8, n_blocks=2)
    z = torch.rand(1, channels, size, size)
    out = gen(z)
    assert out.shape == z.shape and out.abs().max() <= 1.0
    out.sum().backward()
    assert all(p.grad is not None for p in gen.parameters())


def test_generator_default_size_and_eval_equals_train():
    gen = Generator(3)  # 64 filters, 2 down, 6 blocks (reference sizes)
    z = torch.rand(1, 3, 28, 28)
    with torch.no_grad():
        train_out = gen.train()(z)
        eval_out = gen.eval()(z)
    assert torch.equal(train_out, eval_out)  # InstanceNorm: no train/eval difference


def test_perturbation_linf_bound():
    gen = Generator(3, base_filters=8, n_blocks=1)
    eps = 16 / 255
    delta = perturbation(gen, torch.rand(1, 3, 32, 32) * 50, eps, "linf")
    assert delta.shape == (1, 3, 32, 32)
    assert delta.abs().max() <= eps + 1e-7


def test_perturbation_l2_bound():
    gen = Generator(1, base_filters=8, n_blocks=1)
    z = torch.rand(3, 1, 28, 28)
    eps = 0.5
    delta = perturbation(gen, z, eps, "l2")
    norms = delta.flatten(1).norm(dim=1)
    assert (norms <= eps * (1 + 1e-6)).all()
    assert torch.allclose(norms, torch.full_like(norms, eps))  # raw output is far larger than 0.5
    big = perturbation(gen, z, 1e6, "l2")  # inside the ball: untouched
    assert torch.allclose(big, gen(z))
    with pytest.raises(UserError):
        perturbation(gen, z, eps, "l1")


# ---- surrogate weights -----------------------------------------------------------------------
def _save(tmp_path, obj, name="w.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_load_torchvision_state_dict_round_trip(tmp_path):
    source = torchvision.models.resnet18(num_classes=10)
    path = _save(tmp_path, source.state_dict())
    model = ResNetWithFeature("resnet18", num_classes=10, in_channels=3)
    report = load_surrogate_weights(model, path)
    assert report.matched == report.total == 100 and report.missing == report.unexpected == 0
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    source.eval()
    model.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.backbone.fc(model.features(x)), model(x)[0])


@pytest.mark.parametrize("prefix", ["backbone.", "module.", "module.backbone."])
def test_load_prefixed_keys(tmp_path, prefix):
    source = ResNetWithFeature("resnet18", num_classes=3, in_channels=1, small_stem=True)
    state = {prefix + k.removeprefix("backbone."): v for k, v in source.state_dict().items()}
    model = ResNetWithFeature("resnet18", num_classes=3, in_channels=1, small_stem=True)
    report = load_surrogate_weights(model, _save(tmp_path, state))
    assert report.matched == report.total and not report.notes
    assert torch.equal(model.backbone.conv1.weight, source.backbone.conv1.weight)


def test_three_channel_checkpoint_into_one_channel_model(tmp_path):
    source = torchvision.models.resnet18(num_classes=1000)
    model = ResNetWithFeature("resnet18", num_classes=4, in_channels=1)
    report = load_surrogate_weights(model, _save(tmp_path, source.state_dict()))
    assert report.matched == report.total
    assert torch.allclose(model.backbone.conv1.weight, source.conv1.weight.sum(1, keepdim=True))
    assert any("conv1 adapted" in n for n in report.notes)
    assert any("fc kept" in n for n in report.notes)  # 1000 classes -> 4: fresh fc
    assert model.backbone.fc.weight.shape == (4, 512)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_standard_checkpoint_into_small_stem_keeps_fresh_conv1(tmp_path):
    source = torchvision.models.resnet18(num_classes=10)
    model = ResNetWithFeature("resnet18", num_classes=10, in_channels=3, small_stem=True)
    report = load_surrogate_weights(model, _save(tmp_path, source.state_dict()))
    assert report.matched == report.total - 1 and "conv1 kept freshly initialised" in str(report)


def test_load_rejects_list(tmp_path):
    with pytest.raises(UserError, match="not a state dict"):
        load_surrogate_weights(ResNetWithFeature(), _save(tmp_path, [torch.zeros(3)]))


def test_load_rejects_unrelated_keys(tmp_path):
    state = {f"encoder.block{i}.weight": torch.zeros(4, 4) for i in range(20)}
    with pytest.raises(UserError, match=r"only 0/100 backbone tensors match .*20 unexpected"):
        load_surrogate_weights(ResNetWithFeature(), _save(tmp_path, state))


def test_load_rejects_other_arch(tmp_path):
    path = _save(tmp_path, torchvision.models.resnet50(num_classes=10).state_dict())
    with pytest.raises(UserError, match="backbone tensors match"):
        load_surrogate_weights(ResNetWithFeature("resnet18", num_classes=10), path)


def test_load_rejects_pickled_object_and_missing_file(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"x": object()}, path)
    with pytest.raises(UserError, match="weights-only"):
        load_surrogate_weights(ResNetWithFeature(), path)
    with pytest.raises(UserError, match="not found"):
        load_surrogate_weights(ResNetWithFeature(), tmp_path / "missing.pt")


def test_imagenet_weights_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached download
    outcome: list = []

    def attempt():
        try:
            outcome.append(imagenet_weights("resnet18"))
        except Exception as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if not outcome:
        pytest.skip("download neither failed nor finished within 10 s")
    if isinstance(outcome[0], dict):
        pytest.skip("internet available: weights downloaded")
    assert isinstance(outcome[0], UserError)
    assert "surrogate.weights: pretrain" in str(outcome[0]) and "PATH" in str(outcome[0])
    with pytest.raises(UserError):
        imagenet_weights("vgg16")


def test_fold_batchnorm_keeps_outputs():
    from hpc_uc.models import fold_batchnorm

    torch.manual_seed(0)
    model = ResNetWithFeature("resnet18", 10, 1, small_stem=True).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    x = torch.rand(2, 1, 28, 28)
    before = model(x)[1]
    after = fold_batchnorm(model)(x)[1]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
