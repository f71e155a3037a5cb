"""The epochs a victim's validation figures pick: MedMNIST's best and the turning attacker's."""
from __future__ import annotations

import pytest

from hpc_uc.epoch_picks import EpochPicks, turned_reading


def feed(picks: EpochPicks, aucs: list[float]) -> list[int]:
    copied = []
    for epoch, auc in enumerate(aucs, start=1):
        picks.see(epoch, {"acc": 0.7, "auc": auc}, lambda e=epoch: copied.append(e) or {"epoch": e})
    return copied


def test_turned_pick_is_the_validation_auc_farthest_from_chance():
    picks = EpochPicks("auc", turning=True)
    copied = feed(picks, [0.55, 0.30, 0.58, 0.40])
    assert (picks.best["epoch"], picks.best["state"]) == (3, {"epoch": 3})
    assert (picks.turned["epoch"], picks.turned["val_auc"], picks.turned["state"]) == (2, 0.30, {"epoch": 2})
    assert copied == [1, 2, 3]  # a state is copied only for an epoch that is picked, once


def test_turned_pick_follows_the_best_when_no_epoch_ranks_the_wrong_way_round():
    picks = EpochPicks("auc", turning=True)
    feed(picks, [0.60, 0.70, 0.65])
    assert picks.best["epoch"] == picks.turned["epoch"] == 2
    assert picks.turned["state"] is picks.best["state"]


def test_a_protocol_that_reports_its_last_epoch_has_no_turned_pick():
    picks = EpochPicks("acc", turning=False)
    feed(picks, [0.55, 0.30])
    assert picks.turned["state"] is None and picks.best["epoch"] == 1


@pytest.mark.parametrize("val_auc, test_auc, read", [(0.30, 0.28, 0.72), (0.62, 0.64, 0.64), (0.30, 0.55, 0.45)])
def test_turned_reading_turns_the_test_auc_as_validation_says(val_auc, test_auc, read):
    figs = turned_reading({"epoch": 4, "val_auc": val_auc}, {"test_auc": test_auc, "recalibrated_acc": 0.8})
    assert figs == {"turned_epoch": 4, "turned_val_auc": val_auc, "turned_test_auc": pytest.approx(read),
                    "turned_recalibrated_acc": 0.8}
    assert turned_reading({"epoch": 4, "val_auc": val_auc}, {})["turned_test_auc"] is None  # off rank 0
