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


# what the train stage runs for each protection method
METHOD_FUNCS: dict[str, str] = {"uc": "generator:run_train", "classwise": "classwise:run_classwise",
                                "ar": "ar:run_ar"}

# methods whose perturbations are keyed by the class label (one class per image needed)
LABEL_WISE = frozenset({"classwise", "ar"})


def stage_function(name: str, method: str = "uc"):
    module, func = (METHOD_FUNCS[method] if name == "train" else STAGE_FUNCS[name]).split(":")
    return getattr(importlib.import_module(f".{module}", __package__), func)


def check_data(cfg: dict) -> dict:
    """The data directory holds a valid shard set with enough training samples for K."""
    data_dir = Path(cfg["data_dir"])
    if not data_dir.is_dir():
        raise UserError(f"data_dir {data_dir} does not exist (prepare it: python -m data_prep ...)")
    manifest = read_manifest(data_dir)
    if "train" not in manifest["splits"] or "test" not in manifest["splits"]:
        raise UserError(f"{data_dir} needs a train and a test split (has {', '.join(manifest['splits'])})")
    for split, info in manifest["splits"].items():
        if info["count"] < 1:
            raise UserError(f"{data_dir}: the {split} split is empty; prepare the data again with images in it")
    count = manifest["splits"]["train"]["count"]
    if cfg["method"] in LABEL_WISE and manifest["task"].startswith("multi-label"):
        raise UserError(f"method={cfg['method']} needs one class per image; {data_dir} is {manifest['task']}")
    if cfg["clusters"] > count:
        raise UserError(f"clusters={cfg['clusters']} is more than the {count} training samples")
    return manifest


def check_ranks(cfg: dict, world_size: int, train_count: int | None = None) -> None:
    """Every global batch splits evenly over the ranks and, given the training split's size,
    leaves each rank at least one full batch per epoch (else no optimizer step would run)."""
    keys = ["batch_size", "victim.batch_size"]
    if cfg["surrogate"]["weights"] == "pretrain":
        keys.append("surrogate.batch_size")
    for key in keys:
        per_rank = check_world(cfg, world_size, key)
        if train_count is not None and per_rank > train_count // world_size:
            raise UserError(f"{key}={per_rank * world_size} is larger than the training split "
                            f"({train_count} samples, {train_count // world_size} per rank over {world_size}): "
                            f"no optimizer step would run; lower {key}")


def start(cfg: dict):
    """Check data, ranks and weights (cheap, before any heavy work), create the communicator,
    record the resolved config. Returns (comm, RunDir)."""
    manifest = check_data(cfg)
    from .comm import get_comm
    from .surrogate import check_weights_file

    from .reader import set_cache_budget

    set_cache_budget(cfg["cache_budget_mib"])
    comm = get_comm(cfg["backend"])
    check_ranks(cfg, comm.size, manifest["splits"]["train"]["count"])
    check_weights_file(cfg, manifest)
    from .defenses import build_defense

    for name in cfg["defenses"]:  # a misspelled defense fails now, not after the victims trained
        build_defense(name, cfg["defense"])
    run = RunDir(cfg["run_dir"])
    if comm.is_root:
        run.root.mkdir(parents=True, exist_ok=True)
    comm.barrier()
    return comm, run


def check_inputs(name: str, cfg: dict, run: RunDir) -> None:
    """A stage run alone reads the earlier stages' outputs: they must be there, intact, and made
    from this config and data (not, say, from another data_dir with as many images)."""
    for earlier in STAGES[:STAGES.index(name)]:
        if not run.is_done(cfg, earlier):
            raise UserError(f"cannot run {name}: {run.why_not_done(cfg, earlier)}; run `hpc-uc run` "
                            f"(or `hpc-uc {earlier}`) with this config first")


def run_stage(name: str, cfg: dict, comm, run: RunDir) -> dict:
    """Run one stage, then record it as done and its wall time (rank 0)."""
    if comm.is_root:
        print(f"== {name} ({comm.backend}, {comm.size} rank{'s' if comm.size > 1 else ''}, "
              f"{comm.device})", flush=True)
    began = time.perf_counter()
    info = stage_function(name, cfg["method"])(cfg, comm, run)
    seconds = time.perf_counter() - began
    if comm.is_root:
        run.mark_done(cfg, name)
        run.save_config(cfg)  # only now: config.yaml describes outputs that exist
        timings = read_json(run.timings) if run.timings.is_file() else {}
        timings[name] = round(seconds, 2)
        write_json(run.timings, timings)
        print(f"== {name} done in {seconds:.1f}s", flush=True)
    comm.barrier()
    return info


def run_all(cfg: dict, comm, run: RunDir, stages: tuple[str, ...] = STAGES) -> None:
    """Every stage in order, skipping those whose outputs are complete for this config; once a
    stage runs, every later one runs too (its inputs were made again)."""
    ran = False
    for name in stages:
        if not ran and run.is_done(cfg, name):
            if comm.is_root:
                print(f"== {name}: up to date, skipped", flush=True)
            continue
        run_stage(name, cfg, comm, run)
        ran = True
    if "evaluate" in stages and comm.is_root:
        from .report import report

        print(report(run.root), end="", flush=True)
