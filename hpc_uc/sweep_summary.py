"""The batch-size study's tables, plot and test: sweep.csv rows -> mean +- sd per batch, the
batch effect against the seed-to-seed spread, and sweep.png with error bars."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from .atomic import write_bytes
from .errors import UserError

COLUMNS = ("dataset", "lr_scaling", "batch_size", "seed", "protocol", "world_size", "clean_acc",
           "protected_acc", "clean_auc", "protected_auc", "recalibrated_acc", "protection_acc",
           "protection_auc", "protection_recalibrated_acc", "protection", "chance_acc", "psnr_db",
           "train_seconds")
INTS = ("batch_size", "seed", "world_size")
FLOATS = COLUMNS[6:]
SUMMARY = ("protected_auc", "recalibrated_acc", "protection", "protected_acc", "psnr_db", "train_seconds")
PLOTTED = (("protected_auc", "protected victim: test AUC"),
           ("recalibrated_acc", "re-fit last layer: clean test ACC"),
           ("protection", "headline protection (share of gap)"))
TESTED = ("protection", "protected_auc", "recalibrated_acc")
PERMUTATIONS = 5000


def series(row: dict) -> str:
    """What one line of the study is: a dataset under one learning-rate rule."""
    return f"{row['dataset']} (lr {row['lr_scaling']})"


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(path, buf.getvalue().encode())


def read_csv(directory: Path) -> list[dict]:
    path = Path(directory) / "sweep.csv"
    if not path.is_file():
        raise UserError(f"{path} not found: run `hpc-uc sweep` into {directory} first")
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    if rows and "seed" not in rows[0]:
        raise UserError(f"{path} predates the seed column: run `hpc-uc sweep` into {directory} again")
    for row in rows:
        for key in INTS:
            row[key] = int(row[key])
        for key in FLOATS:
            row[key] = float(row[key]) if row.get(key) not in (None, "", "None") else None
    return rows


def _grid(rows: list[dict], metric: str) -> tuple[list[int], list[int], np.ndarray]:
    """batch sizes x seeds array of one metric (NaN where a point is missing)."""
    batches = sorted({r["batch_size"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    grid = np.full((len(batches), len(seeds)), np.nan)
    for r in rows:
        if r[metric] is not None:
            grid[batches.index(r["batch_size"]), seeds.index(r["seed"])] = r[metric]
    return batches, seeds, grid


def batch_effect(rows: list[dict], metric: str, permutations: int = PERMUTATIONS, seed: int = 0) -> dict | None:
    """Is the batch effect on ``metric`` larger than the seed-to-seed spread?

    A randomized complete block design: batch sizes are the treatment, seeds the blocks (a
    seed's points share its surrogate, clusters and clean victims). The F test of the
    two-way ANOVA without interaction, and a permutation test that shuffles the batch labels
    within each seed (its statistic, the between-batch sum of squares, orders permutations as
    that F does). Only seeds with every batch size are used. None with fewer than 2 seeds or
    batch sizes."""
    from scipy import stats

    batches, seeds, grid = _grid(rows, metric)
    grid = grid[:, ~np.isnan(grid).any(axis=0)]
    b, s = grid.shape
    if b < 2 or s < 2:
        return None
    grand = grid.mean()
    ss_batch = s * ((grid.mean(axis=1) - grand) ** 2).sum()
    ss_seed = b * ((grid.mean(axis=0) - grand) ** 2).sum()
    ss_error = max(((grid - grand) ** 2).sum() - ss_batch - ss_seed, 0.0)
    df_batch, df_error = b - 1, (b - 1) * (s - 1)
    f = (ss_batch / df_batch) / (ss_error / df_error) if ss_error > 1e-12 else float("inf")
    p_anova = float(stats.f.sf(f, df_batch, df_error)) if np.isfinite(f) else 0.0
    rng = np.random.default_rng(seed)
    observed = ss_batch - 1e-12
    exceed = 0
    for _ in range(permutations):
        shuffled = np.take_along_axis(grid, rng.permuted(np.tile(np.arange(b)[:, None], (1, s)), axis=0), axis=0)
        exceed += s * ((shuffled.mean(axis=1) - grand) ** 2).sum() >= observed
    p_spread = None  # Brown-Forsythe: does the seed-to-seed spread differ by batch? (>= 3 seeds:
    if s >= 3:       # with 2, both deviations from the median are equal and the test degenerates)
        with np.errstate(all="ignore"):
            p_spread = float(stats.levene(*grid, center="median").pvalue)
            p_spread = p_spread if np.isfinite(p_spread) else 1.0
    return {"metric": metric, "batches": b, "seeds": s, "f": float(f), "df": (df_batch, df_error),
            "p_spread": p_spread,
            "p_anova": p_anova, "p_permutation": (exceed + 1) / (permutations + 1),
            "batch_range": float(np.ptp(grid.mean(axis=1))),
            "seed_sd": float(np.sqrt(ss_error / df_error)) if df_error else float("nan")}


def _fmt(mean: float, sd: float, n: int) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if n < 2 else f"{mean:.3f} ± {sd:.3f}"


def summary_markdown(rows: list[dict]) -> str:
    """Per series and protocol: mean +- sd over seeds per batch size, then the batch-effect test."""
    out = []
    for name in sorted({series(r) for r in rows}):
        mine = [r for r in rows if series(r) == name]
        for protocol in sorted({r["protocol"] for r in mine}):
            cell = [r for r in mine if r["protocol"] == protocol]
            out += [f"## {name}, {protocol} victim", "",
                    "| batch_size | seeds | " + " | ".join(SUMMARY) + " |", "|---|---|" + "---|" * len(SUMMARY)]
            grids = {m: _grid(cell, m) for m in SUMMARY}
            batches = grids[SUMMARY[0]][0]
            for i, batch in enumerate(batches):
                values = {m: grids[m][2][i][~np.isnan(grids[m][2][i])] for m in SUMMARY}
                n = max(len(v) for v in values.values())
                cells = [_fmt(v.mean() if len(v) else np.nan, v.std(ddof=1) if len(v) > 1 else 0.0, len(v))
                         for v in values.values()]
                out.append(f"| {batch} | {n} | " + " | ".join(cells) + " |")
            out.append("")
            for metric in TESTED:
                test = batch_effect(cell, metric)
                if test is None:
                    out.append(f"- batch effect on `{metric}`: not tested (needs ≥ 2 seeds and ≥ 2 batch sizes).")
                    continue
                out.append(f"- batch effect on `{metric}`: range of batch means {test['batch_range']:.3f} "
                           f"vs residual seed-to-seed sd {test['seed_sd']:.3f}; block ANOVA "
                           f"F({test['df'][0]}, {test['df'][1]}) = {test['f']:.2f}, p = {test['p_anova']:.3g}; "
                           f"within-seed permutation p = {test['p_permutation']:.3g} "
                           f"({test['seeds']} seeds × {test['batches']} batch sizes); "
                           + (f"spread differs by batch (Brown-Forsythe) p = {test['p_spread']:.3g}."
                              if test["p_spread"] is not None else "spread test needs ≥ 3 seeds."))
            out.append("")
    return "\n".join(out)


def rows_markdown(rows: list[dict]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else ("n/a" if v is None else str(v))

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, rows: list[dict]) -> None:
    """sweep.md (summary, tests, then every point) and sweep.png in ``out``."""
    text = "# Batch-size sweep\n\n" + summary_markdown(rows) + "\n## Every point\n\n" + rows_markdown(rows)
    write_bytes(out / "sweep.md", text.encode())
    plot(rows, out / "sweep.png")


def plot(rows: list[dict], path: Path) -> None:
    """Mean +- sd over seeds against batch size (log2 axis): a row of panels per victim
    protocol, a column per figure, a line per series."""
    from .figures import pyplot, save_png

    plt = pyplot()
    protocols = sorted({r["protocol"] for r in rows}) or ["none"]
    fig, axes = plt.subplots(len(protocols), len(PLOTTED), figsize=(4.2 * len(PLOTTED), 3.4 * len(protocols)),
                             constrained_layout=True, squeeze=False)
    for i, protocol in enumerate(protocols):
        for j, (metric, title) in enumerate(PLOTTED):
            ax = axes[i][j]
            for name in sorted({series(r) for r in rows}):
                cell = [r for r in rows if series(r) == name and r["protocol"] == protocol]
                if not cell:
                    continue
                batches, _, grid = _grid(cell, metric)
                with np.errstate(all="ignore"):
                    mean = np.nanmean(grid, axis=1)
                    counts = (~np.isnan(grid)).sum(axis=1)
                    sd = np.where(counts > 1, np.nanstd(grid, axis=1, ddof=1) if grid.shape[1] > 1 else 0.0, 0.0)
                ax.errorbar(batches, mean, yerr=sd, fmt="o-", capsize=3, label=name)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("global batch size")
            ax.set_title(f"{title}\n{protocol} victim", fontsize=9)
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=7)
    save_png(fig, path, dpi=100)
