"""`hpc-uc sweep`: how the global batch size changes unlearnability.

The surrogate and clusters are computed once (RUN_DIR/shared); for each global batch size,
train -> export -> evaluate run in RUN_DIR/bs<B> with the same seed and everything else
equal. Points already finished are skipped, so an interrupted sweep resumes. Writes
RUN_DIR/sweep.csv, sweep.md and sweep.png.
"""
from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

from .atomic import read_json, write_bytes, write_json
from .config import load_config
from .errors import UserError
from .rundir import RunDir, stage_key

SHARED_FILES = ("surrogate.pt", "surrogate.json", "clusters.npz")
COLUMNS = ("dataset", "batch_size", "protocol", "world_size", "clean_acc", "protected_acc", "clean_auc",
           "protected_auc", "recalibrated_acc", "protection_acc", "protection_auc",
           "protection_recalibrated_acc", "protection", "chance_acc", "psnr_db", "train_seconds")
FLOATS = COLUMNS[4:-2]


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, not {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise UserError("--batch-sizes needs at least one positive integer")
    return sorted(set(sizes))


def point_config(config: str, overrides: list[str], root: Path, batch: int) -> dict:
    return load_config(config, [*overrides, f"batch_size={batch}", f"run_dir={root / f'bs{batch}'}"])


def seed_point(shared: RunDir, point: RunDir, cfg: dict) -> None:
    """Give a point the shared surrogate and clusters, recorded as done for its config."""
    point.root.mkdir(parents=True, exist_ok=True)
    for name in SHARED_FILES:
        if not (point.root / name).is_file():
            shutil.copyfile(shared.root / name, point.root / name)
    if shared.clean_victims.is_file() and not point.clean_victims.is_file():
        shutil.copyfile(shared.clean_victims, point.clean_victims)  # reused only if its key matches
    done = point.completed()
    for stage in ("surrogate", "cluster"):
        done[stage] = stage_key(cfg, stage)
    write_json(point.root / "stages.json", done)


def run_sweep(config: str, overrides: list[str], batch_sizes: list[int]) -> Path:
    """Run every point (collectively on all ranks); rank 0 writes the tables and the plot."""
    from .pipeline import check_ranks, run_all, start

    base = load_config(config, overrides)
    root = Path(base["run_dir"])
    shared_cfg = load_config(config, [*overrides, f"run_dir={root / 'shared'}"])
    points = [point_config(config, overrides, root, b) for b in batch_sizes]
    comm, shared = start(shared_cfg)
    for cfg in points:  # every batch must split over the ranks: check before any work
        check_ranks(cfg, comm.size)
    run_all(shared_cfg, comm, shared, stages=("surrogate", "cluster"))
    for cfg in points:
        point = RunDir(cfg["run_dir"])
        if comm.is_root:
            print(f"== sweep point batch_size={cfg['batch_size']}", flush=True)
            seed_point(shared, point, cfg)
            point.save_config(cfg)
        comm.barrier()
        run_all(cfg, comm, point, stages=("train", "export", "evaluate"))
        if comm.is_root and point.clean_victims.is_file() and not shared.clean_victims.is_file():
            shutil.copyfile(point.clean_victims, shared.clean_victims)  # the next points reuse them
    if comm.is_root:
        rows = [row for cfg in points for row in rows_of(RunDir(cfg["run_dir"]))]
        write_tables(root, rows)
        print((root / "sweep.md").read_text(), end="", flush=True)
    comm.barrier()
    return root


def rows_of(run: RunDir) -> list[dict]:
    """One row per victim protocol of a finished point."""
    r = read_json(run.results)
    rows = []
    for protocol, victims in r["protocols"].items():
        clean, protected, figs = victims["clean"], victims["protected"], r["protection"][protocol]
        rows.append({"dataset": r["dataset"], "batch_size": r["batch_size"], "protocol": protocol,
                     "world_size": r["world_size"], "clean_acc": clean["test_acc"],
                     "protected_acc": protected["test_acc"], "clean_auc": clean["test_auc"],
                     "protected_auc": protected["test_auc"], "recalibrated_acc": protected["recalibrated_acc"],
                     "protection_acc": figs["acc"], "protection_auc": figs["auc"],
                     "protection_recalibrated_acc": figs["recalibrated_acc"], "protection": figs["headline"],
                     "chance_acc": r["chance_acc"], "psnr_db": r["psnr_db"],
                     "train_seconds": r["stage_seconds"].get("train")})
    return rows


def write_tables(root: Path, rows: list[dict]) -> None:
    """sweep.csv, sweep.md and sweep.png for one sweep directory."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(root / "sweep.csv", buf.getvalue().encode())
    write_bytes(root / "sweep.md", markdown(rows).encode())
    plot({rows[0]["dataset"]: rows} if rows else {}, root / "sweep.png")


def markdown(rows: list[dict]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else ("n/a" if v is None else str(v))

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def read_rows(directory: Path) -> list[dict]:
    path = Path(directory) / "sweep.csv"
    if not path.is_file():
        raise UserError(f"{path} not found: run `hpc-uc sweep` into {directory} first")
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["batch_size"] = int(row["batch_size"])
        for key in FLOATS:
            row[key] = float(row[key]) if row.get(key) not in (None, "", "None") else None
    return rows


def combine(directories: list[str], out: Path) -> Path:
    """One plot (and table) with a line per dataset from several sweep directories."""
    by_dataset: dict[str, list[dict]] = {}
    for directory in directories:
        for row in read_rows(Path(directory)):
            by_dataset.setdefault(row["dataset"], []).append(row)
    plot(by_dataset, out / "sweep.png")
    write_bytes(out / "sweep.md", markdown([r for rows in by_dataset.values() for r in rows]).encode())
    return out


def plot(by_dataset: dict[str, list[dict]], path: Path) -> None:
    """Clean/protected test accuracy and protection gain against batch size (log2 axis)."""
    from .figures import pyplot, save_png

    plt = pyplot()

    def value(v):
        return float("nan") if v is None else v

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for name, rows in sorted(by_dataset.items()):
        for protocol in sorted({r["protocol"] for r in rows}):
            mine = sorted((r for r in rows if r["protocol"] == protocol), key=lambda r: r["batch_size"])
            bs = [r["batch_size"] for r in mine]
            line, = axes[0].plot(bs, [value(r["protected_auc"]) for r in mine], "o-",
                                 label=f"{name} {protocol} protected AUC")
            axes[0].plot(bs, [value(r["protected_acc"]) for r in mine], "s--", color=line.get_color(),
                         label=f"{name} {protocol} protected ACC")
            axes[1].plot(bs, [value(r["protection"]) for r in mine], "o-", color=line.get_color(),
                         label=f"{name} {protocol}")
    for ax, title in zip(axes, ("protected victim on clean test", "headline protection (share of gap)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch size")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_png(fig, path, dpi=120)
