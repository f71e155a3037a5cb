"""Run configuration: defaults, profiles, one YAML per dataset, `key=value` overrides.

Resolution order (later wins): DEFAULTS < PROFILES[profile] < the YAML file (without its
`profiles:` section) < the YAML's `profiles: {profile: ...}` < command-line `key=value`.
Nested keys use dots on the command line: `generator.epochs=3`.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import UserError

DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "data_dir": "data/digits",
    "run_dir": "runs/digits",
    "seed": 0,
    "method": "uc",               # uc (Unlearnable Clusters) | classwise (random class-wise noise)
                                  # | ar (autoregressive perturbations)
                                  # | em (sample-wise error-minimising noise)
    "backend": "auto",            # auto | horovod | torch | mpi
    "profile": "paper",           # paper (the reference settings) | fast (tests, demos)
    "batch_size": 64,             # global batch per optimizer step
    "lr_scaling": "linear",       # none | linear | sqrt, against base_batch_size
    "base_batch_size": 256,
    "warmup_epochs": 0,
    "epsilon": 16 / 255,
    "norm": "linf",               # linf | l2
    "tile": 0,                    # P > 0: each perturbation is one P x P tile repeated over the
                                  # image, a stationary pattern that crops and shifts keep (0: off)
    "clusters": 10,
    "target_offset": 1,
    "cache": "auto",              # reader cache: auto | always | never
    "cache_budget_mib": 0,        # per rank, for cache=auto (0: a quarter of the node's free
                                  # memory shared by its local ranks)
    "resume": False,
    "surrogate": {
        "arch": "resnet18",       # resnet18 | resnet50
        "weights": "pretrain",    # pretrain | imagenet | PATH to a state dict
        "epochs": 10,
        "lr": 1e-3,
        "weight_decay": 5e-4,
        "batch_size": 128,
        "stem": "auto",           # auto (small for <= 64 px) | small (3x3, no max-pool) | standard
        "input_size": None,       # an int: bilinear resize on device before the network
        "min_val_acc": 0.5,       # warn loudly below this clean validation accuracy
        "micro_batch": 0,         # images per forward per rank (0: the whole local batch);
                                  # gradients accumulate, one all-reduce per step
        "augment": False,         # train it with the ue victim's crop + flip (victim.ue.crop_padding;
                                  # pretrain only; no deeper on BreastMNIST, docs/efficacy.md)
        "optimizer": "adam",      # adam | sgd (momentum 0.9, cosine; surrogate.lr is its lr: the
                                  # ue victim's and em's is 0.1; pretrain only)
        "snapshots": 0,           # also keep the weights at this many evenly spaced earlier epochs
                                  # (pretrain only): the targeted refinement then steps through
                                  # them in training order before the final surrogate (0: final
                                  # only; 9 measured no deeper on BreastMNIST, docs/efficacy.md)
    },
    "kmeans": {"iters": 100, "tol": 1e-4, "init_sample": 10000},
    "generator": {
        "epochs": 30,
        "lr": 1e-4,
        "min_lr": 1e-6,
        "weight_decay": 5e-4,
        "base_filters": 64,
        "n_down": 2,
        "n_blocks": 6,
        "train_on": "all",        # all | cluster
        "target": "next",         # next (k + target_offset) | farthest | cross_class
        "augment": False,         # expectation over the ue victim's crop + flip in the loss
        "boundary": "clip",       # clip | reflect: how x + delta stays in [0, 1]
        "bf16": False,            # autocast bf16 (GPU/CPUs with bf16 support)
        "micro_batch": 0,         # images per surrogate forward per rank (0: the whole local
                                  # batch; with train_on=all, K x it): bounds activation memory
    },
    "em": {                       # method=em (Huang et al. 2021), global batch = batch_size
        "rounds": 10,             # at most this many rounds of (model steps, noise steps)
        "train_steps": 10,        # model steps per round (em.optimizer, cosine schedule)
        "pgd_steps": 20,          # signed-gradient steps on each image's delta per round
        "step_size": 0.1,         # per step, as a fraction of epsilon
        "stop_accuracy": 0.99,    # stop once the model fits the perturbed training split this well
        "restart_every": 0,       # re-initialise the model every this many rounds (0: never;
                                  # no deeper on BreastMNIST or digits, docs/efficacy.md)
        "patch": 1,               # delta constant on patch x patch blocks, moved as one (1: per
                                  # pixel, the paper's; > 1: low-frequency noise)
        "init": "uniform",        # where each image's delta starts: uniform noise of its own
                                  # (the paper's) | classwise (its class's random pattern, as
                                  # method=classwise draws it; single-label sets)
        "objective": "auto",      # min: noise that lowers the loss of its true class, for a model
                                  # trained on x + delta (the paper's) | targeted: noise toward the
                                  # next class (y + 1 mod classes), for a model trained on clean
                                  # images (adversarial poisoning, Fowl et al. 2021; one class per image;
                                  # stop_accuracy then counts x + delta taken for the next class) |
                                  # auto: targeted where each image has one class, min on multi-label
        "augment": True,          # the ue victim's crop + flip inside both steps (expectation):
                                  # deeper on BreastMNIST, both protocols; digits: nothing protects
                                  # (docs/efficacy.md)
        "arch": "resnet18",
        "stem": "auto",           # auto (small for <= 64 px) | small | standard
        "optimizer": "sgd",       # sgd (momentum 0.9, em.lr, em.weight_decay; the paper's) | adam
                                  # (em.adam_lr, no weight decay: the medmnist victim's defaults)
        "lr": 0.1,                # sgd's, at global batch 128, scaled like the others (lr_scaling)
        "weight_decay": 5e-4,     # sgd's
        "adam_lr": 1e-3,          # adam's, at global batch 128, scaled the same way
    },
    "export": {
        "npz": True,              # also write RUN_DIR/protected.npz (MedMNIST's layout, streamed)
        "chunk_mib": 64,          # float32 working memory per export chunk (one shard per chunk)
    },
    "refine": {                   # per-sample refinement of the cluster delta at export
        "steps": "auto",          # projected signed-gradient steps per image (0: off) | auto:
                                  # 200 where the targeted objective applies (method=uc, one class
                                  # per image, a surrogate head trained on the labels), else 0
        "step_size": 0.1,         # per step, as a fraction of epsilon
        "objective": "auto",      # uc: UC's own loss (KL to the cluster's target); targeted: the
                                  # surrogate's loss of the next class, y + 1 (single-label sets) |
                                  # auto: targeted where it applies (as above), else uc
        "augment": True,          # the ue victim's crop + flip drawn afresh at every step (an
                                  # expectation), per image from (seed, sample id, step)
        "init": "cluster",        # where each image's refinement starts: its cluster's delta |
                                  # uniform noise in the budget from (seed, sample id), as em's
        "momentum": 0.0,          # > 0: step along the sign of a running sum of normalised
                                  # gradients, this times the last plus the new (MI-FGSM; 0: off)
        "batch_mib": 1024,        # activations kept per refinement batch and rank: as many images go
    },                            # through the surrogate at once (at most 256, or surrogate.micro_batch)
    "victim": {                   # MedMNIST v2's protocol by default
        "arch": "resnet18",
        "stem": "auto",           # auto (small for <= 64 px) | small | standard
        "epochs": 100,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "batch_size": 128,        # global; lr is scaled against base_batch_size 128
        "base_batch_size": 128,
        "milestones": [0.5, 0.75],  # x0.1 at these fractions of training
        "select": "auc",          # keep the epoch with the best validation auc | acc
        "input_norm": "medmnist", # medmnist (0.5 / 0.5) | imagenet statistics
        "micro_batch": 0,         # images per forward per rank (0: the whole local batch), both protocols
        "ue": {                   # the Unlearnable Examples literature's protocol (arch, stem,
            "epochs": 30,         # input_norm and batch_size shared with the keys above)
            "lr": 0.1,            # SGD, scaled like victim.lr against victim.base_batch_size
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "crop_padding": 4,    # random crop with this zero padding (<= 64 px), then h-flip
        },
    },
    "evaluate": {
        "protocols": ["medmnist", "ue"],  # victim protocols: medmnist (Adam, best val epoch) | ue
        "recalibrate_samples": 100,       # clean labelled val images an attacker re-fits the head on
        "floor": False,                   # also a victim on shuffled labels per protocol: what one
    },                                    # that learned nothing reads on these splits
    "defenses": [],               # jpeg10, jpeg50, grayscale, cutmix, mixup, pgd
    "defense": {"pgd_epsilon": 8 / 255, "pgd_steps": 5, "pgd_step_size": 2 / 255},
}

PROTOCOLS = ("medmnist", "ue")

PROFILES: dict[str, dict[str, Any]] = {
    "paper": {},
    "fast": {
        "surrogate": {"epochs": 4},
        "generator": {"epochs": 4, "base_filters": 16, "n_blocks": 2, "lr": 1e-3},
        "victim": {"epochs": 10, "ue": {"epochs": 10}},
    },
}

CHOICES = {
    "method": ("uc", "classwise", "ar", "em"),
    "backend": ("auto", "horovod", "torch", "mpi"),
    "profile": tuple(PROFILES),
    "lr_scaling": ("none", "linear", "sqrt"),
    "norm": ("linf", "l2"),
    "cache": ("auto", "always", "never"),
    "surrogate.arch": ("resnet18", "resnet50"),
    "surrogate.stem": ("auto", "small", "standard"),
    "victim.arch": ("resnet18", "resnet50"),
    "em.arch": ("resnet18", "resnet50"),
    "em.stem": ("auto", "small", "standard"),
    "surrogate.optimizer": ("adam", "sgd"),
    "refine.init": ("cluster", "uniform"),
    "em.init": ("uniform", "classwise"),
    "em.optimizer": ("sgd", "adam"),
    "em.objective": ("auto", "min", "targeted"),
    "refine.objective": ("auto", "uc", "targeted"),
    "victim.stem": ("auto", "small", "standard"),
    "victim.select": ("auc", "acc"),
    "victim.input_norm": ("medmnist", "imagenet"),
    "generator.train_on": ("all", "cluster"),
    "generator.target": ("next", "farthest", "cross_class"),
    "generator.boundary": ("clip", "reflect"),
}
# Keys added after run directories existed, each with the value that does what runs did before
# the key: a stage's inputs leave a key out at this value (hpc_uc.rundir.stage_inputs), so a new
# knob at its neutral default re-runs nothing in an older run directory. A key whose default
# changes behaviour does not belong here.
NEUTRAL: dict[str, Any] = {
    "surrogate.augment": False, "surrogate.snapshots": 0, "surrogate.optimizer": "adam",
    "refine.init": "cluster", "refine.momentum": 0.0,
    "refine.batch_mib": 1024,  # moves the batch split only (float rounding), not what is computed
}


def at_neutral(value: Any, neutral: Any) -> bool:
    """``value == neutral``, a bool never equal to a number (0 and 0.0 are)."""
    return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)


def moved_from_neutral(cfg: dict, *keys: str) -> list[str]:
    """Those of the NEUTRAL ``keys`` that ``cfg`` sets to another value."""
    return [key for key in keys if not at_neutral(get(cfg, key), NEUTRAL[key])]


INF = float("inf")
# Every other leaf key: (kind, lowest, highest); kind is int | int? (or null) | int|auto | number |
# bool | text | list, and
# None in a bound means open. One table, checked before any work (tests keep it complete).
RULES: dict[str, tuple[str, float | None, float | None]] = {
    "dataset": ("text", None, None), "data_dir": ("text", None, None), "run_dir": ("text", None, None),
    "seed": ("int", 0, 2**32 - 1), "batch_size": ("int", 1, INF), "base_batch_size": ("int", 1, INF),
    "warmup_epochs": ("int", 0, INF), "clusters": ("int", 2, INF), "target_offset": ("int", 1, INF),
    "resume": ("bool", None, None), "defenses": ("list", None, None), "cache_budget_mib": ("number", 0, INF),
    "tile": ("int", 0, INF),
    "surrogate.weights": ("text", None, None), "surrogate.epochs": ("int", 0, INF),
    "surrogate.lr": ("number", 0, INF), "surrogate.weight_decay": ("number", 0, INF),
    "surrogate.batch_size": ("int", 1, INF), "surrogate.input_size": ("int?", 8, INF),
    "surrogate.min_val_acc": ("number", 0, 1), "surrogate.micro_batch": ("int", 0, INF),
    "surrogate.snapshots": ("int", 0, INF), "surrogate.augment": ("bool", None, None),
    "kmeans.iters": ("int", 1, INF), "kmeans.tol": ("number", 0, INF), "kmeans.init_sample": ("int", 1, INF),
    "generator.epochs": ("int", 0, INF), "generator.lr": ("number", 0, INF),
    "generator.min_lr": ("number", 0, INF), "generator.weight_decay": ("number", 0, INF),
    "generator.base_filters": ("int", 1, INF), "generator.n_down": ("int", 0, 6),
    "generator.n_blocks": ("int", 0, INF), "generator.augment": ("bool", None, None),
    "generator.bf16": ("bool", None, None), "generator.micro_batch": ("int", 0, INF),
    "em.rounds": ("int", 0, INF), "em.train_steps": ("int", 0, INF), "em.pgd_steps": ("int", 0, INF),
    "em.restart_every": ("int", 0, INF), "em.patch": ("int", 1, INF),
    "em.step_size": ("number", 0, 1), "em.stop_accuracy": ("number", 0, 1), "em.augment": ("bool", None, None),
    "em.lr": ("number", 0, INF), "em.weight_decay": ("number", 0, INF), "em.adam_lr": ("number", 0, INF),
    "export.npz": ("bool", None, None), "export.chunk_mib": ("number", 0, INF), "refine.steps": ("int|auto", 0, INF), "refine.step_size": ("number", 0, INF),
    "refine.augment": ("bool", None, None), "refine.momentum": ("number", 0, 1),
    "refine.batch_mib": ("number", 0, INF),
    "victim.epochs": ("int", 0, INF), "victim.lr": ("number", 0, INF), "victim.weight_decay": ("number", 0, INF),
    "victim.batch_size": ("int", 1, INF), "victim.base_batch_size": ("int", 1, INF),
    "victim.milestones": ("list", None, None), "victim.micro_batch": ("int", 0, INF),
    "victim.ue.epochs": ("int", 0, INF), "victim.ue.lr": ("number", 0, INF), "victim.ue.momentum": ("number", 0, 1),
    "victim.ue.weight_decay": ("number", 0, INF), "victim.ue.crop_padding": ("int", 0, INF),
    "evaluate.protocols": ("list", None, None), "evaluate.recalibrate_samples": ("int", 0, INF),
    "evaluate.floor": ("bool", None, None),
    "defense.pgd_epsilon": ("number", 0, 1), "defense.pgd_steps": ("int", 0, INF),
    "defense.pgd_step_size": ("number", 0, 1),
}
POSITIVE = {"surrogate.lr", "generator.lr", "victim.lr", "victim.ue.lr", "export.chunk_mib", "refine.batch_mib", "em.lr", "em.adam_lr"}  # > 0, not just >= 0


def merge(base: dict, update: dict, where: str = "") -> dict:
    """Deep-merge ``update`` into a copy of ``base``; unknown keys are an error."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        name = f"{where}{key}"
        if key not in out:
            raise UserError(f"unknown config key '{name}'")
        if isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"config key '{name}' is a section, not a value")
            out[key] = merge(out[key], value, f"{name}.")
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict:
    """`a.b=value` -> {"a": {"b": value}}, the value parsed as YAML (numbers, bools, null)."""
    if "=" not in text:
        raise UserError(f"override '{text}' is not key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> dict:
    """Resolve a config file plus overrides into one validated dict."""
    file_cfg: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found")
        try:
            file_cfg = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}")
        if not isinstance(file_cfg, dict):
            raise UserError(f"config file {path} must hold a mapping")
    file_profiles = file_cfg.pop("profiles", {}) or {}
    if not isinstance(file_profiles, dict):
        raise UserError(f"config file {path}: profiles must be a mapping of profile name to settings")
    for name, section in file_profiles.items():  # every section, not only the one in use
        if name not in PROFILES:
            raise UserError(f"config file {path}: profiles.{name} is not a profile (one of {', '.join(PROFILES)})")
        merge(DEFAULTS, section or {}, f"profiles.{name}.")
    cli = [parse_override(o) for o in overrides]
    profile = file_cfg.get("profile", DEFAULTS["profile"])
    for item in cli:
        profile = item.get("profile", profile)
    if profile not in PROFILES:
        raise UserError(f"profile must be one of {', '.join(PROFILES)}, not {profile!r}")
    cfg = merge(DEFAULTS, PROFILES[profile])
    cfg = merge(cfg, file_cfg)
    cfg = merge(cfg, file_profiles.get(profile, {}) or {})
    for item in cli:
        cfg = merge(cfg, item)
    cfg["profile"] = profile
    validate(cfg)
    return cfg


def get(cfg: dict, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = value[part]
    return value


def _checked(key: str, value: Any) -> Any:
    """``value`` if it is of ``key``'s kind and range (a number written as text, e.g. 1e-3, is
    read as one); otherwise a UserError naming the key and what it takes."""
    kind, low, high = RULES[key]
    wants = {"int": "an integer", "int?": "an integer or null", "int|auto": "an integer or auto",
             "number": "a number", "bool": "true or false", "text": "a non-empty string", "list": "a list"}[kind]
    if (kind == "int?" and value is None) or (kind == "int|auto" and value == "auto"):
        return value
    if kind == "number" and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "int?": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "int|auto": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v,
          "bool": lambda v: isinstance(v, bool), "text": lambda v: isinstance(v, str) and v.strip() != "",
          "list": lambda v: isinstance(v, list)}[kind](value)
    if not ok:
        raise UserError(f"{key} must be {wants}, not {value!r}")
    if low is not None and (value < low or value > high or (key in POSITIVE and value <= 0)):
        side = "> 0" if key in POSITIVE else f">= {low:g}"
        upper = "" if high == INF else f" and <= {high:g}"
        raise UserError(f"{key} must be {side}{upper}, not {value!r}")
    return value


def _set(cfg: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        cfg = cfg[part]
    cfg[last] = value


def validate(cfg: dict) -> None:
    """Checks that need no data: every key's type, range or choice, from CHOICES and RULES."""
    for key, allowed in CHOICES.items():
        value = get(cfg, key)
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise UserError(f"{key} must be one of {', '.join(map(str, allowed))}, not {value!r}")
    for key in RULES:
        _set(cfg, key, _checked(key, get(cfg, key)))
    eps = cfg["epsilon"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps <= 1:
        raise UserError(f"epsilon must be in (0, 1] (images are in [0, 1]), not {eps!r}")
    if not all(isinstance(d, str) for d in cfg["defenses"]):
        raise UserError(f"defenses must be a list of names such as [jpeg10, grayscale], not {cfg['defenses']!r}")
    milestones = cfg["victim"]["milestones"]
    if not all(isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m < 1 for m in milestones):
        raise UserError(f"victim.milestones must be a list of fractions in (0, 1), not {milestones!r}")
    protocols = cfg["evaluate"]["protocols"]
    if not protocols or len(set(map(str, protocols))) != len(protocols) or not set(protocols) <= set(PROTOCOLS):
        raise UserError(f"evaluate.protocols must be a non-empty list of distinct names from "
                        f"{', '.join(PROTOCOLS)}, not {protocols!r}")
    if cfg["method"] in ("ar", "em") and cfg["tile"] > 0:
        raise UserError(f"tile repeats a uc or classwise perturbation; set it to 0 for method={cfg['method']}")
    steps = cfg["refine"]["steps"]
    if cfg["method"] != "uc" and steps != "auto" and steps > 0:
        raise UserError(f"refine.steps refines UC's cluster perturbations; set it to 0 for method={cfg['method']}")
    if cfg["refine"]["objective"] != "auto" and (steps == 0 or cfg["method"] != "uc"):
        raise UserError(f"refine.objective={cfg['refine']['objective']} applies to method=uc with refine.steps > 0 "
                        f"(leave it auto otherwise)")
    r = cfg["refine"]
    if moved_from_neutral(cfg, "refine.init", "refine.momentum") and (steps == 0 or cfg["method"] != "uc"):
        raise UserError(f"refine.init={r['init']} and refine.momentum={r['momentum']} shape UC's refinement: they apply "
                        f"to method=uc with refine.steps > 0 (leave them at cluster and 0 otherwise)")
    snapshots, sur = cfg["surrogate"]["snapshots"], cfg["surrogate"]
    if snapshots and (sur["weights"] != "pretrain" or snapshots >= sur["epochs"]):
        raise UserError(f"surrogate.snapshots={snapshots} keeps earlier epochs of surrogate training: it needs "
                        f"surrogate.weights=pretrain and fewer snapshots than surrogate.epochs ({sur['epochs']})")
    for key in moved_from_neutral(cfg, "surrogate.augment", "surrogate.optimizer"):
        if sur["weights"] != "pretrain":
            setting = key if isinstance(get(cfg, key), bool) else f"{key}={get(cfg, key)}"
            raise UserError(f"{setting} trains the surrogate; surrogate.weights={sur['weights']} is not trained here "
                            f"(use surrogate.weights=pretrain, or leave {key} at its default)")
    if cfg["generator"]["min_lr"] > cfg["generator"]["lr"]:
        raise UserError(f"generator.min_lr ({cfg['generator']['min_lr']}) must not exceed generator.lr "
                        f"({cfg['generator']['lr']})")


def check_world(cfg: dict, world_size: int, key: str = "batch_size") -> int:
    """Per-rank batch for the global ``key``; an error when ranks cannot share it evenly."""
    batch = get(cfg, key)
    if batch < world_size or batch % world_size:
        raise UserError(f"{key}={batch} must be a multiple of the number of ranks ({world_size}) "
                        f"and at least that large")
    return batch // world_size


def scaled_lr(cfg: dict, lr: float, batch: int, base: int | None = None) -> float:
    """Learning rate scaled for the global batch against ``base`` (default base_batch_size)."""
    ratio = batch / (base or cfg["base_batch_size"])
    return {"none": lr, "linear": lr * ratio, "sqrt": lr * ratio ** 0.5}[cfg["lr_scaling"]]


def config_hash(cfg: dict) -> str:
    """sha256 of the resolved config (canonical JSON)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
