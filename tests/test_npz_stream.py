"""protected.npz streamed from a shard set equals the arrays written whole, at any chunk size."""
from __future__ import annotations

import numpy as np
import pytest

from hpc_uc.npz_stream import write_medmnist_npz
from hpc_uc.shards import ShardSetWriter, make_manifest


def shard_set(out, channels: int, counts: dict[str, int], seed: int = 0) -> dict:
    """Splits written as 3 shards each, their sample ids shuffled across shards."""
    rng = np.random.default_rng(seed)
    whole = {}
    with ShardSetWriter(out) as w:
        for split, n in counts.items():
            images = rng.integers(0, 256, (n, 6, 6, channels), dtype=np.uint8)
            labels = rng.integers(0, 4, (n, 1))
            index = rng.permutation(n) + 1000  # not in position order
            order = np.argsort(index)
            whole[split] = (images[order], labels[order])
            for i, part in enumerate(np.array_split(np.arange(n), 3)):
                w.write(split, images[part], labels[part], index[part], i, 3)
        w.commit(make_manifest("toy", "multi-class", channels, 6, list("abcd"), {"file": "toy", "md5": None}))
    return whole


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("chunk_bytes", [1, 6 * 6 * 3 * 5, 1 << 26])
def test_streamed_npz_equals_whole_arrays(tmp_path, channels, chunk_bytes):
    whole = shard_set(tmp_path / "set", channels, {"train": 17, "val": 4, "test": 9})
    write_medmnist_npz(tmp_path / "out.npz", tmp_path / "set", chunk_bytes=chunk_bytes)
    with np.load(tmp_path / "out.npz") as npz:
        assert sorted(npz.files) == sorted(f"{s}_{k}" for s in whole for k in ("images", "labels"))
        for split, (images, labels) in whole.items():
            expected = images[..., 0] if channels == 1 else images
            assert npz[f"{split}_images"].dtype == np.uint8 and np.array_equal(npz[f"{split}_images"], expected)
            assert npz[f"{split}_labels"].dtype == np.uint8 and np.array_equal(npz[f"{split}_labels"], labels)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
