"""Stages in order, each runnable alone; `run` skips stages already complete for this config."""
from __future__ import annotations

import importlib
import time
from pathlib import Path

from .atomic import read_json, write_json
from .config import check_world
from .errors import UserError
from .rundir import STAGES, RunDir
from .shards import read_manifest

# stage -> "module:function"; imported when the stage runs (bad input fails fast, without torch)
STAGE_FUNCS: dict[str, str] = {
    "surrogate": "surrogate:run_surrogate",
    "cluster": "cluster:run_cluster",
    "train": "generator:run_train",
    "export": "export:run_export",
    "evaluate": "evaluate:run_evaluate",
}


def stage_function(name: str):
    module, func = STAGE_FUNCS[name].split(":")
    return getattr(importlib.import_module(f".{module}", __package__), func)


def check_data(cfg: dict) -> dict:
    """The data directory holds a valid shard set with enough training samples for K."""
    data_dir = Path(cfg["data_dir"])
    if not data_dir.is_dir():
        raise UserError(f"data_dir {data_dir} does not exist (prepare it: python -m data_prep ...)")
    manifest = read_manifest(data_dir)
    if "train" not in manifest["splits"]:
        raise UserError(f"{data_dir} has no train split")
    count = manifest["splits"]["train"]["count"]
    if cfg["clusters"] > count:
        raise UserError(f"clusters={cfg['clusters']} is more than the {count} training samples")
    return manifest


def check_ranks(cfg: dict, world_size: int) -> None:
    """Every global batch splits evenly over the ranks."""
    check_world(cfg, world_size)
    check_world(cfg, world_size, "victim.batch_size")
    if cfg["surrogate"]["weights"] == "pretrain":
        check_world(cfg, world_size, "surrogate.batch_size")


def start(cfg: dict):
    """Check data, ranks and weights (cheap, before any heavy work), create the communicator,
    record the resolved config. Returns (comm, RunDir)."""
    manifest = check_data(cfg)
    from .comm import get_comm
    from .surrogate import check_weights_file

    comm = get_comm(cfg["backend"])
    check_ranks(cfg, comm.size)
    check_weights_file(cfg, manifest)
    from .defenses import build_defense

    for name in cfg["defenses"]:  # a misspelled defense fails now, not after the victims trained
        build_defense(name, cfg["defense"])
    run = RunDir(cfg["run_dir"])
    if comm.is_root:
        run.root.mkdir(parents=True, exist_ok=True)
        run.save_config(cfg)
    comm.barrier()
    return comm, run


def run_stage(name: str, cfg: dict, comm, run: RunDir) -> dict:
    """Run one stage, then record it as done and its wall time (rank 0)."""
    if comm.is_root:
        print(f"== {name} ({comm.backend}, {comm.size} rank{'s' if comm.size > 1 else ''}, "
              f"{comm.device})", flush=True)
    began = time.perf_counter()
    info = stage_function(name)(cfg, comm, run)
    seconds = time.perf_counter() - began
    if comm.is_root:
        run.mark_done(cfg, name)
        timings = read_json(run.timings) if run.timings.is_file() else {}
        timings[name] = round(seconds, 2)
        write_json(run.timings, timings)
        print(f"== {name} done in {seconds:.1f}s", flush=True)
    comm.barrier()
    return info


def run_all(cfg: dict, comm, run: RunDir, stages: tuple[str, ...] = STAGES) -> None:
    """Every stage in order, skipping those whose outputs are complete for this config."""
    for name in stages:
        if run.is_done(cfg, name):
            if comm.is_root:
                print(f"== {name}: up to date, skipped", flush=True)
            continue
        run_stage(name, cfg, comm, run)
    if "evaluate" in stages and comm.is_root:
        from .report import report

        print(report(run.root), end="", flush=True)
