"""Running the stages (hpc_uc.stages) in order or alone; `run` skips stages already complete
for this config."""
from __future__ import annotations

import time
from pathlib import Path

from .atomic import read_json, write_json
from .config import check_world
from .errors import UserError
from .rundir import RunDir
from .shards import read_manifest
from .stages import METHODS, STAGES, method_stages


def check_data(cfg: dict) -> dict:
    """The data directory holds a valid shard set, and every stage of the method passes its
    up-front check (hpc_uc.stages) on it and the config."""
    data_dir = Path(cfg["data_dir"])
    if not data_dir.is_dir():
        raise UserError(f"data_dir {data_dir} does not exist (prepare it: python -m data_prep ...)")
    manifest = read_manifest(data_dir)
    if "train" not in manifest["splits"] or "test" not in manifest["splits"]:
        raise UserError(f"{data_dir} needs a train and a test split (has {', '.join(manifest['splits'])})")
    for split, info in manifest["splits"].items():
        if info["count"] < 1:
            raise UserError(f"{data_dir}: the {split} split is empty; prepare the data again with images in it")
    for stage in method_stages(cfg["method"]):
        if stage.check is not None:
            stage.check(cfg, manifest)
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
    from .reader import set_cache_budget

    set_cache_budget(cfg["cache_budget_mib"])
    comm = get_comm(cfg["backend"])
    check_ranks(cfg, comm.size, manifest["splits"]["train"]["count"])
    run = RunDir(cfg["run_dir"])
    if comm.is_root:
        run.root.mkdir(parents=True, exist_ok=True)
    comm.barrier()
    return comm, run


def check_inputs(name: str, cfg: dict, run: RunDir) -> None:
    """A stage run alone reads the earlier stages' outputs: they must be there, intact, and made
    from this config and data (not, say, from another data_dir with as many images)."""
    names = METHODS[cfg["method"]].stages
    if name not in names:
        raise UserError(f"method={cfg['method']} has no {name} stage (its stages: {', '.join(names)})")
    for earlier in names[:names.index(name)]:
        if not run.is_done(cfg, earlier):
            raise UserError(f"cannot run {name}: {run.why_not_done(cfg, earlier)}; run `hpc-uc run` "
                            f"(or `hpc-uc {earlier}`) with this config first")


def run_stage(name: str, cfg: dict, comm, run: RunDir) -> dict:
    """Run one stage, then record it as done and its wall time (rank 0)."""
    if comm.is_root:
        print(f"== {name} ({comm.backend}, {comm.size} rank{'s' if comm.size > 1 else ''}, "
              f"{comm.device})", flush=True)
    began = time.perf_counter()
    info = STAGES[name].run(cfg, comm, run)
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


def run_all(cfg: dict, comm, run: RunDir, stages: tuple[str, ...] | None = None) -> None:
    """Every stage of the method (of those in ``stages``, if given) in order, skipping those
    whose outputs are complete for this config; once a stage runs, every later one runs too
    (its inputs were made again)."""
    ran = False
    for name in METHODS[cfg["method"]].stages:
        if stages is not None and name not in stages:
            continue
        if not ran and run.is_done(cfg, name):
            if comm.is_root:
                print(f"== {name}: up to date, skipped", flush=True)
            continue
        run_stage(name, cfg, comm, run)
        ran = True
    if (stages is None or "evaluate" in stages) and comm.is_root:
        from .report import report

        print(report(run.root), end="", flush=True)
