"""A 1-channel MedMNIST npz as an ImageFolder tree of RGB PNGs (the grey replicated), for
measuring the grayscale defense where only grey sets are at hand (docs/methods.md).

    python bench/rgb_tree.py ../shared/data/breastmnist.npz --out runs/breastmnist-rgb-tree
    python -m data_prep imagefolder runs/breastmnist-rgb-tree --size 28 --name breastmnist_rgb \\
        --shards 8 --out data/breastmnist_rgb

Class directories are named ``<label>_c`` so that their sorted order is the label order.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_tree(npz: Path, out: Path) -> dict[str, list[int]]:
    """Write OUT/{train,val,test}/<label>_c/<index>.png; returns the class counts per split."""
    if out.exists():
        raise SystemExit(f"error: {out} exists; choose a new --out")
    data = np.load(npz)
    counts = {}
    for split in ("train", "val", "test"):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
        if images.ndim != 3:
            raise SystemExit(f"error: {npz}: {split}_images has shape {images.shape}; expected N x H x W (grey)")
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = out / split / f"{int(label)}_c"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.repeat(image[..., None], 3, axis=-1)).save(folder / f"{index:06d}.png")
        counts[split] = np.bincount(labels).tolist()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("npz", type=Path, help="a 1-channel MedMNIST npz (e.g. breastmnist.npz)")
    parser.add_argument("--out", type=Path, required=True, help="the tree to write (must not exist)")
    args = parser.parse_args()
    for split, count in write_tree(args.npz, args.out).items():
        print(f"{split}: {sum(count)} images, per class {count}")


if __name__ == "__main__":
    main()
