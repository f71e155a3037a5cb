"""The whole UC pipeline on the embedded digits, single process, tiny but real settings."""
from __future__ import annotations

import json
import math
import stat

import h5py
import numpy as np
import pytest

from conftest import tiny_config
from hpc_uc.errors import UserError
from hpc_uc.export import protect, read_whole_split
from hpc_uc.pipeline import run_all, start
from hpc_uc.report import validate_results
from hpc_uc.shards import verify

def test_protected_images_stay_within_epsilon(finished_run, digits_dir):
    cfg, run = finished_run
    prot_m = verify(run.protected)
    clean, labels, index = read_whole_split(digits_dir, "train")
    prot, prot_labels, prot_index = read_whole_split(run.protected, "train")
    order = np.argsort(prot_index)
    assert np.array_equal(prot_index[order], index)
    assert np.array_equal(prot_labels[order], labels)
    diff = np.abs(prot[order].astype(np.int16) - clean.astype(np.int16))
    assert diff.max() <= math.floor(cfg["epsilon"] * 255 + 1e-6)
    assert diff.mean() > 1.0  # the perturbation is really there
    for split in ("val", "test"):  # untouched
        assert np.array_equal(read_whole_split(run.protected, split)[0],
                              read_whole_split(digits_dir, split)[0])
    record = prot_m["extra"]["protection"]
    assert record["method"] == "unlearnable-clusters" and record["clusters"] == cfg["clusters"]


def test_secret_perturbations_stay_out_of_the_export(finished_run):
    """Whatever reproduces delta is owner-only: delta itself, the generators and their
    checkpoint, and the surrogate and clusters they were trained from (with the seed)."""
    _, run = finished_run
    for path in (run.perturbations, run.generators, run.surrogate, run.clusters,
                 *([run.checkpoint] if run.checkpoint.exists() else [])):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(run.generators.parent.stat().st_mode) == 0o700
    with h5py.File(run.perturbations) as f:
        assert f["delta"].shape == (10, 1, 28, 28)
    assert not any("perturb" in p.name for p in run.protected.iterdir())


def test_protected_npz_has_medmnist_layout(finished_run, digits_dir):
    _, run = finished_run
    with np.load(run.protected_npz) as npz:
        assert sorted(npz.files) == sorted(f"{s}_{k}" for s in ("train", "val", "test")
                                           for k in ("images", "labels"))
        assert npz["train_images"].dtype == np.uint8 and npz["train_images"].shape[1:] == (28, 28)
        assert npz["train_labels"].dtype == np.uint8 and npz["train_labels"].shape[1] == 1
        images, labels, index = read_whole_split(run.protected, "train")  # the shards, by sample id
        order = np.argsort(index)
        assert np.array_equal(npz["train_images"], images[order][..., 0])
        assert np.array_equal(npz["train_labels"], labels[order])


def test_results_follow_schema_and_report_exists(finished_run):
    _, run = finished_run
    doc = json.loads(run.results.read_text())
    validate_results(doc)
    assert doc["world_size"] == 1 and doc["clusters"] == 10
    assert set(doc["protocols"]) == {"medmnist", "ue"}
    assert 0 <= doc["protocols"]["ue"]["protected"]["test_acc"] <= 1
    assert doc["linf"] <= 16 / 255 + 1e-6
    assert "protection (medmnist victim)" in run.report.read_text() and (run.root / "victims.png").is_file()


def test_the_turning_attackers_reading_is_kept_where_the_protocol_picks_an_epoch(finished_run):
    """medmnist victims carry the turned-over reading of the epoch farthest from chance (one
    epoch here: the kept one, its test AUC turned as its validation AUC says); ue victims,
    reported at their last epoch, do not."""
    _, run = finished_run
    doc = json.loads(run.results.read_text())
    for name, victim in doc["protocols"]["medmnist"].items():
        if name == "defenses":
            continue
        assert victim["turned_epoch"] == victim["best_epoch"] == 1
        turned = victim["test_auc"] if victim["turned_val_auc"] >= 0.5 else 1 - victim["test_auc"]
        assert victim["turned_test_auc"] == pytest.approx(turned)
        assert victim["turned_recalibrated_acc"] == victim["recalibrated_acc"]
    assert not any("turned_epoch" in v for k, v in doc["protocols"]["ue"].items() if k != "defenses")


def test_rerun_skips_completed_stages(finished_run, capsys):
    cfg, run = finished_run
    before = run.results.stat().st_mtime_ns
    comm, run = start(cfg)
    run_all(cfg, comm, run)
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 5
    assert run.results.stat().st_mtime_ns == before


def test_quantisation_bound_is_exact():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 8, 8, 1), dtype=np.uint8)
    delta = rng.uniform(-1, 1, (50, 8, 8, 1)).astype(np.float32) * (16 / 255)
    out = protect(images, delta, 16 / 255, "linf")
    assert np.abs(out.astype(int) - images.astype(int)).max() <= 16


def test_clean_victims_are_reused_only_for_the_same_key(finished_run, tmp_path, capsys):
    """The clean victim does not depend on the protection: a run that changes only the
    protection reuses it; one that changes a victim setting trains it again."""
    import shutil

    cfg, run = finished_run
    before = json.loads(run.results.read_text())
    copy = tmp_path / "copy"
    shutil.copytree(run.root, copy)
    capsys.readouterr()
    other = tiny_config(cfg["data_dir"], copy, "generator.boundary=reflect")
    comm, moved = start(other)
    run_all(other, comm, moved)
    out = capsys.readouterr().out
    assert out.count("reused from clean_victims.json") == 2
    after = json.loads(moved.results.read_text())
    for protocol in ("medmnist", "ue"):
        assert after["protocols"][protocol]["clean"] == before["protocols"][protocol]["clean"]
    changed = tiny_config(cfg["data_dir"], copy, "generator.boundary=reflect", "victim.ue.epochs=2")
    comm, moved = start(changed)
    run_all(changed, comm, moved)
    out = capsys.readouterr().out
    assert out.count("reused from clean_victims.json") == 0
    assert json.loads(moved.results.read_text())["protocols"]["ue"]["clean"]["epochs"] == 2


def test_misspelled_defense_is_refused_before_any_work(digits_dir, tmp_path):
    cfg = tiny_config(digits_dir, tmp_path / "run", "defenses=[jpg10]")
    with pytest.raises(UserError, match="unknown defense 'jpg10'"):
        start(cfg)
    assert not (tmp_path / "run").exists()


def test_classwise_method_end_to_end(finished_run, tmp_path):
    """method=classwise: every image of a class carries its class's noise, within epsilon
    after quantisation; the export names the method, results.json too."""
    import shutil

    cfg, run = finished_run
    shutil.copytree(run.root, tmp_path / "cw")
    other = tiny_config(cfg["data_dir"], tmp_path / "cw", "method=classwise")
    comm, moved = start(other)
    run_all(other, comm, moved)
    clean, labels, index = read_whole_split(cfg["data_dir"], "train")
    prot, _, prot_index = read_whole_split(moved.protected, "train")
    prot = prot[np.argsort(prot_index)]
    diff = prot.astype(np.int16) - clean.astype(np.int16)
    assert np.abs(diff).max() <= math.floor(16 + 1e-6)
    assert verify(moved.protected)["extra"]["protection"]["method"] == "class-wise-random-noise"
    assert json.loads(moved.results.read_text())["method"] == "classwise"
    with h5py.File(moved.perturbations) as f:
        assert f["delta"].shape == (10, 1, 28, 28)  # one per digit class
    assert stat.S_IMODE(moved.perturbations.stat().st_mode) == 0o600


def test_ar_method_end_to_end(finished_run, tmp_path):
    """method=ar through train, export and verify: each image carries its own draw of its
    class's AR process (regenerated here from the coefficients and its sample id), within
    epsilon after quantisation; the secret stays owner-only and the export names the method."""
    import shutil

    from hpc_uc.ar import ar_perturbations
    from hpc_uc.pipeline import run_stage

    cfg, run = finished_run
    shutil.copytree(run.root, tmp_path / "ar")
    other = tiny_config(cfg["data_dir"], tmp_path / "ar", "method=ar")
    comm, moved = start(other)
    for stage in ("train", "export"):
        run_stage(stage, other, comm, moved)
    assert verify(moved.protected)["extra"]["protection"]["method"] == "autoregressive-perturbations"
    clean, labels, index = read_whole_split(cfg["data_dir"], "train")
    prot, _, prot_index = read_whole_split(moved.protected, "train")
    prot = prot[np.argsort(prot_index)]
    with h5py.File(moved.perturbations) as f:
        coefficients = f["ar_coefficients"][()]
        assert coefficients.shape == (10, 1, 3, 3) and f["delta"].shape == (10, 1, 28, 28)
    assert stat.S_IMODE(moved.perturbations.stat().st_mode) == 0o600
    delta = ar_perturbations(coefficients, labels[:, 0], index, 28, other["epsilon"], "linf", other["seed"])
    assert np.array_equal(prot, protect(clean, delta.transpose(0, 2, 3, 1), other["epsilon"], "linf",
                                        other["generator"]["boundary"]))
    diff = prot.astype(np.int16) - clean.astype(np.int16)
    assert np.abs(diff).max() <= 16 and np.abs(diff).mean() > 1.0


def test_em_method_end_to_end(finished_run, tmp_path):
    """method=em through train, export and verify, without surrogate or clusters: each image
    carries its own δ from perturbations.h5 (by sample id), within epsilon after quantisation;
    the rank's working file is gone and the secret is owner-only."""
    import shutil

    from hpc_uc.em import SampleNoise
    from hpc_uc.pipeline import run_stage

    cfg, run = finished_run
    shutil.copytree(run.root, tmp_path / "em")
    other = tiny_config(cfg["data_dir"], tmp_path / "em", "method=em", "em.rounds=1", "em.train_steps=2",
                        "em.pgd_steps=2")
    comm, moved = start(other)
    for stage in ("train", "export"):
        run_stage(stage, other, comm, moved)
    record = verify(moved.protected)["extra"]["protection"]
    assert record["method"] == "error-minimising-noise"
    assert record["em_objective"] == "targeted"  # auto, resolved on single-label data
    assert stat.S_IMODE(moved.perturbations.stat().st_mode) == 0o600 and not (moved.root / "em-parts").exists()
    clean, _, index = read_whole_split(cfg["data_dir"], "train")
    prot, _, prot_index = read_whole_split(moved.protected, "train")
    prot = prot[np.argsort(prot_index)]
    delta = SampleNoise(moved.perturbations)(index)
    assert np.array_equal(prot, protect(clean, delta.transpose(0, 2, 3, 1), other["epsilon"], "linf",
                                        other["generator"]["boundary"]))
    diff = prot.astype(np.int16) - clean.astype(np.int16)
    assert np.abs(diff).max() <= 16 and np.abs(diff).mean() > 1.0
    assert len({d.tobytes() for d in delta[:50]}) == 50  # one δ per image, not per class


def test_em_classwise_start_is_written_per_class(finished_run, tmp_path):
    """method=em with em.init=classwise and no rounds: every image's δ in perturbations.h5 is
    its class's pattern (method=classwise's, from the seed), looked up by sample id."""
    import shutil

    from hpc_uc.classwise import class_noise
    from hpc_uc.em import SampleNoise, grey_levels
    from hpc_uc.pipeline import run_stage

    cfg, run = finished_run
    shutil.copytree(run.root, tmp_path / "em0")
    other = tiny_config(cfg["data_dir"], tmp_path / "em0", "method=em", "em.rounds=0", "em.init=classwise")
    comm, moved = start(other)
    run_stage("train", other, comm, moved)
    _, labels, index = read_whole_split(cfg["data_dir"], "train")
    pattern = grey_levels(class_noise(10, 1, 28, other["epsilon"], "linf", other["seed"])).numpy()
    levels = np.round(SampleNoise(moved.perturbations)(index) * 255).astype(np.int16)  # δ in [0, 1] units
    assert np.array_equal(levels, pattern[labels[:, 0]]) and 4 < np.abs(levels).mean() and np.abs(levels).max() <= 16


def test_em_restarts_train_fresh_models(finished_run, tmp_path):
    """em.restart_every: a restart inside the rounds changes the noise (its second round's steps
    see a fresh model; no model steps, so only the re-initialisation can change it), one at or
    beyond the last round changes nothing; metrics.jsonl names each round's model."""
    import shutil

    from hpc_uc.em import SampleNoise
    from hpc_uc.pipeline import run_stage

    cfg, run = finished_run
    _, _, index = read_whole_split(cfg["data_dir"], "train")
    noise, models = {}, {}
    for every in (0, 1, 2):
        shutil.copytree(run.root, tmp_path / f"r{every}")
        other = tiny_config(cfg["data_dir"], tmp_path / f"r{every}", "method=em", "em.rounds=2", "em.train_steps=0",
                            "em.pgd_steps=1", "em.stop_accuracy=1.0", f"em.restart_every={every}")
        comm, moved = start(other)
        run_stage("train", other, comm, moved)
        noise[every] = SampleNoise(moved.perturbations)(index[:64])
        rows = [json.loads(line) for line in moved.metrics.read_text().splitlines()]
        models[every] = [r["model"] for r in rows if r.get("stage") == "train" and "model" in r]
    assert models == {0: [1, 1], 1: [1, 2], 2: [1, 1]}
    assert np.array_equal(noise[0], noise[2]) and not np.array_equal(noise[0], noise[1])


def test_em_patch_noise_starts_in_blocks_and_rejects_a_patch_beyond_the_image(finished_run, tmp_path):
    """em.patch=4 with no rounds: every image's δ in perturbations.h5 is constant on 4 x 4
    blocks and differs between images; a patch wider than the 28-px images is refused."""
    import shutil

    from hpc_uc.em import SampleNoise
    from hpc_uc.pipeline import run_stage

    cfg, run = finished_run
    _, _, index = read_whole_split(cfg["data_dir"], "train")
    shutil.copytree(run.root, tmp_path / "p4")
    other = tiny_config(cfg["data_dir"], tmp_path / "p4", "method=em", "em.rounds=0", "em.patch=4")
    comm, moved = start(other)
    run_stage("train", other, comm, moved)
    delta = SampleNoise(moved.perturbations)(index[:32]).reshape(32, 1, 7, 4, 7, 4)
    assert np.all(delta == delta[:, :, :, :1, :, :1]) and len({d.tobytes() for d in delta}) == 32
    assert 0 < np.abs(delta).max() <= other["epsilon"]
    for bad, message in (("em.patch=29", "em.patch=29 is larger than the 28-px images"),
                         ("em.init=classwise", "em.patch=2 needs em.init=uniform")):
        wrong = tiny_config(cfg["data_dir"], tmp_path / "refused", "method=em", "em.patch=2", bad)
        with pytest.raises(UserError, match=message):
            start(wrong)  # before any data is read or trained on
    assert not (tmp_path / "refused").exists()


def run_em_train_stage(finished_run, where, *overrides: str) -> None:
    """The em train stage alone, on a copy of the finished run, at tiny settings plus ``overrides``."""
    import shutil

    from hpc_uc.pipeline import run_stage

    cfg, run = finished_run
    shutil.copytree(run.root, where)
    other = tiny_config(cfg["data_dir"], where, "method=em", "em.pgd_steps=1", *overrides)
    comm, moved = start(other)
    run_stage("train", other, comm, moved)


def pixel_bytes(images) -> list[bytes]:
    """Each image of an N x C x H x W [0, 1] tensor as the bytes of its uint8 H x W x C pixels."""
    import torch

    pixels = (images.detach().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [p.tobytes() for p in pixels]


def test_em_rounds_use_the_patch_and_the_optimizer_asked_for(finished_run, tmp_path, monkeypatch):
    """The em rounds pass em.patch to every noise step and train with em.optimizer's optimiser."""
    import inspect

    from hpc_uc import em

    seen = {"patch": set(), "optimizer": []}
    steps, build = em.minimise_noise, em.noise_model_optimizer

    def noise_steps(*args, **kwargs):
        call = inspect.signature(steps).bind(*args, **kwargs)
        call.apply_defaults()
        seen["patch"].add(call.arguments["patch"])
        return steps(*args, **kwargs)

    def optimizer(*args):
        opt, lr = build(*args)
        seen["optimizer"].append(type(opt).__name__)
        return opt, lr

    monkeypatch.setattr(em, "minimise_noise", noise_steps)
    monkeypatch.setattr(em, "noise_model_optimizer", optimizer)
    run_em_train_stage(finished_run, tmp_path / "wired", "em.rounds=1", "em.train_steps=1", "em.patch=2",
                       "em.optimizer=adam")
    assert seen == {"patch": {2}, "optimizer": ["Adam"]}


@pytest.mark.parametrize("objective", ["min", "targeted", "auto"])
def test_em_objective_picks_what_the_model_learns_and_where_the_noise_points(objective, finished_run, tmp_path,
                                                                            monkeypatch):
    """em.objective=min: the model trains on x + δ and δ lowers the loss of each image's own
    class; targeted: the model trains on the clean images and δ points at the next class; auto
    is targeted on digits, which has one class per image."""
    import inspect

    from hpc_uc import em

    cfg, _ = finished_run
    images, labels, _ = read_whole_split(cfg["data_dir"], "train")
    label_of = {im.tobytes(): int(lab[0]) for im, lab in zip(images, labels)}
    classes = int(labels.max()) + 1
    seen = {"clean_batches": [], "targets_next": []}
    steps, build = em.minimise_noise, em.victim_model

    def noise_steps(*args, **kwargs):
        call = inspect.signature(steps).bind(*args, **kwargs).arguments
        own = np.array([label_of[p] for p in pixel_bytes(call["x"])])
        seen["targets_next"].append(bool(np.array_equal(call["labels"][:, 0].cpu().numpy(), (own + 1) % classes)))
        return steps(*args, **kwargs)

    def model(*args):
        net = build(*args)

        def record(module, inputs):
            if module.training:
                seen["clean_batches"].append(all(p in label_of for p in pixel_bytes(inputs[0])))
        net.register_forward_pre_hook(record)
        return net

    monkeypatch.setattr(em, "minimise_noise", noise_steps)
    monkeypatch.setattr(em, "victim_model", model)
    run_em_train_stage(finished_run, tmp_path / "wired", "em.rounds=2", "em.train_steps=2", "em.augment=false",
                       "em.stop_accuracy=1", f"em.objective={objective}")
    targeted = objective in ("targeted", "auto")
    assert seen["clean_batches"] and set(seen["clean_batches"]) == {targeted}
    assert seen["targets_next"] and set(seen["targets_next"]) == {targeted}


def test_export_in_small_chunks_equals_one_chunk(finished_run, tmp_path):
    """export.chunk_mib bounds the export's working memory: a chunk of 50 images per shard gives
    the same protected images as the one-chunk export, over 26 shards."""
    import shutil

    cfg, run = finished_run
    shutil.copytree(run.root, tmp_path / "chunked")
    other = tiny_config(cfg["data_dir"], tmp_path / "chunked", f"export.chunk_mib={50 * 4 * 28 * 28 / 2**20}")
    comm, moved = start(other)
    run_all(other, comm, moved)
    whole, _, whole_index = read_whole_split(run.protected, "train")
    chunked, _, chunked_index = read_whole_split(moved.protected, "train")
    assert np.array_equal(whole_index, chunked_index) and np.array_equal(whole, chunked)
    assert len(verify(moved.protected)["splits"]["train"]["shards"]) == -(-len(whole) // 50)


def test_targeted_refinement_at_export_aims_the_images_at_the_next_class(finished_run, tmp_path, capsys):
    """refine.objective=auto on single-label data is targeted: the export refines each image
    toward the surrogate's next class (its loss of y + 1 falls against the unrefined export and
    UC's own loss), by default through the crop-and-flip expectation, records what it ran, and
    logs its progress through rank 0's images; refine.batch_mib sets how many images go through
    the surrogate at once, which changes the split, not the result."""
    import shutil

    import torch
    import torch.nn.functional as F

    from hpc_uc.pipeline import run_stage
    from hpc_uc.shards import read_manifest
    from hpc_uc.surrogate import load_frozen_surrogate

    cfg, run = finished_run
    exported = {}
    for name, overrides in {"auto": [], "plain": ["refine.augment=false"],
                            "uc": ["refine.objective=uc", "refine.augment=false"],
                            "small": ["refine.batch_mib=0.5"]}.items():
        shutil.copytree(run.root, tmp_path / name)
        other = tiny_config(cfg["data_dir"], tmp_path / name, "refine.steps=3", "refine.step_size=0.25", *overrides)
        comm, exported[name] = start(other)
        run_stage("export", other, comm, exported[name])
    count = read_manifest(run.protected)["splits"]["train"]["count"]  # one rank here: all of them
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("export: refining")]
    batches = [line for line in out if line.startswith("export: refinement batch of ")]
    assert [line.split()[4] for line in batches] == ["256", "256", "256", "1"]  # 0.5 MiB: one image at a time
    assert out[out.index(batches[-1]) + 1].startswith("export: refining (3 steps), rank 0: 1/")  # and it did
    assert lines and all(line.startswith("export: refining (3 steps), rank 0: ") for line in lines)
    assert f": {count}/{count} images (" in lines[-1] and lines[-1].endswith(", done)")
    manifest = read_manifest(exported["auto"].protected)
    record = manifest["extra"]["protection"]
    assert (record["refine_steps"], record["refine_objective"], record["refine_augment"]) == (3, "targeted", True)
    assert read_manifest(run.protected)["extra"]["protection"]["refine_objective"] is None  # steps 0: none ran
    surrogate = load_frozen_surrogate(cfg, run, manifest, torch.device("cpu"))

    def next_class_loss(directory) -> float:
        images, labels, _ = read_whole_split(directory, "train")
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            logits = surrogate(x)[0]
        return float(F.cross_entropy(logits, torch.from_numpy((labels[:, 0] + 1) % manifest["num_classes"])))

    unrefined, targeted = next_class_loss(run.protected), next_class_loss(exported["plain"].protected)
    assert targeted < unrefined - 0.05
    assert targeted < next_class_loss(exported["uc"].protected) - 0.05  # UC's own loss, as many steps
    expected = next_class_loss(exported["auto"].protected)  # steps taken through crops and flips
    assert expected < unrefined
    assert not np.array_equal(read_whole_split(exported["auto"].protected, "train")[0],
                              read_whole_split(exported["plain"].protected, "train")[0])
    # refine.batch_mib moves only the batch split: a sign step flips where rounding moves a ~0 gradient
    one_at_a_time = read_whole_split(exported["small"].protected, "train")[0].astype(int)
    assert np.mean(np.abs(one_at_a_time - read_whole_split(exported["auto"].protected, "train")[0]) > 1) < 1e-2  # rounding


def test_refinement_from_uniform_noise_starts_from_each_image_s_own_draw(finished_run, tmp_path):
    """refine.init=uniform: the refinement starts from em's uniform noise, drawn from (seed,
    sample id), not from the cluster's delta: with steps of size 0 the export adds exactly that
    noise (fails when the start is the cluster delta), and the manifest records the start."""
    import shutil

    from hpc_uc.em import initial_levels
    from hpc_uc.export import REFINE_INIT
    from hpc_uc.pipeline import run_stage
    from hpc_uc.shards import read_manifest

    cfg, run = finished_run
    shutil.copytree(run.root, tmp_path / "uniform")
    other = tiny_config(cfg["data_dir"], tmp_path / "uniform", "refine.steps=1", "refine.step_size=0",
                        "refine.init=uniform")
    comm, moved = start(other)
    run_stage("export", other, comm, moved)
    assert read_manifest(moved.protected)["extra"]["protection"]["refine_init"] == "uniform"
    assert read_manifest(run.protected)["extra"]["protection"]["refine_init"] is None  # no refinement ran
    clean, _, index = read_whole_split(cfg["data_dir"], "train")
    protected, _, protected_index = read_whole_split(moved.protected, "train")
    assert np.array_equal(index, protected_index)
    shape = (clean.shape[3],) + clean.shape[1:3]
    levels = initial_levels(index, shape, other["epsilon"], other["norm"], other["seed"] + REFINE_INIT)
    levels = levels.transpose(0, 2, 3, 1).astype(int)
    inside = (clean + levels >= 0) & (clean + levels <= 255)  # where clamping to [0, 1] leaves it whole
    assert inside.mean() > 0.5 and np.abs(levels).max() > 0
    assert np.array_equal((protected.astype(int) - clean)[inside], levels[inside])


def test_floor_victims_are_reported_and_kept_with_the_clean_ones(finished_run, tmp_path, capsys):
    """evaluate.floor: each protocol gets a victim trained on shuffled labels, read as a
    protected one is (results.json, report.md), kept beside the clean victims (whose key the
    floor does not change) and reused by a run that changes only the protection."""
    import shutil

    from hpc_uc.evaluate import clean_victim_key

    cfg, run = finished_run
    assert all("floor" not in v for v in json.loads(run.results.read_text())["protocols"].values())  # off: none
    solo = start(cfg)[0]
    assert clean_victim_key({**cfg, "evaluate": {**cfg["evaluate"], "floor": True}}, solo) == clean_victim_key(cfg, solo)
    shutil.copytree(run.root, tmp_path / "floor")
    capsys.readouterr()
    other = tiny_config(cfg["data_dir"], tmp_path / "floor", "evaluate.floor=true", "evaluate.protocols=[medmnist]")
    comm, moved = start(other)
    run_all(other, comm, moved)
    out = capsys.readouterr().out
    assert "evaluate[medmnist/floor]: epoch 1/1" in out
    doc = json.loads(moved.results.read_text())
    validate_results(doc)
    floor = doc["protocols"]["medmnist"]["floor"]
    assert floor["reading"]["auc"] == pytest.approx(max(floor["test_auc"], 1 - floor["test_auc"],
                                                        floor["turned_test_auc"]))
    assert "- medmnist floor: a victim trained on shuffled labels" in (moved.root / "report.md").read_text()
    again = tiny_config(cfg["data_dir"], tmp_path / "floor", "evaluate.floor=true", "evaluate.protocols=[medmnist]",
                        "refine.steps=1")
    comm, moved = start(again)
    run_all(again, comm, moved)
    out = capsys.readouterr().out
    assert out.count("reused from clean_victims.json") == 2
    assert json.loads(moved.results.read_text())["protocols"]["medmnist"]["floor"] == floor


def test_surrogate_snapshots_are_kept_owner_only_and_refined_through(digits_dir, tmp_path):
    """surrogate.snapshots: the surrogate stage keeps the chosen earlier epochs (rank 0, owner
    only: with the seed they regenerate the perturbations), export refines through them (and
    refuses without them), the manifest says so, and a run without snapshots removes a stale file."""
    import torch

    from hpc_uc.atomic import load_torch
    from hpc_uc.pipeline import run_stage
    from hpc_uc.shards import read_manifest

    cfg = tiny_config(digits_dir, tmp_path / "snap", "surrogate.epochs=2", "surrogate.snapshots=1", "refine.steps=2")
    comm, run = start(cfg)
    run_all(cfg, comm, run, stages=("surrogate", "cluster", "train", "export"))
    snapshots, final = load_torch(run.surrogate_snapshots), load_torch(run.surrogate)
    assert [s["epoch"] for s in snapshots] == [1]
    assert stat.S_IMODE(run.surrogate_snapshots.stat().st_mode) == 0o600
    assert any(not torch.equal(snapshots[0]["state"][k], final[k]) for k in final if final[k].is_floating_point())
    assert json.loads(run.surrogate_info.read_text())["snapshot_epochs"] == [1]
    assert read_manifest(run.protected)["extra"]["protection"]["refine_snapshots"] == 1
    assert "surrogate_snapshots.pt" in run.completed()["surrogate"]["files"]
    run.surrogate_snapshots.unlink()
    assert not run.is_done(cfg, "surrogate")  # a whole run makes them again
    with pytest.raises(UserError, match="surrogate_snapshots.pt is missing"):
        run_stage("export", cfg, comm, run)
    own = tiny_config(digits_dir, tmp_path / "snap", "surrogate.epochs=2", "surrogate.snapshots=1", "refine.steps=2",
                      "refine.objective=uc")  # UC's own loss: the trained surrogate alone, no file needed
    run_stage("export", own, comm, run)
    assert read_manifest(run.protected)["extra"]["protection"]["refine_snapshots"] is None
    run.surrogate_snapshots.write_bytes(b"stale")
    plain = tiny_config(digits_dir, tmp_path / "snap", "surrogate.epochs=2")
    run_stage("surrogate", plain, *start(plain))
    assert not run.surrogate_snapshots.exists()


def test_surrogate_augment_trains_through_the_victims_crop_and_flip(digits_dir, tmp_path):
    """surrogate.augment: other weights than without it, the same ones again from the same seed."""
    import torch

    from hpc_uc.atomic import load_torch
    from hpc_uc.pipeline import run_stage

    weights = {}
    for name, extra in (("plain", []), ("augmented", ["surrogate.augment=true"]), ("again", ["surrogate.augment=true"])):
        cfg = tiny_config(digits_dir, tmp_path / name, *extra)
        comm, run = start(cfg)
        run_stage("surrogate", cfg, comm, run)
        weights[name] = load_torch(run.surrogate)
    floats = [k for k, v in weights["plain"].items() if v.is_floating_point()]
    assert all(torch.equal(weights["augmented"][k], weights["again"][k]) for k in floats)
    assert any(not torch.equal(weights["augmented"][k], weights["plain"][k]) for k in floats)


def test_surrogate_optimizer_sgd_trains_it_with_momentum_sgd(digits_dir, tmp_path, monkeypatch):
    """surrogate.optimizer=sgd: the surrogate trains with SGD, momentum 0.9, at surrogate.lr
    scaled for its batch (em's model and the ue victim train so), not with Adam."""
    import torch

    from hpc_uc.config import scaled_lr
    from hpc_uc.pipeline import run_stage

    made, sgd = [], torch.optim.SGD
    monkeypatch.setattr(torch.optim, "SGD", lambda params, **kw: made.append(kw) or sgd(params, **kw))
    cfg = tiny_config(digits_dir, tmp_path / "sgd", "surrogate.optimizer=sgd", "surrogate.lr=0.05")
    comm, run = start(cfg)
    run_stage("surrogate", cfg, comm, run)
    s = cfg["surrogate"]
    assert made == [{"lr": scaled_lr(cfg, 0.05, s["batch_size"]), "momentum": 0.9, "weight_decay": s["weight_decay"]}]
