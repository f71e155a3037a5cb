"""The run directory: where each stage's outputs live and whether they are up to date."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from .atomic import read_json, write_bytes, write_json
from .config import NEUTRAL, at_neutral, get
from .stages import RUN_KEYS, STAGES, method_stages, stage_keys

DATA_MANIFEST = "data manifest"


def _data_manifest_digest(cfg: dict) -> str | None:
    """The data directory's manifest (its shards' hashes): other data under the same path
    makes other inputs."""
    path = Path(str(cfg.get("data_dir", ""))) / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def without_neutral(inputs: dict) -> dict:
    """``inputs`` less every config.NEUTRAL key that is at its neutral value: a run directory
    made before the key existed, or with the key at that value, has the same inputs."""
    out = json.loads(json.dumps(inputs))  # a deep copy, in the form stages.json keeps it
    for dotted, neutral in NEUTRAL.items():
        *path, last = dotted.split(".")
        node = out
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node and at_neutral(node[last], neutral):
            del node[last]
    return out


def _digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def stage_inputs(cfg: dict, stage: str) -> dict:
    """Every config value ``stage`` (and the method's stages before it) depends on, less the
    new keys at their neutral values (:func:`without_neutral`), and the data's digest."""
    keys: list[str] = list(RUN_KEYS)
    for earlier in method_stages(cfg["method"]):
        keys += stage_keys(earlier.name, cfg["method"])
        if earlier.name == stage:
            break
    else:
        raise ValueError(f"method={cfg['method']} has no {stage} stage")
    return without_neutral({**{k: get(cfg, k) for k in keys}, DATA_MANIFEST: _data_manifest_digest(cfg)})


def stage_key(cfg: dict, stage: str) -> str:
    """Hash of :func:`stage_inputs`."""
    return _digest(stage_inputs(cfg, stage))


def _made_from(record: dict, cfg: dict, stage: str) -> bool:
    """Whether ``record``'s stage was made from this config's inputs: its key, or the inputs it
    recorded with the neutral keys taken out (records from before a key joined config.NEUTRAL)."""
    if record.get("key") == stage_key(cfg, stage):
        return True
    inputs = record.get("inputs")
    return isinstance(inputs, dict) and _digest(without_neutral(inputs)) == stage_key(cfg, stage)


def _differences(recorded: dict, current: dict) -> list[str]:
    return [f"{k} ({recorded.get(k)!r} then, {current.get(k)!r} now)" for k in sorted(set(recorded) | set(current))
            if recorded.get(k) != current.get(k)]


class RunDir:
    """Paths of one run's files, and the record of which stages completed for which config."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    surrogate = property(lambda self: self.root / "surrogate.pt")
    surrogate_snapshots = property(lambda self: self.root / "surrogate_snapshots.pt")
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
        """stage -> its record: {"key", "inputs", "files": {relative path: size}}."""
        return read_json(self._stages) if self._stages.is_file() else {}

    def _intact(self, record: dict) -> bool:
        files = record.get("files") if isinstance(record, dict) else None
        if not isinstance(files, dict):
            return False
        return all((self.root / rel).is_file() and (self.root / rel).stat().st_size == size
                   for rel, size in files.items())

    def is_done(self, cfg: dict, stage: str) -> bool:
        """Completed for this config and data, with its artifacts there and intact."""
        record = self.completed().get(stage)
        return isinstance(record, dict) and _made_from(record, cfg, stage) and self._intact(record)

    def why_not_done(self, cfg: dict, stage: str) -> str:
        """In words, why :meth:`is_done` is false (for an error message)."""
        record = self.completed().get(stage)
        if not isinstance(record, dict):
            return f"{stage} has not completed in {self.root}"
        if not _made_from(record, cfg, stage):
            diff = _differences(without_neutral(record.get("inputs", {})), stage_inputs(cfg, stage))
            return f"{stage}'s outputs in {self.root} were made from other inputs: {', '.join(diff) or 'unknown'}"
        missing = [rel for rel in record.get("files", {}) if not (self.root / rel).is_file()]
        return (f"{stage}'s outputs in {self.root} are " + (f"missing ({', '.join(missing)})" if missing
                else "damaged (a file changed size since the stage finished)"))

    def mark_done(self, cfg: dict, stage: str) -> None:
        done = self.completed()
        made = STAGES[stage].artifacts + STAGES[stage].optional
        files = {rel: (self.root / rel).stat().st_size for rel in made if (self.root / rel).is_file()}
        done[stage] = {"key": stage_key(cfg, stage), "inputs": stage_inputs(cfg, stage), "files": files}
        write_json(self._stages, done)

    def forget(self, stages) -> None:
        """Mark ``stages`` as not done (their inputs were replaced)."""
        done = self.completed()
        for stage in stages:
            done.pop(stage, None)
        write_json(self._stages, done)
