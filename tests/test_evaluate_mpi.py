"""Victim measurement across 2 ranks: every test and val sample is gathered exactly once, in
order, and the figures (test ACC/AUC, the attacker's re-fit) equal those of one process."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.__main__ import main as prep_main
from conftest import single_rank
from hpc_uc.config import load_config
from hpc_uc.evaluate import Splits, build_victim, measure, predict_with_features
from hpc_uc.export import read_whole_split

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def digits_shared():
    from hpc_uc.comm import get_comm

    mpi = get_comm("mpi")
    path = Path(mpi.broadcast(tempfile.mkdtemp(prefix="hpc-uc-eval-") if mpi.is_root else None))
    prep_main(["digits", "--shards", "3", "--out", str(path / "digits")])  # collective: every rank writes
    mpi.barrier()
    yield path / "digits"
    mpi.barrier()
    if mpi.is_root:
        shutil.rmtree(path, ignore_errors=True)


def test_two_ranks_measure_like_one(comm, digits_shared):
    cfg = load_config(None, [f"data_dir={digits_shared}", "victim.stem=standard", "cache=never"])
    splits = Splits(cfg, comm)
    torch.manual_seed(3)
    model = build_victim(cfg, splits.test.manifest).eval()
    gathered = predict_with_features(model, splits.test, comm)
    got = measure(cfg, model, splits, comm)
    if not comm.is_root:
        assert gathered is None and got == {}
        return
    _, labels, _ = read_whole_split(digits_shared, "test")
    assert np.array_equal(gathered[2], labels)  # every sample once, in global order
    solo = single_rank()
    alone = predict_with_features(model, Splits(cfg, solo).test, solo)
    np.testing.assert_allclose(gathered[0], alone[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gathered[1], alone[1], rtol=1e-4, atol=1e-5)
    want = measure(cfg, model, Splits(cfg, solo), solo)
    assert got.keys() == want.keys()
    for key in got:
        assert got[key] == pytest.approx(want[key], abs=2e-3), key
    assert got["recalibrated_acc"] > 0.3  # 100 clean images re-fit an untrained net's features


def test_turned_epoch_is_measured_on_its_own_state(comm, digits_shared, monkeypatch):
    """medmnist victim, 2 epochs, validation AUC scripted to 0.6 then 0.2: epoch 1 is kept,
    epoch 2 is the turning attacker's; its own weights are measured (on every rank, a
    collective) and its test AUC turned over."""
    from hpc_uc import evaluate
    from hpc_uc.training import MetricsLog

    scripted, marks, measured = {1: 0.6, 2: 0.2}, [], []
    real_predict, real_metrics, real_measure = evaluate.predict, evaluate.medmnist_metrics, evaluate.measure

    def fingerprint(model) -> float:
        return float(sum(p.double().sum() for p in model.parameters()))

    def predict(model, ds, comm_):
        if isinstance(model, evaluate._LogitsAndFeatures):  # measure's, unscripted
            return real_predict(model, ds, comm_)
        marks.append(fingerprint(model))  # the end of an epoch: its validation figures
        return ("epoch", len(marks)), None

    def metrics(task, labels, scores):
        if isinstance(scores, tuple):
            return {"acc": 0.5, "auc": scripted[scores[1]]}
        return real_metrics(task, labels, scores)

    def measure(cfg_, model, splits_, comm_):
        measured.append((fingerprint(model), real_measure(cfg_, model, splits_, comm_)))
        return measured[-1][1]

    monkeypatch.setattr(evaluate, "predict", predict)
    monkeypatch.setattr(evaluate, "medmnist_metrics", metrics)
    monkeypatch.setattr(evaluate, "measure", measure)
    cfg = load_config(None, [f"data_dir={digits_shared}", "victim.stem=standard", "cache=never", "victim.epochs=2"])
    splits = Splits(cfg, comm)
    log = MetricsLog(digits_shared.parent / "metrics.jsonl", comm, "evaluate")
    out = evaluate.train_and_test(cfg, comm, digits_shared, "protected", "medmnist", splits, log)
    assert [m[0] for m in measured] == marks  # epoch 1's weights, then epoch 2's
    if comm.is_root:
        assert (out["best_epoch"], out["turned_epoch"], out["turned_val_auc"]) == (1, 2, 0.2)
        assert out["turned_test_auc"] == pytest.approx(1 - measured[1][1]["test_auc"])
        assert out["turned_recalibrated_acc"] == measured[1][1]["recalibrated_acc"]


def test_floor_victim_trains_on_the_same_shuffled_labels_on_every_rank(comm, digits_shared, monkeypatch):
    """evaluate.floor's victim: each training image carries the label its sample id gets from
    one seeded permutation of the split (the class counts kept), whichever rank reads it."""
    from hpc_uc import evaluate
    from hpc_uc.reader import ShardedDataset
    from hpc_uc.shuffled_labels import ShuffledLabels
    from hpc_uc.training import MetricsLog

    seen: dict[int, int] = {}

    def train(model, train_ds, comm_, **kwargs):
        for _, labels, index in train_ds.batches(16, epoch=0, shuffle=True, drop_last=False):
            seen.update(zip(index.tolist(), labels[:, 0].tolist()))

    monkeypatch.setattr(evaluate, "train_classifier", train)
    cfg = load_config(None, [f"data_dir={digits_shared}", "victim.stem=standard", "cache=never", "seed=5"])
    evaluate.train_and_test(cfg, comm, digits_shared, "floor", "medmnist", Splits(cfg, comm),
                            MetricsLog(digits_shared.parent / "metrics.jsonl", comm, "evaluate"), shuffle_labels=True)
    parts = comm.gather(seen)
    if not comm.is_root:
        return
    _, labels, index = read_whole_split(digits_shared, "train")
    solo = ShuffledLabels(ShardedDataset(digits_shared, "train", None), seed=5)
    for part in parts:  # each rank its part of the deal (equal parts: an odd split leaves one out)
        ids = np.array(sorted(part))
        assert [part[i] for i in ids.tolist()] == solo.labels_of(ids)[:, 0].tolist()
    assert len(set(parts[0]) | set(parts[1])) >= len(index) - 1
    by_id = labels[np.argsort(index)]  # the documented rule: labels in sample-id order, permuted by the seed
    assert np.array_equal(solo.labels, by_id[np.random.default_rng(5).permutation(len(by_id))])
    assert np.array_equal(np.bincount(solo.labels[:, 0]), np.bincount(labels[:, 0]))  # a permutation
    truth = dict(zip(index.tolist(), labels[:, 0].tolist()))
    assert np.mean([y != truth[i] for part in parts for i, y in part.items()]) > 0.8  # 10 classes: ~0.9
    assert not np.array_equal(solo.labels, ShuffledLabels(ShardedDataset(digits_shared, "train", None), 6).labels)
