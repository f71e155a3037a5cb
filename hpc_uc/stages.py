"""The registry: every stage in order and every protection method, side by side.

A stage has a name, the config keys its outputs depend on (besides the earlier stages'), a
cheap up-front check, an entry point and the artifacts it leaves in the run directory. A
method names what the train stage runs for it and the stages it needs. Stage modules are
imported only when a stage runs or checks, so bad input fails fast, before torch is imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import UserError
from .shards import is_multilabel

if TYPE_CHECKING:
    from .comm import Comm
    from .rundir import RunDir

Entry = Callable[[dict, "Comm", "RunDir"], dict]
Check = Callable[[dict, dict], None]  # (config, data manifest) -> None, or a UserError


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline (``hpc-uc NAME CONFIG``)."""

    name: str
    help: str
    keys: tuple[str, ...]       # config keys its outputs depend on, besides the earlier stages'
    artifacts: tuple[str, ...]  # what it leaves, relative to the run directory
    run: Entry
    check: Check | None = None  # before any heavy work, on the config and the data manifest
    optional: tuple[str, ...] = ()  # what some configs also leave: recorded, and checked, when there


@dataclass(frozen=True)
class Method:
    """A protection method (``method: NAME``)."""

    name: str
    title: str                  # its name in the export's manifest
    train: Entry                # what the train stage runs
    stages: tuple[str, ...]     # the stages it needs, in order
    keys: tuple[str, ...] = ()  # config keys its train stage depends on, besides the stage's own
    label_wise: bool = False    # δ keyed by the class label: one class per image needed


# ---- entry points (each imports its module when called) -----------------------------------
def _run_surrogate(cfg: dict, comm: Comm, run: RunDir) -> dict:
    from .surrogate import run_surrogate

    return run_surrogate(cfg, comm, run)


def _run_cluster(cfg: dict, comm: Comm, run: RunDir) -> dict:
    from .cluster import run_cluster

    return run_cluster(cfg, comm, run)


def _run_train(cfg: dict, comm: Comm, run: RunDir) -> dict:
    return METHODS[cfg["method"]].train(cfg, comm, run)


def _run_export(cfg: dict, comm: Comm, run: RunDir) -> dict:
    from .export import run_export

    return run_export(cfg, comm, run)


def _run_evaluate(cfg: dict, comm: Comm, run: RunDir) -> dict:
    from .evaluate import run_evaluate

    return run_evaluate(cfg, comm, run)


def _train_uc(cfg: dict, comm: Comm, run: RunDir) -> dict:
    from .generator import run_train

    return run_train(cfg, comm, run)


def _train_classwise(cfg: dict, comm: Comm, run: RunDir) -> dict:
    from .classwise import run_classwise

    return run_classwise(cfg, comm, run)


def _train_ar(cfg: dict, comm: Comm, run: RunDir) -> dict:
    from .ar import run_ar

    return run_ar(cfg, comm, run)


def _train_em(cfg: dict, comm: Comm, run: RunDir) -> dict:
    from .em import run_em

    return run_em(cfg, comm, run)


# ---- up-front checks ----------------------------------------------------------------------
def _check_surrogate(cfg: dict, manifest: dict) -> None:
    """A weights file that will not load (torch is imported only for a file)."""
    if cfg["surrogate"]["weights"] not in ("pretrain", "imagenet"):
        from .surrogate import check_weights_file

        check_weights_file(cfg, manifest)


def _check_cluster(cfg: dict, manifest: dict) -> None:
    count = manifest["splits"]["train"]["count"]
    if cfg["clusters"] > count:
        raise UserError(f"clusters={cfg['clusters']} is more than the {count} training samples")


def _refuse_multilabel(setting: str, manifest: dict, data_dir: str, instead: str | None = None) -> None:
    """``setting`` (e.g. "method=ar") needs one class per image: refuse multi-label data."""
    if is_multilabel(manifest["task"]):
        raise UserError(f"{setting} needs one class per image; {Path(data_dir)} is {manifest['task']}"
                        + (f" (use {instead})" if instead else ""))


def _check_train(cfg: dict, manifest: dict) -> None:
    if cfg["method"] == "em":
        _check_em(cfg["em"], manifest, cfg["data_dir"])
    elif METHODS[cfg["method"]].label_wise:
        _refuse_multilabel(f"method={cfg['method']}", manifest, cfg["data_dir"])


SINGLE_LABEL_EM = {"objective": ("targeted", "min"), "init": ("classwise", "uniform")}  # key: (value, instead)


def _check_em(em: dict, manifest: dict, data_dir: str) -> None:
    """em.patch against the images, em.init=classwise against block-wise noise, and the
    single-label settings (SINGLE_LABEL_EM) against multi-label data."""
    patch, size = em["patch"], manifest["image_size"]
    if patch > size:
        raise UserError(f"em.patch={patch} is larger than the {size}-px images")
    if em["init"] == "classwise" and patch > 1:
        raise UserError(f"em.patch={patch} needs em.init=uniform (the classwise start is per pixel)")
    for key, (value, instead) in SINGLE_LABEL_EM.items():
        if em[key] == value:
            _refuse_multilabel(f"em.{key}={value}", manifest, data_dir, f"em.{key}={instead}")


def head_trained_on_labels(cfg: dict) -> bool:
    """Whether the surrogate's classifier head is trained on the data's labels: not with
    surrogate.weights=imagenet (a PATH may hold a head trained on them)."""
    return cfg["surrogate"]["weights"] != "imagenet"


def _check_export(cfg: dict, manifest: dict) -> None:
    """refine.objective=targeted aims each image at the next class of the surrogate's own
    classifier: one class per image, and a classifier head trained on these labels (not
    ImageNet's)."""
    if cfg["refine"]["objective"] != "targeted":
        return
    _refuse_multilabel("refine.objective=targeted", manifest, cfg["data_dir"], "refine.objective=uc")
    if not head_trained_on_labels(cfg):
        raise UserError("refine.objective=targeted attacks the surrogate's classifier, which surrogate.weights="
                        "imagenet leaves untrained for these labels (use surrogate.weights=pretrain, or a PATH "
                        "to a surrogate trained on them)")


def _check_evaluate(cfg: dict, manifest: dict) -> None:
    """A misspelled defense fails now, not after the victims trained."""
    from .defenses import build_defense

    for name in cfg["defenses"]:
        build_defense(name, cfg["defense"])


# ---- the registry -------------------------------------------------------------------------
# what every stage depends on, whichever stage a method starts with (method=em has no surrogate)
RUN_KEYS = ("dataset", "data_dir", "seed", "lr_scaling", "base_batch_size", "warmup_epochs")
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("surrogate", "obtain and measure the surrogate feature extractor", ("surrogate",),
          ("surrogate.pt", "surrogate.json"), _run_surrogate, _check_surrogate,
          optional=("surrogate_snapshots.pt",)),  # with surrogate.snapshots
    Stage("cluster", "K-means of the training split in surrogate feature space",
          ("clusters", "kmeans"), ("clusters.npz",), _run_cluster, _check_cluster),
    Stage("train", "make the perturbations (UC: train one generator per cluster, data-parallel)",
          ("method", "epsilon", "norm"),
          ("perturbations.h5", "generators/generators.pt"), _run_train, _check_train),
    Stage("export", "write the protected dataset (shards + protected.npz)",
          ("refine", "export"), ("protected/manifest.json", "protected.npz"), _run_export, _check_export),
    Stage("evaluate", "train victims on clean and protected data; write results.json",
          ("victim", "defenses", "defense", "evaluate"), ("results.json",), _run_evaluate, _check_evaluate),
)}

# the label-wise methods need no clusters; the surrogate still runs: results.json and the
# report give its validation accuracy
_LABEL_WISE_STAGES = ("surrogate", "train", "export", "evaluate")
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("uc", "unlearnable-clusters", _train_uc, tuple(STAGES),
           ("batch_size", "tile", "target_offset", "generator")),
    Method("classwise", "class-wise-random-noise", _train_classwise, _LABEL_WISE_STAGES, ("tile",),
           label_wise=True),
    Method("ar", "autoregressive-perturbations", _train_ar, _LABEL_WISE_STAGES, label_wise=True),
    # its own classifier is trained with the noise: no surrogate, no clusters
    Method("em", "error-minimising-noise", _train_em, ("train", "export", "evaluate"), ("batch_size", "em")),
)}


def stage_keys(stage: str, method: str) -> tuple[str, ...]:
    """The config keys ``stage``'s outputs depend on under ``method`` (besides the earlier
    stages'): the train stage adds the method's own, so a uc run does not re-train when an
    em key changes."""
    return STAGES[stage].keys + (METHODS[method].keys if stage == "train" else ())


def method_stages(method: str) -> tuple[Stage, ...]:
    """The stages ``method`` runs, in order."""
    return tuple(STAGES[name] for name in METHODS[method].stages)
