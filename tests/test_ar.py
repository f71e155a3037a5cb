"""method=ar: autoregressive perturbations (hpc_uc.ar) — the recurrence, the budget, the seed."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import fake_manifest
from hpc_uc.ar import CROP, ar_coefficients, ar_fill, ar_perturbations, ar_residual
from hpc_uc.config import load_config
from hpc_uc.errors import UserError

EPS = 16 / 255


def class_draws(seed: int = 0, classes: int = 4, per_class: int = 3, channels: int = 3, size: int = 16,
                norm: str = "linf", epsilon: float = EPS):
    coefficients = ar_coefficients(classes, channels, size, seed)
    labels = np.repeat(np.arange(classes), per_class)
    ids = np.arange(len(labels)) * 7 + 3  # sample ids need not be 0..N-1
    return coefficients, labels, ids, ar_perturbations(coefficients, labels, ids, size, epsilon, norm, seed)


def raster_fill(b: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The paper's order, one pixel at a time (one channel; b is 3 x 3, its last entry ignored)."""
    x = start.astype(np.float64).copy()
    w = b.copy()
    w[2, 2] = 0.0
    for i in range(2, x.shape[0]):
        for j in range(2, x.shape[1]):
            x[i, j] = np.sum(w * x[i - 2:i + 1, j - 2:j + 1])
    return x


def test_fill_matches_the_raster_order_recurrence():
    rng = np.random.default_rng(0)
    b = rng.standard_normal((2, 3, 3))
    b[:, 2, 2] = 0
    b /= b.sum(axis=(1, 2), keepdims=True)
    start = rng.standard_normal((1, 2, 9, 7))
    got = ar_fill(b[None], start)
    for ch in range(2):
        assert np.allclose(got[0, ch], raster_fill(b[ch], start[0, ch]), rtol=1e-10, atol=1e-12)
    assert np.array_equal(got[0, :, :2], start[0, :, :2]) and np.array_equal(got[0, :, :, :2], start[0, :, :, :2])
    assert not np.allclose(got[0, :, 2:, 2:], start[0, :, 2:, 2:])  # the interior was generated


def test_coefficients_sum_to_one_and_stay_bounded():
    c = ar_coefficients(5, 3, 28, seed=1)
    assert c.shape == (5, 3, 3, 3)
    assert np.allclose(c.sum(axis=(2, 3)), 1.0) and np.all(c[..., 2, 2] == 0)
    x = ar_fill(c, np.random.default_rng(9).standard_normal((5, 3, 28 + CROP, 28 + CROP)))
    assert np.isfinite(x).all() and np.abs(x).max() < 100  # a stable process: no blow-up


def test_each_delta_obeys_its_own_class_recurrence_and_not_the_others():
    coefficients, labels, _, delta = class_draws()
    own = ar_residual(coefficients[labels], delta)
    assert np.abs(own).max() <= 1e-5 * np.abs(delta).max()  # float32 rounding only
    other = ar_residual(coefficients[(labels + 1) % len(coefficients)], delta)
    assert np.abs(other).mean() > 0.05 * np.abs(delta).mean()


@pytest.mark.parametrize("norm, epsilon", [("linf", EPS), ("l2", 0.5)])
def test_every_delta_is_scaled_to_the_budget(norm, epsilon):
    *_, delta = class_draws(norm=norm, epsilon=epsilon)
    assert delta.shape == (12, 3, 16, 16) and delta.dtype == np.float32
    flat = delta.reshape(len(delta), -1).astype(np.float64)
    size = np.abs(flat).max(axis=1) if norm == "linf" else np.linalg.norm(flat, axis=1)
    assert np.all(size <= epsilon * (1 + 1e-6)) and np.allclose(size, epsilon, rtol=1e-5)


def test_seeded_per_sample_and_independent_of_how_samples_are_split():
    coefficients, labels, ids, delta = class_draws(seed=4)
    again = class_draws(seed=4)
    assert np.array_equal(again[0], coefficients) and delta.tobytes() == again[3].tobytes()
    other = class_draws(seed=5)
    assert not np.allclose(other[0], coefficients) and not np.allclose(other[3], delta)
    # a rank holding some of the samples, in another order, draws the same rows for them
    part = [7, 2, 10]
    assert np.array_equal(ar_perturbations(coefficients, labels[part], ids[part], 16, EPS, "linf", 4), delta[part])
    # per-sample: two images of one class get different draws of the same process
    assert labels[0] == labels[1] and not np.allclose(delta[0], delta[1])


def test_classes_get_different_processes():
    c = ar_coefficients(6, 1, 28, seed=0).reshape(6, -1)
    gaps = np.abs(c[:, None] - c[None]).sum(-1)
    assert (gaps + np.eye(6) > 1e-3).all()


def test_ar_refuses_refine():
    assert load_config(None, ["method=ar"])["method"] == "ar"
    with pytest.raises(UserError, match="refine.steps refines UC"):
        load_config(None, ["method=ar", "refine.steps=3"])


def test_ar_refuses_multilabel_data(tmp_path, monkeypatch):
    from hpc_uc import pipeline

    fake_manifest(monkeypatch, "multi-label, binary-class")
    cfg = load_config(None, ["method=ar", f"data_dir={tmp_path}", "clusters=2"])
    with pytest.raises(UserError, match="method=ar needs one class per image"):
        pipeline.check_data(cfg)
    pipeline.check_data({**cfg, "method": "uc"})  # UC takes multi-label data
