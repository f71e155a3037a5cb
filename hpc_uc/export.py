"""Stage `export`: the protected dataset, as shards (every rank writes its own) and npz.

Each training image gets the perturbation of its own cluster (class, for the label-wise methods;
method=ar draws one per image from its class's process; method=em has one per image), is clamped to [0, 1] and
quantised to uint8 so that it stays within epsilon of the clean image (L-inf, after
rounding). Labels are unchanged; val/test are copied untouched. The perturbations stay in
RUN_DIR/perturbations.h5 and never enter the export.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from .comm import Comm
from .config import config_hash
from .diskspace import require_free
from .em import resolve_objective
from .refine import resolve_refinement
from .generator import add_perturbation, cluster_of_index, load_perturbations, load_targets
from .reader import ShardedDataset, chunk_rows
from .rundir import RunDir
from .npz_stream import CHUNK_BYTES, write_medmnist_npz
from .shards import ShardSetWriter, partition
from .training import rate_line
from .stages import METHODS

REFINE_AUGMENT = 14  # refine.augment's stream of randomness, drawn from the seed
REFINE_INIT = 15     # refine.init=uniform's
PROGRESS_SECONDS = 10.0  # the refinement's progress lines: at most one per this many seconds


def protect(images: np.ndarray, delta: np.ndarray, epsilon: float, norm: str,
            boundary: str = "clip") -> np.ndarray:
    """uint8 N×H×W×C images plus float N×H×W×C perturbations -> protected uint8 images.

    ``boundary``: how x + delta is kept in [0, 1] (hpc_uc.generator.add_perturbation). For
    ``linf`` the quantised difference is clipped to floor(255·epsilon) grey levels, so
    |protected - clean| <= epsilon holds exactly after rounding.
    """
    import torch

    base = torch.from_numpy(np.ascontiguousarray(images)).float()
    y = add_perturbation(base / 255.0, torch.from_numpy(np.asarray(delta, dtype=np.float32)), boundary)
    out = y.mul_(255.0).round_()  # round half to even, as np.rint
    if norm == "linf":
        levels = math.floor(255.0 * epsilon + 1e-6)
        out = torch.minimum(torch.maximum(out, base - levels), base + levels)
    return out.to(torch.uint8).numpy()


def read_whole_split(directory, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All of one split's (images, labels, index) in global order, read by this process alone."""
    return ShardedDataset(directory, split, None, full=True).local_arrays()


def run_export(cfg: dict, comm: Comm, run: RunDir) -> dict:
    """Write RUN_DIR/protected/ (shards + manifest) and RUN_DIR/protected.npz."""
    data = ShardedDataset(cfg["data_dir"], "train", comm, seed=cfg["seed"], cache=cfg["cache"], full=True)
    splits = data.manifest["splits"]
    image_bytes = data.image_size ** 2 * data.channels
    require_free(run.root, 2 * image_bytes * sum(s["count"] for s in splits.values()),  # shards + npz
                 "the export (protected/ and protected.npz)")
    rows = chunk_rows(cfg["export"]["chunk_mib"] * 2**20, image_bytes, 4)  # float32 working copies
    chunks = [-(-(stop - start) // rows) for start, stop in  # each rank's shard count, for global ids
              (partition(data.num_samples, comm.size, r, True) for r in range(comm.size))]
    first, total = sum(chunks[:comm.rank]), max(1, sum(chunks))
    plan = resolve_refinement(cfg, data.manifest["task"])  # (steps, objective)
    perturb = chunk_protector(cfg, run, data.manifest, comm, data.image_size, plan, len(data))
    source = data.manifest
    manifest = {**source, "dataset": f"{source['dataset']}-protected",
                "source": {"file": str(cfg["data_dir"]), "md5": None},
                "extra": {**source.get("extra", {}), "protection": protection_record(cfg, comm, source["task"], plan)}}
    others = [s for s in source["splits"] if s != "train"]
    with ShardSetWriter(run.protected, comm, overwrite=True) as writer:
        for j, (images, labels, index) in enumerate(data.local_chunks(rows)):  # one chunk in memory
            writer.write("train", perturb(images, labels, index), labels, index, shard_id=first + j,
                         num_shards=total)
        if comm.is_root:
            for split in others:  # copied untouched, a bounded chunk at a time
                clean = ShardedDataset(cfg["data_dir"], split, None, full=True, cache="never")
                rows = chunk_rows(CHUNK_BYTES, image_bytes, 1)
                shards = max(1, -(-clean.num_samples // rows))
                for i, chunk in enumerate(clean.chunks_by_index(rows)):
                    writer.write(split, *chunk, shard_id=i, num_shards=shards)
                clean.close()
        writer.commit(manifest)
    steps, objective = plan
    if comm.is_root and steps > 0:
        print(f"export: refined each image's perturbation with {steps} steps of the {objective} objective"
              + (" through the ue victim's crop and flip" if cfg["refine"]["augment"] else ""), flush=True)
    if comm.is_root:
        if cfg["export"]["npz"]:  # streamed from the shards just written: one chunk in memory
            write_medmnist_npz(run.protected_npz, run.protected)
        elif run.protected_npz.exists():
            run.protected_npz.unlink()  # it would describe an earlier export
        print(f"export: {data.num_samples} protected training images -> {run.protected}"
              + (f" and {run.protected_npz}" if cfg["export"]["npz"] else ""), flush=True)
    comm.barrier()
    return {"train_images": int(data.num_samples)}


def perturbation_source(cfg: dict, run: RunDir, size: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``delta_of(clusters, index) -> N×H×W×C``, with perturbations.h5 read once: each image's
    cluster's (or class's) row; for method=ar a fresh draw from its class's AR process seeded
    by its sample id (hpc_uc.ar); for method=em its own δ, by sample id (hpc_uc.em)."""
    if cfg["method"] == "ar":
        from .ar import ar_perturbations, load_coefficients

        coefficients = load_coefficients(run.perturbations)
        return lambda clusters, index: ar_perturbations(
            coefficients, clusters, index, size, cfg["epsilon"], cfg["norm"], cfg["seed"]).transpose(0, 2, 3, 1)
    if cfg["method"] == "em":
        from .em import SampleNoise

        noise = SampleNoise(run.perturbations)
        return lambda clusters, index: noise(index).transpose(0, 2, 3, 1)
    table = load_perturbations(run.perturbations).transpose(0, 2, 3, 1)  # K×H×W×C
    return lambda clusters, index: table[clusters]


def chunk_protector(cfg: dict, run: RunDir, manifest: dict, comm: Comm, size: int, plan: tuple[int, str],
                    local_images: int):
    """``perturb(images, labels, index) -> protected uint8 images`` for one chunk of this rank's
    training images: each image's δ (:func:`perturbation_source`), refined per image when the
    ``plan``'s steps (hpc_uc.refine.resolve_refinement) > 0 (the surrogate is loaded once, and
    rank 0 logs its progress through its ``local_images``), added and quantised."""
    steps, objective = plan
    refine_step = (refiner(cfg, run, manifest, comm, steps, objective, refine_progress(comm, local_images, steps))
                   if steps > 0 else None)
    needs_clusters = "cluster" in METHODS[cfg["method"]].stages
    cluster_of = cluster_of_index(run.clusters) if needs_clusters else None
    delta_of = perturbation_source(cfg, run, size)

    def perturb(images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> np.ndarray:
        clusters = labels[:, 0] if cluster_of is None else cluster_of[index]
        delta = delta_of(clusters, index)
        if refine_step is not None:
            delta = refine_step(images, delta, clusters, labels, index)
        return protect(images, delta, cfg["epsilon"], cfg["norm"], cfg["generator"]["boundary"])

    return perturb


def through_snapshots(objective: str) -> bool:
    """Whether the refinement goes through the surrogate's kept epochs: the targeted objective
    only (UC's own loss compares features with centroids of the trained surrogate's space)."""
    return objective == "targeted"


def refine_progress(comm: Comm, total: int, steps: int) -> Callable[[int], None] | None:
    """Rank 0's log line after a refined batch (the longest wait of an export), the first and
    then at most one every :data:`PROGRESS_SECONDS`, and the last: its images done
    of ``total``, the rate and the time left; None on the other ranks."""
    if not comm.is_root:
        return None
    began, done, last = time.perf_counter(), 0, None

    def report(count: int) -> None:
        nonlocal done, last
        done += count
        now = time.perf_counter()
        if last is None or now - last >= PROGRESS_SECONDS or done >= total:
            last = now
            print(f"export: refining ({steps} steps), rank 0: " + rate_line(done, total, now - began, "images"),
                  flush=True)
    return report


def refiner(cfg: dict, run: RunDir, manifest: dict, comm: Comm, steps: int, objective: str,
            on_batch: Callable[[int], None] | None = None):
    """Per-sample refinement of perturbations (hpc_uc.refine), as
    ``(images, delta, clusters, labels, index) -> delta``: ``steps`` steps lowering
    ``objective``'s loss (with ``refine.augment``, its expectation over the ue victim's crop and flip),
    from ``delta`` or, with ``refine.init=uniform``, from uniform noise of each image's own."""
    import torch
    import torch.nn.functional as F

    from .em import initial_levels
    from .refine import BATCH, cluster_target_loss, fitting_batch, keyed_augment, next_class_loss, refine
    from .surrogate import load_trajectory

    models = load_trajectory(cfg, run, manifest, comm.device, snapshots=through_snapshots(objective))
    r = cfg["refine"]
    image_shape = (manifest["channels"], manifest["image_size"], manifest["image_size"])
    batch = fitting_batch(models[-1], image_shape, comm.device, r["batch_mib"], cfg["surrogate"]["micro_batch"] or BATCH)
    if comm.is_root:
        print(f"export: refinement batch of {batch} images per rank (refine.batch_mib={r['batch_mib']:g})", flush=True)
    if objective == "uc":  # each cluster's target distribution
        with np.load(run.clusters) as data:
            centroids = torch.from_numpy(data["centroids"]).float()
        targets = torch.from_numpy(load_targets(run.perturbations))
        probs = F.softmax(centroids[targets], dim=1).to(comm.device)

    def refine_chunk(images: np.ndarray, delta: np.ndarray, clusters: np.ndarray, labels: np.ndarray,
                     index: np.ndarray) -> np.ndarray:
        loss = (next_class_loss(labels, manifest["num_classes"]) if objective == "targeted"
                else cluster_target_loss(probs, clusters))
        augment = (keyed_augment(index, cfg["seed"] + REFINE_AUGMENT, cfg["victim"]["ue"]["crop_padding"])
                   if r["augment"] else None)
        if r["init"] == "uniform":  # em's start, from (seed, sample id): the same on any number of ranks
            shape = (images.shape[3],) + images.shape[1:3]
            levels = initial_levels(index, shape, cfg["epsilon"], cfg["norm"], cfg["seed"] + REFINE_INIT)
            delta = levels.transpose(0, 2, 3, 1).astype(np.float32) / 255.0
        return refine(models, images, delta, loss, cfg["epsilon"], cfg["norm"], steps, r["step_size"],
                      comm.device, batch=batch,
                      boundary=cfg["generator"]["boundary"], augment=augment, momentum=r["momentum"],
                      on_batch=on_batch)
    return refine_chunk


def protection_record(cfg: dict, comm: Comm, task: str, plan: tuple[int, str]) -> dict:
    """What the manifest says about how the data was protected, ``auto`` settings resolved for
    this ``task`` (``refine_*``: the refinement export ran, ``plan`` = (steps, objective);
    objective and step size null without one;
    ``em_objective``: the objective method=em ran, absent for the other methods)."""
    surrogate = cfg["surrogate"]
    em = {"em_objective": resolve_objective(cfg["em"]["objective"], task)} if cfg["method"] == "em" else {}
    steps, objective = plan
    return {**em, "method": METHODS[cfg["method"]].title, "epsilon": cfg["epsilon"], "norm": cfg["norm"],
            "clusters": cfg["clusters"], "target": cfg["generator"]["target"],
            "augment": cfg["generator"]["augment"],
            "boundary": cfg["generator"]["boundary"], "refine_steps": steps,
            "refine_objective": objective if steps else None, "refine_augment": cfg["refine"]["augment"] and steps > 0,
            "refine_step_size": cfg["refine"]["step_size"] if steps else None,
            "refine_snapshots": cfg["surrogate"]["snapshots"] if steps and through_snapshots(objective) else None,
            "refine_init": cfg["refine"]["init"] if steps else None,
            "refine_momentum": cfg["refine"]["momentum"] if steps else None,
            "surrogate": {"arch": surrogate["arch"], "weights": surrogate["weights"]},
            "world_size": comm.size, "batch_size": cfg["batch_size"], "backend": comm.backend,
            "config_sha256": config_hash(cfg)}
