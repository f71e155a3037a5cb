"""Clean baseline of the victim protocol against MedMNIST v2's published figures.

Trains the evaluate stage's victim (ResNet-18 (28): small-image stem, Adam lr 1e-3, batch 128,
100 epochs, x0.1 at epochs 50 and 75, best-on-validation checkpoint) on a clean shard set and
reports test ACC/AUC. Published (MedMNIST v2, Table 3) BreastMNIST ResNet-18 (28):
ACC 0.863, AUC 0.901.

    python -m data_prep medmnist breastmnist --npz ../shared/data/breastmnist.npz --out data/breastmnist
    python bench/medmnist_baseline.py configs/breastmnist.yaml [key=value ...]
"""
from __future__ import annotations

import json
import sys
import time

import torch

from hpc_uc.comm import get_comm
from hpc_uc.config import load_config
from hpc_uc.evaluate import train_and_test
from hpc_uc.rundir import RunDir
from hpc_uc.training import MetricsLog


def main() -> None:
    cfg = load_config(sys.argv[1], ["profile=paper", *sys.argv[2:]])
    comm = get_comm(cfg["backend"])
    run = RunDir(cfg["run_dir"])
    if comm.is_root:
        run.root.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    result = train_and_test(cfg, comm, cfg["data_dir"], "clean", MetricsLog(run.metrics, comm, "baseline"))
    if comm.is_root:
        result.update(dataset=cfg["dataset"], ranks=comm.size, threads=torch.get_num_threads(),
                      epochs=cfg["victim"]["epochs"], wall_s=round(time.perf_counter() - began, 1))
        print(json.dumps(result))


if __name__ == "__main__":
    main()
