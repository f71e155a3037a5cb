"""UC's depth knobs: generator targets, the augmentation-robust loss, per-sample refinement."""
from __future__ import annotations

import copy

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import fake_manifest
from hpc_uc.augment import crop_flip, epoch_generator
from hpc_uc.config import load_config
from hpc_uc.errors import UserError
from hpc_uc.export import protect
from hpc_uc.generator import add_perturbation, choose_targets, kl_to_target
from hpc_uc.models import ResNetWithFeature
from hpc_uc.refine import (activation_bytes, cluster_target_loss, fitting_batch, model_at, next_class_loss,
                           refine, saved_bytes)
from hpc_uc.surrogate import frozen, snapshot_epochs

# three clusters on a line: 0 and 1 close together (class 0), 2 far away (class 1)
CENTROIDS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])


def test_next_target_is_the_reference_offset():
    assert choose_targets(CENTROIDS, "next", offset=1).tolist() == [1, 2, 0]


def test_farthest_target():
    assert choose_targets(CENTROIDS, "farthest").tolist() == [2, 2, 0]


def test_cross_class_target_always_crosses_classes():
    majority = np.array([0, 0, 1])
    assert choose_targets(CENTROIDS, "cross_class", majority=majority).tolist() == [2, 2, 0]
    # the reference offset would push cluster 0 toward cluster 1 of the same class
    assert majority[choose_targets(CENTROIDS, "next")[0]] == majority[0]
    far_same = torch.tensor([[0.0, 0.0], [9.0, 0.0], [2.0, 0.0]])  # farthest from 0 is same-class 1
    assert choose_targets(far_same, "cross_class", majority=majority).tolist() == [2, 2, 1]
    one_class = choose_targets(CENTROIDS, "cross_class", majority=np.array([0, 0, 0]))
    assert one_class.tolist() == choose_targets(CENTROIDS, "farthest").tolist()


@pytest.mark.parametrize("override,message", [
    ("generator.target=nearest", "generator.target must be one of"),
    ("generator.augment=maybe", "generator.augment must be true or false"),
    ("generator.boundary=wrap", "generator.boundary must be one of"),
    ("refine.steps=-1", "refine.steps must be >= 0"),
    ("refine.step_size=abc", "refine.step_size must be a number"),
    ("refine.batch_mib=0", "refine.batch_mib must be > 0"),
])
def test_bad_knob_values_are_refused(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


@pytest.fixture(scope="module")
def surrogate():
    torch.manual_seed(0)
    return ResNetWithFeature("resnet18", 3, 1, small_stem=False).eval().requires_grad_(False)


def test_refinement_stays_in_budget_lowers_the_loss_and_ignores_batching(surrogate):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 28, 28, 1), dtype=np.uint8)
    images[:3] = 0  # dark images: delta may only be positive there
    eps = 16 / 255
    start = np.repeat(rng.uniform(-eps, eps, (1, 28, 28, 1)).astype(np.float32), 12, 0)
    target = F.softmax(torch.randn(3, 512, generator=torch.Generator().manual_seed(1)), 1)
    clusters = np.arange(12) % 3

    def loss(delta):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        d = torch.from_numpy(delta).permute(0, 3, 1, 2)
        return kl_to_target(surrogate((x + d).clamp(0, 1))[1], target[torch.from_numpy(clusters)]).mean()

    uc_loss = cluster_target_loss(target, clusters)
    out = refine([surrogate], images, start, uc_loss, eps, "linf", 5, 0.25, torch.device("cpu"))
    assert np.abs(out).max() <= eps + 1e-6
    assert loss(out) < loss(start) - 1e-3
    halves = refine([surrogate], images, start, uc_loss, eps, "linf", 5, 0.25, torch.device("cpu"), batch=5)
    assert np.allclose(out, halves, atol=1e-6)
    l2 = refine([surrogate], images, start * 0.01, uc_loss, 1.0, "l2", 3, 0.5, torch.device("cpu"))
    assert np.linalg.norm(l2.reshape(12, -1), axis=1).max() <= 1.0 + 1e-5


def test_snapshot_epochs_are_evenly_spaced_before_the_last():
    assert snapshot_epochs(30, 4) == (6, 12, 18, 24)
    assert snapshot_epochs(30, 9) == (3, 6, 9, 12, 15, 18, 21, 24, 27)
    assert snapshot_epochs(10, 9) == tuple(range(1, 10))
    assert snapshot_epochs(5, 0) == ()


def test_model_schedule_goes_through_the_trajectory_in_equal_blocks():
    models = ["epoch 3", "epoch 6", "final"]
    assert [model_at(models, s, 6) for s in range(6)] == ["epoch 3"] * 2 + ["epoch 6"] * 2 + ["final"] * 2
    assert [model_at(models, s, 4) for s in range(4)] == ["epoch 3", "epoch 3", "epoch 6", "final"]
    assert {model_at(["only"], s, 200) for s in range(200)} == {"only"}


def test_refinement_through_a_trajectory_attacks_each_model_in_turn(surrogate):
    """Two models, four steps: two steps against the first, then two against the second from
    there -- not the second alone, not the other order."""
    torch.manual_seed(5)
    other = ResNetWithFeature("resnet18", 3, 1, small_stem=False).eval().requires_grad_(False)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    labels = (np.arange(6) % 3).reshape(-1, 1)
    eps, start, cpu = 16 / 255, np.zeros((6, 28, 28, 1), np.float32), torch.device("cpu")
    loss = next_class_loss(labels, 3)
    both = refine([surrogate, other], images, start, loss, eps, "linf", 4, 0.25, cpu)
    halfway = refine([surrogate], images, start, loss, eps, "linf", 2, 0.25, cpu)
    assert np.allclose(both, refine([other], images, halfway, loss, eps, "linf", 2, 0.25, cpu), atol=1e-6)
    assert not np.allclose(both, refine([other], images, start, loss, eps, "linf", 4, 0.25, cpu), atol=1e-3)
    assert not np.allclose(both, refine([other, surrogate], images, start, loss, eps, "linf", 4, 0.25, cpu), atol=1e-3)


def test_refinement_with_momentum_steps_along_the_running_sum_of_normalised_gradients(surrogate):
    """refine.momentum (MI-FGSM): each step's sign is that of momentum x the last sum plus the
    new L1-normalised gradient -- the same as this hand-written loop, other than without
    momentum, and momentum 0 is the plain refinement."""
    import torch.nn.functional as F

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    labels = (np.arange(4) % 3).reshape(-1, 1)
    eps, cpu = 16 / 255, torch.device("cpu")
    start = rng.uniform(-eps, eps, (4, 28, 28, 1)).astype(np.float32)
    loss = next_class_loss(labels, 3)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    d, velocity = torch.from_numpy(start).permute(0, 3, 1, 2), torch.zeros(4, 1, 28, 28)
    for _ in range(5):
        d.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(surrogate((x + d).clamp(0, 1))[0],
                                                    torch.from_numpy((labels[:, 0] + 1) % 3), reduction="sum"), d)
        velocity = 0.9 * velocity + grad / grad.abs().sum((1, 2, 3), keepdim=True)
        d = (d.detach() - 0.25 * eps * velocity.sign()).clamp(-eps, eps)
    expected = d.permute(0, 2, 3, 1).numpy()
    with_momentum = refine([surrogate], images, start, loss, eps, "linf", 5, 0.25, cpu, momentum=0.9)
    assert np.allclose(with_momentum, expected, atol=1e-6)
    plain = refine([surrogate], images, start, loss, eps, "linf", 5, 0.25, cpu)
    assert not np.allclose(with_momentum, plain, atol=1e-3)
    assert np.array_equal(plain, refine([surrogate], images, start, loss, eps, "linf", 5, 0.25, cpu, momentum=0.0))


def test_refine_init_and_momentum_need_a_refinement_to_shape():
    for overrides in (["refine.init=uniform", "refine.steps=0"], ["refine.momentum=0.5", "method=em"]):
        with pytest.raises(UserError, match="refine.init=.* and refine.momentum=.* shape UC's refinement"):
            load_config(None, overrides)
    with pytest.raises(UserError, match="refine.momentum must be"):
        load_config(None, ["refine.momentum=2"])


@pytest.mark.parametrize("overrides", [["surrogate.snapshots=2", "surrogate.weights=imagenet"],
                                       ["surrogate.snapshots=4", "surrogate.epochs=4"]])
def test_snapshots_need_a_trained_surrogate_with_more_epochs(overrides):
    with pytest.raises(UserError, match="surrogate.snapshots=.* needs surrogate.weights=pretrain and fewer"):
        load_config(None, overrides)


def test_surrogate_augment_needs_a_surrogate_trained_here():
    with pytest.raises(UserError, match="surrogate.augment trains the surrogate; surrogate.weights=imagenet"):
        load_config(None, ["surrogate.augment=true", "surrogate.weights=imagenet"])


def test_surrogate_optimizer_sgd_needs_a_surrogate_trained_here():
    with pytest.raises(UserError, match="surrogate.optimizer=sgd trains the surrogate; surrogate.weights=imagenet"):
        load_config(None, ["surrogate.optimizer=sgd", "surrogate.weights=imagenet"])
    with pytest.raises(UserError, match="surrogate.optimizer must be one of adam, sgd"):
        load_config(None, ["surrogate.optimizer=lamb"])


def test_targeted_refinement_aims_each_image_at_the_next_class(surrogate):
    """refine.objective=targeted: every step lowers the surrogate's loss of class y + 1 (not of
    y), per image, whatever the batching."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 28, 28, 1), dtype=np.uint8)
    labels = (np.arange(10) % 3).reshape(-1, 1)
    head = surrogate  # three classes
    eps, start = 16 / 255, np.zeros((10, 28, 28, 1), np.float32)

    def loss_of(delta, classes):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        logits = head((x + torch.from_numpy(delta).permute(0, 3, 1, 2)).clamp(0, 1))[0]
        return F.cross_entropy(logits, torch.from_numpy(classes), reduction="none")

    out = refine([head], images, start, next_class_loss(labels, 3), eps, "linf", 5, 0.25, torch.device("cpu"))
    assert np.abs(out).max() <= eps + 1e-6
    following, own = (labels[:, 0] + 1) % 3, labels[:, 0]
    assert (loss_of(out, following) < loss_of(start, following)).all()
    assert loss_of(out, own).mean() > loss_of(start, own).mean()
    halves = refine([head], images, start, next_class_loss(labels, 3), eps, "linf", 5, 0.25, torch.device("cpu"),
                    batch=4)
    assert np.allclose(out, halves, atol=1e-6)


def test_augmented_loss_is_seeded_and_differentiable(surrogate):
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    delta = torch.zeros(1, 1, 28, 28, requires_grad=True)
    target = F.softmax(torch.randn(1, 512), 1).expand(4, -1)

    def loss(epoch):
        augment = functools.partial(crop_flip, gen=epoch_generator(0, 0, epoch))
        return kl_to_target(surrogate(augment((x + delta).clamp(0, 1)))[1], target).mean()

    first = loss(0)
    first.backward()
    assert delta.grad.abs().sum() > 0
    assert torch.equal(first.detach(), loss(0).detach()) and not torch.equal(first.detach(), loss(1).detach())


def test_reflect_keeps_the_signal_on_black_pixels_within_budget():
    x = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 0.02])
    d = torch.tensor([-0.05, 0.05, -0.05, 0.05, -0.05, -0.06])
    clipped = add_perturbation(x, d, "clip")
    reflected = add_perturbation(x, d, "reflect")
    assert clipped[0] == 0 and reflected[0] == pytest.approx(0.05)  # clip deletes it, reflect keeps |d|
    assert reflected[3] == pytest.approx(0.95) and reflected[5] == pytest.approx(0.04)
    assert ((reflected - x).abs() <= d.abs() + 1e-7).all() and (reflected >= 0).all() and (reflected <= 1).all()
    rng = np.random.default_rng(0)
    images = rng.choice(np.array([0, 1, 128, 254, 255], np.uint8), (20, 6, 6, 1))
    delta = rng.uniform(-16 / 255, 16 / 255, images.shape).astype(np.float32)
    for boundary in ("clip", "reflect"):
        out = protect(images, delta, 16 / 255, "linf", boundary)
        assert np.abs(out.astype(int) - images.astype(int)).max() <= 16
    black = images == 0
    assert (protect(images, delta, 16 / 255, "linf", "reflect")[black] > 0).mean() > 0.9
    assert (protect(images, delta, 16 / 255, "linf", "clip")[black] > 0).mean() < 0.6


@pytest.mark.parametrize("train_on", ["all", "cluster"])
@pytest.mark.parametrize("micro_batch", [1, 3, 8, 20])
def test_micro_batches_give_the_unchunked_gradient(surrogate, train_on, micro_batch):
    """generator.micro_batch bounds the images per surrogate forward (K x the batch with
    train_on=all); the accumulated gradient equals the whole batch's (float tolerance)."""
    from types import SimpleNamespace

    from hpc_uc.generator import accumulate_generator_loss

    gen = torch.Generator().manual_seed(0)
    k, b = 3, 7
    x = torch.rand(b, 1, 28, 28, generator=gen)
    idx = torch.arange(b)
    probs = torch.softmax(torch.randn(k, 512, generator=gen), dim=1).double()  # centroids: feature space
    targets = SimpleNamespace(target_probs=probs, clusters=lambda index: index % k)
    surrogate = copy.deepcopy(surrogate).double()

    def grad(micro: int) -> tuple[torch.Tensor, float]:
        delta = (torch.rand(k, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 0.1).double().requires_grad_()
        loss = accumulate_generator_loss(surrogate, x.double(), idx, delta, targets, train_on, micro)
        return delta.grad, float(loss)

    whole, loss = grad(0)
    chunked, chunked_loss = grad(micro_batch)
    assert torch.allclose(chunked, whole, rtol=1e-9, atol=1e-12) and chunked_loss == pytest.approx(loss, rel=1e-9)
    assert whole.abs().sum() > 0


def test_classwise_noise_is_within_budget_and_seeded():
    from hpc_uc.classwise import class_noise

    a = class_noise(3, 1, 28, 16 / 255, "linf", seed=4)
    assert a.shape == (3, 1, 28, 28) and a.abs().max() <= 16 / 255 and a.abs().mean() > 4 / 255
    assert torch.equal(a, class_noise(3, 1, 28, 16 / 255, "linf", seed=4))
    assert not torch.equal(a, class_noise(3, 1, 28, 16 / 255, "linf", seed=5))
    l2 = class_noise(2, 3, 8, 0.5, "l2", seed=0)
    assert torch.allclose(l2.flatten(1).norm(dim=1), torch.full((2,), 0.5))


def test_augmented_refinement_is_an_expectation_and_the_same_in_any_batch(surrogate):
    """refine.augment: every step's loss is taken through the ue victim's crop and flip, drawn
    per image from (seed, sample id, step), so a chunk split across ranks refines the same; it
    moves delta differently from the plain loss, and its expected next-class loss is lower."""
    from hpc_uc.augment import augment_keys, keyed_crop_flip
    from hpc_uc.refine import keyed_augment

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (10, 28, 28, 1), dtype=np.uint8)
    labels = (np.arange(10) % 3).reshape(-1, 1)
    ids = np.arange(500, 510)
    eps, start = 16 / 255, np.zeros((10, 28, 28, 1), np.float32)
    loss, cpu = next_class_loss(labels, 3), torch.device("cpu")
    out = refine([surrogate], images, start, loss, eps, "linf", 5, 0.25, cpu, augment=keyed_augment(ids, seed=9, padding=4))
    assert np.abs(out).max() <= eps + 1e-6
    halves = [refine([surrogate], images[s], start[s], next_class_loss(labels[s], 3), eps, "linf", 5, 0.25, cpu,
                     augment=keyed_augment(ids[s], seed=9, padding=4)) for s in (slice(0, 4), slice(4, 10))]
    assert np.allclose(out, np.concatenate(halves), atol=1e-6)
    plain = refine([surrogate], images, start, loss, eps, "linf", 5, 0.25, cpu)
    assert not np.allclose(out, plain, atol=1e-3)

    def expected_loss(delta):  # over 16 fresh draws of the augmentation
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        inputs = (x + torch.from_numpy(delta).permute(0, 3, 1, 2)).clamp(0, 1)
        following = torch.from_numpy((labels[:, 0] + 1) % 3)
        return np.mean([F.cross_entropy(surrogate(keyed_crop_flip(inputs, augment_keys(77, ids, s)))[0],
                                        following).item() for s in range(16)])
    assert expected_loss(out) < expected_loss(start)


def test_refinement_auto_is_targeted_where_it_applies_and_off_elsewhere():
    """refine.steps/objective=auto (the defaults): 200 targeted steps for method=uc on
    single-label data with a surrogate head trained on its labels; UC's cluster delta alone on
    multi-label data, with surrogate.weights=imagenet and for the other methods; explicit
    settings pass through."""
    from hpc_uc.refine import AUTO_STEPS, resolve_refinement

    def plan(task, *overrides):
        return resolve_refinement(load_config(None, list(overrides)), task)

    assert AUTO_STEPS == 200
    assert plan("multi-class") == (200, "targeted") and plan("binary-class") == (200, "targeted")
    assert plan("multi-label, binary-class") == (0, "uc")
    assert plan("multi-class", "surrogate.weights=imagenet") == (0, "uc")
    assert plan("multi-class", "method=em") == (0, "uc") and plan("multi-class", "method=classwise") == (0, "uc")
    assert plan("multi-class", "refine.objective=uc") == (200, "uc")  # asked for: refined
    assert plan("multi-label, binary-class", "refine.objective=uc") == (200, "uc")
    assert plan("multi-label, binary-class", "refine.steps=5") == (5, "uc")
    assert plan("multi-class", "refine.steps=7", "refine.objective=uc") == (7, "uc")
    assert plan("multi-class", "refine.steps=0") == (0, "targeted")
    with pytest.raises(UserError, match="refine.steps must be an integer or auto"):
        load_config(None, ["refine.steps=many"])
    for overrides in (["method=em", "refine.objective=targeted"], ["method=ar", "refine.objective=uc"],
                      ["refine.objective=uc", "refine.steps=0"]):  # an objective that would refine nothing
        with pytest.raises(UserError, match="applies to method=uc with refine.steps > 0"):
            load_config(None, overrides)


def test_classwise_refuses_refine():
    with pytest.raises(UserError, match="refine.steps refines UC"):
        load_config(None, ["method=classwise", "refine.steps=3"])


def test_targeted_refinement_refuses_zero_steps_multilabel_data_and_an_untrained_head(tmp_path, monkeypatch):
    from hpc_uc import pipeline

    with pytest.raises(UserError, match="refine.objective=targeted applies to method=uc with refine.steps > 0"):
        load_config(None, ["refine.objective=targeted", "refine.steps=0"])
    fake_manifest(monkeypatch, "multi-label, binary-class")
    cfg = load_config(None, ["refine.objective=targeted", "refine.steps=3", f"data_dir={tmp_path}"])
    with pytest.raises(UserError, match="refine.objective=targeted needs one class per image"):
        pipeline.check_data(cfg)
    pipeline.check_data({**cfg, "refine": {**cfg["refine"], "objective": "uc"}})  # UC's own loss takes it
    fake_manifest(monkeypatch, "multi-class")
    pipeline.check_data(cfg)
    with pytest.raises(UserError, match="surrogate.weights=imagenet leaves untrained for these labels"):
        pipeline.check_data({**cfg, "surrogate": {**cfg["surrogate"], "weights": "imagenet"}})


def test_tile_pattern_repeats_the_corner_and_survives_shifts():
    from hpc_uc.models import tile_pattern
    pattern = torch.randn(2, 3, 28, 28)
    tiled = tile_pattern(pattern, 4)
    assert tiled.shape == pattern.shape
    assert torch.equal(tiled[..., :4, :4], pattern[..., :4, :4])
    assert torch.equal(tiled[..., 8:12, 20:24], pattern[..., :4, :4])
    # a shift by any amount is the same tiling of a rolled corner: the pattern is stationary
    shifted = torch.roll(tiled, shifts=(3, 1), dims=(-2, -1))
    assert torch.equal(shifted, tile_pattern(torch.roll(pattern[..., :4, :4], (3, 1), (-2, -1)).repeat(1, 1, 7, 7), 4))
    odd = tile_pattern(pattern, 5)  # a period that does not divide the image: cut at the edge
    assert torch.equal(odd[..., 25:28, 25:28], pattern[..., :3, :3])
    assert torch.equal(tile_pattern(pattern, 0), pattern) and torch.equal(tile_pattern(pattern, 28), pattern)


def test_tiled_perturbations_keep_the_budget():
    from hpc_uc.models import Generator, perturbation
    gen = Generator(1, 8, 1, 1)
    z = torch.rand(2, 1, 28, 28)
    d = perturbation(gen, z, 16 / 255, "linf", tile=7)
    assert d.abs().max() <= 16 / 255 + 1e-7 and torch.equal(d[..., 7:14, :7], d[..., :7, :7])
    d2 = perturbation(gen, z, 0.5, "l2", tile=7)
    assert torch.all(d2.flatten(1).norm(dim=1) <= 0.5 + 1e-6)
    from hpc_uc.classwise import class_noise
    for norm, bound in (("linf", lambda t: t.abs().amax((1, 2, 3))), ("l2", lambda t: t.flatten(1).norm(dim=1))):
        noise = class_noise(3, 1, 28, 0.1, norm, seed=0, tile=4)
        assert torch.all(bound(noise) <= 0.1 + 1e-6)
        assert torch.equal(noise[..., 4:8, 4:8], noise[..., :4, :4])


def test_tile_is_a_train_stage_key():
    from hpc_uc.rundir import stage_key
    assert stage_key(load_config(None, ["tile=4"]), "train") != stage_key(load_config(None, []), "train")
    assert stage_key(load_config(None, ["tile=4"]), "cluster") == stage_key(load_config(None, []), "cluster")
    with pytest.raises(UserError):
        load_config(None, ["tile=-1"])


def test_refinement_reports_each_batch_and_the_log_line_reads_the_rate():
    from hpc_uc.training import rate_line

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    heard = []
    loss = lambda logits, feats, rows: logits.square().sum(1)  # noqa: E731
    model = lambda x: (x.flatten(1)[:, :3], None)  # noqa: E731
    refine([model], images, np.zeros((5, 8, 8, 1), np.float32), loss, 16 / 255, "linf", 2, 0.25,
           torch.device("cpu"), batch=2, on_batch=heard.append)
    assert heard == [2, 2, 1]
    assert rate_line(50, 200, 10.0, "images") == "50/200 images (5.0 images/s, about 30 s left)"
    assert rate_line(200, 200, 10.0, "images") == "200/200 images (20.0 images/s, done)"


def test_refinement_batch_keeps_its_activations_within_the_budget():
    """At 224 px 256 images of a ResNet-18's activations are ~9 GiB: the batch follows
    refine.batch_mib, and the per-image figure it is made from holds for a larger batch."""
    torch.manual_seed(0)
    model = frozen(ResNetWithFeature("resnet18", 2, 3, small_stem=False), torch.device("cpu"))
    shape = (3, 224, 224)
    per_image = activation_bytes(model, shape, torch.device("cpu"))
    one, four = (saved_bytes(model, torch.zeros(n, *shape)) for n in (1, 4))
    assert four - one == pytest.approx(3 * per_image, rel=1e-3)
    n = fitting_batch(model, shape, torch.device("cpu"), 64)
    assert n * per_image <= 64 * 2**20 < (n + 1) * per_image
    assert fitting_batch(model, shape, torch.device("cpu"), 1024) < 256
    assert fitting_batch(model, shape, torch.device("cpu"), 0.01) == 1  # never fewer than one image
    small = frozen(ResNetWithFeature("resnet18", 2, 1, small_stem=False), torch.device("cpu"))
    assert fitting_batch(small, (1, 28, 28), torch.device("cpu"), 1024) == 256  # 28 px: as before
    assert fitting_batch(small, (1, 28, 28), torch.device("cpu"), 1024, cap=32) == 32  # surrogate.micro_batch
