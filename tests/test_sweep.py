"""The sweep's bookkeeping and statistics, without MPI: stale points, mean +- sd, the batch-effect test."""
from __future__ import annotations

import numpy as np
import pytest

from hpc_uc.atomic import write_json
from hpc_uc.errors import UserError
from hpc_uc.rundir import RunDir
from hpc_uc.sweep import parse_seeds, seed_point, shared_files
from hpc_uc.sweep_summary import batch_effect, read_csv, summary_markdown, write_csv, write_summary


def rows(values: np.ndarray, batches=(16, 64, 256), protocol="ue", dataset="digits") -> list[dict]:
    """Rows of a (batch x seed) grid of headline protection."""
    out = []
    for i, b in enumerate(batches):
        for s in range(values.shape[1]):
            v = float(values[i, s])
            out.append({"dataset": dataset, "lr_scaling": "linear", "batch_size": b, "seed": s,
                        "protocol": protocol, "world_size": 2, "clean_acc": 0.9, "protected_acc": 0.5,
                        "clean_auc": 0.95, "protected_auc": 1 - v / 2, "recalibrated_acc": 0.8,
                        "protection_acc": v, "protection_auc": v, "protection_recalibrated_acc": v,
                        "protection": v, "chance_acc": 0.5, "psnr_db": 30.0, "train_seconds": 1.0})
    return out


def test_batch_effect_separates_signal_from_seed_noise():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.05, (3, 4))
    strong = batch_effect(rows(np.array([[0.1], [0.5], [0.9]]) + noise), "protection", permutations=999)
    assert strong["p_anova"] < 0.001 and strong["p_permutation"] < 0.01
    assert strong["df"] == (2, 6) and strong["seeds"] == 4
    spread = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.1, 0.3, 0.2], [0.2, 0.4, 0.1, 0.3]])  # equal batch means
    null = batch_effect(rows(spread), "protection", permutations=999)
    assert null["p_anova"] > 0.99 and null["p_permutation"] > 0.99 and null["batch_range"] < 1e-9
    assert null["p_spread"] > 0.99  # the same four values in every batch: the same spread
    wide = np.array([[0.5, 0.5, 0.5, 0.5], [0.49, 0.51, 0.5, 0.5], [0.1, 0.9, 0.2, 0.8]])
    assert batch_effect(rows(wide), "protection", permutations=99)["p_spread"] < 0.05


def test_batch_effect_blocks_on_seed():
    """A seed that is better at every batch is the block effect, not noise around the batch."""
    grid = np.array([[0.1, 0.5, 0.9], [0.12, 0.52, 0.92], [0.14, 0.54, 0.94]])  # columns: seeds
    test = batch_effect(rows(grid), "protection", permutations=999)
    assert test["p_anova"] < 1e-6 and test["seed_sd"] < 1e-6


def test_batch_effect_needs_two_seeds_and_uses_complete_blocks():
    assert batch_effect(rows(np.array([[0.1], [0.2], [0.3]])), "protection") is None
    incomplete = [r for r in rows(np.full((3, 3), 0.5) + np.eye(3)[:, :3] * 0.01) if (r["seed"], r["batch_size"]) != (2, 16)]
    two = batch_effect(incomplete, "protection", permutations=99)
    assert two["seeds"] == 2 and two["p_spread"] is None


def test_summary_reports_mean_sd_and_the_test(tmp_path):
    data = rows(np.array([[0.1, 0.3], [0.5, 0.7], [0.9, 0.7]])) + rows(np.full((3, 2), 0.2), protocol="medmnist")
    text = summary_markdown(data)
    assert "## digits (lr linear), ue victim" in text and "## digits (lr linear), medmnist victim" in text
    assert "| 16 | 2 | 0.900 ± 0.071 | 0.800 ± 0.000 | 0.200 ± 0.141 |" in text
    assert "block ANOVA F(2, 2)" in text and "within-seed permutation p" in text
    write_csv(tmp_path / "sweep.csv", data)
    assert read_csv(tmp_path) == data
    write_summary(tmp_path, data)
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_read_csv_refuses_a_table_without_seeds(tmp_path):
    (tmp_path / "sweep.csv").write_text("dataset,batch_size,protocol\ndigits,32,ue\n")
    with pytest.raises(UserError, match="seed column"):
        read_csv(tmp_path)


def test_parse_seeds():
    assert parse_seeds("2,0,2") == [0, 2]
    for bad in ("", "a", "-1"):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(bad)


def test_stale_point_gets_the_new_shared_files_and_recomputes(tmp_path):
    """After the sweep's inputs changed (say K 2 -> 3), a point made before must not keep its
    old surrogate and clusters while its stages are marked done for the new config."""
    shared, point = RunDir(tmp_path / "shared"), RunDir(tmp_path / "bs32")
    cfg = {"dataset": "digits", "data_dir": "d", "seed": 0, "surrogate": {}, "lr_scaling": "linear",
           "base_batch_size": 256, "warmup_epochs": 0, "clusters": 3, "kmeans": {}, "method": "uc"}
    for run, tag in ((shared, b"new"), (point, b"old")):
        run.root.mkdir()
        for name in shared_files(shared, cfg):
            (run.root / name).write_bytes(tag + name.encode())
    write_json(point.root / "stages.json", {"surrogate": "x", "cluster": "y", "train": "z", "export": "e",
                                            "evaluate": "v"})
    seed_point(shared, point, cfg)
    for name in shared_files(shared, cfg):
        assert (point.root / name).read_bytes() == b"new" + name.encode()
    assert set(point.completed()) == {"surrogate", "cluster"}
    write_json(point.root / "stages.json", {**point.completed(), "train": "z"})
    seed_point(shared, point, cfg)  # the same files: the later stages stay done
    assert "train" in point.completed()


def test_points_get_the_surrogate_snapshots_when_kept_and_lose_stale_ones(tmp_path):
    """The kept epochs travel with the surrogate where the shared run has them; a point that
    holds some from a config that kept them loses them, and its later stages re-run."""
    shared, point = RunDir(tmp_path / "shared"), RunDir(tmp_path / "bs32")
    cfg = {"dataset": "digits", "data_dir": "d", "seed": 0, "surrogate": {"snapshots": 3}, "lr_scaling": "linear",
           "base_batch_size": 256, "warmup_epochs": 0, "clusters": 3, "kmeans": {}, "method": "uc"}
    shared.root.mkdir()
    for name in ("surrogate.pt", "surrogate.json", "clusters.npz"):
        (shared.root / name).write_bytes(name.encode())
    assert "surrogate_snapshots.pt" not in shared_files(shared, cfg)
    shared.surrogate_snapshots.write_bytes(b"kept")
    assert "surrogate_snapshots.pt" in shared_files(shared, cfg)
    seed_point(shared, point, cfg)
    assert point.surrogate_snapshots.read_bytes() == b"kept"
    assert "surrogate_snapshots.pt" in point.completed()["surrogate"]["files"]
    shared.surrogate_snapshots.unlink()  # the sweep now runs without snapshots
    write_json(point.root / "stages.json", {**point.completed(), "train": "z"})
    seed_point(shared, point, cfg)
    assert not point.surrogate_snapshots.exists()
    assert set(point.completed()) == {"surrogate", "cluster"}
