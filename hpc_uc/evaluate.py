"""Stage `evaluate`: how unlearnable the protected copy is, read as a sceptical data owner would.

For each victim protocol (``evaluate.protocols``) a victim is trained from scratch,
data-parallel, once on the clean training split, once on the protected one and once per
configured defense; each is tested on the **clean** test split with MedMNIST's metrics over
the full gathered test set, and again after an attacker re-fits its last layer on a few
clean labelled images (hpc_uc.recalibrate). Protocols:

* ``medmnist`` -- MedMNIST v2's: Adam, step decay, no augmentation, the best
  clean-validation epoch reported.
* ``ue`` -- the Unlearnable Examples literature's: SGD momentum 0.9, lr 0.1, weight decay
  5e-4, cosine to 0, random crop + horizontal flip, the **final** epoch reported (the best
  validation epoch's test figures beside it).

RUN_DIR/results.json holds the figures (schema: docs/results.md), RUN_DIR/victims.png the
per-epoch validation curves.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch

from .atomic import read_json, write_json
from .comm import Comm
from .config import check_world, scaled_lr
from .defenses import build_defense
from .epoch_picks import EpochPicks, turned_reading
from .imperceptibility import parallel_imperceptibility
from .metrics import chance_accuracy, medmnist_metrics, prior_loss
from .models import ResNetClassifier, ResNetWithFeature, victim_model
from .protection import attacker_reading, protection_figures
from .reader import ShardedDataset
from .recalibrate import recalibrated_metrics
from .rundir import RunDir
from .shuffled_labels import ShuffledLabels
from .training import MetricsLog, predict, train_classifier

RESULTS_VERSION = 2
RECALIBRATE_SEED = 0


def build_victim(cfg: dict, manifest: dict) -> ResNetClassifier:
    """ResNet-18 (28) style for small images, torchvision's stem for larger ones."""
    v = cfg["victim"]
    return victim_model(v["arch"], manifest["num_classes"], manifest["channels"], manifest["image_size"],
                        stem=v["stem"], input_norm=v["input_norm"])


def protocol_settings(cfg: dict, protocol: str) -> dict:
    """Training arguments of one victim protocol, and whether it reports the final epoch."""
    from .augment import victim_crop_flip

    v = cfg["victim"]
    if protocol == "ue":
        ue = v["ue"]
        return {"epochs": ue["epochs"], "optimizer": "sgd", "momentum": ue["momentum"],
                "lr": scaled_lr(cfg, ue["lr"], v["batch_size"], v["base_batch_size"]),
                "weight_decay": ue["weight_decay"], "milestones": None,
                "augment": victim_crop_flip(cfg), "final": True}
    return {"epochs": v["epochs"], "optimizer": "adam", "momentum": 0.0,
            "lr": scaled_lr(cfg, v["lr"], v["batch_size"], v["base_batch_size"]),
            "weight_decay": v["weight_decay"], "milestones": tuple(v["milestones"]),
            "augment": None, "final": False}


class _LogitsAndFeatures(torch.nn.Module):
    """A victim's logits and pooled features side by side, as one tensor (for predict)."""

    def __init__(self, model: ResNetClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(ResNetWithFeature.forward(self.model, x), 1)


def predict_with_features(model: ResNetClassifier, ds: ShardedDataset, comm: Comm):
    """(logits, pooled features, labels) of every sample of ``ds`` on rank 0; None elsewhere."""
    out = predict(_LogitsAndFeatures(model), ds, comm)
    if out is None:
        return None
    both, labels = out
    c = model.backbone.fc.out_features
    return both[:, :c], both[:, c:], labels


class Splits:
    """The clean val and test splits every victim is measured on (read once)."""

    def __init__(self, cfg: dict, comm: Comm) -> None:
        self.test = ShardedDataset(cfg["data_dir"], "test", comm, cache=cfg["cache"], full=True)
        manifest = self.test.manifest
        self.val = (ShardedDataset(cfg["data_dir"], "val", comm, cache=cfg["cache"], full=True)
                    if "val" in manifest["splits"] else None)
        self.task, self.num_classes = manifest["task"], manifest["num_classes"]


def measure(cfg: dict, model: ResNetClassifier, splits: Splits, comm: Comm) -> dict:
    """Test ACC/AUC of ``model`` and of its head re-fitted on clean val images (rank 0)."""
    test = predict_with_features(model, splits.test, comm)
    val = predict_with_features(model, splits.val, comm) if splits.val is not None else None
    if not comm.is_root:
        return {}
    logits, feats, labels = test
    scores = medmnist_metrics(splits.task, labels, logits)
    out = {"test_acc": scores["acc"], "test_auc": scores["auc"], "recalibrated_acc": None,
           "recalibrated_auc": None}
    if val is not None and cfg["evaluate"]["recalibrate_samples"] > 0:
        recal = recalibrated_metrics(val[1], val[2], feats, labels, splits.task, splits.num_classes,
                                     cfg["evaluate"]["recalibrate_samples"], RECALIBRATE_SEED)
        out.update(recalibrated_acc=recal["acc"], recalibrated_auc=recal["auc"])
    return out


def train_and_test(cfg: dict, comm: Comm, train_dir, name: str, protocol: str, splits: Splits,
                   log: MetricsLog, defense_name: str | None = None, shuffle_labels: bool = False) -> dict:
    """Train one victim under ``protocol`` on ``train_dir``'s train split (its labels shuffled
    by ``seed`` with ``shuffle_labels``: the floor victim); return its figures on the clean test
    split (rank 0; an empty dict elsewhere). ``history`` holds the per-epoch clean validation
    ACC/AUC; ``turned_*`` (protocols that keep an epoch) the turning attacker's epoch and
    figures (hpc_uc/epoch_picks.py)."""
    v, s = cfg["victim"], protocol_settings(cfg, protocol)
    per_rank = check_world(cfg, comm.size, "victim.batch_size")
    train = ShardedDataset(train_dir, "train", comm, seed=cfg["seed"], cache=cfg["cache"])
    manifest = train.manifest
    if shuffle_labels:
        train = ShuffledLabels(train, cfg["seed"])
    torch.manual_seed(cfg["seed"])
    model = build_victim(cfg, manifest)
    picks = EpochPicks(v["select"], turning=not s["final"])
    best, turned = picks.best, picks.turned
    history: list[dict] = []
    label = f"{protocol}/{name}"

    def on_epoch(epoch: int, loss: float) -> None:
        record = {"victim": name, "protocol": protocol, "epoch": epoch + 1, "loss": loss}
        if splits.val is not None:
            result = predict(model, splits.val, comm)
            scores = medmnist_metrics(manifest["task"], result[1], result[0]) if comm.is_root else None
            scores = comm.broadcast(scores)
            record.update(val_acc=scores["acc"], val_auc=scores["auc"])
            picks.see(epoch + 1, scores, lambda: copy.deepcopy(model.state_dict()))
        history.append(record)
        log.write(**record)
        if comm.is_root:
            print(f"evaluate[{label}]: epoch {epoch + 1}/{s['epochs']} loss {loss:.4f}"
                  + (f" val acc {record['val_acc']:.3f} auc {record['val_auc']}"
                     if "val_acc" in record else ""), flush=True)

    defense = build_defense(defense_name, cfg["defense"]) if defense_name else None
    began = time.perf_counter()
    train_classifier(model, train, comm, epochs=s["epochs"], lr=s["lr"], weight_decay=s["weight_decay"],
                     batch_per_rank=per_rank, task=manifest["task"], milestones=s["milestones"],
                     on_epoch=on_epoch, defense=defense, seed=cfg["seed"], optimizer=s["optimizer"],
                     momentum=s["momentum"], augment=s["augment"], micro_batch=cfg["victim"]["micro_batch"])
    if not s["final"] and best["state"] is not None:  # medmnist: the best-validation epoch
        final_epoch = best["epoch"]
        model.load_state_dict(best["state"])
    else:
        final_epoch = s["epochs"]
    out = measure(cfg, model, splits, comm)

    def measure_at(state: dict) -> dict:
        model.load_state_dict(state)
        return measure(cfg, model, splits, comm)

    extra = {}
    if s["final"] and best["state"] is not None:  # ue: the best-validation epoch, for reference
        at_best = measure_at(best["state"])
        extra = {"best_val_test_acc": at_best.get("test_acc"), "best_val_test_auc": at_best.get("test_auc")}
    if turned["state"] is not None:  # the turning attacker's epoch (the same on every rank)
        at_turned = out if turned["epoch"] == final_epoch else measure_at(turned["state"])
        extra.update(turned_reading(turned, at_turned))
    if not comm.is_root:
        return {}
    out.update(best_epoch=best["epoch"], reported_epoch=final_epoch, epochs=s["epochs"],
               val_acc=best["val_acc"], val_auc=best["val_auc"], **extra,
               final_train_loss=history[-1]["loss"] if history else None,
               seconds=round(time.perf_counter() - began, 2), history=history)
    print(f"evaluate[{label}]: test acc {out['test_acc']:.3f} auc {_num(out['test_auc'])} "
          f"recalibrated acc {_num(out['recalibrated_acc'])}", flush=True)
    return out


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def clean_victim_key(cfg: dict, comm: Comm) -> str:
    """What a clean victim's figures depend on -- and a floor victim's (``evaluate.floor``,
    whose labels are shuffled by the seed): the data, the seed, the victim and evaluation
    settings and the number of ranks (the data order)."""
    manifest = (Path(cfg["data_dir"]) / "manifest.json").read_bytes()
    evaluate = {k: v for k, v in cfg["evaluate"].items() if k != "floor"}  # the floor adds a victim, alters none
    values = {"manifest": hashlib.sha256(manifest).hexdigest(), "seed": cfg["seed"], "victim": cfg["victim"],
              "evaluate": evaluate, "cache": cfg["cache"], "world_size": comm.size,
              "results_version": RESULTS_VERSION}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def known_clean_victims(cfg: dict, comm: Comm, run: RunDir) -> dict:
    """Clean victims already measured for this key (RUN_DIR/clean_victims.json), by protocol,
    and floor victims under "PROTOCOL/floor". Neither depends on the protection, so sweeps and
    knob studies that seed a run directory with this file train them once."""
    if not run.clean_victims.is_file():
        return {}
    try:
        doc = read_json(run.clean_victims)
    except (OSError, ValueError):  # a damaged cache is only a cache: measure again
        return {}
    if not isinstance(doc, dict) or doc.get("key") != clean_victim_key(cfg, comm):
        return {}
    return doc.get("protocols", {}) if isinstance(doc.get("protocols"), dict) else {}


def kept_victim(cfg: dict, comm: Comm, run: RunDir, known: dict, key: str, label: str,
                train: Callable[[], dict]) -> dict:
    """A victim that does not depend on the protection (the clean one, and the shuffled-label
    floor of ``evaluate.floor``): reused from RUN_DIR/clean_victims.json under ``key`` when
    ``known`` holds it, otherwise ``train()`` and kept there (rank 0 writes)."""
    if key in known:
        if comm.is_root:
            print(f"evaluate[{label}]: reused from {run.clean_victims.name} (same data, seed, "
                  f"victim settings and ranks)", flush=True)
        return copy.deepcopy(known[key]) if comm.is_root else {}
    victim = train()
    if comm.is_root:
        known[key] = copy.deepcopy(victim)
        write_json(run.clean_victims, {"key": clean_victim_key(cfg, comm), "protocols": known})
    return victim


def run_evaluate(cfg: dict, comm: Comm, run: RunDir) -> dict:
    """Clean and protected victims (plus defenses) under each protocol; rank 0 writes
    results.json and victims.png."""
    log = MetricsLog(run.metrics, comm, "evaluate")
    splits = Splits(cfg, comm)
    protocols = {}
    known = comm.broadcast(known_clean_victims(cfg, comm, run) if comm.is_root else None)
    for protocol in cfg["evaluate"]["protocols"]:
        clean = kept_victim(cfg, comm, run, known, protocol, f"{protocol}/clean", lambda: train_and_test(
            cfg, comm, cfg["data_dir"], "clean", protocol, splits, log))
        victims = {"clean": clean,
                   "protected": train_and_test(cfg, comm, run.protected, "protected", protocol, splits, log)}
        victims["defenses"] = {name: train_and_test(cfg, comm, run.protected, name, protocol, splits, log,
                                                    defense_name=name) for name in cfg["defenses"]}
        if cfg["evaluate"]["floor"]:  # what a victim that learned nothing about the labels reads here
            victims["floor"] = kept_victim(cfg, comm, run, known, f"{protocol}/floor", f"{protocol}/floor",
                                           lambda: train_and_test(cfg, comm, cfg["data_dir"], "floor", protocol,
                                                                  splits, log, shuffle_labels=True))
        protocols[protocol] = victims
    torch.manual_seed(cfg["seed"])  # the floor of the re-fit: features of a network that learned nothing
    untrained = measure(cfg, build_victim(cfg, splits.test.manifest).to(comm.device), splits, comm)
    quality = parallel_imperceptibility(cfg["data_dir"], run.protected, comm)  # each rank its own range
    results = None
    if comm.is_root:
        from .victim_curves import plot_victims

        plot_victims({p: {n: victims[n].pop("history") for n in ("clean", "protected")}
                      for p, victims in protocols.items()}, run.victims_png)
        for victims in protocols.values():
            for d in [*victims["defenses"].values(), victims.get("floor", {})]:
                d.pop("history", None)
        results = build_results(cfg, comm, run, protocols, untrained, quality)
        write_json(run.results, results)
    comm.barrier()
    return results or {}


def build_results(cfg: dict, comm: Comm, run: RunDir, protocols: dict, untrained: dict, quality: dict) -> dict:
    """The results.json document (docs/results.md describes every field)."""
    source = read_json(f"{cfg['data_dir']}/manifest.json")
    test_labels, _ = ShardedDataset(cfg["data_dir"], "test", None, full=True).labels_by_index()
    surrogate = read_json(run.surrogate_info) if run.surrogate_info.is_file() else {}
    timings = read_json(run.timings) if run.timings.is_file() else {}
    chance = chance_accuracy(test_labels, source["task"])
    train_labels, _ = ShardedDataset(cfg["data_dir"], "train", None, full=True).labels_by_index()
    protection = {}
    for name, victims in protocols.items():
        protection[name] = protection_figures(victims["clean"], victims["protected"], chance)
        for d in victims["defenses"].values():
            d["protection"] = protection_figures(victims["clean"], d, chance)
        if "floor" in victims:
            victims["floor"]["reading"] = attacker_reading(victims["floor"])
    return {
        "results_version": RESULTS_VERSION,
        "dataset": source["dataset"],
        "method": cfg["method"],
        "task": source["task"],
        "world_size": comm.size,
        "backend": comm.backend,
        "batch_size": cfg["batch_size"],
        "epsilon": cfg["epsilon"],
        "norm": cfg["norm"],
        "clusters": cfg["clusters"],
        "seed": cfg["seed"],
        "profile": cfg["profile"],
        "generator": cfg["generator"],
        "surrogate_val_acc": surrogate.get("val_acc"),
        "chance_acc": chance,
        "prior_loss": prior_loss(train_labels, source["task"], source["num_classes"]),
        "recalibrate_samples": cfg["evaluate"]["recalibrate_samples"],
        "protocols": protocols,
        "protection": protection,
        "untrained": {k: untrained[k] for k in ("test_acc", "test_auc", "recalibrated_acc", "recalibrated_auc")},
        "psnr_db": quality["psnr_db"],
        "ssim": quality["ssim"],
        "linf": quality["linf"],
        "l2": quality["l2"],
        "stage_seconds": timings,
    }
