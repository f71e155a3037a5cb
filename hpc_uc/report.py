"""`hpc-uc report RUN_DIR`: results.json as a readable table (printed and saved as report.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .atomic import read_json, write_bytes
from .errors import UserError

# field -> allowed types (None allowed where a metric can be undefined); docs/results.md
_NUM = (int, float)
SCHEMA: dict[str, tuple] = {
    "results_version": (int,), "dataset": (str,), "task": (str,), "world_size": (int,),
    "backend": (str,), "batch_size": (int,), "epsilon": _NUM, "norm": (str,), "clusters": (int,),
    "seed": (int,), "profile": (str,), "surrogate_val_acc": _NUM + (type(None),),
    "clean": (dict,), "protected": (dict,), "protection_gain": _NUM, "chance_acc": _NUM,
    "psnr_db": _NUM + (type(None),), "ssim": _NUM, "linf": _NUM, "l2": _NUM,
    "defenses": (dict,), "stage_seconds": (dict,),
}
VICTIM_SCHEMA = {"test_acc": _NUM, "test_auc": _NUM + (type(None),)}


def validate_results(doc: Any) -> None:
    """Raise UserError unless ``doc`` follows the results.json schema."""
    if not isinstance(doc, dict):
        raise UserError("results.json must hold an object")
    missing = sorted(set(SCHEMA) - set(doc))
    if missing:
        raise UserError(f"results.json lacks {', '.join(missing)}")
    for key, kinds in SCHEMA.items():
        if not isinstance(doc[key], kinds) or isinstance(doc[key], bool):
            raise UserError(f"results.json: {key} has type {type(doc[key]).__name__}")
    victims = {"clean": doc["clean"], "protected": doc["protected"], **doc["defenses"]}
    for name, victim in victims.items():
        for key, kinds in VICTIM_SCHEMA.items():
            if not isinstance(victim, dict) or not isinstance(victim.get(key), kinds):
                raise UserError(f"results.json: {name}.{key} missing or of the wrong type")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render(doc: dict) -> str:
    """Markdown report of one run's results."""
    lines = [
        f"# hpc-uc report: {doc['dataset']}",
        "",
        f"{doc['world_size']} rank(s), backend {doc['backend']}, global batch {doc['batch_size']}, "
        f"epsilon {doc['epsilon']:.4f} ({doc['norm']}), K = {doc['clusters']}, profile {doc['profile']}, "
        f"surrogate val acc {_fmt(doc['surrogate_val_acc'])}",
        "",
        "| victim trained on | test ACC | test AUC |",
        "|---|---|---|",
        f"| clean | {_fmt(doc['clean']['test_acc'])} | {_fmt(doc['clean']['test_auc'])} |",
        f"| protected | {_fmt(doc['protected']['test_acc'])} | {_fmt(doc['protected']['test_auc'])} |",
    ]
    lines += [f"| protected + {name} | {_fmt(d['test_acc'])} | {_fmt(d['test_auc'])} |"
              for name, d in doc["defenses"].items()]
    lines += [
        "",
        f"- protection gain (clean - protected test ACC): **{_fmt(doc['protection_gain'])}**",
        f"- chance (majority class of the test split): {_fmt(doc['chance_acc'])}",
        f"- imperceptibility: PSNR {_fmt(doc['psnr_db'], 2)} dB, SSIM {_fmt(doc['ssim'])}, "
        f"L-inf {_fmt(doc['linf'], 4)}, mean L2 {_fmt(doc['l2'])}",
        "- wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in doc["stage_seconds"].items()),
    ]
    return "\n".join(lines) + "\n"


def report(run_dir: str | Path) -> str:
    """Validate RUN_DIR/results.json, write RUN_DIR/report.md, return the text."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise UserError(f"{path} not found: run `hpc-uc evaluate` (or `hpc-uc run`) first")
    doc = read_json(path)
    validate_results(doc)
    text = render(doc)
    write_bytes(Path(run_dir) / "report.md", text.encode())
    return text
