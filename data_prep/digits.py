"""scikit-learn's bundled handwritten digits -> 28×28 grayscale shard set (no download).

1797 real scanned digits (8×8, values 0..16) are scaled to 0..255, upsampled bilinearly to
28×28 with PIL and split 70/10/20 into train/val/test, stratified by class with a fixed seed.
``index`` is each image's row in ``load_digits()``; every split is stored in that order.
"""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hpc_uc.errors import UserError
from hpc_uc.shards import ShardSetWriter, make_manifest, shard_bounds

IMAGE_SIZE = 28
SPLIT_SEED = 0
SOURCE_FILE = "digits.csv.gz"


def load() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per split ``(images N×28×28×1 uint8, labels N×1 int64, index N int64)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(im).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
                       for im in small])[..., None]
    ids = np.arange(len(images))
    train, rest = train_test_split(ids, test_size=0.3, stratify=digits.target, random_state=SPLIT_SEED)
    val, test = train_test_split(rest, test_size=2 / 3, stratify=digits.target[rest],
                                 random_state=SPLIT_SEED)
    labels = digits.target.astype(np.int64)[:, None]
    return {split: (images[np.sort(i)], labels[np.sort(i)], np.sort(i))
            for split, i in (("train", train), ("val", val), ("test", test))}


def source_md5() -> str:
    data = resources.files("sklearn.datasets") / "data" / SOURCE_FILE
    return hashlib.md5(data.read_bytes()).hexdigest()


def prepare(out: str | Path, shards: int, overwrite: bool = False, compression: str = "lzf",
            comm: Any = None) -> dict:
    """Write the digits shard set at ``out`` (rank 0 writes; others join the commit)."""
    if shards < 1:
        raise UserError(f"--shards must be at least 1, not {shards}")
    with ShardSetWriter(out, comm, overwrite, compression) as writer:
        if comm is None or comm.rank == 0:
            for split, (images, labels, index) in load().items():
                count = min(shards, len(images))
                for i, (lo, hi) in enumerate(shard_bounds(len(images), count)):
                    writer.write(split, images[lo:hi], labels[lo:hi], index[lo:hi], i, count)
        source = {"file": f"sklearn.datasets.load_digits ({SOURCE_FILE})", "md5": source_md5()}
        manifest = make_manifest("digits", "multi-class", 1, IMAGE_SIZE, [str(d) for d in range(10)], source)
        return writer.commit(manifest)
