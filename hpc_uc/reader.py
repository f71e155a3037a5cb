"""ShardedDataset: each rank reads its own part of a shard set, in batches.

Parts (see docs/shard_format.md, "Which samples a rank reads"): in training mode every rank
gets ``N // size`` samples and ``N % size`` are left out of the epoch; ``full=True`` gives
the first ``N % size`` ranks one extra sample so that every sample is seen exactly once.
A training part is a seeded random draw from the whole split (``spread``), so what a rank
trains on does not depend on how the shards are laid out (a class-sorted split would give
each rank a few classes); one-pass parts (``full=True``) are contiguous ranges.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import h5py
import numpy as np
import torch

from .errors import UserError
from .shards import label_width, open_shard, partition, read_manifest, verify as verify_set

CACHE_MODES = ("auto", "always", "never")
CACHE_RAM_FRACTION = 0.25
SPAN_READ_BYTES = 8 << 20  # read a covering slice instead of single rows up to this size
SPREAD_STREAM = 0x5EED  # the random stream that deals a split's samples to the ranks


_CACHE_BUDGET: list[int | None] = [None]  # bytes per rank; None: auto


def set_cache_budget(mib: float) -> None:
    """The per-rank budget ``cache: auto`` caches within (``cache_budget_mib``; 0: auto)."""
    _CACHE_BUDGET[0] = int(mib * 2**20) if mib > 0 else None


def cache_budget(local_ranks: int = 1) -> int:
    """Bytes this rank may cache: the configured budget, else a quarter of the node's
    available memory shared by the ranks on it."""
    if _CACHE_BUDGET[0] is not None:
        return _CACHE_BUDGET[0]
    return int(CACHE_RAM_FRACTION * available_ram() / max(1, local_ranks))


def available_ram() -> int:
    """Bytes of physical memory available now (0 when the OS does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def chunk_rows(budget_bytes: float, sample_values: int, bytes_per_value: int) -> int:
    """Samples per chunk such that one copy of the chunk, at ``bytes_per_value`` per value,
    fits in ``budget_bytes`` (at least one): the one rule every chunked pass sizes by."""
    return max(1, int(budget_bytes) // (bytes_per_value * max(1, int(sample_values))))


def squeeze_labels(labels: torch.Tensor) -> torch.Tensor:
    """N×1 labels as N class indices (for cross-entropy); multi-label N×L left as is."""
    return labels[:, 0] if labels.ndim == 2 and labels.shape[1] == 1 else labels


class ShardedDataset:
    """This rank's part of one split of a shard set.

    ``comm`` is anything with ``rank``, ``size`` and ``device`` (a :class:`hpc_uc.comm.Comm`);
    None means one process on the CPU. ``cache``: ``always`` keeps this rank's samples in
    memory as uint8, ``never`` reads every batch from the shards, ``auto`` caches when they
    take less than a quarter of the available RAM. ``verify``: None (default) checks the
    sha256 of each shard whose first sample is in this rank's contiguous range (together the
    ranks check every shard once), True verifies the whole set on open, False checks dataset shapes only.
    ``spread`` (default: ``not full``): this rank's samples are a random draw from the whole
    split, seeded by ``seed`` and the same on every rank, instead of a contiguous range.
    """

    def __init__(self, root: str | os.PathLike, split: str, comm: Any = None, seed: int = 0,
                 cache: str = "auto", full: bool = False, verify: bool | None = None,
                 spread: bool | None = None) -> None:
        if cache not in CACHE_MODES:
            raise UserError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
        self.root = Path(root)
        self.manifest = verify_set(self.root) if verify else read_manifest(self.root)
        if split not in self.manifest["splits"]:
            raise UserError(f"{self.root}: no split {split!r} (has {', '.join(self.manifest['splits'])})")
        self.split, self.seed, self.full = split, seed, full
        self.spread = not full if spread is None else spread
        self.rank = getattr(comm, "rank", 0)
        self.size = getattr(comm, "size", 1)
        self.device = getattr(comm, "device", torch.device("cpu"))
        self._check_hash = verify is None
        counts = [e["count"] for e in self.manifest["splits"][split]["shards"]]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_samples = int(self._offsets[-1])
        if not full and self.num_samples < self.size:
            raise UserError(f"{self.root}: split {split!r} has {self.num_samples} samples, "
                            f"fewer than the {self.size} ranks")
        self.start, self.stop = partition(self.num_samples, self.size, self.rank, full)
        self._positions = (spread_positions(self.num_samples, self.start, self.stop, seed)
                           if self.spread else np.arange(self.start, self.stop, dtype=np.int64))
        self._shards: dict[int, _Shard] = {}
        lo, hi = partition(self.num_samples, self.size, self.rank, full=True)
        owned = [s for s, c in enumerate(counts) if c and lo <= self._offsets[s] < hi]  # first sample here
        self._hashed: set[int] = set(range(len(counts))) - set(owned)  # hashed by their owners
        image_bytes = self.image_size ** 2 * self.channels
        self.cached = cache == "always" or (cache == "auto" and len(self) * image_bytes
                                             <= cache_budget(getattr(comm, "local_size", 1)))
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._touch(self._positions, owned)
        if self.cached:
            self._arrays()
        self.close()  # checked; each reopens when read (an open shard's HDF5 state grows with reads)

    # ---- metadata ------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return self.manifest["channels"]

    @property
    def image_size(self) -> int:
        return self.manifest["image_size"]

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def label_width(self) -> int:
        return label_width(self.task, self.num_classes)

    def __len__(self) -> int:
        return self.stop - self.start

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches per epoch on this rank (the same on every rank unless ``full=True``)."""
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    # ---- which samples -------------------------------------------------------------------
    def positions(self) -> np.ndarray:
        """Sorted global positions this rank reads (before the local shuffle): a seeded random
        draw from the split when ``spread``, else ``start..stop``."""
        return self._positions

    def _shards_of(self, positions: np.ndarray) -> np.ndarray:
        """The shard each global position is in."""
        return np.searchsorted(self._offsets, positions, side="right") - 1

    def labels_by_index(self) -> tuple[np.ndarray, np.ndarray]:
        """``(labels, index)`` of the whole split (``full=True``) in ascending sample index
        (small: no images are read)."""
        order, index = self._order_by_index()
        labels = np.concatenate([self._shard(i).labels for i in range(len(self._offsets) - 1)])
        return labels[order], index[order]

    def _order_by_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions sorted by sample index, index in position order) of the whole split."""
        index = np.concatenate([self._shard(i).index for i in range(len(self._offsets) - 1)])
        return np.argsort(index, kind="stable"), index

    def chunks_by_index(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The whole split (``full=True``, one process) as ``(images, labels, index)`` chunks of
        at most ``rows`` samples, in ascending sample index: memory bounded by one chunk."""
        order, _ = self._order_by_index()
        for lo in range(0, len(order), rows):
            want = order[lo:lo + rows]
            sorted_positions = np.sort(want)
            arrays = self._read(sorted_positions)
            where = np.searchsorted(sorted_positions, want)
            yield tuple(a[where] for a in arrays)

    def local_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(images uint8 N×H×W×C, labels int64 N×L, index int64 N)`` of this rank, in global order."""
        return self._arrays() if self.cached else self._read(self.positions())

    def local_index(self) -> np.ndarray:
        """Sample ids of this rank's samples, in global order (no images are read)."""
        if self.cached:
            return self._arrays()[2]
        positions = self.positions()
        shard_of = self._shards_of(positions)
        out = np.empty(len(positions), np.int64)
        for shard in np.unique(shard_of):
            pick = shard_of == shard
            out[pick] = self._shard(int(shard)).index[positions[pick] - self._offsets[shard]]
        return out

    def local_chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`local_arrays` in pieces of at most ``rows`` samples (memory: one piece
        unless the split is cached)."""
        if self.cached:
            arrays = self._arrays()
            for lo in range(0, len(arrays[2]), rows):
                yield tuple(a[lo:lo + rows] for a in arrays)
            return
        positions = self.positions()
        shard_of = self._shards_of(positions)
        for lo in range(0, len(positions), rows):
            yield self._read(positions[lo:lo + rows])
            if lo + rows < len(positions):  # shards behind this point are not read again here
                self._close_shards_before(int(shard_of[lo + rows]))
        self._close_shards_before(len(self._offsets))

    def batches(self, batch_size: int, epoch: int = 0, shuffle: bool = True,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(images float32 N×C×H×W in [0,1], labels int64 N×L, index int64 N)`` on the
        communicator's device; ``batch_size`` is per rank. The local order is reshuffled
        each epoch from ``(seed, rank, epoch)``."""
        if batch_size < 1:
            raise UserError(f"batch size must be positive, not {batch_size}")
        positions = self.positions()
        order = (np.random.default_rng([self.seed, self.rank, epoch]).permutation(len(positions))
                 if shuffle else np.arange(len(positions)))
        arrays = self._arrays() if self.cached else None
        for lo in range(0, len(order), batch_size):
            pick = order[lo:lo + batch_size]
            if drop_last and len(pick) < batch_size:
                break
            if arrays is not None:
                yield self._tensors(*(a[pick] for a in arrays))
            else:
                sort = np.argsort(pick)
                inverse = np.empty_like(sort)
                inverse[sort] = np.arange(len(sort))
                yield self._tensors(*(a[inverse] for a in self._read(positions[pick[sort]])))
        if arrays is None:
            self.close()  # a spread epoch opens every shard; their HDF5 state is let go each epoch

    def _tensors(self, images: np.ndarray, labels: np.ndarray, index: np.ndarray):
        """NHWC uint8 -> NCHW float in [0,1]: in numpy on the CPU (small torch ops there pay
        thread-pool overhead), on the device after a uint8 copy elsewhere."""
        if self.device.type == "cpu":
            x = torch.from_numpy(np.divide(images.transpose(0, 3, 1, 2), np.float32(255),
                                           dtype=np.float32))
        else:
            x = torch.from_numpy(images).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).contiguous().float().div_(255)
        return x, torch.from_numpy(labels).to(self.device), torch.from_numpy(index).to(self.device)

    # ---- reading -------------------------------------------------------------------------
    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's cached arrays (loaded once)."""
        if self._cache is None:
            self._cache = self._read(self.positions())
        return self._cache

    def _shard(self, shard: int) -> "_Shard":
        """An open shard: its images dataset, and its labels and index read whole (small)."""
        if shard not in self._shards:
            f = open_shard(self.root, self.manifest, self.split, shard,
                           check_hash=self._check_hash and shard not in self._hashed)
            self._hashed.add(shard)  # a shard reopened later is not hashed again
            self._shards[shard] = _Shard(f, f["images"], f["labels"][:], f["index"][:])
        return self._shards[shard]

    def _touch(self, positions: np.ndarray, shards: list[int]) -> None:
        """Open (and so check) every shard that ``positions`` fall in, and ``shards``."""
        for shard in np.union1d(self._shards_of(positions), shards):
            self._shard(int(shard))

    def _read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Images, labels and index at sorted global ``positions`` (images read per shard piece)."""
        s, c = self.image_size, self.channels
        images = np.empty((len(positions), s, s, c), np.uint8)
        labels = np.empty((len(positions), self.label_width), np.int64)
        index = np.empty(len(positions), np.int64)
        shard_of = self._shards_of(positions)
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(positions)]):
            if lo == hi:
                continue
            shard = int(shard_of[lo])
            local = positions[lo:hi] - self._offsets[shard]
            opened = self._shard(shard)
            images[lo:hi] = _take(opened.images, local)
            labels[lo:hi], index[lo:hi] = opened.labels[local], opened.index[local]
        return images, labels, index

    def _close_shards_before(self, shard: int) -> None:
        """Close the open shards numbered below ``shard``: an open shard holds HDF5 metadata
        that grows with the chunks read from it."""
        for i in [i for i in self._shards if i < shard]:
            self._shards.pop(i).file.close()

    def close(self) -> None:
        """Close the open shard files (they reopen on demand)."""
        for opened in self._shards.values():
            opened.file.close()
        self._shards.clear()

    def __enter__(self) -> "ShardedDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spread_positions(n: int, start: int, stop: int, seed: int) -> np.ndarray:
    """Sorted positions ``[start, stop)`` of a seeded permutation of ``n``: with every rank's
    ``start..stop`` from :func:`partition`, a random deal of the split into disjoint parts."""
    return np.sort(np.random.default_rng([seed, SPREAD_STREAM]).permutation(n)[start:stop])


class _Shard(NamedTuple):
    file: h5py.File
    images: h5py.Dataset
    labels: np.ndarray
    index: np.ndarray


def _take(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted, unique) of ``ds``: one read of the covering slice when that is small,
    else one read per HDF5 chunk touched (h5py point selections are far slower)."""
    first, last = int(rows[0]), int(rows[-1]) + 1
    if last - first == len(rows):
        return ds[first:last]
    row_bytes = ds.dtype.itemsize * int(np.prod(ds.shape[1:]))
    if (last - first) * row_bytes <= SPAN_READ_BYTES:
        return ds[first:last][rows - first]
    out = np.empty((len(rows),) + ds.shape[1:], ds.dtype)
    chunk_of = rows // (ds.chunks[0] if ds.chunks else len(ds))
    bounds = np.flatnonzero(np.diff(chunk_of)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(rows)]):
        start = int(rows[lo])
        out[lo:hi] = ds[start:int(rows[hi - 1]) + 1][rows[lo:hi] - start]
    return out
