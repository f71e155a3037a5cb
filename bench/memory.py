"""Peak RSS per rank of each pipeline stage against the training split's size, at 224 px RGB.

`python bench/memory.py --sizes 2000,29000 --root /tmp/mem` builds, for each size N, a 224 px RGB
training split of N images from ../shared/data/breastmnist.npz (upscaled bilinearly, repeated
in order; val and test upscaled once) (RGB, as the paper's 224 px sets), written shard by shard (never the
whole split in memory), then runs each stage alone under `mpirun -np NP`, every rank wrapped in
GNU time, and reports each rank's peak RSS and the stage's wall time. The settings keep the
compute small (surrogate and generator one epoch with the surrogate's input resized to 56 px,
victims 0 epochs) and keep every data path whole: cache=never, every image read, perturbed,
exported to shards and protected.npz, and measured for PSNR/SSIM. The table goes to stdout and
ROOT/memory.md; bench/results.md has the figures of this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
STAGES = ("surrogate", "cluster", "train", "export", "evaluate")
SETTINGS = ["profile=fast", "cache=never", "clusters=2", "batch_size=64", "surrogate.batch_size=64",
            "surrogate.epochs=1", "surrogate.stem=standard", "surrogate.input_size=56",
            "generator.epochs=1", "generator.base_filters=8", "generator.n_blocks=1",
            "generator.train_on=cluster", "victim.batch_size=64", "victim.epochs=0", "victim.ue.epochs=0",
            "victim.stem=standard", "evaluate.recalibrate_samples=20", "evaluate.floor=false",
            "backend=horovod"]  # floor off: the figures stay comparable with earlier sessions
SHARD_IMAGES = 1000  # images per data shard (150 MB at 224 px RGB)


def build_split(source: Path, out: Path, size: int, train: int) -> None:
    """The 224 px RGB data set: ``train`` training images (the source's, repeated), val and
    test once, written one shard at a time."""
    from PIL import Image

    from hpc_uc.shards import ShardSetWriter, make_manifest

    def upscale(images: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR).convert("RGB"))
                         for im in images])

    with np.load(source) as src:
        arrays = {k: src[k] for k in src.files}
    with ShardSetWriter(out, None, overwrite=True) as writer:
        for split in ("train", "val", "test"):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1, 1)
            count = train if split == "train" else len(images)
            shards = -(-count // SHARD_IMAGES)
            for i in range(shards):
                ids = np.arange(i * SHARD_IMAGES, min(count, (i + 1) * SHARD_IMAGES))
                writer.write(split, upscale(images[ids % len(images)]), labels[ids % len(images)].astype(np.int64),
                             ids, i, shards)
        writer.commit(make_manifest("breastmnist", "binary-class", 3, size, ["malignant", "normal, benign"],
                                    {"file": f"{source.name} upscaled to {size} px, {train} training images",
                                     "md5": None}))


def run_stage(stage: str, data: Path, run: Path, ranks: int, extra: list[str]) -> tuple[float, list[float]]:
    """(wall seconds, peak RSS MiB of each rank) of one stage under mpirun."""
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_mpi_yield_when_idle": "1", "OMP_NUM_THREADS": "1"}
    cmd = ["mpirun", "-np", str(ranks), "--oversubscribe", "/usr/bin/time", "-f", "peak-rss-kib %M",
           str(VENV_BIN / "hpc-uc"), stage, str(REPO / "configs" / "breastmnist.yaml"), f"data_dir={data}",
           f"run_dir={run}", *SETTINGS, *extra]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peaks = [int(k) / 1024 for k in re.findall(r"peak-rss-kib (\d+)", proc.stderr)]
    return seconds, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,29000")
    parser.add_argument("--root", required=True)
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--set", default="", help="more overrides, e.g. 'surrogate.epochs=0 generator.epochs=0'")
    parser.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "breastmnist.npz"))
    args = parser.parse_args()
    root = Path(args.root)
    extra = args.set.split()
    done = root / "memory.json"  # rows of earlier invocations are kept (a size measured again replaces its rows)
    rows = json.loads(done.read_text()) if done.is_file() else []
    for n in (int(s) for s in args.sizes.split(",")):
        data, run = root / f"data-{n}", root / f"run-{n}"
        began = time.perf_counter()
        if not (data / "manifest.json").is_file():
            build_split(Path(args.source), data, args.image_size, n)
        print(f"N={n}: data built in {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
        share = n * args.image_size ** 2 * 3 / args.np / 2**30
        rows = [r for r in rows if r["train_images"] != n]
        for stage in STAGES:
            seconds, peaks = run_stage(stage, data, run, args.np, extra)
            rows.append({"train_images": n, "share_gib": round(share, 2), "stage": stage, "set": args.set,
                         "seconds": round(seconds, 1), "peak_rss_mib": [round(p) for p in peaks]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        done.write_text(json.dumps(rows, indent=1))
    lines = ["| training images | each rank's share (GiB) | stage | more settings | wall s | peak RSS per rank (MiB) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['train_images']} | {r['share_gib']} | {r['stage']} | {r.get('set') or '-'} | {r['seconds']} | "
              f"{' / '.join(map(str, r['peak_rss_mib']))} |" for r in rows]
    (root / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
