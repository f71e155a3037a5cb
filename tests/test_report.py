"""results.json version 2: schema validation and the report's protection headline."""
from __future__ import annotations

import copy

import pytest

from hpc_uc.errors import UserError
from hpc_uc.report import render, validate_results


def victim(acc, auc, recal, epoch=10):
    return {"test_acc": acc, "test_auc": auc, "recalibrated_acc": recal, "recalibrated_auc": None,
            "best_epoch": epoch, "reported_epoch": epoch, "epochs": 10, "seconds": 1.5}


def figures(acc, auc, recal):
    return {"acc": acc, "auc": auc, "recalibrated_acc": recal, "headline": min(acc, auc, recal)}


DOC = {
    "results_version": 2, "dataset": "breastmnist", "task": "binary-class", "world_size": 2,
    "backend": "horovod", "batch_size": 64, "epsilon": 16 / 255, "norm": "linf", "clusters": 3,
    "seed": 0, "profile": "fast", "generator": {"epochs": 3}, "surrogate_val_acc": 0.9,
    "chance_acc": 0.731, "recalibrate_samples": 100,
    "protocols": {
        "medmnist": {"clean": victim(0.86, 0.90, 0.84), "protected": victim(0.60, 0.80, 0.80),
                     "defenses": {"jpeg10": {**victim(0.80, 0.88, 0.83), "protection": figures(0.46, 0.05, 0.09)}}},
        "ue": {"clean": victim(0.85, 0.90, 0.83), "protected": victim(0.73, 0.52, 0.73), "defenses": {}},
    },
    "protection": {"medmnist": figures(1.0, 0.25, 0.36), "ue": figures(1.0, 0.95, 1.0)},
    "untrained": {"test_acc": 0.3, "test_auc": 0.5, "recalibrated_acc": 0.72, "recalibrated_auc": 0.7},
    "psnr_db": 30.1, "ssim": 0.8, "linf": 0.0627, "l2": 1.2, "stage_seconds": {"train": 3.0},
}


def test_a_complete_document_validates_and_leads_with_the_headlines():
    validate_results(DOC)
    text = render(DOC)
    first = text.split("\n\n")[1]
    assert "protection (medmnist victim): 0.250" in first and "**shallow**" in first
    assert "protection (ue victim): 0.950" in first and "deep" in first
    assert "| medmnist | jpeg10 | 0.460 |" in text
    assert "victims.png" in text and "untrained victim" in text
    assert "caution" not in text


def test_a_clean_victim_near_chance_is_flagged():
    doc = copy.deepcopy(DOC)
    doc["protocols"]["ue"]["clean"]["test_acc"] = 0.756
    text = render(doc)
    assert "caution: under this protocol the clean victim itself reaches only 0.756" in text
    assert text.count("caution") == 1


def test_a_clean_victim_that_did_not_fit_is_flagged():
    """BreastMNIST's ue victim at batch 128: final training loss 0.48 against the prior's 0.58."""
    doc = copy.deepcopy(DOC)
    doc["prior_loss"] = 0.58
    doc["protocols"]["medmnist"]["clean"]["final_train_loss"] = 0.004
    doc["protocols"]["ue"]["clean"]["final_train_loss"] = 0.48
    validate_results(doc)
    text = render(doc)
    assert "caution: under this protocol the clean victim did not fit its training set" in text
    assert "final training loss is 0.480, the class prior alone gives 0.580" in text
    assert text.count("caution") == 1  # medmnist's victim fit
    doc["protocols"]["ue"]["clean"]["final_train_loss"] = None
    assert "caution" not in render(doc)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(results_version=1), "results_version 1"),
    (lambda d: d.pop("protection"), "lacks protection"),
    (lambda d: d["protocols"]["ue"]["protected"].pop("recalibrated_acc"), "ue.protected.recalibrated_acc is missing"),
    (lambda d: d["protocols"]["medmnist"]["clean"].update(test_acc="high"), "medmnist.clean.test_acc has type str"),
    (lambda d: d["protection"]["ue"].pop("headline"), "protection.ue.headline is missing"),
    (lambda d: d["protocols"]["medmnist"]["defenses"]["jpeg10"].pop("protection"), "jpeg10.protection must be an object"),
    (lambda d: d["protection"].pop("ue"), "protocols and protection must name the same protocols"),
])
def test_a_damaged_document_is_refused_with_the_field_named(mutate, message):
    doc = copy.deepcopy(DOC)
    mutate(doc)
    with pytest.raises(UserError, match=message):
        validate_results(doc)


def test_the_run_line_names_only_what_the_method_used():
    text = render(DOC)  # uc: clusters and surrogate
    assert "K = 3" in text and "surrogate val acc 0.900" in text
    text = render({**DOC, "method": "em"})  # its own model: neither
    assert "method em" in text and "K = " not in text and "surrogate val acc" not in text
    text = render({**DOC, "method": "classwise"})  # the surrogate runs, for the report
    assert "K = " not in text and "surrogate val acc 0.900" in text


def test_the_turning_attackers_epoch_is_named_when_it_differs_from_the_kept_one():
    doc = copy.deepcopy(DOC)
    validate_results(doc)
    assert "turning attacker" not in render(doc)
    doc["protocols"]["medmnist"]["protected"].update(turned_epoch=4, turned_val_auc=0.28, turned_test_auc=0.71,
                                                     turned_recalibrated_acc=0.79)
    validate_results(doc)
    text = render(doc)
    assert ("- medmnist protected: the turning attacker keeps epoch 4 (validation AUC 0.280) and reads "
            "test AUC 0.710 turned over, recalibrated ACC 0.790") in text
    doc["protocols"]["medmnist"]["protected"]["turned_epoch"] = 10  # the kept epoch: nothing to add
    assert "turning attacker" not in render(doc)
