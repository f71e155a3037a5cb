"""What an attacker reads from a victim that learned nothing about the labels: the floor of the
AUC and re-fit readings, the best any protection can reach on this split and protocol.

Each seed's victim trains under each protocol of the config (``hpc-uc evaluate``'s own
training and measuring: the floor victim of ``evaluate.floor``) on the clean training images
with their labels **shuffled** (a permutation, so the class counts stay): whatever it learns,
its outputs carry no label information except by chance. The figures are read exactly as a protected victim's are
(``attacker_reading``: the AUC as ranked, the turning attacker's epoch under ``medmnist``), so
a protected victim reading near them is as deep as this measurement can show.

    mpirun -np 2 python bench/reading_floor.py configs/breastmnist.yaml --out runs/floor-breast \\
        --seeds 0,1,2,3,4 profile=fast data_dir=data/breastmnist

Writes OUT/floor.csv (one row per seed and protocol) and prints a mean ± sd table.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from hpc_uc.comm import get_comm
from hpc_uc.config import load_config
from hpc_uc.evaluate import Splits, train_and_test
from hpc_uc.protection import attacker_reading
from hpc_uc.training import MetricsLog

COLUMNS = ("seed", "protocol", "test_acc", "test_auc", "recalibrated_acc", "turned_test_auc",
           "turned_recalibrated_acc", "read_auc", "read_recal", "best_epoch", "turned_epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE, as for hpc-uc")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_intermixed_args()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = load_config(args.config, [*args.overrides, f"seed={seed}"])
        comm = get_comm(cfg["backend"])
        if comm.is_root:
            args.out.mkdir(parents=True, exist_ok=True)
        splits = Splits(cfg, comm)
        log = MetricsLog(args.out / "metrics.jsonl", comm, "reading_floor")
        for protocol in cfg["evaluate"]["protocols"]:
            victim = train_and_test(cfg, comm, cfg["data_dir"], f"floor-seed{seed}", protocol, splits, log,
                                    shuffle_labels=True)
            if comm.is_root:
                read = attacker_reading(victim)
                rows.append({**{k: victim.get(k) for k in COLUMNS}, "seed": seed, "protocol": protocol,
                             "read_auc": read["auc"], "read_recal": read["recalibrated_acc"]})
    if not comm.is_root:
        return
    with open(args.out / "floor.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print("| protocol | seeds | AUC reported | **AUC read** (per seed) | re-fit read |")
    print("|---|---|---|---|---|")
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        mine = [r for r in rows if r["protocol"] == protocol]
        col = {k: np.array([r[k] for r in mine], dtype=float) for k in ("test_auc", "read_auc", "read_recal")}
        sd = {k: np.std(v, ddof=1) if len(v) > 1 else 0.0 for k, v in col.items()}
        print(f"| {protocol} | {len(mine)} | {col['test_auc'].mean():.3f} ± {sd['test_auc']:.3f} "
              f"| **{col['read_auc'].mean():.3f} ± {sd['read_auc']:.3f}** "
              f"({' / '.join(f'{v:.3f}' for v in col['read_auc'])}) "
              f"| {col['read_recal'].mean():.3f} ± {sd['read_recal']:.3f} |")


if __name__ == "__main__":
    main()
