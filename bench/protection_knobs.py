"""Which knob moves protection: rerun train -> export -> evaluate with overrides, one table.

Each variant gets its own run directory seeded with the base run's surrogate and clusters
(so only the stages the override touches run again), runs ``hpc-uc run`` under mpirun, and
contributes one Markdown row from its results.json.

    python bench/protection_knobs.py configs/digits.yaml --base runs/digits --np 2 \\
        --variant "fast=profile=fast" --variant "eps32=profile=fast epsilon=0.12549"
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

SEED_FILES = ("surrogate.pt", "surrogate.json", "clusters.npz")
VENV_BIN = Path(sys.executable).parent


def seed_run_dir(base: Path, target: Path) -> None:
    """Copy the base run's surrogate and clusters, marking only those stages complete."""
    target.mkdir(parents=True, exist_ok=True)
    for name in SEED_FILES:
        shutil.copy2(base / name, target / name)
    done = json.loads((base / "stages.json").read_text())
    keep = {k: v for k, v in done.items() if k in ("surrogate", "cluster")}
    (target / "stages.json").write_text(json.dumps(keep))


def run_variant(config: str, base: Path, root: Path, name: str, overrides: list[str], ranks: int) -> dict:
    run_dir = root / name
    if not (run_dir / "results.json").is_file():
        seed_run_dir(base, run_dir)
        cmd = ["mpirun", "-np", str(ranks), str(VENV_BIN / "hpc-uc"), "run", config,
               f"run_dir={run_dir}", *overrides]
        began = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"{name}: {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return json.loads((run_dir / "results.json").read_text())


def row(name: str, overrides: list[str], r: dict) -> str:
    return (f"| {name} | `{' '.join(overrides)}` | {r['clean']['test_acc']:.3f} | {r['protected']['test_acc']:.3f} "
            f"| {r['protection_gain']:.3f} | {r['chance_acc']:.3f} | {r['psnr_db']:.1f} "
            f"| {r['stage_seconds'].get('train', 0):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--base", required=True, help="a completed run dir whose surrogate/clusters to reuse")
    parser.add_argument("--root", default="runs/knobs")
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--variant", action="append", required=True, help="NAME=override override ...")
    args = parser.parse_args()
    print("| variant | overrides | clean ACC | protected ACC | gain | chance | PSNR dB | train s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        overrides = shlex.split(rest)
        result = run_variant(args.config, Path(args.base), Path(args.root), name, overrides, args.np)
        print(row(name, overrides, result), flush=True)


if __name__ == "__main__":
    main()
