"""The pipeline under real `mpirun -np 2`: both backends end to end, 1 vs 2 ranks, kill + resume."""
from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest

from conftest import REPO, kill_group, mpirun, run_job, venv_bin
from hpc_uc.comm import horovod_available
from hpc_uc.shards import verify

TINY = ["profile=fast", "surrogate.epochs=1", "surrogate.stem=standard", "generator.base_filters=8",
        "generator.n_blocks=1", "generator.train_on=cluster", "victim.epochs=1", "victim.ue.epochs=1", "victim.stem=standard",
        "batch_size=64", "refine.steps=0"]  # refinement (auto: 200 steps per image) where a test asks
CONFIG = str(REPO / "configs" / "digits.yaml")


def hpc_uc(args: list[str], np: int = 1) -> subprocess.CompletedProcess:
    cmd = [*mpirun(np), venv_bin("hpc-uc")] if np > 1 else [venv_bin("hpc-uc")]
    return run_job([*cmd, *args])


def delta(run_dir: Path) -> np.ndarray:
    with h5py.File(run_dir / "perturbations.h5") as f:
        return f["delta"][()]


@pytest.fixture(scope="module")
def clustered(digits_dir, tmp_path_factory) -> Path:
    """A run directory with surrogate and clusters done (shared by the tests below)."""
    run = tmp_path_factory.mktemp("ranks") / "base"
    proc = hpc_uc(["surrogate", CONFIG, *TINY, f"data_dir={digits_dir}", f"run_dir={run}"])
    assert proc.returncode == 0, proc.stderr
    proc = hpc_uc(["cluster", CONFIG, *TINY, f"data_dir={digits_dir}", f"run_dir={run}"])
    assert proc.returncode == 0, proc.stderr
    return run


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("surrogate.pt", "surrogate.json", "clusters.npz", "stages.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.mark.parametrize("backend", ["torch", pytest.param("horovod", marks=pytest.mark.skipif(
    not horovod_available(), reason="horovod not installed"))])
def test_two_ranks_end_to_end(backend, clustered, digits_dir, tmp_path):
    run = copy_run(clustered, tmp_path / backend)
    proc = hpc_uc(["run", CONFIG, *TINY, "generator.epochs=1", f"backend={backend}",
                   f"data_dir={digits_dir}", f"run_dir={run}"], np=2)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["backend"] == backend
    assert "protection (ue victim)" in proc.stdout
    assert subprocess.run([venv_bin("hpc-uc"), "verify", str(run / "protected")]).returncode == 0


def test_one_and_two_ranks_agree(clustered, digits_dir, tmp_path):
    """Same global batch and seed: the ranks see other samples per step (each rank shuffles
    its own range), so the trajectories differ slightly; the perturbations stay close."""
    common = [*TINY, "generator.epochs=2", "backend=torch", f"data_dir={digits_dir}"]
    one, two = copy_run(clustered, tmp_path / "one"), copy_run(clustered, tmp_path / "two")
    assert hpc_uc(["train", CONFIG, *common, f"run_dir={one}"]).returncode == 0
    assert hpc_uc(["train", CONFIG, *common, f"run_dir={two}"], np=2).returncode == 0
    a, b = delta(one).ravel(), delta(two).ravel()
    cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert cosine > 0.9, cosine


def test_refined_export_is_the_same_on_one_and_two_ranks(clustered, digits_dir, tmp_path):
    """The default refinement (targeted, through crops and flips drawn per sample id) gives each
    image the same protected pixels whichever rank and chunk exports it."""
    from hpc_uc.reader import ShardedDataset

    common = [*TINY, "generator.epochs=1", "backend=torch", f"data_dir={digits_dir}"]
    trained = copy_run(clustered, tmp_path / "trained")
    assert hpc_uc(["train", CONFIG, *common, f"run_dir={trained}"]).returncode == 0
    images = {}
    for ranks in (1, 2):
        run = tmp_path / f"export{ranks}"
        shutil.copytree(trained, run)
        proc = hpc_uc(["export", CONFIG, *common, "refine.steps=3", "refine.step_size=0.25",
                       "export.chunk_mib=0.5", f"run_dir={run}"], np=ranks)
        assert proc.returncode == 0, proc.stderr
        record = verify(run / "protected")["extra"]["protection"]
        assert (record["refine_objective"], record["refine_augment"]) == ("targeted", True)
        images[ranks] = ShardedDataset(run / "protected", "train", None, full=True).local_arrays()[0]
    unrefined = tmp_path / "unrefined"
    shutil.copytree(trained, unrefined)
    assert hpc_uc(["export", CONFIG, *common, f"run_dir={unrefined}"]).returncode == 0
    plain = ShardedDataset(unrefined / "protected", "train", None, full=True).local_arrays()[0]
    assert (images[1] != plain).mean() > 0.05  # refinement moved many pixels
    assert (images[1] == images[2]).mean() > 0.999, (images[1] != images[2]).mean()


def test_killed_rank_ends_job_and_resume_matches(clustered, digits_dir, tmp_path):
    common = [CONFIG, *TINY, "generator.epochs=3", "backend=torch", f"data_dir={digits_dir}"]
    whole = copy_run(clustered, tmp_path / "whole")
    assert hpc_uc(["train", *common, f"run_dir={whole}"], np=2).returncode == 0

    killed = copy_run(clustered, tmp_path / "killed")
    job = subprocess.Popen([*mpirun(2), venv_bin("hpc-uc"), "train", *common, f"run_dir={killed}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        checkpoint = killed / "generators" / "checkpoint.pt"
        deadline = time.monotonic() + 300
        while not checkpoint.exists() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.2)
        assert checkpoint.exists(), "no checkpoint was written"
        ranks = [p for p in psutil.Process(job.pid).children(recursive=True) if "hpc-uc" in " ".join(p.cmdline())]
        assert len(ranks) == 2
        os.kill(ranks[-1].pid, signal.SIGKILL)
        job.communicate(timeout=60)
    finally:
        kill_group(job)  # whatever happened above, no rank outlives the test
    assert job.returncode != 0
    assert not (killed / "perturbations.h5").exists()

    proc = hpc_uc(["train", *common, f"run_dir={killed}", "resume=true"], np=2)
    assert proc.returncode == 0, proc.stderr
    assert "resuming after epoch" in proc.stdout
    assert np.array_equal(delta(killed), delta(whole))
    assert (killed / "perturbations.h5").read_bytes() == (whole / "perturbations.h5").read_bytes()


def test_sweep_over_seeds_writes_tables_and_resumes(clustered, digits_dir, tmp_path):
    root = tmp_path / "sweep"
    copy_run(clustered, root / "seed0" / "shared")  # seed 0's surrogate and clusters, already made
    args = ["sweep", CONFIG, *TINY, "generator.epochs=1", "backend=torch", f"data_dir={digits_dir}",
            f"run_dir={root}", "--batch-sizes", "32,64", "--seeds"]
    first = hpc_uc([*args, "0"], np=2)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("reused from clean_victims.json") == 2  # bs64 reuses bs32's clean victims
    stamp = (root / "seed0" / "bs32" / "results.json").stat().st_mtime_ns
    again = hpc_uc([*args, "0,1"], np=2)  # a seed added: only seed 1's points are computed
    assert again.returncode == 0, again.stderr
    assert (root / "seed0" / "bs32" / "results.json").stat().st_mtime_ns == stamp
    assert again.stdout.count("== train: up to date, skipped") == 2
    assert again.stdout.count("== surrogate done in") == 1 and again.stdout.count("== train done in") == 2
    rows = (root / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("dataset,lr_scaling,batch_size,seed,protocol")
    assert len(rows) == 1 + 2 * 2 * 2  # (batch, seed, protocol)
    assert {r.split(",")[3] for r in rows[1:]} == {"0", "1"}
    assert (root / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    table = (root / "sweep.md").read_text()
    assert "## digits (lr linear), ue victim" in table and " ± " in table and "block ANOVA F(1, 1)" in table
    third = hpc_uc([*args, "0,1"], np=2)  # everything done: no stage runs
    assert third.returncode == 0, third.stderr
    assert third.stdout.count("up to date, skipped") == 2 * (2 + 2 * 3) and " done in " not in third.stdout


def em_noise(run_dir: Path) -> np.ndarray:
    """perturbations.h5's sample-wise noise (method=em), in sample-id order."""
    with h5py.File(run_dir / "perturbations.h5") as f:
        index = f["index"][()]
        assert len(np.unique(index)) == len(index)
        return f["samples"][()][np.argsort(index)]


def test_em_on_two_ranks(digits_dir, tmp_path):
    """method=em data-parallel: with no steps the noise is its seeded start, the same on 1 and 2
    ranks; with steps the whole pipeline runs on 2 ranks (no surrogate, no clusters), the ranks'
    parts are merged into one file of every image's δ and the export verifies."""
    backend = "horovod" if horovod_available() else "torch"
    common = ["train", CONFIG, *TINY, "method=em", "em.rounds=1", f"backend={backend}", f"data_dir={digits_dir}"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert hpc_uc([*common, "em.train_steps=0", "em.pgd_steps=0", f"run_dir={one}"]).returncode == 0
    assert hpc_uc([*common, "em.train_steps=0", "em.pgd_steps=0", f"run_dir={two}"], np=2).returncode == 0
    start = em_noise(one)
    assert start.shape == (1257, 1, 28, 28) and np.array_equal(start, em_noise(two))
    run = tmp_path / "run"
    proc = hpc_uc(["run", *common[1:], "em.train_steps=3", "em.pgd_steps=2", f"run_dir={run}"], np=2)
    assert proc.returncode == 0, proc.stderr
    assert "train: em round 1/1" in proc.stdout and not (run / "surrogate.pt").exists()
    assert json.loads((run / "results.json").read_text())["world_size"] == 2
    trained = em_noise(run)
    assert trained.shape == start.shape and not np.array_equal(trained, start) and np.abs(trained).max() <= 16
    assert not (run / "em-parts").exists()
    assert subprocess.run([venv_bin("hpc-uc"), "verify", str(run / "protected")]).returncode == 0


def test_224px_rgb_pipeline_on_two_ranks(tmp_path):
    """The size the paper ran at (its configs: Pets, Flowers102, MedMNIST at 224): real
    BreastMNIST images upscaled to 224 px RGB in PathMNIST's layout, the whole pipeline on 2
    ranks with tiny epochs. Before the SSIM batches were bounded, evaluate asked for 62 GB."""
    from PIL import Image

    from conftest import SHARED_DATA

    with np.load(SHARED_DATA / "breastmnist.npz") as src:
        def upscale(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
            images = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BILINEAR).convert("RGB"))
                               for im in src[f"{split}_images"][:n]])
            return images, src[f"{split}_labels"][:n]
        arrays = {}
        for split, n in (("train", 24), ("val", 8), ("test", 8)):
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = upscale(split, n)
    np.savez(tmp_path / "pathmnist_224.npz", **arrays)
    data, run = tmp_path / "data", tmp_path / "run"
    prep = run_job([*mpirun(2), sys.executable, "-m", "data_prep", "medmnist", "pathmnist", "--npz",
                    str(tmp_path / "pathmnist_224.npz"), "--size", "224", "--allow-md5-mismatch", "--shards", "2",
                    "--out", str(data)])
    assert prep.returncode == 0, prep.stderr
    proc = hpc_uc(["run", str(REPO / "configs" / "pathmnist.yaml"), "profile=fast", f"data_dir={data}",
                   f"run_dir={run}", "clusters=2", "batch_size=8", "surrogate.batch_size=8", "victim.batch_size=8",
                   "surrogate.epochs=1", "surrogate.stem=standard", "generator.epochs=1", "generator.base_filters=8",
                   "generator.n_blocks=1", "generator.train_on=cluster", "victim.epochs=1", "victim.ue.epochs=1",
                   "victim.stem=standard", "evaluate.recalibrate_samples=4", "backend=torch",
                   "export.chunk_mib=2", "refine.steps=1"], np=2)  # 3 images per export chunk: 4 shards
                                                                    # per rank; refined through resized crops
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = verify(run / "protected")["extra"]["protection"]
    assert (record["refine_steps"], record["refine_objective"], record["refine_augment"]) == (1, "targeted", True)
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and 0 < results["linf"] <= 16 / 255 + 1e-6 and results["ssim"] < 1
    with np.load(run / "protected.npz") as npz:
        assert npz["train_images"].shape == (24, 224, 224, 3)
    assert len(verify(run / "protected")["splits"]["train"]["shards"]) == 8
