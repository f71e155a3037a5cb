"""The shard format every stage reads and writes: a directory of HDF5 shards plus a manifest.

A shard set is a directory with ``manifest.json`` and ``<split>-<i:05d>-of-<n:05d>.h5``
files; each shard holds ``images`` (uint8 N×H×W×C, chunked by whole images), ``labels``
(int64 N×L) and ``index`` (int64 N, the sample id). Writers stage everything in a
temporary sibling directory, write the manifest last and rename the directory into place,
so an interrupted write never leaves a directory that :func:`verify` or the reader accepts.
docs/shard_format.md describes the format in full.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import psutil

from .diskspace import require_free
from .errors import UserError

FORMAT = "hpc-uc-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COMPRESSIONS = ("lzf", "gzip")
CHUNK_BYTES = 64 * 1024  # images per HDF5 chunk: as many whole images as fit, at least one
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_TOP_KEYS = {"format": str, "format_version": int, "dataset": str, "task": str, "channels": int,
             "image_size": int, "class_names": list, "num_classes": int, "splits": dict,
             "source": dict, "extra": dict}


def shard_name(split: str, shard_id: int, num_shards: int) -> str:
    """File name of shard ``shard_id`` of ``num_shards`` of ``split``."""
    return f"{split}-{shard_id:05d}-of-{num_shards:05d}.h5"


def partition(n: int, size: int, rank: int, full: bool = False) -> tuple[int, int]:
    """The contiguous range ``[start, stop)`` of ``n`` samples that ``rank`` of ``size`` gets.

    Default (training): every rank gets ``n // size`` samples; the last ``n % size`` are
    left out. ``full=True``: the first ``n % size`` ranks get one more, so every sample
    lands on exactly one rank.
    """
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside a world of size {size}")
    q, r = divmod(n, size)
    if not full:
        return rank * q, (rank + 1) * q
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def shard_bounds(count: int, num_shards: int) -> list[tuple[int, int]]:
    """Split ``range(count)`` into ``num_shards`` contiguous pieces differing by at most one."""
    return [partition(count, num_shards, i, full=True) for i in range(num_shards)]


def is_multilabel(task: str) -> bool:
    """Whether a MedMNIST task string names several binary labels per image (N×L labels)."""
    return task.startswith("multi-label")


def label_width(task: str, num_classes: int) -> int:
    """Columns of the label array: one per class for multi-label tasks, else one."""
    return num_classes if is_multilabel(task) else 1


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- writing ---------------------------------------------------------------------------------
def write_split(tmp_dir: str | os.PathLike, split: str, images: np.ndarray, labels: np.ndarray,
                index: np.ndarray, shard_id: int, num_shards: int,
                compression: str = "lzf") -> dict:
    """Write one shard of ``split`` into ``tmp_dir`` atomically; return ``{file, count, sha256}``.

    ``images`` is uint8 N×H×W×C, ``labels`` integer N×L, ``index`` integer N. The file is
    written under a temporary name, flushed, hashed, then renamed.
    """
    if compression not in COMPRESSIONS:
        raise UserError(f"compression must be one of {', '.join(COMPRESSIONS)}, not {compression!r}")
    images, labels, index = np.asarray(images), np.asarray(labels), np.asarray(index)
    n = len(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 N×H×W×C, got {images.dtype} {images.shape}")
    if labels.ndim != 2 or index.shape != (n,) or len(labels) != n:
        raise ValueError(f"labels {labels.shape} / index {index.shape} do not match {n} images")
    path = Path(tmp_dir) / shard_name(split, shard_id, num_shards)
    part = path.with_name(f"{path.name}.part-{os.getpid()}")
    rows = max(1, CHUNK_BYTES // max(1, int(np.prod(images.shape[1:]))))
    with h5py.File(part, "w") as f:
        for key, data, chunk in (("images", images, rows), ("labels", labels.astype(np.int64), 4096),
                                 ("index", index.astype(np.int64), 4096)):
            f.create_dataset(key, data=data, chunks=(chunk,) + data.shape[1:],
                             maxshape=(None,) + data.shape[1:], compression=compression,
                             track_times=False)
        f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "split": split,
                        "shard": shard_id, "num_shards": num_shards})
    _fsync(part)
    digest = sha256_file(part)
    os.replace(part, path)
    return {"file": path.name, "count": n, "sha256": digest}


def make_manifest(dataset: str, task: str, channels: int, image_size: int, class_names: list[str],
                  source: dict, splits: dict | None = None, extra: dict | None = None) -> dict:
    """A manifest dict; ``splits`` is filled in by :meth:`ShardSetWriter.commit`."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "dataset": dataset, "task": task,
            "channels": int(channels), "image_size": int(image_size),
            "class_names": [str(c) for c in class_names], "num_classes": len(class_names),
            "splits": splits or {}, "source": source, "extra": extra or {}}


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """Validate ``manifest`` and write it to ``directory/manifest.json`` atomically."""
    _check_manifest(manifest, Path(directory) / MANIFEST)
    path = Path(directory) / MANIFEST
    part = path.with_name(f"{MANIFEST}.part-{os.getpid()}")
    part.write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync(part)
    os.replace(part, path)
    _fsync(directory)


def check_output(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise UserError unless ``out`` is absent, an empty directory, or (with overwrite) a shard set."""
    out = Path(out)
    if not out.exists():
        return
    if out.is_dir() and (out / MANIFEST).is_file():
        if not overwrite:
            raise UserError(f"{out} already holds a shard set; pass --overwrite to replace it")
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    raise UserError(f"{out} exists and is not a shard set; choose another --out or remove it")


def finalize_shard_set(tmp_dir: str | os.PathLike, out_dir: str | os.PathLike, manifest: dict,
                       overwrite: bool = False) -> None:
    """Write the manifest into ``tmp_dir`` (last), then rename ``tmp_dir`` to ``out_dir``."""
    tmp, out = Path(tmp_dir), Path(out_dir)
    write_manifest(tmp, manifest)
    check_output(out, overwrite)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():  # a shard set being overwritten: swap, then delete the old one
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    _fsync(out.parent)


def remove_stale_staging(out: Path) -> None:
    """Staging (``.tmp-PID-*``) and swapped-out (``.old-PID``) siblings of ``out`` left by a
    writer that was killed: removed when no process PID runs here any more."""
    for path in out.parent.glob(f"{glob.escape(out.name)}.*-*"):
        match = re.fullmatch(re.escape(out.name) + r"\.(?:tmp|old)-(\d+)(?:-[0-9a-f]+)?", path.name)
        if match and path.is_dir() and not psutil.pid_exists(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)


class ShardSetWriter:
    """Stage a shard set in a temporary sibling of ``out``; every rank writes its own shards.

    ``with ShardSetWriter(out, comm) as w: w.write(...); w.commit(manifest)`` -- rank 0
    creates the staging directory, ``commit`` gathers every rank's shard entries, and rank 0
    writes the manifest and renames the directory into place. If the block raises, the
    staging directory is removed and ``out`` is left as it was.
    """

    def __init__(self, out: str | os.PathLike, comm: Any = None, overwrite: bool = False,
                 compression: str = "lzf") -> None:
        out = Path(out)
        self.out = out.resolve() if out.is_symlink() else out.absolute()  # replace the target, keep the link
        self.comm = comm
        self.overwrite = overwrite
        self.compression = compression
        self.tmp: Path | None = None
        self.entries: dict[str, list[dict]] = {}

    @property
    def _is_root(self) -> bool:
        return self.comm is None or self.comm.rank == 0

    def __enter__(self) -> "ShardSetWriter":
        status: tuple[str, str] = ("ok", "")
        if self._is_root:
            try:
                check_output(self.out, self.overwrite)
                self.out.parent.mkdir(parents=True, exist_ok=True)
                remove_stale_staging(self.out)
                tmp = self.out.with_name(f"{self.out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
                tmp.mkdir()
                status = ("ok", str(tmp))
            except (UserError, OSError) as exc:
                status = ("error", str(exc))
        if self.comm is not None and self.comm.size > 1:
            status = self.comm.broadcast(status)
        if status[0] == "error":
            raise UserError(status[1])
        self.tmp = Path(status[1])
        return self

    def write(self, split: str, images: np.ndarray, labels: np.ndarray, index: np.ndarray,
              shard_id: int, num_shards: int) -> dict:
        """Write one shard (see :func:`write_split`) and remember its entry for the manifest."""
        require_free(self.tmp, np.asarray(images).nbytes + 16 * len(labels), f"shard {split} {shard_id}")
        entry = write_split(self.tmp, split, images, labels, index, shard_id, num_shards,
                            self.compression)
        self.entries.setdefault(split, []).append(entry)
        return entry

    def commit(self, manifest: dict) -> dict:
        """Gather all ranks' entries; rank 0 adds them to ``manifest``, writes it and renames.

        Returns the final manifest on every rank, once the shard set is in place.
        """
        gathered = [self.entries] if self.comm is None else self.comm.gather(self.entries)
        if self._is_root:
            manifest = {**manifest, "splits": _merge_entries(gathered)}
            finalize_shard_set(self.tmp, self.out, manifest, self.overwrite)
        if self.comm is not None and self.comm.size > 1:
            manifest = self.comm.broadcast(manifest)
        return manifest

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _merge_entries(per_rank: list[dict[str, list[dict]]]) -> dict:
    splits: dict[str, dict] = {}
    for entries in per_rank:
        for split, shards in entries.items():
            splits.setdefault(split, {"count": 0, "shards": []})["shards"].extend(shards)
    for split, info in splits.items():
        info["shards"].sort(key=lambda e: e["file"])
        info["count"] = sum(e["count"] for e in info["shards"])
        n = len(info["shards"])
        if [e["file"] for e in info["shards"]] != [shard_name(split, i, n) for i in range(n)]:
            raise RuntimeError(f"split {split}: shards written are not 0..{n - 1} of {n}")
    return splits


# ---- reading and verifying -------------------------------------------------------------------
def _check_manifest(manifest: Any, where: Path) -> None:
    def bad(why: str) -> UserError:
        return UserError(f"{where}: {why}")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise bad(f"not an {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise bad(f"format_version {manifest.get('format_version')!r} unsupported (this reader: {FORMAT_VERSION})")
    for key, kind in _TOP_KEYS.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise bad(f"key {key!r} missing or not a {kind.__name__}")
    if manifest["num_classes"] != len(manifest["class_names"]) or manifest["num_classes"] < 1:
        raise bad("num_classes does not match class_names")
    if manifest["channels"] < 1 or manifest["image_size"] < 1:
        raise bad("channels and image_size must be positive")
    if not all(isinstance(c, str) for c in manifest["class_names"]):
        raise bad("class_names must be strings")
    source = manifest["source"]
    if not isinstance(source.get("file"), str) or not isinstance(source.get("md5"), (str, type(None))):
        raise bad("source must name a file and an md5 (or null)")
    if not manifest["splits"]:
        raise bad("no splits")
    for split, info in manifest["splits"].items():
        if not _SPLIT_NAME.match(split):
            raise bad(f"split name {split!r} is not letters, digits and underscores")
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list) or not shards:
            raise bad(f"split {split!r} lists no shards")
        for i, entry in enumerate(shards):
            if not (isinstance(entry, dict) and entry.get("file") == shard_name(split, i, len(shards))
                    and isinstance(entry.get("count"), int) and entry["count"] >= 0
                    and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
                raise bad(f"split {split!r}: shard entry {i} is malformed")
        if info.get("count") != sum(e["count"] for e in shards):
            raise bad(f"split {split!r}: count does not equal the sum of its shards")


def read_manifest(directory: str | os.PathLike) -> dict:
    """Load and validate ``directory/manifest.json``; UserError if missing, invalid or incomplete."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise UserError(f"{directory}: no such shard directory")
    if not path.is_file():
        raise UserError(f"{directory}: no {MANIFEST} -- not a shard set (or an interrupted write)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable manifest ({exc})") from None
    _check_manifest(manifest, path)
    return manifest


def open_shard(directory: str | os.PathLike, manifest: dict, split: str, shard: int,
               check_hash: bool = True) -> h5py.File:
    """Open one shard read-only after checking its sha256 (optional) and datasets against the manifest."""
    entry = manifest["splits"][split]["shards"][shard]
    path = Path(directory) / entry["file"]
    if not path.is_file():
        raise UserError(f"{path}: shard missing")
    if check_hash and sha256_file(path) != entry["sha256"]:
        raise UserError(f"{path}: sha256 does not match the manifest (truncated or edited shard)")
    try:
        # no HDF5 chunk cache: readers read whole chunks per call, and a cache per open shard
        # grew a rank's memory with the shards it had opened (~8 MB each at 224 px RGB)
        f = h5py.File(path, "r", rdcc_nbytes=0)
    except OSError as exc:
        raise UserError(f"{path}: not a readable HDF5 shard ({exc})") from None
    n, s, c = entry["count"], manifest["image_size"], manifest["channels"]
    width = label_width(manifest["task"], manifest["num_classes"])
    expected = {"images": (np.uint8, (n, s, s, c)), "labels": (np.int64, (n, width)),
                "index": (np.int64, (n,))}
    for key, (dtype, shape) in expected.items():
        ds = f.get(key)
        if not isinstance(ds, h5py.Dataset) or ds.dtype != dtype or ds.shape != shape:
            got = "missing" if not isinstance(ds, h5py.Dataset) else f"{ds.dtype} {ds.shape}"
            f.close()
            raise UserError(f"{path}: dataset {key!r} is {got}, manifest implies "
                            f"{np.dtype(dtype)} {shape}")
    return f


def verify(directory: str | os.PathLike) -> dict:
    """Check every shard's sha256, datasets and counts against the manifest; return the manifest.

    Raises UserError naming the first bad file.
    """
    manifest = read_manifest(directory)
    high = 1 if label_width(manifest["task"], manifest["num_classes"]) > 1 else manifest["num_classes"] - 1
    for split, info in manifest["splits"].items():
        seen: list[np.ndarray] = []
        for i in range(len(info["shards"])):
            with open_shard(directory, manifest, split, i) as f:
                labels, index = f["labels"][()], f["index"][()]
            path = Path(directory) / info["shards"][i]["file"]
            if len(labels) and (labels.min() < 0 or labels.max() > high):
                raise UserError(f"{path}: labels {labels.min()}..{labels.max()} outside 0..{high} "
                                f"({manifest['task']}, {manifest['num_classes']} classes)")
            if len(index) and index.min() < 0:
                raise UserError(f"{path}: negative sample index {index.min()}")
            seen.append(index)
        ids = np.concatenate(seen) if seen else np.zeros(0, np.int64)
        if len(np.unique(ids)) != len(ids):
            raise UserError(f"{directory}: split {split!r} holds a sample index twice (sample ids must be unique)")
    return manifest
