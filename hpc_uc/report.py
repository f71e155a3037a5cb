"""`hpc-uc report RUN_DIR`: results.json as a readable table (printed and saved as report.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .atomic import read_json, write_bytes
from .errors import UserError
from .stages import METHODS

# field -> allowed types (None allowed where a metric can be undefined); docs/results.md
_NUM = (int, float)
_OPT = _NUM + (type(None),)
SCHEMA: dict[str, tuple] = {
    "results_version": (int,), "dataset": (str,), "task": (str,), "world_size": (int,),
    "backend": (str,), "batch_size": (int,), "epsilon": _NUM, "norm": (str,), "clusters": (int,),
    "seed": (int,), "profile": (str,), "generator": (dict,), "surrogate_val_acc": _OPT,
    "chance_acc": _NUM, "recalibrate_samples": (int,), "protocols": (dict,), "protection": (dict,),
    "untrained": (dict,),
    "psnr_db": _OPT, "ssim": _NUM, "linf": _NUM, "l2": _NUM, "stage_seconds": (dict,),
}
VICTIM_SCHEMA = {"test_acc": _NUM, "test_auc": _OPT, "recalibrated_acc": _OPT, "recalibrated_auc": _OPT,
                 "best_epoch": (int,), "reported_epoch": (int,), "epochs": (int,), "seconds": _NUM}
PROTECTION_SCHEMA = {"acc": _OPT, "auc": _OPT, "recalibrated_acc": _OPT, "headline": _OPT}
READING_SCHEMA = {"acc": _NUM, "auc": _OPT, "recalibrated_acc": _OPT}


def _check_fields(where: str, doc: Any, schema: dict) -> None:
    if not isinstance(doc, dict):
        raise UserError(f"results.json: {where} must be an object")
    for key, kinds in schema.items():
        if key not in doc:
            raise UserError(f"results.json: {where}.{key} is missing")
        if not isinstance(doc[key], kinds) or isinstance(doc[key], bool):
            raise UserError(f"results.json: {where}.{key} has type {type(doc[key]).__name__}")


def validate_results(doc: Any) -> None:
    """Raise UserError unless ``doc`` follows the results.json schema (version 2)."""
    if not isinstance(doc, dict):
        raise UserError("results.json must hold an object")
    if doc.get("results_version") != 2:
        raise UserError(f"results.json has results_version {doc.get('results_version')!r}; this hpc-uc "
                        f"reads version 2 (rerun `hpc-uc evaluate`)")
    missing = sorted(set(SCHEMA) - set(doc))
    if missing:
        raise UserError(f"results.json lacks {', '.join(missing)}")
    _check_fields("results", doc, SCHEMA)
    if not doc["protocols"] or set(doc["protocols"]) != set(doc["protection"]):
        raise UserError("results.json: protocols and protection must name the same protocols")
    for protocol, victims in doc["protocols"].items():
        _check_fields(f"protocols.{protocol}", victims, {"clean": (dict,), "protected": (dict,),
                                                          "defenses": (dict,)})
        named = {"clean": victims["clean"], "protected": victims["protected"],
                 **{f"defenses.{n}": d for n, d in victims["defenses"].items()}}
        for name, victim in named.items():
            _check_fields(f"protocols.{protocol}.{name}", victim, VICTIM_SCHEMA)
        for name, d in victims["defenses"].items():
            _check_fields(f"protocols.{protocol}.defenses.{name}.protection", d.get("protection"),
                          PROTECTION_SCHEMA)
        if "floor" in victims:  # evaluate.floor
            _check_fields(f"protocols.{protocol}.floor", victims["floor"], VICTIM_SCHEMA)
            _check_fields(f"protocols.{protocol}.floor.reading", victims["floor"].get("reading"), READING_SCHEMA)
        _check_fields(f"protection.{protocol}", doc["protection"][protocol], PROTECTION_SCHEMA)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def verdict(figures: dict) -> str:
    """One sentence on how deep the protection is."""
    from .protection import shallow

    head = figures["headline"]
    if head is None:
        return "undefined (the clean victim is no better than chance)"
    if shallow(figures):
        return ("**shallow**: accuracy falls, but the victim still ranks the classes (AUC) or an "
                "attacker re-fitting its last layer on a few clean images recovers much of it")
    if head >= 0.8:
        return "deep: every reading is near chance"
    if head >= 0.5:
        return "partial: the weakest reading closes about half the gap or more"
    return "weak: the weakest reading keeps most of the clean victim's skill"


def render(doc: dict) -> str:
    """Markdown report of one run's results."""
    lines = [f"# hpc-uc report: {doc['dataset']}", ""]
    from .protection import unfit_victim, weak_clean_victim

    for protocol, figs in doc["protection"].items():
        lines.append(f"- **protection ({protocol} victim): {_fmt(figs['headline'])}** -- {verdict(figs)}")
        if weak_clean_victim(doc["protocols"][protocol]["clean"], doc["chance_acc"]):
            lines.append(f"  (caution: under this protocol the clean victim itself reaches only "
                         f"{_fmt(doc['protocols'][protocol]['clean']['test_acc'])} against a majority rate of "
                         f"{_fmt(doc['chance_acc'])}; the shares rest on a small gap -- train it longer)")
        clean = doc["protocols"][protocol]["clean"]
        if unfit_victim(clean, doc.get("prior_loss")):
            lines.append(f"  (caution: under this protocol the clean victim did not fit its training set: its "
                         f"final training loss is {_fmt(clean['final_train_loss'])}, the class prior alone gives "
                         f"{_fmt(doc['prior_loss'])}; a victim that learns little from either copy measures little "
                         f"-- give it more steps: more epochs or a smaller victim.batch_size)")
    method = doc.get("method", "uc")
    stages = METHODS[method].stages if method in METHODS else ()
    lines += [
        "",
        f"method {method}, {doc['world_size']} rank(s), backend {doc['backend']}, "
        f"global batch {doc['batch_size']}, epsilon {doc['epsilon']:.4f} ({doc['norm']}), "
        + (f"K = {doc['clusters']}, " if "cluster" in stages else "")  # only what the method used
        + f"profile {doc['profile']}, seed {doc['seed']}"
        + (f", surrogate val acc {_fmt(doc['surrogate_val_acc'])}" if "surrogate" in stages else ""),
        "",
        "Protection = share of the clean-vs-chance gap closed (0 none, 1 chance); the headline is "
        "the smallest of the three.",
        "",
        "| protocol | ACC | AUC | recalibrated ACC | headline |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {p} | {_fmt(f['acc'])} | {_fmt(f['auc'])} | {_fmt(f['recalibrated_acc'])} | "
              f"**{_fmt(f['headline'])}** |" for p, f in doc["protection"].items()]
    defended = [(p, n, d["protection"]) for p, v in doc["protocols"].items() for n, d in v["defenses"].items()]
    if defended:
        lines += ["", "Protection left when the attacker trains with a defense:", "",
                  "| protocol | defense | ACC | AUC | recalibrated ACC | headline |", "|---|---|---|---|---|---|"]
        lines += [f"| {p} | {n} | {_fmt(f['acc'])} | {_fmt(f['auc'])} | {_fmt(f['recalibrated_acc'])} | "
                  f"**{_fmt(f['headline'])}** |" for p, n, f in defended]
    lines += ["", f"| protocol | victim trained on | test ACC | test AUC | recalibrated ACC "
                  f"({doc['recalibrate_samples']} clean images) | reported epoch |",
              "|---|---|---|---|---|---|"]
    for protocol, victims in doc["protocols"].items():
        named = [("clean", victims["clean"]), ("protected", victims["protected"])]
        named += [(f"protected + {n}", d) for n, d in victims["defenses"].items()]
        lines += [f"| {protocol} | {n} | {_fmt(v['test_acc'])} | {_fmt(v['test_auc'])} | "
                  f"{_fmt(v['recalibrated_acc'])} | {v['reported_epoch']}/{v['epochs']} |" for n, v in named]
    lines += [f"- {protocol} {n}: the turning attacker keeps epoch {v['turned_epoch']} (validation AUC "
              f"{_fmt(v['turned_val_auc'])}) and reads test AUC {_fmt(v['turned_test_auc'])}"
              + (" turned over" if v["turned_val_auc"] < 0.5 else "")
              + f", recalibrated ACC {_fmt(v['turned_recalibrated_acc'])}"
              for protocol, victims in doc["protocols"].items() for n, v in victims.items()
              if n == "protected" and v.get("turned_epoch") not in (None, v["reported_epoch"])]
    lines += floor_lines(doc)
    lines += [
        "",
        f"- chance: majority rate of the test split {_fmt(doc['chance_acc'])} (ACC), 0.5 (AUC)",
        f"- floor of the re-fit: an untrained victim's features give recalibrated ACC "
        f"{_fmt(doc['untrained']['recalibrated_acc'])} (AUC {_fmt(doc['untrained']['recalibrated_auc'])}); "
        f"no protection can push the re-fit much below that",
        f"- imperceptibility: PSNR {_fmt(doc['psnr_db'], 2)} dB, SSIM {_fmt(doc['ssim'])}, "
        f"L-inf {_fmt(doc['linf'], 4)}, mean L2 {_fmt(doc['l2'])}",
        "- validation curves of the victims: [victims.png](victims.png)",
        "- wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in doc["stage_seconds"].items()),
    ]
    return "\n".join(lines) + "\n"


def floor_lines(doc: dict) -> list[str]:
    """Per protocol with a floor victim (evaluate.floor): what it reads beside the protected one."""
    from .protection import attacker_reading

    lines = []
    for protocol, victims in doc["protocols"].items():
        if "floor" not in victims:
            continue
        floor, protected = victims["floor"]["reading"], attacker_reading(victims["protected"])
        above = ("" if floor["auc"] is None or protected["auc"] is None
                 else f", {protected['auc'] - floor['auc']:+.3f} against the floor")
        lines.append(f"- {protocol} floor: a victim trained on shuffled labels (it learned nothing about them) "
                     f"reads AUC {_fmt(floor['auc'])} and recalibrated ACC {_fmt(floor['recalibrated_acc'])}; "
                     f"the protected victim reads AUC {_fmt(protected['auc'])}{above}, recalibrated ACC "
                     f"{_fmt(protected['recalibrated_acc'])}")
    return lines


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
