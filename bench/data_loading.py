"""Images/s of the sharded reader against a PNG ImageFolder read through torchvision.

The PNG path is how the reference UC code feeds its training: ``torchvision.datasets.
ImageFolder`` + ``transforms.ToTensor()`` through a ``DataLoader``. Both paths read the same
images (BreastMNIST from ../shared/data, else scikit-learn digits, repeated to ``--images``).

    python bench/data_loading.py [--images 4096] [--size 28] [--append]
    mpirun -np 2 python bench/data_loading.py --append   # sharded reader on 2 ranks

Under mpirun only the sharded reader runs; images/s is the total over ranks, timed from a
barrier to the slowest rank's end. ``--append`` adds the table to bench/results.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hpc_uc.comm import get_comm
from hpc_uc.reader import ShardedDataset
from hpc_uc.shards import ShardSetWriter, make_manifest, shard_bounds

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results.md"


def source_images(size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """All BreastMNIST images at ``size`` (N×S×S×1), else digits; labels; a name."""
    npz = DATA / ("breastmnist.npz" if size == 28 else f"breastmnist_{size}.npz")
    if npz.is_file():
        with np.load(npz) as d:
            images = np.concatenate([d[f"{s}_images"] for s in ("train", "val", "test")])
            labels = np.concatenate([d[f"{s}_labels"] for s in ("train", "val", "test")])
        return images[..., None], labels.astype(np.int64), npz.name
    from data_prep import digits
    parts = digits.load().values()
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            "sklearn digits (28 px)")


def build(work: Path, images: np.ndarray, labels: np.ndarray, shards: int) -> None:
    """The same images as a PNG ImageFolder (work/png/train/<class>/) and a shard set (work/shards)."""
    for i, (image, label) in enumerate(zip(images, labels[:, 0])):
        folder = work / "png" / "train" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(folder / f"{i:06d}.png")
    with ShardSetWriter(work / "shards") as w:
        for i, (lo, hi) in enumerate(shard_bounds(len(images), shards)):
            w.write("train", images[lo:hi], labels[lo:hi], np.arange(lo, hi), i, shards)
        classes = [str(c) for c in range(int(labels.max()) + 1)]
        w.commit(make_manifest("bench", "multi-class", 1, images.shape[1], classes, {"file": "bench", "md5": None}))


def timed(epoch_fn, min_seconds: float, comm=None) -> tuple[float, int]:
    """Run one warm-up epoch, then epochs until ``min_seconds`` pass; (seconds, images)."""
    epoch_fn(0)
    if comm is not None:
        comm.barrier()
    start, images, epoch = time.perf_counter(), 0, 1
    while time.perf_counter() - start < min_seconds:
        images += epoch_fn(epoch)
        epoch += 1
    if comm is not None:
        images = sum(comm.allgather(images))
        elapsed = max(comm.allgather(time.perf_counter() - start))
    else:
        elapsed = time.perf_counter() - start
    return elapsed, images


def png_rate(root: Path, batch: int, workers: int, min_seconds: float) -> float:
    from torchvision import datasets, transforms

    dataset = datasets.ImageFolder(str(root), transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)

    def epoch(_: int) -> int:
        return sum(len(x) for x, _ in loader)

    seconds, images = timed(epoch, min_seconds)
    return images / seconds


def shard_rate(root: Path, comm, batch: int, cache: str, min_seconds: float) -> tuple[float, float]:
    """(images/s over all ranks, seconds to open the dataset incl. sha256 checks)."""
    start = time.perf_counter()
    ds = ShardedDataset(root, "train", comm, cache=cache)
    opened = time.perf_counter() - start

    def epoch(e: int) -> int:
        return sum(len(x) for x, _, _ in ds.batches(batch, e))

    seconds, images = timed(epoch, min_seconds, comm)
    return images / seconds, opened


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4096, help="images per epoch (source repeated)")
    parser.add_argument("--size", type=int, default=28, choices=(28, 64))
    parser.add_argument("--batch", type=int, default=128, help="batch per rank")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per row")
    parser.add_argument("--append", action="store_true", help=f"append the table to {RESULTS}")
    args = parser.parse_args(argv)
    comm = get_comm("mpi")
    work = Path(comm.broadcast(tempfile.mkdtemp(prefix="hpc-uc-bench-") if comm.is_root else None))
    try:
        if comm.is_root:
            images, labels, name = source_images(args.size)
            reps = np.arange(args.images) % len(images)
            build(work, images[reps], labels[reps], args.shards)
        name = comm.broadcast(name if comm.is_root else None)
        comm.barrier()
        rows = []
        if comm.size == 1:
            for workers in (0, 2):
                rows.append(("PNG ImageFolder + ToTensor", f"DataLoader, {workers} workers", 1,
                             png_rate(work / "png", args.batch, workers, args.seconds), None))
        for cache in ("always", "never"):
            rate, opened = shard_rate(work / "shards", comm, args.batch, cache, args.seconds)
            rows.append(("ShardedDataset.batches", f"cache={cache}", comm.size, rate, opened))
    finally:
        comm.barrier()
        if comm.is_root:
            shutil.rmtree(work, ignore_errors=True)
    if not comm.is_root:
        return
    head = (f"\n{machine()}, {os.cpu_count()} cores; {comm.size} rank(s) x {torch.get_num_threads()} torch "
            f"thread(s); torch {torch.__version__.split('+')[0]}. {args.images} images of {name} "
            f"at {args.size} px, batch {args.batch} per rank, {args.shards} shards.\n\n"
            "| reader | setting | ranks | images/s | open (s) |\n|---|---|---:|---:|---:|\n")
    table = head + "".join(f"| {r} | {s} | {n} | {rate:,.0f} | {'' if o is None else f'{o:.3f}'} |\n"
                           for r, s, n, rate, o in rows)
    print(table)
    if args.append:
        if not RESULTS.exists():
            RESULTS.write_text("# Benchmarks\n\n## Data loading\n")
        with RESULTS.open("a") as f:
            f.write(table)


if __name__ == "__main__":
    main()
