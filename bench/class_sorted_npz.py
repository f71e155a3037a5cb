"""A MedMNIST npz with every split sorted by label (stable), the layout an ImageFolder tree is
written in: for checking that what the ranks train on does not depend on the shard layout
(docs/efficacy.md, "Re-measured after the reader's random deal").

    python bench/class_sorted_npz.py breastmnist --npz ../shared/data/breastmnist.npz --out runs/breastmnist_sorted.npz
    python -m data_prep medmnist breastmnist --npz runs/breastmnist_sorted.npz --allow-md5-mismatch \\
        --shards 8 --out data/breastmnist_sorted

The npz is read and checked by data_prep's own loader (``data_prep.medmnist.load_npz``);
single-label sets only (multi-label rows have no one order).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from data_prep.medmnist import SPLITS, load_npz
from hpc_uc.errors import UserError
from npz_copy_cli import run


def write_sorted(flag: str, npz: Path, out: Path, size: int) -> dict[str, list[int]]:
    """Write OUT with each split's images and labels in stable label order; returns the class
    counts per split."""
    from medmnist import INFO

    if flag not in INFO or INFO[flag]["task"].startswith("multi-label"):
        raise UserError(f"{flag}: not a single-label MedMNIST set (medmnist.INFO)")
    if out.exists():
        raise UserError(f"{out} exists; choose a new --out")
    splits = load_npz(npz, flag, INFO[flag], size)
    arrays, counts = {}, {}
    for split in SPLITS:
        images, labels = splits[split]
        order = np.argsort(labels[:, 0], kind="stable")
        arrays[f"{split}_images"] = images[order]
        arrays[f"{split}_labels"] = labels[order].astype(np.uint8)
        counts[split] = np.bincount(labels[:, 0]).tolist()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "xb") as f:  # never over a file that appeared meanwhile
        np.savez(f, **arrays)
    return counts


if __name__ == "__main__":
    sys.exit(run(__doc__, write_sorted, "a single-label MedMNIST set, e.g. breastmnist", "the npz to write (must not exist)"))
