"""Stage `evaluate`: how unlearnable the protected copy is.

A victim is trained from scratch, data-parallel, once on the clean training split and once
on the protected one (plus once per configured defense), each tested on the **clean** test
split with MedMNIST's metrics over the full gathered test set. RUN_DIR/results.json holds
the figures (schema: docs/results.md).
"""
from __future__ import annotations

import copy
import time

import torch

from .atomic import read_json, write_json
from .comm import Comm
from .config import check_world, scaled_lr
from .defenses import build_defense
from .export import read_whole_split
from .imperceptibility import imperceptibility
from .metrics import chance_accuracy, medmnist_metrics
from .models import ResNetClassifier, victim_model
from .reader import ShardedDataset
from .rundir import RunDir
from .training import MetricsLog, predict, train_classifier

RESULTS_VERSION = 1


def build_victim(cfg: dict, manifest: dict) -> ResNetClassifier:
    """ResNet-18 (28) style for small images, torchvision's stem for larger ones."""
    v = cfg["victim"]
    return victim_model(v["arch"], manifest["num_classes"], manifest["channels"], manifest["image_size"],
                        stem=v["stem"], input_norm=v["input_norm"])


def train_and_test(cfg: dict, comm: Comm, train_dir, name: str, log: MetricsLog,
                   defense_name: str | None = None) -> dict:
    """Train a victim on ``train_dir``'s train split, keep the best-on-validation weights
    (``victim.select``: val AUC as MedMNIST's benchmark, or val ACC), and return test
    ACC/AUC on the clean test split (rank 0; an empty dict elsewhere)."""
    v = cfg["victim"]
    per_rank = check_world(cfg, comm.size, "victim.batch_size")
    train = ShardedDataset(train_dir, "train", comm, seed=cfg["seed"], cache=cfg["cache"])
    manifest = train.manifest
    val_split = "val" if "val" in manifest["splits"] else None
    val = ShardedDataset(cfg["data_dir"], val_split, comm, cache=cfg["cache"], full=True) if val_split else None
    test = ShardedDataset(cfg["data_dir"], "test", comm, cache=cfg["cache"], full=True)
    torch.manual_seed(cfg["seed"])
    model = build_victim(cfg, manifest)
    best = {"score": -1.0, "val_acc": None, "val_auc": None, "state": None, "epoch": 0}

    def on_epoch(epoch: int, loss: float) -> None:
        record = {"victim": name, "epoch": epoch + 1, "loss": loss}
        if val is not None:
            result = predict(model, val, comm)
            scores = medmnist_metrics(manifest["task"], result[1], result[0]) if comm.is_root else None
            scores = comm.broadcast(scores)
            record.update(val_acc=scores["acc"], val_auc=scores["auc"])
            score = scores[v["select"]] if scores[v["select"]] is not None else scores["acc"]
            if score > best["score"]:
                best.update(score=score, val_acc=scores["acc"], val_auc=scores["auc"],
                            state=copy.deepcopy(model.state_dict()), epoch=epoch + 1)
        log.write(**record)
        if comm.is_root:
            print(f"evaluate[{name}]: epoch {epoch + 1}/{v['epochs']} loss {loss:.4f}"
                  + (f" val acc {record['val_acc']:.3f} auc {record['val_auc']}"
                     if "val_acc" in record else ""), flush=True)

    defense = build_defense(defense_name, cfg["defense"]) if defense_name else None
    began = time.perf_counter()
    train_classifier(model, train, comm, epochs=v["epochs"],
                     lr=scaled_lr(cfg, v["lr"], v["batch_size"], v["base_batch_size"]),
                     weight_decay=v["weight_decay"], batch_per_rank=per_rank, task=manifest["task"],
                     milestones=tuple(v["milestones"]), on_epoch=on_epoch, defense=defense,
                     seed=cfg["seed"])
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    result = predict(model, test, comm)
    if not comm.is_root:
        return {}
    scores, labels = result
    metrics = medmnist_metrics(manifest["task"], labels, scores)
    out = {"test_acc": metrics["acc"], "test_auc": metrics["auc"], "best_epoch": best["epoch"],
           "val_acc": best["val_acc"], "val_auc": best["val_auc"],
           "seconds": round(time.perf_counter() - began, 2)}
    print(f"evaluate[{name}]: test acc {out['test_acc']:.3f} auc {out['test_auc']}", flush=True)
    return out


def run_evaluate(cfg: dict, comm: Comm, run: RunDir) -> dict:
    """Clean and protected victims (plus defenses); rank 0 writes results.json."""
    log = MetricsLog(run.metrics, comm, "evaluate")
    clean = train_and_test(cfg, comm, cfg["data_dir"], "clean", log)
    protected = train_and_test(cfg, comm, run.protected, "protected", log)
    defenses = {name: train_and_test(cfg, comm, run.protected, name, log, defense_name=name)
                for name in cfg["defenses"]}
    results = None
    if comm.is_root:
        results = build_results(cfg, comm, run, clean, protected, defenses)
        write_json(run.results, results)
    comm.barrier()
    return results or {}


def build_results(cfg: dict, comm: Comm, run: RunDir, clean: dict, protected: dict,
                  defenses: dict) -> dict:
    """The results.json document (docs/results.md describes every field)."""
    source = read_json(f"{cfg['data_dir']}/manifest.json")
    _, test_labels, _ = read_whole_split(cfg["data_dir"], "test")
    clean_train, _, _ = read_whole_split(cfg["data_dir"], "train")
    prot_train, _, _ = read_whole_split(run.protected, "train")
    quality = imperceptibility(clean_train, prot_train)
    surrogate = read_json(run.surrogate_info) if run.surrogate_info.is_file() else {}
    timings = read_json(run.timings) if run.timings.is_file() else {}
    return {
        "results_version": RESULTS_VERSION,
        "dataset": source["dataset"],
        "task": source["task"],
        "world_size": comm.size,
        "backend": comm.backend,
        "batch_size": cfg["batch_size"],
        "epsilon": cfg["epsilon"],
        "norm": cfg["norm"],
        "clusters": cfg["clusters"],
        "seed": cfg["seed"],
        "profile": cfg["profile"],
        "surrogate_val_acc": surrogate.get("val_acc"),
        "clean": clean,
        "protected": protected,
        "protection_gain": clean["test_acc"] - protected["test_acc"],
        "chance_acc": chance_accuracy(test_labels, source["task"]),
        "psnr_db": quality["psnr_db"],
        "ssim": quality["ssim"],
        "linf": quality["linf"],
        "l2": quality["l2"],
        "defenses": {name: {"test_acc": d["test_acc"], "test_auc": d["test_auc"]} for name, d in defenses.items()},
        "stage_seconds": timings,
    }
