"""Protection figures: the share of the clean-vs-chance gap that the protection closes.

For a metric m, share = (clean_m - protected_m) / (clean_m - chance_m), clipped to [0, 1]:
0 = the protected victim is as good as the clean one, 1 = it is no better than chance.
Chance is the test split's majority rate for the accuracies and 0.5 for AUC. A protected
AUC below 0.5 is read as 1 - AUC: a victim that ranks the classes the wrong way round still
separates them, and an attacker with a few labelled images turns its scores over (measured:
AUC 0.146 on an RGB copy of BreastMNIST). Where the victim protocol picks an epoch on clean
validation images (``medmnist``), the same attacker also picks the epoch whose validation AUC
is farthest from 0.5 and turns its scores over when that AUC is below 0.5 (``turned_*``): the
AUC and re-fit readings are the higher of the two epochs'. The headline is the smallest share:
a protection is only as deep as its weakest reading.
"""
from __future__ import annotations

METRICS = ("acc", "auc", "recalibrated_acc")
VICTIM_FIELD = {"acc": "test_acc", "auc": "test_auc", "recalibrated_acc": "recalibrated_acc"}
TURNED_FIELD = {"auc": "turned_test_auc", "recalibrated_acc": "turned_recalibrated_acc"}
AUC_CHANCE = 0.5
SHALLOW_MARGIN = 0.25  # "shallow": accuracy share this much above the weakest other share,
SHALLOW_BELOW = 0.5    # and that weakest share keeps more than half of the clean skill
WEAK_CLEAN_GAP = 0.05  # a clean victim this close to chance makes the shares unstable
UNFIT_SHARE = 0.5      # a victim whose final training loss keeps this share of the prior's did not fit


def gap_closed(clean: float | None, protected: float | None, chance: float) -> float | None:
    """(clean - protected) / (clean - chance) clipped to [0, 1]; None when undefined (a missing
    figure, or a clean victim no better than chance)."""
    if clean is None or protected is None or clean - chance <= 1e-12:
        return None
    return min(1.0, max(0.0, (clean - protected) / (clean - chance)))


def ranking_auc(auc: float | None) -> float | None:
    """How well scores separate the classes whichever way round they rank: max(AUC, 1 - AUC)."""
    return None if auc is None else AUC_CHANCE + abs(auc - AUC_CHANCE)


def attacker_reading(victim: dict) -> dict[str, float | None]:
    """What the attacker reads from a victim: {"acc", "auc", "recalibrated_acc"}, the AUC as
    ranked (``ranking_auc``), the AUC and re-fit the higher of the kept and the turned epoch's."""
    reading = {m: victim.get(VICTIM_FIELD[m]) for m in METRICS}
    reading["auc"] = ranking_auc(reading["auc"])
    for m, field in TURNED_FIELD.items():  # the turning attacker's epoch, where it reads higher
        if victim.get(field) is not None:
            reading[m] = victim[field] if reading[m] is None else max(reading[m], victim[field])
    return reading


def protection_figures(clean: dict, protected: dict, chance_acc: float) -> dict[str, float | None]:
    """{"acc", "auc", "recalibrated_acc", "headline"} for one victim protocol."""
    chance = {"acc": chance_acc, "auc": AUC_CHANCE, "recalibrated_acc": chance_acc}
    reading = attacker_reading(protected)
    out = {m: gap_closed(clean.get(VICTIM_FIELD[m]), reading[m], chance[m]) for m in METRICS}
    defined = [v for v in out.values() if v is not None]
    out["headline"] = min(defined) if defined else None
    return out


def shallow(figures: dict) -> bool:
    """Accuracy falls while AUC or the recalibrated accuracy mostly do not."""
    acc, rest = figures.get("acc"), [figures.get(m) for m in ("auc", "recalibrated_acc")]
    rest = [v for v in rest if v is not None]
    return (acc is not None and bool(rest) and acc - min(rest) >= SHALLOW_MARGIN
            and min(rest) < SHALLOW_BELOW)


def weak_clean_victim(clean: dict, chance_acc: float) -> bool:
    """The clean victim itself is barely above the majority rate: there is little gap to close."""
    return clean.get("test_acc") is not None and clean["test_acc"] - chance_acc < WEAK_CLEAN_GAP


def unfit_victim(victim: dict, prior: float | None) -> bool:
    """The victim's final training loss is still more than UNFIT_SHARE of what predicting the
    class prior gives: it learned little from its training copy (clean or protected)."""
    loss = victim.get("final_train_loss")
    return loss is not None and prior is not None and prior > 0 and loss > UNFIT_SHARE * prior
