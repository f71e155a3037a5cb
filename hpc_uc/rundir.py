"""The run directory: where each stage's outputs live and whether they are up to date."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from .atomic import read_json, write_bytes, write_json
from .config import get

# Config keys each stage's output depends on (cumulative: a stage depends on earlier ones).
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "surrogate": ("dataset", "data_dir", "seed", "surrogate", "lr_scaling", "base_batch_size",
                  "warmup_epochs"),
    "cluster": ("clusters", "kmeans"),
    "train": ("batch_size", "epsilon", "norm", "target_offset", "generator"),
    "export": ("refine",),
    "evaluate": ("victim", "defenses", "defense", "evaluate"),
}
STAGES = tuple(STAGE_KEYS)


def stage_key(cfg: dict, stage: str) -> str:
    """Hash of every config value that ``stage`` (and the stages before it) depends on."""
    keys: list[str] = []
    for name in STAGES:
        keys += STAGE_KEYS[name]
        if name == stage:
            break
    values = {k: get(cfg, k) for k in keys}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


class RunDir:
    """Paths of one run's files, and the record of which stages completed for which config."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    surrogate = property(lambda self: self.root / "surrogate.pt")
    surrogate_info = property(lambda self: self.root / "surrogate.json")
    clusters = property(lambda self: self.root / "clusters.npz")
    checkpoint = property(lambda self: self.root / "generators" / "checkpoint.pt")
    generators = property(lambda self: self.root / "generators" / "generators.pt")
    perturbations = property(lambda self: self.root / "perturbations.h5")
    protected = property(lambda self: self.root / "protected")
    protected_npz = property(lambda self: self.root / "protected.npz")
    results = property(lambda self: self.root / "results.json")
    report = property(lambda self: self.root / "report.md")
    victims_png = property(lambda self: self.root / "victims.png")
    clean_victims = property(lambda self: self.root / "clean_victims.json")
    timings = property(lambda self: self.root / "timings.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    config = property(lambda self: self.root / "config.yaml")
    _stages = property(lambda self: self.root / "stages.json")

    def save_config(self, cfg: dict) -> None:
        write_bytes(self.config, yaml.safe_dump(cfg, sort_keys=True).encode())

    def completed(self) -> dict:
        return read_json(self._stages) if self._stages.is_file() else {}

    def is_done(self, cfg: dict, stage: str) -> bool:
        return self.completed().get(stage) == stage_key(cfg, stage)

    def mark_done(self, cfg: dict, stage: str) -> None:
        done = self.completed()
        done[stage] = stage_key(cfg, stage)
        write_json(self._stages, done)
