"""Which of a victim's epochs its clean-validation figures pick, and the turning attacker's reading.

``best``: the protocol's pick, the epoch with the highest ``victim.select`` figure (MedMNIST's
model selection). ``turned``: the pick of an attacker who holds the same clean validation images
and turns a victim's scores over when they rank the classes the wrong way round (AUC below
0.5): the epoch whose validation AUC is farthest from 0.5. Only where the protocol itself picks
an epoch (``medmnist``); the ``ue`` protocol reports its last epoch.
"""
from __future__ import annotations

from typing import Callable

from .protection import AUC_CHANCE, ranking_auc


class EpochPicks:
    """The best and the turned epoch seen so far, each with a copy of its model state."""

    def __init__(self, select: str, turning: bool) -> None:
        self.select, self.turning = select, turning
        self.best = {"score": -1.0, "val_acc": None, "val_auc": None, "state": None, "epoch": 0}
        self.turned = {"score": -1.0, "val_auc": None, "state": None, "epoch": 0}

    def see(self, epoch: int, scores: dict, state: Callable[[], dict]) -> None:
        """Epoch ``epoch`` (1-based) had validation ``scores`` ({"acc", "auc"}); ``state()``
        copies the model's state, called only for an epoch that is picked."""
        score = scores[self.select] if scores[self.select] is not None else scores["acc"]
        if score > self.best["score"]:
            self.best.update(score=score, val_acc=scores["acc"], val_auc=scores["auc"], state=state(),
                             epoch=epoch)
        ranking = ranking_auc(scores["auc"])
        if self.turning and ranking is not None and ranking > self.turned["score"]:
            self.turned.update(score=ranking, val_auc=scores["auc"],
                               state=self.best["state"] if self.best["epoch"] == epoch else state(),
                               epoch=epoch)


def turned_reading(turned: dict, at_turned: dict) -> dict:
    """The turning attacker's figures from ``measure``'s figures of its epoch (``at_turned``;
    empty off rank 0): the test AUC turned over when the epoch's validation AUC is below 0.5,
    and the re-fit accuracy."""
    auc = at_turned.get("test_auc")
    if auc is not None and turned["val_auc"] < AUC_CHANCE:
        auc = 1.0 - auc
    return {"turned_epoch": turned["epoch"], "turned_val_auc": turned["val_auc"], "turned_test_auc": auc,
            "turned_recalibrated_acc": at_turned.get("recalibrated_acc")}
