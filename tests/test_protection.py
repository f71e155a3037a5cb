"""Protection figures on hand-made numbers: the share of the clean-vs-chance gap closed."""
from __future__ import annotations

import pytest

from hpc_uc.protection import attacker_reading, gap_closed, protection_figures, shallow


def victim(acc, auc, recal):
    return {"test_acc": acc, "test_auc": auc, "recalibrated_acc": recal}


def test_gap_closed_is_a_clipped_share():
    assert gap_closed(0.9, 0.5, 0.1) == pytest.approx(0.5)
    assert gap_closed(0.9, 0.05, 0.1) == 1.0     # below chance counts as chance, not more
    assert gap_closed(0.9, 0.95, 0.1) == 0.0     # protected better than clean: no protection
    assert gap_closed(0.1, 0.05, 0.1) is None    # a clean victim at chance defines no gap
    assert gap_closed(None, 0.5, 0.1) is None


def test_reversed_ranking_is_read_as_the_ranking_it_hides():
    """A protected AUC of 0.146 separates the classes as well as 0.854 does: the attacker
    turns the scores over, so the AUC share is that of 0.854, not 1."""
    figs = protection_figures(victim(0.936, 0.928, 0.891), victim(0.731, 0.146, 0.769), chance_acc=0.731)
    assert figs["auc"] == pytest.approx((0.928 - 0.854) / (0.928 - 0.5))
    assert figs["headline"] == pytest.approx(figs["auc"])
    assert protection_figures(victim(0.9, 0.9, 0.9), victim(0.7, 0.5, 0.7), 0.7)["auc"] == 1.0


def test_turning_attackers_epoch_counts_where_it_reads_higher():
    """A medmnist victim kept at a near-chance epoch (AUC 0.55) whose other epoch ranks the
    classes the wrong way round (turned over: 0.72) is read at 0.72, and its re-fit there too."""
    clean = victim(0.86, 0.88, 0.84)
    kept = victim(0.731, 0.55, 0.735)
    turned = {**kept, "turned_test_auc": 0.72, "turned_recalibrated_acc": 0.80}
    plain = protection_figures(clean, kept, chance_acc=0.731)
    figs = protection_figures(clean, turned, chance_acc=0.731)
    assert plain["auc"] == pytest.approx((0.88 - 0.55) / (0.88 - 0.5))
    assert figs["auc"] == pytest.approx((0.88 - 0.72) / (0.88 - 0.5))
    assert figs["recalibrated_acc"] == pytest.approx((0.84 - 0.80) / (0.84 - 0.731))
    assert figs["headline"] == pytest.approx(figs["recalibrated_acc"])
    lower = {**kept, "turned_test_auc": 0.52, "turned_recalibrated_acc": 0.70}  # never read lower
    assert protection_figures(clean, lower, chance_acc=0.731) == plain


def test_attacker_reading_is_what_the_shares_are_taken_of():
    """The raw figures an attacker reads (bench/reading_floor.py reads victims with it): the
    AUC as ranked, the turning attacker's epoch where it reads higher, the accuracy as is."""
    kept = {**victim(0.731, 0.40, 0.735), "turned_test_auc": 0.58, "turned_recalibrated_acc": 0.70}
    assert attacker_reading(kept) == pytest.approx({"acc": 0.731, "auc": 0.60, "recalibrated_acc": 0.735})
    assert attacker_reading(victim(0.7, None, None)) == {"acc": 0.7, "auc": None, "recalibrated_acc": None}
    assert attacker_reading({**victim(0.7, None, None), "turned_test_auc": 0.62})["auc"] == 0.62


def test_binary_victim_that_answers_one_class():
    """The issue's binary set: ACC below the majority rate, AUC and the re-fit still high."""
    figs = protection_figures(victim(0.862, 0.959, 0.85), victim(0.375, 0.780, 0.80), chance_acc=0.625)
    assert figs["acc"] == 1.0
    assert figs["auc"] == pytest.approx((0.959 - 0.780) / (0.959 - 0.5))
    assert figs["recalibrated_acc"] == pytest.approx((0.85 - 0.80) / (0.85 - 0.625))
    assert figs["headline"] == pytest.approx(figs["recalibrated_acc"])
    assert shallow(figs)


def test_multilabel_chance_is_the_mean_majority_rate():
    figs = protection_figures(victim(0.95, 0.90, 0.93), victim(0.85, 0.55, 0.923), chance_acc=0.85)
    assert figs["acc"] == 1.0 and figs["auc"] == pytest.approx(0.875)
    assert figs["recalibrated_acc"] == pytest.approx(0.0875)
    assert figs["headline"] == pytest.approx(0.0875)


def test_deep_but_uneven_protection_is_not_called_shallow():
    """BreastMNIST measured: ACC at the majority rate, AUC 0.571, re-fit 0.756 -- uneven, not shallow."""
    figs = protection_figures(victim(0.853, 0.877, 0.827), victim(0.635, 0.571, 0.756), chance_acc=0.731)
    assert figs["acc"] == 1.0 and figs["headline"] == pytest.approx(0.74, abs=0.01)
    assert not shallow(figs)


def test_ordinal_deep_protection_is_not_shallow():
    figs = protection_figures(victim(0.52, 0.72, 0.45), victim(0.26, 0.52, 0.26), chance_acc=0.25)
    assert figs["headline"] == pytest.approx(min(figs["acc"], figs["auc"], figs["recalibrated_acc"]))
    assert figs["headline"] > 0.9 and not shallow(figs)


def test_undefined_auc_and_missing_recalibration_leave_the_others():
    figs = protection_figures(victim(0.9, None, None), victim(0.5, None, None), chance_acc=0.1)
    assert figs["auc"] is None and figs["recalibrated_acc"] is None
    assert figs["headline"] == pytest.approx(0.5)
    none = protection_figures(victim(0.1, None, None), victim(0.1, None, None), chance_acc=0.1)
    assert none["headline"] is None
