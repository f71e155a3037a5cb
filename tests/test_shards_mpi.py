"""Shard writing and ShardedDataset across real MPI ranks (run under ``mpirun -np 2``).

Every rank runs the same tests; they compare across ranks with the "mpi" communicator.
Shared directories are made by rank 0 and broadcast (per-rank tmp_path would differ).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import imagefolder
from data_prep.__main__ import main as prep_main
from hpc_uc.comm import get_comm
from hpc_uc.reader import ShardedDataset
from hpc_uc.shards import ShardSetWriter, make_manifest, partition, read_manifest, shard_bounds, verify

pytestmark = pytest.mark.mpi


@pytest.fixture
def comm():
    return get_comm("mpi")


@pytest.fixture
def shared_dir(comm):
    path = Path(comm.broadcast(tempfile.mkdtemp(prefix="hpc-uc-mpi-") if comm.is_root else None))
    yield path
    comm.barrier()
    if comm.is_root:
        shutil.rmtree(path, ignore_errors=True)


def write_parallel(out: Path, comm, n: int, num_shards: int, seed: int = 0) -> np.ndarray:
    """Every rank writes shards i with i % size == rank of one train split of n samples."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 5, 5, 1), dtype=np.uint8)
    labels = rng.integers(0, 2, (n, 1))
    with ShardSetWriter(out, comm) as w:
        for i, (lo, hi) in enumerate(shard_bounds(n, num_shards)):
            if i % comm.size == comm.rank:
                w.write("train", images[lo:hi], labels[lo:hi], np.arange(lo, hi), i, num_shards)
        manifest = w.commit(make_manifest("toy", "binary-class", 1, 5, ["a", "b"], {"file": "toy", "md5": None}))
    assert comm.allgather(manifest) == [manifest] * comm.size
    return images


def test_world_is_parallel(comm):
    assert comm.size >= 2, "run these tests under mpirun -np 2 (or more)"


@pytest.mark.parametrize("num_shards", [1, 3, 8])
def test_ranges_disjoint_equal_and_deterministic(comm, shared_dir, num_shards):
    n = 61
    images = write_parallel(shared_dir / "set", comm, n, num_shards)
    verify(shared_dir / "set")
    for cache in ("always", "never"):
        ds = ShardedDataset(shared_dir / "set", "train", comm, seed=7, cache=cache)
        local = ds.local_arrays()
        assert np.array_equal(local[0], images[ds.positions()]) and len(ds) == n // comm.size
        ranges = comm.allgather((ds.start, ds.stop))
        assert ranges == [partition(n, comm.size, r) for r in range(comm.size)]
        parts = comm.allgather(ds.positions())
        assert len(np.unique(np.concatenate(parts))) == (n // comm.size) * comm.size  # disjoint
        order = [torch.cat([i for _, _, i in ds.batches(8, epoch)]).numpy() for epoch in (0, 1)]
        again = ShardedDataset(shared_dir / "set", "train", comm, seed=7, cache=cache)
        assert np.array_equal(order[0], torch.cat([i for _, _, i in again.batches(8, 0)]).numpy())
        assert not np.array_equal(order[0], order[1])
        everyone = np.concatenate(comm.allgather(order[0]))
        assert len(everyone) == len(np.unique(everyone)) == (n // comm.size) * comm.size
        full = ShardedDataset(shared_dir / "set", "train", comm, full=True, cache=cache)
        seen = np.concatenate(comm.allgather(full.local_arrays()[2]))
        assert np.array_equal(np.sort(seen), np.arange(n))


def write_tree(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    from PIL import Image

    for split, per_class in (("train", 5), ("val", 1), ("test", 3)):
        for name in ("a", "b", "c"):
            (root / split / name).mkdir(parents=True)
            for k in range(per_class):
                h, w = (int(v) for v in rng.integers(10, 24, 2))
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / name / f"{k}.png")


def test_imagefolder_parallel_equals_serial(comm, shared_dir):
    if comm.is_root:
        write_tree(shared_dir / "tree")
    comm.barrier()
    parallel = imagefolder.prepare(shared_dir / "tree", shared_dir / "par", 12, 4, comm=comm)
    assert comm.allgather(parallel) == [parallel] * comm.size
    if comm.is_root:
        serial = imagefolder.prepare(shared_dir / "tree", shared_dir / "ser", 12, 4)
        assert serial["splits"] == parallel["splits"], "ranks must write the same bytes as one process"
        assert len(parallel["splits"]["train"]["shards"]) == 4 and len(parallel["splits"]["val"]["shards"]) == 3
    comm.barrier()
    verify(shared_dir / "par")
    ds = ShardedDataset(shared_dir / "par", "train", comm, full=True)
    x, y, _ = next(ds.batches(4))
    assert x.shape == (4, 3, 12, 12) and x.device == comm.device and y.max() <= 2


def test_prepare_cli_under_mpirun(comm, shared_dir):
    npz = Path(__file__).resolve().parents[2] / "shared" / "data" / "breastmnist.npz"
    if npz.is_file():
        argv = ["medmnist", "breastmnist", "--npz", str(npz)]
    else:
        argv = ["digits"]
    assert prep_main(argv + ["--shards", "3", "--out", str(shared_dir / "out")]) == 0
    manifest = read_manifest(shared_dir / "out")
    assert comm.allgather(manifest["splits"]) == [manifest["splits"]] * comm.size
    verify(shared_dir / "out")


def test_parallel_imperceptibility_equals_one_process(comm, shared_dir):
    """Each rank measures its own range (other shard layouts for the two sets, one image per
    SSIM batch): the four numbers equal one process's over the whole arrays."""
    from hpc_uc.imperceptibility import imperceptibility, parallel_imperceptibility

    rng = np.random.default_rng(3)
    clean = rng.integers(0, 256, (23, 16, 16, 3), dtype=np.uint8)
    noisy = np.clip(clean.astype(int) + rng.integers(-9, 10, clean.shape), 0, 255).astype(np.uint8)
    for name, images, shards in (("clean", clean, 5), ("protected", noisy, comm.size)):
        with ShardSetWriter(shared_dir / name, comm) as w:
            for i, (lo, hi) in enumerate(shard_bounds(23, shards)):
                if i % comm.size == comm.rank:
                    w.write("train", images[lo:hi], np.zeros((hi - lo, 1)), np.arange(lo, hi), i, shards)
            w.commit(make_manifest("toy", "binary-class", 3, 16, ["a", "b"], {"file": "toy", "md5": None}))
    got = parallel_imperceptibility(shared_dir / "clean", shared_dir / "protected", comm, batch_values=16 * 16 * 3)
    assert got == pytest.approx(imperceptibility(clean, noisy), rel=1e-9)
