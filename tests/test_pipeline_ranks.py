"""The pipeline under real `mpirun -np 2`: both backends end to end, 1 vs 2 ranks, kill + resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest

from conftest import REPO, kill_group, mpirun, run_job, venv_bin
from hpc_uc.comm import horovod_available

TINY = ["profile=fast", "surrogate.epochs=1", "surrogate.stem=standard", "generator.base_filters=8",
        "generator.n_blocks=1", "generator.train_on=cluster", "victim.epochs=1", "victim.ue.epochs=1", "victim.stem=standard",
        "batch_size=64"]
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


def test_sweep_writes_tables_and_resumes(clustered, digits_dir, tmp_path):
    root = tmp_path / "sweep"
    shared = copy_run(clustered, root / "shared")
    assert shared.is_dir()
    args = ["sweep", CONFIG, *TINY, "generator.epochs=1", "backend=torch", f"data_dir={digits_dir}",
            f"run_dir={root}", "--batch-sizes"]
    first = hpc_uc([*args, "32,64"], np=2)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("reused from clean_victims.json") == 2  # bs64 reuses bs32's clean victims
    stamp = (root / "bs32" / "results.json").stat().st_mtime_ns
    again = hpc_uc([*args, "32,64,128"], np=2)  # as after an interruption: only 128 is missing
    assert again.returncode == 0, again.stderr
    assert (root / "bs32" / "results.json").stat().st_mtime_ns == stamp
    assert again.stdout.count("== train: up to date, skipped") == 2
    assert again.stdout.count("reused from clean_victims.json") == 2
    rows = (root / "sweep.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 2 and rows[0].startswith("dataset,batch_size,protocol")  # a row per protocol
    assert (root / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "| digits | 128 | ue |" in (root / "sweep.md").read_text()
