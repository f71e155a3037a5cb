"""ImageFolder trees (``ROOT/{train,val,test}/<class>/<image>``) -> RGB shard set.

Classes are the sorted subdirectories of ``train/``; ``test/`` is required and ``val/``
optional, and their class directories must be classes of ``train/``. Each image is
converted to RGB, resized bilinearly so its short side is S, then center-cropped to S×S.
``index`` is the image's position in its split's file list sorted by (class, file name).
Under mpirun, rank r encodes and writes shards r, r + size, ...
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from hpc_uc.errors import UserError
from hpc_uc.shards import ShardSetWriter, make_manifest, shard_bounds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")


def scan(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names and, per split present, the sorted ``(file, label)`` list."""
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise UserError(f"{root}: an ImageFolder tree needs train/ and test/ (val/ optional)")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{root / 'train'}: no class directories")
    label = {name: i for i, name in enumerate(classes)}
    files = {}
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        items = []
        for d in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            if d.name not in label:
                raise UserError(f"{d}: class {d.name!r} is not a class of train/")
            images = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not images:
                raise UserError(f"{d}: empty class (no {'/'.join(IMAGE_EXTENSIONS)} files)")
            items += [(p, label[d.name]) for p in images]
        if not items:
            raise UserError(f"{root / split}: no class directories")
        files[split] = items
    return classes, files


def to_rgb8(im: Image.Image, path: Path) -> Image.Image:
    """RGB with 8 bits per channel. 16-bit grey (PNG/TIFF "I;16", "I") is scaled down by 257
    (Pillow's convert would clip it to 255, saturating the image); float images are refused."""
    if im.mode == "F":
        raise UserError(f"{path}: floating-point image; convert it to 8 or 16 bits per channel first")
    if im.mode.startswith("I"):
        values = np.asarray(im, dtype=np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise UserError(f"{path}: {im.mode} image with values outside 0..65535")
        im = Image.fromarray(np.rint(values / 257.0).astype(np.uint8), "L")
    return im.convert("RGB")


def load_image(path: Path, size: int) -> np.ndarray:
    """RGB ``size``×``size``×3 uint8: short side resized to ``size`` (bilinear), center crop."""
    try:
        with Image.open(path) as im:
            im = to_rgb8(im, path)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: cannot read image ({type(exc).__name__})") from None
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    im = im.resize((size, new_long) if w <= h else (new_long, size), Image.BILINEAR)
    left, top = int(round((im.width - size) / 2.0)), int(round((im.height - size) / 2.0))
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def prepare(root: str | Path, out: str | Path, size: int, shards: int, name: str | None = None,
            overwrite: bool = False, compression: str = "lzf", comm: Any = None) -> dict:
    """Write the ImageFolder tree at ``root`` as a shard set at ``out``; return its manifest."""
    root = Path(root)
    if size < 1:
        raise UserError(f"--size must be positive, not {size}")
    if shards < 1:
        raise UserError(f"--shards must be at least 1, not {shards}")
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    classes, files = scan(root)
    rank, world = (0, 1) if comm is None else (comm.rank, comm.size)
    with ShardSetWriter(out, comm, overwrite, compression) as writer:
        for split, items in files.items():
            count = min(shards, len(items))
            for i, (lo, hi) in enumerate(shard_bounds(len(items), count)):
                if i % world != rank:
                    continue
                images = np.stack([load_image(path, size) for path, _ in items[lo:hi]])
                labels = np.array([[label] for _, label in items[lo:hi]], dtype=np.int64)
                writer.write(split, images, labels, np.arange(lo, hi), i, count)
        source = {"file": str(root.resolve()), "md5": None}
        manifest = make_manifest(name or root.resolve().name, "multi-class", 3, size, classes, source)
        return writer.commit(manifest)
