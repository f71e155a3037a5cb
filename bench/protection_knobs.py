"""Which knob makes UC deep: variants x seeds, both victim protocols, the three protection figures.

For each seed, a base run directory gets the surrogate and the clusters once; each variant's
run directory is seeded with them (and with the clean victims, which do not depend on the
protection), then ``hpc-uc run`` under mpirun trains, exports and evaluates the variant.
Finished variants are skipped. Writes ROOT/knobs.csv (one row per variant, seed, protocol)
and prints ROOT/knobs.md (mean ± sd over seeds).

    python bench/protection_knobs.py configs/digits.yaml --root runs/knobs-digits --seeds 0,1,2 \\
        --common "profile=fast" --variant "today=" \\
        --variant "deep=generator.target=cross_class generator.augment=true refine.steps=5"

(Since session 20 ``method=uc`` refines every image at export by default, ``refine.steps: auto``;
a variant written before then, such as ``today=``, reads ``refine.steps=0`` today, and
``refine.steps=5`` then meant ``refine.objective=uc refine.step_size=0.25 refine.augment=false``.)

``--no-surrogate`` when every variant is ``method=em`` (which trains its own model): no base run,
the variants share only the clean victims.

With ``defenses=[jpeg10,pgd]`` in ``--common`` every defended victim gets its own rows
(victim ``+jpeg10``, ...) beside the protected one.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hpc_uc.rundir import RunDir
from hpc_uc.sweep import SHARED, shared_files

VENV_BIN = Path(sys.executable).parent
FIGURES = ("clean_acc", "clean_auc", "clean_recal", "acc", "auc", "recal", "turned_auc", "turned_recal",
           "share_acc", "share_auc", "share_recal", "headline", "psnr_db", "ssim", "untrained_recal", "protect_s")


def mpirun(ranks: int, *args: str) -> None:
    cmd = ["mpirun", "-np", str(ranks), "--oversubscribe", str(VENV_BIN / "hpc-uc"), *args]
    env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_mpi_yield_when_idle": "1",
           **os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)


def base_run(config: str, base: Path, common: list[str], ranks: int) -> None:
    """Surrogate and clusters of one seed."""
    stages = base / "stages.json"
    if stages.is_file() and "cluster" in json.loads(stages.read_text()):
        return
    for stage in ("surrogate", "cluster"):
        mpirun(ranks, stage, config, f"run_dir={base}", *common)


def seed_run_dir(base: Path, target: Path) -> None:
    """The base's surrogate, clusters (marked complete) and clean victims (reused if they match);
    without a base surrogate (``--no-surrogate``) only the clean victims."""
    target.mkdir(parents=True, exist_ok=True)
    if (base / "clean_victims.json").is_file():
        shutil.copy2(base / "clean_victims.json", target / "clean_victims.json")
    if not (base / "stages.json").is_file():
        return
    for name in shared_files(RunDir(base), {"method": "uc"}):
        shutil.copy2(base / name, target / name)
    done = json.loads((base / "stages.json").read_text())
    keep = {k: v for k, v in done.items() if k in SHARED}
    (target / "stages.json").write_text(json.dumps(keep))


def run_variant(config: str, base: Path, run_dir: Path, overrides: list[str], ranks: int) -> dict:
    if not (run_dir / "results.json").is_file():
        seed_run_dir(base, run_dir)
        began = time.perf_counter()
        mpirun(ranks, "run", config, f"run_dir={run_dir}", *overrides)
        print(f"{run_dir}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
        if not (base / "clean_victims.json").is_file() and (run_dir / "clean_victims.json").is_file():
            shutil.copy2(run_dir / "clean_victims.json", base / "clean_victims.json")
    return json.loads((run_dir / "results.json").read_text())


def rows_of(variant: str, seed: int, r: dict) -> list[dict]:
    """One row per protocol and victim: the protected one, then each defense's (``+name``)."""
    run = {"psnr_db": r["psnr_db"], "ssim": r["ssim"],
           "untrained_recal": r["untrained"]["recalibrated_acc"], "chance": r["chance_acc"],
           "protect_s": r["stage_seconds"].get("train", 0) + r["stage_seconds"].get("export", 0)}
    rows = []
    for protocol, v in r["protocols"].items():
        clean = {"clean_acc": v["clean"]["test_acc"], "clean_auc": v["clean"]["test_auc"],
                 "clean_recal": v["clean"]["recalibrated_acc"]}
        victims = [("protected", v["protected"], r["protection"][protocol])]
        victims += [(f"+{name}", d, d["protection"]) for name, d in v.get("defenses", {}).items()]
        for victim, m, f in victims:
            rows.append({"variant": variant, "seed": seed, "protocol": protocol, "victim": victim, **clean,
                         "acc": m["test_acc"], "auc": m["test_auc"], "recal": m["recalibrated_acc"],
                         "turned_auc": m.get("turned_test_auc"), "turned_recal": m.get("turned_recalibrated_acc"),
                         "share_acc": f["acc"], "share_auc": f["auc"], "share_recal": f["recalibrated_acc"],
                         "headline": f["headline"], **run})
    return rows


def summary(rows: list[dict]) -> str:
    """Mean ± sd over seeds per (variant, protocol, victim), variants in the order first seen."""
    head = ("| variant | protocol | victim | seeds | clean ACC / AUC / recal | test ACC | test AUC | "
            "recal ACC | turning attacker AUC / recal | share ACC / AUC / recal | **headline** | PSNR dB / SSIM | untrained recal | "
            "train+export s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def ms(values, digits=3):
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.{digits}f}"

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["protocol"], r["victim"]), []).append(r)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    keys = sorted(groups, key=lambda k: (variants.index(k[0]), k[1], k[2] != "protected", k[2]))
    for variant, protocol, victim in keys:
        mine = groups[(variant, protocol, victim)]
        col = {k: [r[k] for r in mine] for k in FIGURES}
        lines.append(
            f"| {variant} | {protocol} | {victim} | {len(mine)} | {ms(col['clean_acc'], 2)} / {ms(col['clean_auc'], 2)} / "
            f"{ms(col['clean_recal'], 2)} | {ms(col['acc'])} | {ms(col['auc'])} | {ms(col['recal'])} | "
            f"{ms(col['turned_auc'])} / {ms(col['turned_recal'])} | {ms(col['share_acc'], 2)} / {ms(col['share_auc'], 2)} / {ms(col['share_recal'], 2)} | "
            f"**{ms(col['headline'])}** | {ms(col['psnr_db'], 1)} / {ms(col['ssim'], 2)} | "
            f"{ms(col['untrained_recal'])} | {ms(col['protect_s'], 0)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--root", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--common", default="", help="overrides every run gets")
    parser.add_argument("--variant", action="append", required=True, help="NAME=override override ...")
    parser.add_argument("--no-surrogate", action="store_true",
                        help="every variant is method=em (no surrogate, no clusters): train no base")
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    variants = [(spec.partition("=")[0], shlex.split(spec.partition("=")[2])) for spec in args.variant]
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        common = [*shlex.split(args.common), f"seed={seed}"]
        base = root / f"seed{seed}" / "base"
        base.mkdir(parents=True, exist_ok=True)
        if not args.no_surrogate:
            base_run(args.config, base, common, args.np)
        for name, overrides in variants:
            result = run_variant(args.config, base, root / f"seed{seed}" / name, [*common, *overrides], args.np)
            rows += rows_of(name, seed, result)
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
            (root / "knobs.csv").write_text(buf.getvalue())
            (root / "knobs.md").write_text(summary(rows))
    print((root / "knobs.md").read_text(), end="")


if __name__ == "__main__":
    main()
