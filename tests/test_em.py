"""method=em: sample-wise error-minimising noise (hpc_uc.em) — budget, seed, noise steps, files."""
from __future__ import annotations

import stat

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from conftest import fake_manifest
from hpc_uc.config import load_config
from hpc_uc.classwise import class_noise
from hpc_uc.em import (NoiseStore, SampleNoise, block_mean, classwise_levels, grey_levels, initial_levels,
                        merge_parts, minimise_noise, model_cycles, noise_targets, model_seed, noise_model_optimizer,
                        resolve_objective)
from hpc_uc.errors import UserError
from hpc_uc.rundir import RunDir
from hpc_uc.training import classification_loss

EPS = 16 / 255
SHAPE = (3, 8, 8)


def test_grey_levels_truncate_toward_zero_and_keep_exact_levels():
    delta = torch.tensor([16 / 255, -16 / 255, 15.7 / 255, -15.7 / 255, 0.2 / 255, 0.0])
    assert grey_levels(delta).tolist() == [16, -16, 15, -15, 0, 0]  # 16/255 * 255 is 15.99999 in float32
    assert grey_levels(delta).dtype == torch.int16


@pytest.mark.parametrize("norm, epsilon", [("linf", EPS), ("l2", 0.5)])
def test_initial_noise_is_within_budget_after_quantisation(norm, epsilon):
    levels = initial_levels(np.arange(20), SHAPE, epsilon, norm, seed=0).astype(np.float64) / 255
    flat = levels.reshape(20, -1)
    size = np.abs(flat).max(axis=1) if norm == "linf" else np.linalg.norm(flat, axis=1)
    assert np.all(size <= epsilon + 1e-9)
    assert np.all(size > 0.8 * epsilon)  # truncation costs at most one grey level per value


def test_initial_noise_is_seeded_per_sample_id():
    ids = np.array([3, 17, 40, 41])
    a = initial_levels(ids, SHAPE, EPS, "linf", seed=1)
    assert np.array_equal(a, initial_levels(ids, SHAPE, EPS, "linf", seed=1))
    assert np.array_equal(a[[2, 0]], initial_levels(ids[[2, 0]], SHAPE, EPS, "linf", seed=1))  # any split
    assert not np.array_equal(a, initial_levels(ids, SHAPE, EPS, "linf", seed=2))
    assert not np.array_equal(a[0], a[1])


def blocks_are_constant(values: np.ndarray, patch: int, atol: float = 0.0) -> bool:
    """Every patch x patch block of the last two axes holds one value (edge blocks cut)."""
    h, w = values.shape[-2:]
    return all(np.allclose(values[..., i:i + patch, j:j + patch], values[..., i:i + 1, j:j + 1], rtol=0, atol=atol)
               for i in range(0, h, patch) for j in range(0, w, patch))


def test_block_mean_averages_each_block_and_cuts_edge_blocks_to_the_image():
    grad = torch.arange(25.0).view(1, 1, 5, 5)
    out = block_mean(grad, 2)
    assert out.shape == grad.shape
    assert float(out[0, 0, 0, 0]) == float(out[0, 0, 1, 1]) == (0 + 1 + 5 + 6) / 4
    assert float(out[0, 0, 4, 4]) == 24.0                      # a 1 x 1 edge block is its pixel
    assert float(out[0, 0, 4, 0]) == float(out[0, 0, 4, 1]) == (20 + 21) / 2
    assert block_mean(grad, 1) is grad


@pytest.mark.parametrize("patch", [2, 3])
def test_patch_noise_starts_block_constant_within_budget(patch):
    ids = np.arange(6)
    levels = initial_levels(ids, SHAPE, EPS, "linf", seed=1, patch=patch)
    assert blocks_are_constant(levels, patch) and not blocks_are_constant(levels, 2 * patch)
    assert np.abs(levels).max() <= 16
    l2 = initial_levels(ids, SHAPE, 0.5, "l2", seed=1, patch=patch)
    assert blocks_are_constant(l2, patch) and np.all(np.linalg.norm(l2.reshape(6, -1) / 255, axis=1) <= 0.5)
    assert np.array_equal(levels[[4, 1]], initial_levels(ids[[4, 1]], SHAPE, EPS, "linf", seed=1, patch=patch))
    assert np.array_equal(initial_levels(ids, SHAPE, EPS, "linf", seed=1, patch=1),
                          initial_levels(ids, SHAPE, EPS, "linf", seed=1))  # patch 1: the paper's draw


@pytest.mark.parametrize("norm, epsilon", [("linf", EPS), ("l2", 0.5)])
def test_patch_noise_steps_move_whole_blocks(norm, epsilon):
    model = tiny_model()
    x = 0.25 + 0.5 * torch.rand(8, *SHAPE)   # far from 0 and 1: no clip splits a block
    y = torch.randint(0, 2, (8, 1))
    start = torch.from_numpy(initial_levels(np.arange(8), SHAPE, epsilon, norm, seed=0, patch=4)).float() / 255
    delta = minimise_noise(model, x, start, y, "multi-class", epsilon, norm, 5, 0.2, patch=4)
    size = delta.flatten(1).abs().amax(1) if norm == "linf" else delta.flatten(1).norm(dim=1)
    assert torch.all(size <= epsilon * (1 + 1e-5))
    assert blocks_are_constant(delta.numpy(), 4, atol=1e-6)   # x + δ - x rounds in the last bit
    assert not torch.allclose(delta, start, atol=1e-3)
    free = minimise_noise(model, x, start, y, "multi-class", epsilon, norm, 5, 0.2)
    assert not blocks_are_constant(free.numpy(), 4, atol=1e-3)   # without the knob, pixels move apart


def test_noise_model_optimizer_is_the_papers_sgd_or_the_medmnist_victims_adam():
    model = tiny_model()
    cfg = load_config(None, ["method=em", "batch_size=64", "em.lr=0.2", "em.adam_lr=0.004"])
    sgd, lr = noise_model_optimizer(cfg, model)
    assert type(sgd) is torch.optim.SGD and lr == pytest.approx(0.1)      # 0.2 at batch 128, linear
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == cfg["em"]["weight_decay"]
    cfg = load_config(None, ["method=em", "batch_size=64", "em.optimizer=adam", "em.adam_lr=0.004"])
    adam, lr = noise_model_optimizer(cfg, model)
    assert type(adam) is torch.optim.Adam and lr == pytest.approx(0.002)  # em.adam_lr at batch 128
    assert adam.defaults["lr"] == lr and adam.defaults["weight_decay"] == 0
    assert load_config(None, ["method=em"])["em"]["adam_lr"] == cfg["victim"]["lr"]  # the victim's default


def test_restarts_split_the_rounds_into_fresh_models():
    assert model_cycles(10, 0) == [(0, 10)]                      # one model, as without the knob
    assert model_cycles(10, 4) == [(0, 4), (4, 4), (8, 2)]       # the last model gets what is left
    assert model_cycles(10, 10) == model_cycles(10, 25) == [(0, 10)]
    assert model_cycles(0, 3) == []


def test_first_model_keeps_the_run_seed_and_later_ones_differ():
    assert model_seed(7, 0) == 7
    later = [model_seed(7, c) for c in (1, 2, 3)]
    assert later == [model_seed(7, c) for c in (1, 2, 3)] and len(set(later + [7])) == 4
    assert model_seed(8, 1) != later[0]


def tiny_model(classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, classes))


@pytest.mark.parametrize("norm, epsilon", [("linf", EPS), ("l2", 0.5)])
@pytest.mark.parametrize("augment", [False, True])
def test_noise_steps_lower_the_loss_within_budget_and_pixel_range(norm, epsilon, augment):
    model = tiny_model()
    x = torch.rand(16, *SHAPE)
    x[:4] = 1.0  # saturated images: x + δ must stay in [0, 1]
    y = torch.randint(0, 2, (16, 1))
    start = torch.zeros_like(x)
    gen = torch.Generator().manual_seed(0) if augment else None
    delta = minimise_noise(model, x, start, y, "multi-class", epsilon, norm, 10, 0.2, gen, padding=1)
    flat = delta.flatten(1)
    size = flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)
    assert torch.all(size <= epsilon * (1 + 1e-5)) and float(size.max()) > 0.5 * epsilon
    assert float((x + delta).min()) >= 0 and float((x + delta).max()) <= 1
    with torch.no_grad():
        before = classification_loss(model(x), y, "multi-class")
        after = classification_loss(model(x + delta), y, "multi-class")
        opposite = classification_loss(model((x - delta).clamp(0, 1)), y, "multi-class")
    assert float(after) < float(before) < float(opposite)  # minimised, not maximised


def test_rank_parts_merge_into_one_owner_only_file_read_back_by_sample_id(tmp_path):
    run = RunDir(tmp_path)
    parts = [np.array([5, 1, 9]), np.array([0, 7])]  # each rank's sample ids, in its own order
    levels = {}
    for rank, ids in enumerate(parts):
        store = NoiseStore(run.root / "em-parts" / f"part-{rank:05d}.h5", ids, SHAPE)
        assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
        values = initial_levels(ids, SHAPE, EPS, "linf", seed=3)
        store.write(store.rows_of(ids[::-1]), values[::-1])  # rows found by id, any order
        assert np.array_equal(store.read(store.rows_of(ids)), values)
        store.close()
        levels.update(zip(ids.tolist(), values))
    merge_parts(run, 2, SHAPE, {"epsilon": EPS, "norm": "linf", "seed": 3})
    assert not (run.root / "em-parts").exists()
    assert stat.S_IMODE(run.perturbations.stat().st_mode) == 0o600
    with h5py.File(run.perturbations) as f:
        assert f["samples"].shape == (5, *SHAPE) and sorted(f["index"][()]) == [0, 1, 5, 7, 9]
    noise = SampleNoise(run.perturbations)
    ids = np.array([9, 0, 5])
    expected = np.stack([levels[i] for i in ids.tolist()]).astype(np.float32) / 255
    assert np.array_equal(noise(ids), expected)
    with pytest.raises(UserError, match="no noise for some training images"):
        noise(np.array([2]))


def test_noise_of_another_method_is_refused(tmp_path):
    with h5py.File(tmp_path / "perturbations.h5", "w") as f:
        f["delta"] = np.zeros((2, *SHAPE), np.float32)
    with pytest.raises(UserError, match="not made by method=em"):
        SampleNoise(tmp_path / "perturbations.h5")


@pytest.mark.parametrize("override, message", [
    ("tile=4", "set it to 0 for method=em"),
    ("refine.steps=2", "set it to 0 for method=em"),
    ("em.rounds=-1", "em.rounds"),
    ("em.step_size=2", "em.step_size"),
    ("em.lr=0", "em.lr"),
    ("em.stem=huge", "em.stem"),
    ("em.optimizer=rmsprop", "em.optimizer"),
    ("em.patch=0", "em.patch"),
    ("em.objective=max", "em.objective"),
])
def test_em_settings_are_checked(override, message):
    assert load_config(None, ["method=em"])["em"]["rounds"] == 10
    with pytest.raises(UserError, match=message):
        load_config(None, ["method=em", override])


@pytest.mark.parametrize("norm, epsilon", [("linf", 16 / 255), ("l2", 1.0)])
def test_classwise_start_is_each_class_pattern_within_budget(norm, epsilon):
    """em.init=classwise: every image starts from its class's pattern (method=classwise's, from
    the seed), whole grey levels within the budget; two classes, two patterns."""
    pattern = class_noise(3, SHAPE[0], SHAPE[1], epsilon, norm, seed=5)
    labels = np.array([[2], [0], [2], [1], [0]])
    levels = classwise_levels(labels, pattern)
    assert levels.dtype == np.int16 and levels.shape == (5, *SHAPE)
    assert np.array_equal(levels[0], levels[2]) and np.array_equal(levels[1], levels[4])
    assert len({levels[i].tobytes() for i in (0, 1, 3)}) == 3
    assert np.array_equal(levels[3], grey_levels(pattern[1:2])[0].numpy())
    delta = levels.astype(np.float64) / 255
    if norm == "linf":
        assert np.abs(delta).max() <= epsilon + 1e-12
    else:
        assert np.sqrt((delta ** 2).sum(axis=(1, 2, 3))).max() <= epsilon + 1e-9


@pytest.mark.parametrize("key, value, instead", [("init", "classwise", "uniform"), ("objective", "targeted", "min")])
def test_single_label_em_settings_refuse_multilabel_data(key, value, instead, tmp_path, monkeypatch):
    from hpc_uc import pipeline

    fake_manifest(monkeypatch, "multi-label, binary-class")
    cfg = load_config(None, ["method=em", f"em.{key}={value}", f"data_dir={tmp_path}"])
    with pytest.raises(UserError, match=f"em.{key}={value} needs one class per image"):
        pipeline.check_data(cfg)
    pipeline.check_data({**cfg, "em": {**cfg["em"], key: instead}})  # the setting suggested takes it
    pipeline.check_data(load_config(None, ["method=em", f"data_dir={tmp_path}"]))  # and the defaults (auto: min)


def test_auto_objective_is_targeted_where_each_image_has_one_class():
    assert resolve_objective("auto", "multi-class") == "targeted"
    assert resolve_objective("auto", "binary-class") == "targeted"
    assert resolve_objective("auto", "ordinal-regression") == "targeted"
    assert resolve_objective("auto", "multi-label, binary-class") == "min"
    assert resolve_objective("min", "multi-class") == "min" and resolve_objective("targeted", "binary-class") == "targeted"


def test_noise_targets_are_the_own_class_or_the_next_one():
    labels = torch.tensor([[0], [1], [2], [4]])
    assert torch.equal(noise_targets(labels, 5, "min"), labels)
    assert torch.equal(noise_targets(labels, 5, "targeted"), torch.tensor([[1], [2], [3], [0]]))
    assert torch.equal(noise_targets(torch.tensor([[0], [1]]), 2, "targeted"), torch.tensor([[1], [0]]))
    with pytest.raises(UserError, match="one class per image"):
        noise_targets(torch.tensor([[0, 1], [1, 1]]), 2, "targeted")
