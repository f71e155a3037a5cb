"""A grey MedMNIST npz as an ImageFolder tree of RGB PNGs (the grey replicated), for
measuring the grayscale defense where only grey sets are at hand (docs/methods.md).

    python bench/rgb_tree.py breastmnist --npz ../shared/data/breastmnist.npz --out runs/breastmnist-rgb-tree
    python -m data_prep imagefolder runs/breastmnist-rgb-tree --size 28 --name breastmnist_rgb \\
        --shards 8 --out data/breastmnist_rgb

The npz is read and checked by data_prep's own loader (``data_prep.medmnist.load_npz``).
Class directories are named ``<label>_c`` so that their sorted order is the label order.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.medmnist import SPLITS, load_npz
from hpc_uc.errors import UserError
from npz_copy_cli import run


def write_tree(flag: str, npz: Path, out: Path, size: int) -> dict[str, list[int]]:
    """Write OUT/{train,val,test}/<label>_c/<index>.png; returns the class counts per split."""
    from medmnist import INFO

    if flag not in INFO or INFO[flag]["n_channels"] != 1:
        raise UserError(f"{flag}: not a grey MedMNIST set (medmnist.INFO)")
    if out.exists():
        raise UserError(f"{out} exists; choose a new --out")
    splits = load_npz(npz, flag, INFO[flag], size)
    counts = {}
    for split in SPLITS:
        images, labels = splits[split]
        for index, (image, label) in enumerate(zip(images, labels[:, 0])):
            folder = out / split / f"{int(label)}_c"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.repeat(image, 3, axis=-1)).save(folder / f"{index:06d}.png")
        counts[split] = np.bincount(labels[:, 0]).tolist()
    return counts


if __name__ == "__main__":
    sys.exit(run(__doc__, write_tree, "a grey MedMNIST set, e.g. breastmnist", "the tree to write (must not exist)"))
