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
    "backend": "auto",            # auto | horovod | torch | mpi
    "profile": "paper",           # paper (the reference settings) | fast (tests, demos)
    "batch_size": 64,             # global batch per optimizer step
    "lr_scaling": "linear",       # none | linear | sqrt, against base_batch_size
    "base_batch_size": 256,
    "warmup_epochs": 0,
    "epsilon": 16 / 255,
    "norm": "linf",               # linf | l2
    "clusters": 10,
    "target_offset": 1,
    "cache": "auto",              # reader cache: auto | always | never
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
    },
    "refine": {                   # per-sample refinement of the cluster delta at export
        "steps": 0,               # projected signed-gradient steps of UC's loss per image (0: off)
        "step_size": 0.25,        # per step, as a fraction of epsilon
    },
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
    },
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
    "backend": ("auto", "horovod", "torch", "mpi"),
    "profile": tuple(PROFILES),
    "lr_scaling": ("none", "linear", "sqrt"),
    "norm": ("linf", "l2"),
    "cache": ("auto", "always", "never"),
    "surrogate.arch": ("resnet18", "resnet50"),
    "surrogate.stem": ("auto", "small", "standard"),
    "victim.arch": ("resnet18", "resnet50"),
    "victim.stem": ("auto", "small", "standard"),
    "victim.select": ("auc", "acc"),
    "victim.input_norm": ("medmnist", "imagenet"),
    "generator.train_on": ("all", "cluster"),
    "generator.target": ("next", "farthest", "cross_class"),
    "generator.augment": (False, True),  # false | true
    "generator.boundary": ("clip", "reflect"),
}


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


def validate(cfg: dict) -> None:
    """Checks that need no data: ranges, choices and types."""
    for key, allowed in CHOICES.items():
        value = get(cfg, key)
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise UserError(f"{key} must be one of {', '.join(map(str, allowed))}, not {value!r}")
    eps = cfg["epsilon"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps <= 1:
        raise UserError(f"epsilon must be in (0, 1] (images are in [0, 1]), not {eps!r}")
    if not isinstance(cfg["defenses"], list):
        raise UserError(f"defenses must be a list such as [jpeg10, grayscale], not {cfg['defenses']!r}")
    for key in ("batch_size", "clusters", "surrogate.batch_size", "generator.epochs", "seed",
                "victim.epochs", "victim.batch_size"):
        value = get(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{key} must be a non-negative integer, not {value!r}")
    protocols = cfg["evaluate"]["protocols"]
    if (not isinstance(protocols, list) or not protocols or len(set(map(str, protocols))) != len(protocols)
            or not set(protocols) <= set(PROTOCOLS)):
        raise UserError(f"evaluate.protocols must be a non-empty list of distinct names from "
                        f"{', '.join(PROTOCOLS)}, not {protocols!r}")
    for key in ("victim.ue.epochs", "victim.ue.crop_padding", "evaluate.recalibrate_samples", "refine.steps"):
        value = get(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{key} must be a non-negative integer, not {value!r}")
    for key in ("victim.ue.lr", "victim.ue.momentum", "victim.ue.weight_decay", "refine.step_size"):
        value = get(cfg, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise UserError(f"{key} must be a non-negative number, not {value!r}")
    if cfg["batch_size"] < 1:
        raise UserError("batch_size must be at least 1")
    if cfg["clusters"] < 2:
        raise UserError(f"clusters (K) must be at least 2, not {cfg['clusters']}")


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
