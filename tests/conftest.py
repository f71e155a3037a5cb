"""Shared test set-up: the `mpi` marker, mpirun settings, and no hangs under mpirun."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# mpirun as root and with more ranks than cores (the Makefile sets these too).
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
os.environ.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")



def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mpi: runs under `mpirun -np 2` (make test-mpi)")


def mpirun(np: int = 2) -> list[str]:
    """The mpirun prefix for a subprocess with ``np`` ranks."""
    exe = shutil.which("mpirun")
    if exe is None:
        pytest.skip("mpirun not installed")
    return [exe, "-np", str(np), "--oversubscribe"]


def run_job(cmd: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` for commands that may start
    MPI ranks. The command gets a session of its own; if it outlives ``timeout``, everything
    in that session (mpirun and every rank) is killed and the test fails with the output so
    far, so a hung job costs one test its timeout and never blocks the suite."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            pytest.fail(f"{' '.join(cmd[:4])} ... still running after {timeout}s (hang?); "
                        f"killed.\n--- stdout tail\n{out[-3000:]}\n--- stderr tail\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with ``start_new_session=True`` and everything in its session
    (mpirun gives each rank a process group of its own, so killpg alone would miss them)."""
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == proc.pid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def venv_bin(name: str) -> str:
    """Path of a console script installed beside the running Python."""
    return str(Path(sys.executable).with_name(name))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under mpirun, a failing test on one rank would leave the other waiting in a
    collective: print the failure and abort the whole job instead."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when == "call" and _world_size() > 1:
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
        print(f"\n[rank {rank}] FAILED {item.nodeid}\n{report.longreprtext}", file=sys.stderr, flush=True)
        MPI.COMM_WORLD.Abort(1)


def _world_size() -> int:
    if "mpi4py.MPI" not in sys.modules:
        return 1
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size()


def _backends() -> list:
    from hpc_uc.comm import horovod_available

    return ["mpi", "torch", pytest.param("horovod", marks=pytest.mark.skipif(
        not horovod_available(), reason="horovod not installed (make install HOROVOD=1)"))]


@pytest.fixture(params=_backends())
def comm(request):
    """A communicator of every backend, for tests that run under mpirun -np 2 or more."""
    from hpc_uc.comm import get_comm

    c = get_comm(request.param)
    if c.size < 2:
        pytest.skip("needs mpirun -np 2 or more")
    return c


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The embedded default data set (scikit-learn digits) as a 2-shard set, built once."""
    import subprocess

    out = tmp_path_factory.mktemp("data") / "digits"
    subprocess.run([sys.executable, "-m", "data_prep", "digits", "--shards", "2", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    return out


def single_rank():
    """The real communicator class as a plain one-rank process has it (beside an MPI job)."""
    from hpc_uc.comm import Comm

    return Comm.local()


TINY = ["profile=fast", "backend=mpi", "surrogate.epochs=1", "surrogate.stem=standard",
        "generator.epochs=2", "generator.base_filters=8", "generator.n_blocks=1",
        "generator.train_on=cluster", "victim.epochs=1", "victim.ue.epochs=1", "victim.stem=standard", "batch_size=64",
        "refine.steps=0"]  # refine.steps=auto takes 200 steps per image; tests that refine say so


def tiny_config(data_dir, run_dir, *extra: str) -> dict:
    """configs/digits.yaml at tiny but real settings, single process."""
    from hpc_uc.config import load_config

    return load_config(REPO / "configs" / "digits.yaml", [*TINY, f"data_dir={data_dir}", f"run_dir={run_dir}", *extra])


def fake_manifest(monkeypatch, task: str) -> None:
    """pipeline.check_data reads a manifest of ``task`` (28 px, 10 images per split) instead of
    the data directory's: for the up-front refusals that depend on the task."""
    from hpc_uc import pipeline

    split = {"count": 10}
    monkeypatch.setattr(pipeline, "read_manifest", lambda _: {
        "task": task, "image_size": 28, "splits": {"train": split, "test": split}})


def replace_stage_bodies(monkeypatch, body) -> None:
    """Every stage's entry point replaced by ``body(stage name)`` (the registry keeps the
    rest: keys, checks, artifacts), for tests of which stages run."""
    import dataclasses

    from hpc_uc.stages import STAGES

    for name, stage in list(STAGES.items()):
        monkeypatch.setitem(STAGES, name, dataclasses.replace(stage, run=body(name)))


@pytest.fixture(scope="session")
def finished_run(digits_dir, tmp_path_factory):
    """The whole pipeline once on digits, single process (tests that change it work on a copy)."""
    from hpc_uc.pipeline import run_all, start

    cfg = tiny_config(digits_dir, tmp_path_factory.mktemp("run") / "digits")
    comm, run = start(cfg)
    run_all(cfg, comm, run)
    return cfg, run
