"""What an attacker recovers from a victim that learned nothing: the recalibrated accuracy of an
untrained (randomly initialised) victim, the floor any protection can reach on that reading.

    python bench/recalibration_floor.py data/digits data/breastmnist [--seeds 0,1,2] [--stem standard]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from hpc_uc.config import load_config
from hpc_uc.evaluate import Splits, build_victim, measure
from hpc_uc.metrics import chance_accuracy
from hpc_uc.comm import get_comm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dirs", nargs="+")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--stem", default="auto")
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()
    comm = get_comm("mpi")
    for data_dir in args.data_dirs:
        cfg = load_config(None, [f"data_dir={data_dir}", f"victim.stem={args.stem}",
                                 f"evaluate.recalibrate_samples={args.samples}"])
        splits = Splits(cfg, comm)
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            torch.manual_seed(seed)
            model = build_victim(cfg, splits.test.manifest).eval()
            rows.append(measure(cfg, model, splits, comm))
        labels = np.concatenate([y.numpy() for _, y, _ in splits.test.batches(4096, shuffle=False)])
        acc = [r["recalibrated_acc"] for r in rows]
        auc = [r["recalibrated_auc"] for r in rows]
        print(f"| {data_dir} | {args.stem} | {len(rows)} | {np.mean(acc):.3f} ± {np.std(acc):.3f} "
              f"| {np.mean(auc):.3f} ± {np.std(auc):.3f} | {chance_accuracy(labels, splits.task):.3f} |")


if __name__ == "__main__":
    main()
