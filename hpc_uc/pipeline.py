"""Stages in order, each runnable alone; `run` skips stages already complete for this config."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .atomic import read_json, write_json
from .cluster import check_clusters, run_cluster
from .comm import Comm, get_comm
from .config import check_world
from .errors import UserError
from .export import run_export
from .generator import run_train
from .rundir import STAGES, RunDir
from .shards import read_manifest
from .surrogate import check_weights_file, run_surrogate

STAGE_FUNCS: dict[str, Callable[[dict, Comm, RunDir], dict]] = {
    "surrogate": run_surrogate,
    "cluster": run_cluster,
    "train": run_train,
    "export": run_export,
}


def preflight(cfg: dict, world_size: int) -> dict:
    """Every check that needs no heavy work: data, ranks vs batch, K vs samples, weights."""
    data_dir = Path(cfg["data_dir"])
    if not data_dir.is_dir():
        raise UserError(f"data_dir {data_dir} does not exist (prepare it: python -m data_prep ...)")
    manifest = read_manifest(data_dir)
    if "train" not in manifest["splits"]:
        raise UserError(f"{data_dir} has no train split")
    check_world(cfg, world_size)
    if cfg["surrogate"]["weights"] == "pretrain":
        check_world(cfg, world_size, "surrogate.batch_size")
    check_clusters(cfg, manifest["splits"]["train"]["count"])
    check_weights_file(cfg, manifest)
    return manifest


def start(cfg: dict) -> tuple[Comm, RunDir]:
    """Create the communicator, run the preflight checks, record the resolved config."""
    comm = get_comm(cfg["backend"])
    preflight(cfg, comm.size)
    run = RunDir(cfg["run_dir"])
    if comm.is_root:
        run.root.mkdir(parents=True, exist_ok=True)
        run.save_config(cfg)
    comm.barrier()
    return comm, run


def run_stage(name: str, cfg: dict, comm: Comm, run: RunDir) -> dict:
    """Run one stage, then record it as done and its wall time (rank 0)."""
    if comm.is_root:
        print(f"== {name} ({comm.backend}, {comm.size} rank{'s' if comm.size > 1 else ''}, "
              f"{comm.device})", flush=True)
    began = time.perf_counter()
    info = STAGE_FUNCS[name](cfg, comm, run)
    seconds = time.perf_counter() - began
    if comm.is_root:
        run.mark_done(cfg, name)
        timings_path = run.root / "timings.json"
        timings = read_json(timings_path) if timings_path.is_file() else {}
        timings[name] = round(seconds, 2)
        write_json(timings_path, timings)
        print(f"== {name} done in {seconds:.1f}s", flush=True)
    comm.barrier()
    return info


def run_all(cfg: dict, comm: Comm, run: RunDir, stages: tuple[str, ...] = STAGES) -> None:
    """Every stage in order, skipping those whose outputs are complete for this config."""
    for name in stages:
        if run.is_done(cfg, name):
            if comm.is_root:
                print(f"== {name}: up to date, skipped", flush=True)
            continue
        run_stage(name, cfg, comm, run)
