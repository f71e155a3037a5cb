"""`hpc-uc sweep`: how the global batch size changes unlearnability, over seeds.

For each seed S the surrogate and clusters are computed once (RUN_DIR/seed<S>/shared); for
each global batch size B, train -> export -> evaluate run in RUN_DIR/seed<S>/bs<B> with
everything else equal. Finished points are skipped, so an interrupted or extended sweep
computes only what is missing; a point whose inputs changed is recomputed. Writes
RUN_DIR/sweep.csv (a row per batch, seed and victim protocol), sweep.md (mean +- sd per batch
and the batch-effect test) and sweep.png (error bars).
"""
from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import yaml

from .atomic import read_json
from .config import load_config
from .errors import UserError
from .rundir import RunDir
from .shards import read_manifest
from .stages import METHODS, STAGES
from .sweep_summary import read_csv, write_csv, write_summary

SHARED = ("surrogate", "cluster")  # once per seed, for every batch size (those the method runs)
DOWNSTREAM = ("train", "export", "evaluate")


def shared_stages(cfg: dict) -> tuple[str, ...]:
    """The method's stages that a seed's points share."""
    return tuple(name for name in METHODS[cfg["method"]].stages if name in SHARED)


def optional_files(cfg: dict) -> tuple[str, ...]:
    """What the shared stages leave under some configs only (a point may hold a stale one)."""
    return tuple(rel for name in shared_stages(cfg) for rel in STAGES[name].optional)


def shared_files(shared: RunDir, cfg: dict) -> tuple[str, ...]:
    """What the shared stages left in ``shared``: their artifacts, and the optional ones present
    (``surrogate.snapshots``' kept epochs: the points refine through them)."""
    return (tuple(rel for name in shared_stages(cfg) for rel in STAGES[name].artifacts)
            + tuple(rel for rel in optional_files(cfg) if (shared.root / rel).is_file()))


def parse_ints(text: str, flag: str, minimum: int) -> list[int]:
    """A comma-separated list of integers >= minimum, sorted and de-duplicated."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, not {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise UserError(f"{flag} needs at least one integer, each >= {minimum}")
    return sorted(set(values))


def parse_batch_sizes(text: str) -> list[int]:
    return parse_ints(text, "--batch-sizes", 1)


def parse_seeds(text: str) -> list[int]:
    return parse_ints(text, "--seeds", 0)


def seed_dir(root: Path, seed: int) -> Path:
    return root / f"seed{seed}"


def point_config(config: str, overrides: list[str], root: Path, seed: int, batch: int) -> dict:
    return load_config(config, [*overrides, f"seed={seed}", f"batch_size={batch}",
                                f"run_dir={seed_dir(root, seed) / f'bs{batch}'}"])


def seed_point(shared: RunDir, point: RunDir, cfg: dict) -> None:
    """Give a point its seed's surrogate and clusters, recorded as done for its config.

    A point holding other copies (made before the sweep's inputs changed) gets the shared
    ones, and its later stages are recomputed."""
    point.root.mkdir(parents=True, exist_ok=True)
    replaced = False
    files = shared_files(shared, cfg)
    for name in files:
        src, dst = shared.root / name, point.root / name
        if not dst.is_file() or not filecmp.cmp(src, dst, shallow=False):
            shutil.copy(src, dst)  # with its owner-only mode
            replaced = True
    for name in set(optional_files(cfg)) - set(files):  # left by a config that kept it
        if (point.root / name).is_file():
            (point.root / name).unlink()
            replaced = True
    if replaced:
        point.forget(DOWNSTREAM)
    if shared.clean_victims.is_file() and not point.clean_victims.is_file():
        shutil.copyfile(shared.clean_victims, point.clean_victims)  # reused only if its key matches
    for stage in shared_stages(cfg):
        point.mark_done(cfg, stage)


def run_sweep(config: str, overrides: list[str], batch_sizes: list[int], seeds: list[int] | None = None) -> Path:
    """Run every (seed, batch) point (collectively on all ranks); rank 0 writes the tables."""
    from .pipeline import check_ranks, run_all, start

    base = load_config(config, overrides)
    root = Path(base["run_dir"])
    seeds = seeds if seeds is not None else [base["seed"]]
    points = {s: [point_config(config, overrides, root, s, b) for b in batch_sizes] for s in seeds}
    comm = None
    for seed in seeds:
        shared_cfg = load_config(config, [*overrides, f"seed={seed}", f"run_dir={seed_dir(root, seed) / 'shared'}"])
        comm, shared = start(shared_cfg)
        count = read_manifest(shared_cfg["data_dir"])["splits"]["train"]["count"]
        for cfg in points[seed]:  # every batch must split over the ranks: check before any work
            check_ranks(cfg, comm.size, count)
        if comm.is_root:
            print(f"== sweep seed {seed}", flush=True)
        run_all(shared_cfg, comm, shared, stages=SHARED)
        for cfg in points[seed]:
            point = RunDir(cfg["run_dir"])
            if comm.is_root:
                print(f"== sweep point seed={seed} batch_size={cfg['batch_size']}", flush=True)
                seed_point(shared, point, cfg)
            comm.barrier()
            run_all(cfg, comm, point, stages=DOWNSTREAM)
            if comm.is_root and point.clean_victims.is_file() and not shared.clean_victims.is_file():
                shutil.copyfile(point.clean_victims, shared.clean_victims)  # the next points reuse them
    if comm.is_root:
        rows = [row for s in seeds for cfg in points[s] for row in rows_of(RunDir(cfg["run_dir"]))]
        write_csv(root / "sweep.csv", rows)
        write_summary(root, rows)
        print(f"sweep: {root / 'sweep.md'}, {root / 'sweep.csv'}, {root / 'sweep.png'}", flush=True)
    comm.barrier()
    return root


def rows_of(run: RunDir) -> list[dict]:
    """One row per victim protocol of a finished point."""
    r = read_json(run.results)
    cfg = yaml.safe_load(run.config.read_text())
    rows = []
    for protocol, victims in r["protocols"].items():
        clean, protected, figs = victims["clean"], victims["protected"], r["protection"][protocol]
        rows.append({"dataset": r["dataset"], "lr_scaling": cfg["lr_scaling"], "batch_size": r["batch_size"],
                     "seed": r["seed"], "protocol": protocol, "world_size": r["world_size"],
                     "clean_acc": clean["test_acc"], "protected_acc": protected["test_acc"],
                     "clean_auc": clean["test_auc"], "protected_auc": protected["test_auc"],
                     "recalibrated_acc": protected["recalibrated_acc"], "protection_acc": figs["acc"],
                     "protection_auc": figs["auc"], "protection_recalibrated_acc": figs["recalibrated_acc"],
                     "protection": figs["headline"], "chance_acc": r["chance_acc"], "psnr_db": r["psnr_db"],
                     "train_seconds": r["stage_seconds"].get("train")})
    return rows


def combine(directories: list[str], out: Path) -> Path:
    """sweep.md and sweep.png over several sweep directories (datasets, learning-rate rules)."""
    rows = [row for directory in directories for row in read_csv(Path(directory))]
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out, rows)
    return out
