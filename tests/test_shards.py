"""Shard format, data_prep commands and ShardedDataset, in one process (world sizes simulated)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_job
from data_prep.__main__ import main as prep_main
from hpc_uc import reader as reader_module
from hpc_uc.errors import UserError
from hpc_uc.reader import ShardedDataset, squeeze_labels
from hpc_uc.shards import (MANIFEST, ShardSetWriter, make_manifest, partition, read_manifest,
                           shard_bounds, verify, write_split)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CPU = torch.device("cpu")


def fake_comm(rank: int, size: int) -> SimpleNamespace:
    return SimpleNamespace(rank=rank, size=size, device=CPU)


def make_npz(path: Path, flag: str, size: int = 28, counts=(12, 5, 7), seed: int = 0, **override) -> dict:
    """A small npz in the official MedMNIST layout for ``flag`` (random pixels, valid labels)."""
    from medmnist import INFO

    info = INFO[flag]
    rng = np.random.default_rng(seed)
    classes, channels = len(info["label"]), info["n_channels"]
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        shape = (n, size, size) if channels == 1 else (n, size, size, channels)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        if info["task"].startswith("multi-label"):
            arrays[f"{split}_labels"] = rng.integers(0, 2, (n, classes), dtype=np.uint8)
        else:
            arrays[f"{split}_labels"] = rng.integers(0, classes, (n, 1), dtype=np.uint8)
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez_compressed(path, **arrays)
    return arrays


def build_set(out: Path, counts: list[int], size: int = 4, channels: int = 1, seed: int = 0,
              labels: np.ndarray | None = None) -> np.ndarray:
    """A train split with shards of the given (uneven) counts (random labels unless given);
    returns the images in order."""
    rng = np.random.default_rng(seed)
    n = sum(counts)
    images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    labels = rng.integers(0, 3, (n, 1)) if labels is None else labels
    with ShardSetWriter(out) as w:
        lo = 0
        for i, c in enumerate(counts):
            w.write("train", images[lo:lo + c], labels[lo:lo + c], np.arange(lo, lo + c), i, len(counts))
            lo += c
        w.commit(make_manifest("toy", "multi-class", channels, size, ["a", "b", "c"], {"file": "toy", "md5": None}))
    return images


def uneven_counts(n: int, shards: int, seed: int) -> list[int]:
    cuts = np.sort(np.random.default_rng(seed).integers(0, n + 1, shards - 1))
    return np.diff(np.r_[0, cuts, n]).tolist()


def run_prep(capsys, *argv) -> tuple[int, list[str]]:
    code = prep_main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def assert_clean_failure(code: int, err: list[str], out: Path, fragment: str) -> None:
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert fragment in err[0], err[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(out.name + ".")]


# ---- partition and reader ranges ------------------------------------------------------------
def test_partition_rules():
    for n in range(0, 40):
        for size in range(1, 8):
            train = [partition(n, size, r) for r in range(size)]
            assert all(b - a == n // size for a, b in train)
            assert [a for a, _ in train] == [r * (n // size) for r in range(size)]
            full = [partition(n, size, r, full=True) for r in range(size)]
            assert full[0][0] == 0 and full[-1][1] == n
            assert all(full[r][1] == full[r + 1][0] for r in range(size - 1))
            assert max(b - a for a, b in full) - min(b - a for a, b in full) <= 1
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError):
        partition(10, 2, 2)


@pytest.fixture(scope="module")
def uneven_sets(tmp_path_factory) -> dict[int, tuple[Path, int]]:
    """For shard counts 1..8: a 61-sample split cut into uneven shards (some empty)."""
    base = tmp_path_factory.mktemp("uneven")
    sets = {}
    for shards in range(1, 9):
        build_set(base / f"s{shards}", uneven_counts(61, shards, shards))
        sets[shards] = (base / f"s{shards}", 61)
    return sets


@pytest.mark.parametrize("size", range(1, 8))
def test_ranges_simulated(uneven_sets, size, monkeypatch):
    """Training parts are disjoint seeded random draws of n // size samples; one-pass parts
    (full=True) are contiguous and cover the split; each shard is hashed by the one rank
    whose contiguous range holds its first sample, whatever the parts."""
    opened, hashed = [], []
    real_open = reader_module.open_shard

    def spy(root, m, split, shard, check_hash=True):
        opened.append(shard)
        hashed.extend([shard] * check_hash)
        return real_open(root, m, split, shard, check_hash=check_hash)

    monkeypatch.setattr(reader_module, "open_shard", spy)
    for shards, (root, n) in uneven_sets.items():
        counts = [e["count"] for e in read_manifest(root)["splits"]["train"]["shards"]]
        offsets = np.r_[0, np.cumsum(counts)]
        seen, hashed_by_all = [], []
        for rank in range(size):
            opened.clear(), hashed.clear()
            ds = ShardedDataset(root, "train", fake_comm(rank, size), seed=3, cache="never")
            index = ds.local_arrays()[2]
            assert len(ds) == len(index) == n // size
            assert np.array_equal(index, ds.positions()) and np.all(np.diff(index) > 0)
            assert set(np.searchsorted(offsets, index, side="right") - 1) <= set(opened)
            lo, hi = partition(n, size, rank, full=True)
            assert set(hashed) == {s for s in range(shards) if counts[s] and lo <= offsets[s] < hi}
            hashed_by_all += hashed
            seen.append(index)
            full = ShardedDataset(root, "train", fake_comm(rank, size), full=True)
            assert np.array_equal(full.local_arrays()[2], np.arange(lo, hi))
        allseen = np.concatenate(seen)
        assert len(np.unique(allseen)) == len(allseen) == (n // size) * size
        assert sorted(hashed_by_all) == [s for s in range(shards) if counts[s]]  # each once
        if size > 1:
            assert not np.array_equal(np.sort(allseen), np.arange((n // size) * size)) or n % size == 0


def test_training_parts_do_not_depend_on_the_shard_layout(tmp_path):
    """A class-sorted split (as an ImageFolder tree writes it) once gave rank 0 of 2 one class
    and rank 1 the other, so victims trained differently on the same images in another order:
    every rank's training part now holds the classes in the split's proportions."""
    n = 600
    labels = np.repeat(np.arange(3), [300, 200, 100])[:, None]
    build_set(tmp_path / "sorted", [250, 350], labels=labels)
    for size in (2, 3):
        for rank in range(size):
            ds = ShardedDataset(tmp_path / "sorted", "train", fake_comm(rank, size), seed=0)
            share = np.bincount(ds.local_arrays()[1][:, 0], minlength=3) / len(ds)
            assert np.abs(share - np.array([3, 2, 1]) / 6).max() < 0.08, (size, rank, share)
        em_part = ShardedDataset(tmp_path / "sorted", "train", fake_comm(0, size), full=True, spread=True)
        assert len(em_part) == -(-n // size) and len(set(em_part.local_arrays()[1][:, 0])) == 3


def test_a_pass_in_chunks_keeps_few_shards_open_and_hashes_each_once(uneven_sets, monkeypatch):
    """An open shard's HDF5 state grows with what is read from it (6,000 images at 224 px:
    +250 MiB per rank over one SSIM pass, flat once passed shards were closed): a pass closes
    the shards behind it, and a reopened shard is not hashed again."""
    hashed = []
    real_open = reader_module.open_shard
    monkeypatch.setattr(reader_module, "open_shard", lambda root, m, split, shard, check_hash=True:
                        hashed.extend([shard] * check_hash) or real_open(root, m, split, shard, check_hash=check_hash))
    root, n = uneven_sets[8]
    ds = ShardedDataset(root, "train", None, cache="never", full=True)
    assert ds._shards == {}  # checked on open, then closed
    most, seen = 0, []
    for _ in range(2):
        for _, _, index in ds.local_chunks(5):
            most = max(most, len(ds._shards))
            seen.append(index)
        assert ds._shards == {}
    assert most <= 2 and np.array_equal(np.concatenate(seen), np.tile(np.arange(n), 2))
    assert sorted(hashed) == sorted(set(hashed))  # each shard hashed once, on the first open


def test_same_seed_same_order(uneven_sets):
    root, _ = uneven_sets[3]

    def order(seed, epoch, cache="always"):
        ds = ShardedDataset(root, "train", fake_comm(1, 2), seed=seed, cache=cache)
        return np.concatenate([i.numpy() for _, _, i in ds.batches(8, epoch)])

    assert np.array_equal(order(1, 0), order(1, 0))
    assert np.array_equal(order(1, 2), order(1, 2, cache="never"))
    assert not np.array_equal(order(1, 0), order(1, 1))
    assert not np.array_equal(order(1, 0), order(2, 0))


@pytest.mark.parametrize("span_bytes", [8 << 20, 0])
def test_uncached_reads_match_cache(tmp_path, monkeypatch, span_bytes):
    """Uncached batches (covering-slice reads, or per-HDF5-chunk reads) equal cached ones."""
    monkeypatch.setattr(reader_module, "SPAN_READ_BYTES", span_bytes)
    images = build_set(tmp_path / "s", [120, 80], size=64)  # 16 images per chunk
    cached, uncached = (ShardedDataset(tmp_path / "s", "train", fake_comm(1, 2), seed=4, cache=c)
                        for c in ("always", "never"))
    for epoch in (0, 1):
        for (xa, ya, ia), (xb, yb, ib) in zip(cached.batches(32, epoch), uncached.batches(32, epoch)):
            assert torch.equal(ia, ib) and torch.equal(xa, xb) and torch.equal(ya, yb)
            assert np.array_equal((xb.numpy() * 255).round().astype(np.uint8).transpose(0, 2, 3, 1),
                                  images[ib.numpy()])
    assert len(list(uncached.batches(32, 2))) == 4 and uncached._shards == {}  # an epoch lets its shards go


def test_batches(tmp_path):
    images = build_set(tmp_path / "s", [5, 9, 3], size=6, channels=3)
    for cache in ("always", "never"):
        ds = ShardedDataset(tmp_path / "s", "train", seed=1, cache=cache)
        assert (ds.num_samples, len(ds), ds.start, ds.stop) == (17, 17, 0, 17)
        assert (ds.channels, ds.image_size, ds.num_classes, ds.label_width) == (3, 6, 3, 1)
        got = list(ds.batches(4, epoch=0))
        assert [len(b[0]) for b in got] == [4, 4, 4, 4, 1] and ds.num_batches(4) == 5
        assert len(list(ds.batches(4, drop_last=True))) == ds.num_batches(4, drop_last=True) == 4
        x, y, i = got[0]
        assert x.dtype == torch.float32 and x.shape == (4, 3, 6, 6) and x.device == CPU
        assert y.dtype == torch.int64 and y.shape == (4, 1) and squeeze_labels(y).shape == (4,)
        expected = torch.from_numpy(images[i.numpy()]).permute(0, 3, 1, 2).float() / 255
        assert torch.equal(x, expected)
        ordered = torch.cat([b[2] for b in ds.batches(4, shuffle=False)])
        assert torch.equal(ordered, torch.arange(17))
    with pytest.raises(UserError, match="fewer than the 18 ranks"):
        ShardedDataset(tmp_path / "s", "train", fake_comm(0, 18))
    idle = ShardedDataset(tmp_path / "s", "train", fake_comm(17, 18), full=True, cache="never")
    assert len(idle) == 0 and list(idle.batches(4)) == [] and idle.local_arrays()[0].shape == (0, 6, 6, 3)
    with pytest.raises(UserError, match="no split 'val'"):
        ShardedDataset(tmp_path / "s", "val")


# ---- writing ----------------------------------------------------------------------------------
def test_write_split_empty_and_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (9, 5, 5, 1), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_split(tmp_path / "a", "train", images, np.zeros((9, 1)), np.arange(9), 0, 2)
    b = write_split(tmp_path / "b", "train", images, np.zeros((9, 1)), np.arange(9), 0, 2)
    assert a == b and a["file"] == "train-00000-of-00002.h5" and a["count"] == 9
    empty = write_split(tmp_path / "a", "train", images[:0], np.zeros((0, 1)), np.arange(0), 1, 2)
    assert empty["count"] == 0
    with h5py.File(tmp_path / "a" / empty["file"]) as f:
        assert f["images"].shape == (0, 5, 5, 1)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [a["file"], empty["file"]]


def test_interrupted_write_leaves_nothing(tmp_path):
    out = tmp_path / "set"
    with pytest.raises(RuntimeError):
        with ShardSetWriter(out) as w:
            w.write("train", np.zeros((2, 3, 3, 1), np.uint8), np.zeros((2, 1)), np.arange(2), 0, 1)
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    # what a killed process leaves: shards without a manifest -- refused by verify and reader
    staged = tmp_path / "set.tmp-1"
    staged.mkdir()
    write_split(staged, "train", np.zeros((2, 3, 3, 1), np.uint8), np.zeros((2, 1)), np.arange(2), 0, 1)
    for check in (lambda: verify(staged), lambda: ShardedDataset(staged, "train")):
        with pytest.raises(UserError, match="no manifest.json"):
            check()


def test_manifest_validation(tmp_path):
    build_set(tmp_path / "s", [3, 4])
    manifest = read_manifest(tmp_path / "s")
    for edit in ({"format_version": 2}, {"num_classes": 5}, {"channels": "1"}, {"splits": {}},
                 {"splits": {"train": {"count": 8, "shards": manifest["splits"]["train"]["shards"]}}},
                 {"splits": {"../x": manifest["splits"]["train"]}}):
        (tmp_path / "s" / MANIFEST).write_text(json.dumps({**manifest, **edit}))
        with pytest.raises(UserError, match="manifest.json"):
            read_manifest(tmp_path / "s")
    (tmp_path / "s" / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="unreadable manifest"):
        verify(tmp_path / "s")


@pytest.mark.parametrize("damage", ["truncate", "edit", "delete"])
def test_damaged_shard_is_caught(tmp_path, damage):
    build_set(tmp_path / "s", [30, 30], size=8)
    shard = tmp_path / "s" / "train-00001-of-00002.h5"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "edit":
        data[-100] ^= 0xFF
        shard.write_bytes(data)
    else:
        shard.unlink()
    with pytest.raises(UserError, match="train-00001-of-00002.h5"):
        verify(tmp_path / "s")
    with pytest.raises(UserError, match="train-00001-of-00002.h5"):
        ShardedDataset(tmp_path / "s", "train", cache="never")
    # a one-pass rank 0 of 2 reads only shard 0, so it does not need the damaged one ...
    assert len(ShardedDataset(tmp_path / "s", "train", fake_comm(0, 2), full=True)) == 30
    # ... and a damaged shard in a training part is caught by its owner (rank 1) at least
    with pytest.raises(UserError, match="train-00001-of-00002.h5"):
        ShardedDataset(tmp_path / "s", "train", fake_comm(1, 2))
    if damage == "truncate":
        with pytest.raises(UserError, match="not a readable HDF5 shard"):
            ShardedDataset(tmp_path / "s", "train", verify=False)


# ---- data_prep medmnist -----------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["breastmnist", "dermamnist", "chestmnist", "retinamnist"])
def test_medmnist_round_trip(tmp_path, capsys, flag):
    from medmnist import INFO

    arrays = make_npz(tmp_path / f"{flag}.npz", flag, counts=(13, 4, 6))
    out = tmp_path / "out"
    code, err = run_prep(capsys, "medmnist", flag, "--npz", tmp_path / f"{flag}.npz", "--shards", 3,
                         "--out", out, "--allow-md5-mismatch")
    assert code == 0 and len(err) == 1 and err[0].startswith("WARNING: md5")
    manifest = verify(out)
    info = INFO[flag]
    assert manifest["task"] == info["task"] and manifest["channels"] == info["n_channels"]
    assert manifest["class_names"] == [info["label"][str(i)] for i in range(len(info["label"]))]
    assert manifest["source"]["file"] == f"{flag}.npz"
    for split in ("train", "val", "test"):
        want_images = arrays[f"{split}_images"].reshape(-1, 28, 28, info["n_channels"])
        for cache in ("always", "never"):
            images, labels, index = ShardedDataset(out, split, cache=cache).local_arrays()
            assert np.array_equal(index, np.arange(len(want_images)))
            assert np.array_equal(images, want_images)
            assert labels.dtype == np.int64 and np.array_equal(labels, arrays[f"{split}_labels"])
    assert len(manifest["splits"]["val"]["shards"]) == 3


@pytest.mark.parametrize("name,size", [("breastmnist", 28), ("BreastMNIST", 64)])
def test_real_breastmnist(tmp_path, capsys, name, size):
    npz = DATA / ("breastmnist.npz" if size == 28 else f"breastmnist_{size}.npz")
    if not npz.is_file():
        pytest.skip(f"{npz} not present")
    code, err = run_prep(capsys, "medmnist", name, "--npz", npz, "--size", size, "--shards", 4,
                         "--out", tmp_path / "out")
    assert code == 0 and err == []
    manifest = verify(tmp_path / "out")
    assert manifest["source"]["md5"] in ("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364")
    with np.load(npz) as ref:
        for split in ("train", "val", "test"):
            images, labels, index = ShardedDataset(tmp_path / "out", split).local_arrays()
            assert np.array_equal(images[..., 0], ref[f"{split}_images"])
            assert np.array_equal(labels, ref[f"{split}_labels"])
            assert np.array_equal(index, np.arange(len(images)))


@pytest.mark.parametrize("override,fragment", [
    ({"val_labels": None}, "missing key 'val_labels'"),
    ({"train_images": np.zeros((12, 28, 28), np.float32)}, "dtype float32, expected uint8"),
    ({"test_labels": np.zeros((7, 1), np.float64)}, "expected an integer type"),
    ({"train_images": np.zeros((12, 32, 32), np.uint8)}, "expected (12, 28, 28)"),
    ({"train_labels": np.full((12, 1), 2, np.uint8)}, "outside 0..1"),
    ({"train_labels": np.zeros((12, 2), np.uint8)}, "expected (12, 1)"),
])
def test_medmnist_bad_npz(tmp_path, capsys, override, fragment):
    make_npz(tmp_path / "b.npz", "breastmnist", **override)
    code, err = run_prep(capsys, "medmnist", "breastmnist", "--npz", tmp_path / "b.npz",
                         "--allow-md5-mismatch", "--out", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", fragment)


@pytest.mark.parametrize("argv,fragment", [
    (["medmnist", "nosuchmnist", "--npz", "x.npz"], "unknown MedMNIST dataset 'nosuchmnist'"),
    (["medmnist", "organmnist3d", "--npz", "x.npz"], "3D MedMNIST set"),
    (["medmnist", "breastmnist"], "one of the arguments --npz --download is required"),
    (["medmnist", "breastmnist", "--npz", "missing.npz"], "no such npz file"),
    (["medmnist", "breastmnist", "--npz", "b.npz"], "pass --allow-md5-mismatch"),
    (["medmnist", "breastmnist", "--npz", "b.npz", "--shards", "0"], "--shards must be at least 1"),
    (["medmnist", "breastmnist", "--npz", "b.npz", "--size", "32"], "invalid choice: 32"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
])
def test_bad_arguments(tmp_path, capsys, monkeypatch, argv, fragment):
    make_npz(tmp_path / "b.npz", "breastmnist")
    monkeypatch.chdir(tmp_path)
    code, err = run_prep(capsys, *argv, "--out", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", fragment)


def test_overwrite(tmp_path, capsys):
    make_npz(tmp_path / "a.npz", "breastmnist", seed=1)
    make_npz(tmp_path / "b.npz", "breastmnist", seed=2)
    out = tmp_path / "out"
    base = ["medmnist", "breastmnist", "--allow-md5-mismatch", "--out", out, "--npz"]
    assert run_prep(capsys, *base, tmp_path / "a.npz")[0] == 0
    first = read_manifest(out)
    code, err = run_prep(capsys, *base, tmp_path / "b.npz")
    assert code == 2 and "--overwrite" in err[-1] and read_manifest(out) == first
    assert run_prep(capsys, *base, tmp_path / "b.npz", "--overwrite")[0] == 0
    assert read_manifest(out)["source"]["file"] == "b.npz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "out"]


def test_subprocess_one_line_and_exit_code(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "data_prep", "digits", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "exists and is not a shard set" in lines[0]
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_download_offline_names_npz(tmp_path, capsys, monkeypatch):
    import medmnist

    def offline(*args, **kwargs):
        raise RuntimeError("Automatic download failed!\n  many lines")

    monkeypatch.setattr(medmnist, "BreastMNIST", offline)
    code, err = run_prep(capsys, "medmnist", "breastmnist", "--download", "--root", tmp_path / "dl",
                         "--out", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "pass --npz PATH")


# ---- data_prep digits and imagefolder ---------------------------------------------------------
def test_digits(tmp_path, capsys):
    assert run_prep(capsys, "digits", "--shards", 2, "--out", tmp_path / "a")[0] == 0
    assert run_prep(capsys, "digits", "--shards", 2, "--out", tmp_path / "b")[0] == 0
    a, b = verify(tmp_path / "a"), verify(tmp_path / "b")
    assert a["splits"] == b["splits"], "digits shards must be byte-identical run to run"
    assert {s: i["count"] for s, i in a["splits"].items()} == {"train": 1257, "val": 180, "test": 360}
    assert (a["channels"], a["image_size"], a["class_names"]) == (1, 28, [str(d) for d in range(10)])
    splits = {split: ShardedDataset(tmp_path / "a", split).local_arrays() for split in a["splits"]}
    per_class = sum(np.bincount(labels[:, 0], minlength=10) for _, labels, _ in splits.values())
    for split, share in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        images, labels, index = splits[split]
        assert images.shape[1:] == (28, 28, 1) and images.max() > 200
        counts = np.bincount(labels[:, 0], minlength=10)
        assert np.all(np.abs(counts - share * per_class) <= 1), counts  # stratified
        assert np.all(np.diff(index) > 0)
    ids = np.concatenate([index for _, _, index in splits.values()])
    assert np.array_equal(np.sort(ids), np.arange(1797))


def write_tree(root: Path, layout: dict[str, dict[str, int]], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, classes in layout.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for k in range(count):
                w, h = (int(v) for v in rng.integers(9, 30, 2))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                mode = "L" if k % 3 == 2 else "RGB"
                Image.fromarray(pixels).convert(mode).save(root / split / name / f"{k:03d}.{'png' if k % 2 else 'jpg'}")


def test_imagefolder(tmp_path, capsys):
    from torchvision import transforms

    root = tmp_path / "pets"
    write_tree(root, {"train": {"cat": 4, "dog": 5}, "val": {"dog": 2}, "test": {"cat": 2, "dog": 3}})
    (root / "train" / "cat" / "README.txt").write_text("not an image")
    code, _ = run_prep(capsys, "imagefolder", root, "--size", 8, "--shards", 2, "--out", tmp_path / "out")
    assert code == 0
    manifest = verify(tmp_path / "out")
    assert (manifest["dataset"], manifest["class_names"], manifest["channels"]) == ("pets", ["cat", "dog"], 3)
    reference = transforms.Compose([transforms.Resize(8), transforms.CenterCrop(8)])
    for split in ("train", "val", "test"):
        files = sorted((root / split).glob("*/*.[jp][pn]g"))
        images, labels, index = ShardedDataset(tmp_path / "out", split).local_arrays()
        assert np.array_equal(index, np.arange(len(files)))
        assert labels[:, 0].tolist() == [["cat", "dog"].index(f.parent.name) for f in files]
        for image, f in zip(images, files):
            with Image.open(f) as im:
                assert np.array_equal(image, np.asarray(reference(im.convert("RGB"))))


@pytest.mark.parametrize("layout,fragment", [
    ({"train": {"cat": 2, "dog": 0}, "test": {"cat": 1}}, "empty class"),
    ({"train": {"cat": 2}, "test": {"cat": 1, "cow": 1}}, "not a class of train/"),
    ({"train": {"cat": 2}}, "needs train/ and test/"),
])
def test_imagefolder_bad_tree(tmp_path, capsys, layout, fragment):
    write_tree(tmp_path / "tree", layout)
    code, err = run_prep(capsys, "imagefolder", tmp_path / "tree", "--size", 8, "--out", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", fragment)


def test_imagefolder_unreadable_image(tmp_path, capsys):
    write_tree(tmp_path / "tree", {"train": {"cat": 2}, "test": {"cat": 2}})
    (tmp_path / "tree" / "test" / "cat" / "001.png").write_bytes(b"not a png")
    code, err = run_prep(capsys, "imagefolder", tmp_path / "tree", "--size", 8, "--out", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "001.png: cannot read image")


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
def test_mpirun_failure_on_one_rank_ends_job(tmp_path):
    """A bad image that only rank 1 encodes must end the whole job: non-zero, no hang, no output."""
    write_tree(tmp_path / "tree", {"train": {"cat": 4}, "test": {"cat": 2}})
    (tmp_path / "tree" / "train" / "cat" / "003.png").write_bytes(b"broken")  # in shard 1 -> rank 1
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1")
    result = run_job(["mpirun", "-np", "2", sys.executable, "-m", "data_prep", "imagefolder",
                      str(tmp_path / "tree"), "--size", "8", "--shards", "2", "--out",
                      str(tmp_path / "out")], cwd=REPO, env=env, timeout=180)
    assert result.returncode != 0
    assert "error: " in result.stderr and "003.png: cannot read image" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


def test_cache_auto_follows_the_per_rank_budget(tmp_path, monkeypatch):
    """cache=auto caches a rank's share only within its budget: the configured
    cache_budget_mib, else a quarter of the node's free memory split over its local ranks."""
    from hpc_uc.reader import set_cache_budget

    build_set(tmp_path / "s", [100, 100], size=32)  # 200 x 1 KiB: 100 KiB per rank of 2
    comm = SimpleNamespace(rank=0, size=2, device=CPU, local_size=2)
    try:
        set_cache_budget(0.2)  # 205 KiB: fits
        assert ShardedDataset(tmp_path / "s", "train", comm, cache="auto").cached
        set_cache_budget(0.05)  # 51 KiB: does not
        assert not ShardedDataset(tmp_path / "s", "train", comm, cache="auto").cached
        set_cache_budget(0)  # auto: 4 * 150 KiB of free memory over 2 local ranks = 75 KiB each
        monkeypatch.setattr(reader_module, "available_ram", lambda: 4 * 150 * 1024)
        assert not ShardedDataset(tmp_path / "s", "train", comm, cache="auto").cached
        assert ShardedDataset(tmp_path / "s", "train", SimpleNamespace(rank=0, size=2, device=CPU, local_size=1),
                              cache="auto").cached
    finally:
        set_cache_budget(0)


def test_open_shards_keep_no_hdf5_chunk_cache(digits_dir):
    """A chunk cache per open shard made a rank's memory grow with the shards it had read
    (bench/memory.py: 2.8 GB in evaluate at 29,000 images of 224 px); shards open without one."""
    from hpc_uc.reader import ShardedDataset

    ds = ShardedDataset(digits_dir, "train", None, full=True, cache="never")
    ds.local_arrays()
    assert ds._shards and all(s.file.id.get_access_plist().get_cache()[2] == 0 for s in ds._shards.values())
