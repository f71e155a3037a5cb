"""The hardening cases (docs/bad_input.md): each gets one line and a non-zero exit before heavy
work, leaves good outputs untouched and nothing half-written; secrets are owner-only."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY, mpirun, replace_stage_bodies, run_job, tiny_config, venv_bin
from data_prep.__main__ import main as prep_main
from hpc_uc.errors import UserError, describe
from hpc_uc.pipeline import check_ranks, run_all, run_stage, start
from hpc_uc.rundir import RunDir
from hpc_uc.shards import ShardSetWriter, make_manifest, verify

CONFIG = str(REPO / "configs" / "digits.yaml")


def copy_of(finished_run, tmp_path: Path, name: str = "run") -> RunDir:
    _, run = finished_run
    shutil.copytree(run.root, tmp_path / name, symlinks=True)
    return RunDir(tmp_path / name)


def cli(*args: str, np: int = 1) -> subprocess.CompletedProcess:
    cmd = [*mpirun(np), venv_bin("hpc-uc")] if np > 1 else [venv_bin("hpc-uc")]
    return run_job([*cmd, *args], timeout=300)


def one_line(proc: subprocess.CompletedProcess, fragment: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hpc-uc:")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(run: RunDir) -> dict[str, bytes]:
    return {str(p.relative_to(run.root)): p.read_bytes() for p in sorted(run.root.rglob("*")) if p.is_file()}


# ---- high -----------------------------------------------------------------------------------
def test_export_refuses_inputs_made_from_other_data(finished_run, digits_dir, tmp_path):
    """Same image count, other directory: the clusters and delta belong to the first data."""
    run = copy_of(finished_run, tmp_path)
    other = tmp_path / "other-digits"
    shutil.copytree(digits_dir, other)
    before = snapshot(run)
    proc = cli("export", CONFIG, *TINY, f"data_dir={other}", f"run_dir={run.root}")
    line = one_line(proc, "cannot run export: surrogate's outputs")
    assert "made from other inputs" in line and "data_dir" in line
    assert snapshot(run) == before


def test_a_stage_record_names_the_data_it_was_made_from(tmp_path, capsys):
    """The same data_dir re-prepared with other images is other input."""
    data = tmp_path / "data"
    assert prep_main(["digits", "--shards", "2", "--out", str(data)]) == 0
    cfg = tiny_config(data, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    for name in ("surrogate.pt", "surrogate.json"):
        (run.root / name).write_bytes(b"x")
    run.mark_done(cfg, "surrogate")
    assert run.is_done(cfg, "surrogate")
    assert prep_main(["digits", "--shards", "3", "--out", str(data), "--overwrite"]) == 0
    assert not run.is_done(cfg, "surrogate")
    assert "data manifest" in run.why_not_done(cfg, "surrogate")


def test_batch_larger_than_the_training_split_is_refused_up_front(digits_dir, tmp_path):
    for key in ("batch_size", "victim.batch_size", "surrogate.batch_size"):
        cfg = tiny_config(digits_dir, tmp_path / "run", f"{key}=2048")
        with pytest.raises(UserError, match=rf"{key}=2048 is larger than the training split \(1257 samples"):
            start(cfg)
    assert not (tmp_path / "run").exists()


def test_batch_check_counts_each_ranks_share():
    cfg = tiny_config("data/digits", "runs/x", "batch_size=100", "victim.batch_size=100", "surrogate.batch_size=100")
    check_ranks(cfg, 2, 101)  # 50 per rank, 50 samples per rank
    with pytest.raises(UserError, match="50 per rank over 2"):
        check_ranks(tiny_config("data/digits", "runs/x", "batch_size=102"), 2, 101)


# ---- medium ---------------------------------------------------------------------------------
def test_full_disk_is_one_line_before_writing(finished_run, tmp_path, monkeypatch):
    import hpc_uc.diskspace as diskspace

    cfg, _ = finished_run
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda p: SimpleNamespace(free=1 << 20))
    cfg = {**cfg, "run_dir": str(run.root)}
    comm, run = start(cfg)
    with pytest.raises(UserError, match=r"not enough disk space for the export \(protected/ and protected.npz\) in .*MiB free"):
        run_stage("export", cfg, comm, run)
    assert snapshot(run) == before
    assert not [p for p in run.root.iterdir() if ".tmp-" in p.name]
    line = describe(OSError(28, "No space left on device", "/x/protected.npz"))
    assert line.startswith("disk full writing /x/protected.npz")


def test_data_prep_checks_free_space(tmp_path, capsys, monkeypatch):
    import hpc_uc.diskspace as diskspace

    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda p: SimpleNamespace(free=1 << 10))
    assert prep_main(["digits", "--out", str(tmp_path / "out")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "not enough disk space" in err[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_evaluate_without_an_export_fails_before_training(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    shutil.rmtree(run.protected)
    cfg, _ = finished_run
    proc = cli("evaluate", CONFIG, *TINY, f"data_dir={cfg['data_dir']}", f"run_dir={run.root}")
    one_line(proc, "cannot run evaluate: export's outputs")
    assert "missing (protected/manifest.json)" in proc.stderr and "victim" not in proc.stdout


def test_a_stage_is_done_only_with_its_artifacts_intact(finished_run, tmp_path):
    cfg, _ = finished_run
    run = copy_of(finished_run, tmp_path)
    cfg = {**cfg, "run_dir": str(run.root)}
    assert run.is_done(cfg, "cluster")
    run.clusters.unlink()
    assert not run.is_done(cfg, "cluster")
    proc = cli("train", CONFIG, *TINY, f"data_dir={cfg['data_dir']}", f"run_dir={run.root}")
    one_line(proc, "cannot run train: cluster's outputs")
    assert "missing (clusters.npz)" in proc.stderr
    with open(run.results, "ab") as fh:
        fh.write(b" ")
    assert not run.is_done(cfg, "evaluate") and "damaged" in run.why_not_done(cfg, "evaluate")


def test_missing_artifact_reruns_its_stage_and_the_later_ones(finished_run, tmp_path, capsys, monkeypatch):
    """`rm clusters.npz; hpc-uc run` makes the clusters again and everything after them
    (stage bodies replaced by a recorder: which stages run is what is tested here)."""
    cfg, _ = finished_run
    run = copy_of(finished_run, tmp_path)
    cfg = {**cfg, "run_dir": str(run.root)}
    run.clusters.unlink()
    ran = []
    replace_stage_bodies(monkeypatch, lambda name: lambda c, comm, r: ran.append(name))
    comm, run = start(cfg)
    run_all(cfg, comm, run)
    assert ran == ["cluster", "train", "export", "evaluate"]


def test_config_yaml_describes_only_outputs_that_exist(finished_run, tmp_path, monkeypatch):
    cfg, _ = finished_run
    run = copy_of(finished_run, tmp_path)
    before = run.config.read_bytes()
    changed = {**cfg, "run_dir": str(run.root), "generator": {**cfg["generator"], "epochs": 3}}
    comm, run = start(changed)
    assert run.config.read_bytes() == before  # not rewritten just by starting

    def fails(c, comm, r):
        raise RuntimeError("killed")

    replace_stage_bodies(monkeypatch, lambda name: fails)
    with pytest.raises(RuntimeError):
        run_stage("train", changed, comm, run)
    assert run.config.read_bytes() == before


def test_data_prep_refuses_an_empty_split(tmp_path, capsys):
    from test_shards import make_npz

    make_npz(tmp_path / "b.npz", "breastmnist", counts=(12, 0, 7))
    code = prep_main(["medmnist", "breastmnist", "--npz", str(tmp_path / "b.npz"), "--allow-md5-mismatch",
                      "--out", str(tmp_path / "out")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "the val split is empty" in err[0]
    assert not (tmp_path / "out").exists()


def test_pipeline_refuses_a_shard_set_with_an_empty_split(tmp_path):
    out = tmp_path / "data"
    rng = np.random.default_rng(0)
    with ShardSetWriter(out) as w:
        w.write("train", rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), rng.integers(0, 2, (40, 1)),
                np.arange(40), 0, 1)
        w.write("val", np.zeros((0, 8, 8, 1), np.uint8), np.zeros((0, 1)), np.arange(0), 0, 1)
        w.write("test", rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8), rng.integers(0, 2, (5, 1)),
                np.arange(5), 0, 1)
        w.commit(make_manifest("toy", "binary-class", 1, 8, ["a", "b"], {"file": "toy", "md5": None}))
    with pytest.raises(UserError, match="the val split is empty"):
        start(tiny_config(out, tmp_path / "run", "clusters=2", "batch_size=8", "victim.batch_size=8",
                          "surrogate.batch_size=8"))


def test_16_bit_png_keeps_its_contrast(tmp_path, capsys):
    """Pillow's convert("RGB") clips 16-bit grey to 255 (the probe: 99 % of pixels white)."""
    from test_shards import write_tree

    write_tree(tmp_path / "tree", {"train": {"cat": 2}, "test": {"cat": 1}})
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "tree" / "train" / "cat" / "deep.png")
    assert prep_main(["imagefolder", str(tmp_path / "tree"), "--size", "32", "--out", str(tmp_path / "out")]) == 0
    from hpc_uc.export import read_whole_split

    images, _, _ = read_whole_split(tmp_path / "out", "train")
    deep = images[-1]  # "deep.png" sorts last among cat's files
    assert np.abs(deep[..., 0].astype(int) - np.rint(ramp / 257)).max() <= 1
    assert (deep == 255).mean() < 0.01


# ---- low ------------------------------------------------------------------------------------
def test_corrupt_weights_file_is_named(finished_run, tmp_path):
    cfg, _ = finished_run
    run = copy_of(finished_run, tmp_path)
    run.surrogate.write_bytes(b"not a torch file")
    stamp = run.completed()  # as if the file had been damaged without changing size
    stamp["surrogate"]["files"]["surrogate.pt"] = run.surrogate.stat().st_size
    (run.root / "stages.json").write_text(json.dumps(stamp))
    proc = cli("train", CONFIG, *TINY, f"data_dir={cfg['data_dir']}", f"run_dir={run.root}")
    one_line(proc, f"{run.surrogate} is damaged or not a file hpc-uc wrote")


def test_corrupt_checkpoint_starts_over_with_a_warning(finished_run, tmp_path):
    cfg, _ = finished_run
    run = copy_of(finished_run, tmp_path)
    run.checkpoint.parent.mkdir(exist_ok=True)
    run.checkpoint.write_bytes(b"\x00" * 100)
    proc = cli("train", CONFIG, *TINY, f"data_dir={cfg['data_dir']}", f"run_dir={run.root}", "resume=true")
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint.pt is damaged" in proc.stdout and "starting over" in proc.stdout


def test_verify_checks_labels_and_sample_ids(tmp_path):
    rng = np.random.default_rng(0)

    def build(out, labels, index):
        with ShardSetWriter(out) as w:
            w.write("train", rng.integers(0, 256, (4, 4, 4, 1), dtype=np.uint8), labels, index, 0, 1)
            w.commit(make_manifest("toy", "multi-class", 1, 4, ["a", "b", "c"], {"file": "toy", "md5": None}))

    build(tmp_path / "labels", np.array([[0], [1], [2], [3]]), np.arange(4))
    with pytest.raises(UserError, match="labels 0..3 outside 0..2"):
        verify(tmp_path / "labels")
    build(tmp_path / "range", np.zeros((4, 1)), np.array([0, 1, 2, -9]))
    with pytest.raises(UserError, match="negative sample index -9"):
        verify(tmp_path / "range")
    build(tmp_path / "twice", np.zeros((4, 1)), np.array([0, 1, 1, 2]))
    with pytest.raises(UserError, match="holds a sample index twice"):
        verify(tmp_path / "twice")


def test_symlinked_export_replaces_the_target_and_keeps_the_link(finished_run, tmp_path):
    """protected/ as a link to another disk (the probe: a stale protected.npz and a stray
    protected.old-*)."""
    cfg, _ = finished_run
    run = copy_of(finished_run, tmp_path)
    elsewhere = tmp_path / "scratch" / "protected"
    elsewhere.parent.mkdir()
    shutil.move(str(run.protected), elsewhere)
    run.protected.symlink_to(elsewhere)
    with np.load(run.protected_npz) as npz:
        old = {k: npz[k] for k in npz.files}
    run.protected_npz.unlink()
    stamp = run.completed()
    stamp.pop("export")
    (run.root / "stages.json").write_text(json.dumps(stamp))
    proc = cli("export", CONFIG, *TINY, f"data_dir={cfg['data_dir']}", f"run_dir={run.root}")
    assert proc.returncode == 0, proc.stderr
    assert run.protected.is_symlink() and verify(run.protected)
    with np.load(run.protected_npz) as npz:
        assert all(np.array_equal(npz[k], v) for k, v in old.items())
    assert sorted(p.name for p in run.root.iterdir() if p.name.startswith("protected")) == ["protected",
                                                                                         "protected.npz"]
    assert [p.name for p in elsewhere.parent.iterdir()] == ["protected"]


def test_staging_left_by_a_killed_writer_is_cleared(tmp_path):
    stale = tmp_path / "protected.tmp-999999999-abcd1234"  # no such process
    stale.mkdir()
    (stale / "train_000-of-002.h5").write_bytes(b"half")
    live = tmp_path / f"protected.tmp-{os.getpid()}-abcd1234"  # a writer still running: kept
    live.mkdir()
    with ShardSetWriter(tmp_path / "protected") as w:
        w.write("train", np.zeros((2, 4, 4, 1), np.uint8), np.zeros((2, 1)), np.arange(2), 0, 1)
        w.commit(make_manifest("toy", "multi-class", 1, 4, ["a"], {"file": "toy", "md5": None}))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["protected", live.name])


def test_a_bad_config_under_mpirun_is_reported_once(tmp_path):
    proc = cli("run", CONFIG, "bogus=1", f"run_dir={tmp_path / 'run'}", np=2)
    one_line(proc, "unknown config key 'bogus'")
    assert not (tmp_path / "run").exists()


def test_secrets_copied_into_sweep_points_stay_owner_only(tmp_path):
    from hpc_uc.sweep import seed_point, shared_files

    shared = RunDir(tmp_path / "shared")
    shared.root.mkdir()
    cfg = tiny_config("data/digits", tmp_path / "p")
    for name in shared_files(shared, cfg):
        (shared.root / name).write_bytes(name.encode())
        os.chmod(shared.root / name, 0o600)
    point = RunDir(tmp_path / "p")
    seed_point(shared, point, cfg)
    assert all((point.root / n).stat().st_mode & 0o077 == 0 for n in shared_files(shared, cfg))
