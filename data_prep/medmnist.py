"""Official MedMNIST npz files (any 2D set, any size) -> shard set.

Everything about a dataset -- task, channels, class names, md5 -- comes from
``medmnist.INFO``; the npz must have the official layout: ``{split}_images`` uint8
N×S×S (gray) or N×S×S×3 (RGB) and ``{split}_labels`` integer N×L for train, val and test.
"""
from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from hpc_uc.errors import UserError
from hpc_uc.shards import ShardSetWriter, label_width, make_manifest, shard_bounds

SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")


def medmnist_info() -> dict:
    """``medmnist.INFO`` (imported lazily: the package pulls in torch and friends)."""
    from medmnist import INFO
    return INFO


def lookup(name: str) -> tuple[str, dict]:
    """The INFO flag and entry for a 2D dataset named by flag or class name (any case)."""
    info = medmnist_info()
    flags = {flag: flag for flag in info} | {e["python_class"].lower(): flag for flag, e in info.items()}
    flag = flags.get(name.lower())
    if flag is None:
        names = ", ".join(f for f in info if not f.endswith("3d"))
        raise UserError(f"unknown MedMNIST dataset {name!r}; 2D sets: {names}")
    if flag.endswith("3d"):
        raise UserError(f"{flag} is a 3D MedMNIST set; only 2D sets are supported")
    return flag, info[flag]


def npz_name(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def expected_md5(entry: dict, size: int) -> str:
    return entry["MD5"] if size == 28 else entry[f"MD5_{size}"]


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(flag: str, entry: dict, size: int, root: Path) -> Path:
    """Fetch the npz with medmnist's own downloader into ``root``; UserError when it fails."""
    import medmnist

    root.mkdir(parents=True, exist_ok=True)
    try:
        getattr(medmnist, entry["python_class"])(split="test", download=True, root=str(root), size=size)
    except Exception:
        raise UserError(f"downloading {npz_name(flag, size)} failed (offline?); fetch it where there "
                        f"is internet and pass --npz PATH") from None
    return root / npz_name(flag, size)


def load_npz(path: Path, flag: str, entry: dict, size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split ``(images N×S×S×C uint8, labels N×L int64)``, after checking keys, dtypes,
    shapes and label range against INFO; UserError on the first problem."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable npz ({exc})") from None
    if not hasattr(npz, "files"):
        raise UserError(f"{path}: not an npz archive")
    channels, classes = entry["n_channels"], len(entry["label"])
    width = label_width(entry["task"], classes)
    multi_label = width > 1
    out = {}
    with npz:
        for split in SPLITS:
            for key in (f"{split}_images", f"{split}_labels"):
                if key not in npz.files:
                    raise UserError(f"{path}: missing key {key!r} (official layout: "
                                    f"{', '.join(f'{s}_images/{s}_labels' for s in SPLITS)})")
            try:
                images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            except (OSError, ValueError, zipfile.BadZipFile) as exc:
                raise UserError(f"{path}: cannot read {split} arrays ({exc})") from None
            if images.dtype != np.uint8:
                raise UserError(f"{path}: {split}_images has dtype {images.dtype}, expected uint8")
            if labels.dtype.kind not in "iu":
                raise UserError(f"{path}: {split}_labels has dtype {labels.dtype}, expected an integer type")
            n = len(images)
            if n == 0:
                raise UserError(f"{path}: the {split} split is empty (every split needs images)")
            shape = (n, size, size) if channels == 1 else (n, size, size, channels)
            if images.shape != shape and images.shape != (n, size, size, channels):
                raise UserError(f"{path}: {split}_images has shape {images.shape}, expected {shape} "
                                f"({flag} at size {size}: {channels} channel(s) per INFO)")
            if labels.shape != (n, width):
                raise UserError(f"{path}: {split}_labels has shape {labels.shape}, expected {(n, width)}")
            high = 1 if multi_label else classes - 1
            if n and (labels.min() < 0 or labels.max() > high):
                raise UserError(f"{path}: {split}_labels range {labels.min()}..{labels.max()} is "
                                f"outside 0..{high} ({flag}: {entry['task']}, {classes} classes)")
            out[split] = (images.reshape(n, size, size, channels), labels.astype(np.int64))
    return out


def check_md5(path: Path, flag: str, entry: dict, size: int, allow_mismatch: bool) -> str:
    """md5 of the npz; a mismatch with INFO is an error unless allowed (then a loud warning)."""
    actual, expected = md5_file(path), expected_md5(entry, size)
    if actual != expected:
        what = (f"md5 of {path} is {actual}, but medmnist.INFO lists {expected} for "
                f"{npz_name(flag, size)}: not the official file")
        if not allow_mismatch:
            raise UserError(f"{what}; pass --allow-md5-mismatch to use it anyway")
        print(f"WARNING: {what}; continuing (--allow-md5-mismatch)", file=sys.stderr, flush=True)
    return actual


def prepare(name: str, out: str | Path, shards: int, npz: str | Path | None = None,
            download_root: str | Path | None = None, size: int = 28, overwrite: bool = False,
            allow_md5_mismatch: bool = False, compression: str = "lzf", comm: Any = None) -> dict:
    """Write MedMNIST set ``name`` as a shard set at ``out``; return its manifest.

    Pass ``npz`` (a local file) or ``download_root`` (download there). Rank 0 reads and
    writes everything; other ranks only take part in the commit.
    """
    flag, entry = lookup(name)
    if size not in SIZES:
        raise UserError(f"--size must be one of {', '.join(map(str, SIZES))}, not {size}")
    if shards < 1:
        raise UserError(f"--shards must be at least 1, not {shards}")
    if (npz is None) == (download_root is None):
        raise UserError("pass exactly one of --npz PATH and --download")
    is_root = comm is None or comm.rank == 0
    with ShardSetWriter(out, comm, overwrite, compression) as writer:
        source = {"file": None, "md5": None}
        if is_root:
            path = Path(npz) if npz is not None else download(flag, entry, size, Path(download_root))
            if not path.is_file():
                raise UserError(f"{path}: no such npz file")
            data = load_npz(path, flag, entry, size)
            source = {"file": path.name, "md5": check_md5(path, flag, entry, size, allow_md5_mismatch)}
            for split, (images, labels) in data.items():
                count = min(shards, max(1, len(images)))
                for i, (lo, hi) in enumerate(shard_bounds(len(images), count)):
                    writer.write(split, images[lo:hi], labels[lo:hi], np.arange(lo, hi), i, count)
        classes = [entry["label"][str(i)] for i in range(len(entry["label"]))]
        manifest = make_manifest(flag, entry["task"], entry["n_channels"], size, classes, source)
        return writer.commit(manifest)
