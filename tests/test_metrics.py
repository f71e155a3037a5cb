"""MedMNIST metrics against medmnist's own getACC/getAUC, chance level, imperceptibility."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from medmnist.evaluator import getACC, getAUC
from sklearn.metrics import accuracy_score, roc_auc_score
from torchmetrics.functional.image import structural_similarity_index_measure

from hpc_uc.errors import UserError
from hpc_uc.imperceptibility import imperceptibility
from hpc_uc.metrics import chance_accuracy, medmnist_metrics, probabilities

MULTI, BINARY, MULTILABEL, ORDINAL = ("multi-class", "binary-class", "multi-label, binary-class",
                                      "ordinal-regression")


def _reference(task: str, labels: np.ndarray, logits: np.ndarray) -> dict:
    """MedMNIST's pipeline: softmax/sigmoid in torch (its training script), then its evaluator."""
    t = torch.from_numpy(logits)
    probs = (torch.sigmoid(t) if task == MULTILABEL else torch.softmax(t, dim=1)).numpy()
    return {"acc": getACC(labels, probs, task), "auc": getAUC(labels, probs, task)}


def _case(task: str, n: int = 40, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random logits, informative about the labels, with every class present."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)).astype(np.float32)
    if task == MULTILABEL:
        labels = (rng.random((n, classes)) < 0.4).astype(np.int64)
        labels[0], labels[1] = 1, 0
        logits += 1.5 * (labels - 0.5)
    else:
        labels = (np.arange(n) % classes).astype(np.int64)[:, None]
        logits[np.arange(n), labels[:, 0]] += 1.0
    return labels, logits


@pytest.mark.parametrize("task,classes", [(MULTI, 4), (BINARY, 2), (MULTILABEL, 5), (ORDINAL, 5)])
def test_equals_medmnist_evaluator(task, classes):
    labels, logits = _case(task, classes=classes)
    got = medmnist_metrics(task, labels, logits)
    ref = _reference(task, labels, logits)
    assert got["acc"] == pytest.approx(ref["acc"], abs=1e-12)
    assert got["auc"] == pytest.approx(ref["auc"], abs=1e-12)
    assert 0.5 < got["auc"] < 1.0 and isinstance(got["acc"], float)


def test_multiclass_equals_sklearn():
    labels, logits = _case(MULTI, classes=4)
    probs = probabilities(MULTI, logits)
    got = medmnist_metrics(MULTI, labels, logits)
    assert got["acc"] == pytest.approx(accuracy_score(labels[:, 0], logits.argmax(1)))
    assert got["auc"] == pytest.approx(roc_auc_score(labels[:, 0], probs, multi_class="ovr"), abs=1e-6)


def test_multilabel_and_binary_equal_sklearn():
    labels, logits = _case(MULTILABEL, classes=3)
    got = medmnist_metrics(MULTILABEL, labels, logits)
    assert got["auc"] == pytest.approx(roc_auc_score(labels, logits, average="macro"))
    assert got["acc"] == pytest.approx(np.mean((logits > 0) == labels))
    labels, logits = _case(BINARY, classes=2)
    got = medmnist_metrics(BINARY, labels, logits)
    assert got["auc"] == pytest.approx(roc_auc_score(labels[:, 0], logits[:, 1] - logits[:, 0]))


def test_hand_made_values():
    labels = np.array([[0], [1], [2], [2]])
    logits = np.array([[3.0, 0, 0], [0, 2, 0], [0, 0, 1], [5, 0, 0]])
    assert medmnist_metrics(MULTI, labels, logits)["acc"] == 0.75
    # binary: threshold on softmax of the last class, i.e. logit1 > logit0
    got = medmnist_metrics(BINARY, np.array([[0], [1], [1], [0]]),
                           np.array([[1.0, 0], [0, 1], [2, 1], [0, 0]]))
    assert got == {"acc": 0.75, "auc": 0.625}  # pairs: 1, 1, 0.5, 0 of 4
    # multi-label: sigmoid > 0.5 per label (logit > 0), mean of per-label accuracies
    got = medmnist_metrics(MULTILABEL, np.array([[1, 0], [0, 1], [1, 1]]),
                           np.array([[2.0, -1], [-1, -1], [3, 0.5]]))
    assert got["acc"] == pytest.approx((1 + 2 / 3) / 2)
    assert got["auc"] == 0.875  # label 0: 1.0; label 1: (0.5 + 1) / 2


def test_undefined_auc_is_none():
    labels = np.array([[1, 0], [0, 0], [1, 0]])  # label 1 never positive: MedMNIST gives NaN
    logits = np.array([[1.0, 0], [0, 1], [2, 0]])
    with pytest.warns(Warning):
        assert math.isnan(getAUC(labels, logits, MULTILABEL))
    assert medmnist_metrics(MULTILABEL, labels, logits)["auc"] is None


def test_bad_inputs():
    with pytest.raises(UserError, match="unknown task"):
        medmnist_metrics("regression", np.zeros((2, 1), int), np.zeros((2, 2)))
    with pytest.raises(UserError, match="do not match"):
        medmnist_metrics(MULTI, np.zeros((3, 1), int), np.zeros((2, 2)))
    with pytest.raises(UserError, match="one column per label"):
        medmnist_metrics(MULTILABEL, np.zeros((2, 3), int), np.zeros((2, 2)))


def test_chance_accuracy():
    assert chance_accuracy(np.array([[0], [0], [1], [2]]), MULTI) == 0.5
    assert chance_accuracy(np.array([[1], [1], [1], [0]]), BINARY) == 0.75
    multilabel = np.array([[1, 0], [1, 0], [1, 0], [0, 0]])  # label rates 0.75 and 1.0
    assert chance_accuracy(multilabel, MULTILABEL) == 0.875
    majority_guess = np.tile([1.0, -1.0], (4, 1))  # label 0 positive, label 1 negative
    assert medmnist_metrics(MULTILABEL, multilabel, majority_guess)["acc"] == 0.875
    assert chance_accuracy(1 - multilabel, MULTILABEL) == 0.875


def _images(n: int = 2, size: int = 16, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def test_imperceptibility_identical():
    clean = _images()
    got = imperceptibility(clean, clean.copy())
    assert got["psnr_db"] is None and got["linf"] == 0.0 and got["l2"] == 0.0
    assert got["ssim"] == pytest.approx(1.0)


def test_imperceptibility_single_pixel():
    clean = np.full((2, 16, 16, 3), 100, np.uint8)
    protected = clean.copy()
    protected[1, 5, 7, 2] += 51  # 0.2 in [0, 1] units, in one of two images
    got = imperceptibility(clean, protected)
    assert got["linf"] == pytest.approx(0.2)
    assert got["l2"] == pytest.approx(0.2 / 2)  # mean over the two images
    mse = 0.2 ** 2 / clean.size
    assert got["psnr_db"] == pytest.approx(10 * math.log10(1 / mse))
    assert got["ssim"] < 1.0
    assert imperceptibility(clean, protected, batch_values=16 * 16 * 3) == pytest.approx(got)  # an image a batch


def test_imperceptibility_ssim_and_batching():
    clean = _images(n=5, channels=1)
    noise = np.random.default_rng(2).integers(-8, 9, clean.shape)
    protected = np.clip(clean.astype(int) + noise, 0, 255).astype(np.uint8)
    got = imperceptibility(clean, protected, batch_values=2 * 16 * 16)
    as_float = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).double() / 255  # noqa: E731
    ref = structural_similarity_index_measure(as_float(protected), as_float(clean), data_range=1.0)
    assert got["ssim"] == pytest.approx(float(ref))
    assert got["linf"] == pytest.approx(np.abs(protected.astype(int) - clean).max() / 255)
    assert got == pytest.approx(imperceptibility(clean, protected))
    with pytest.raises(UserError):
        imperceptibility(clean, protected[:3])


@pytest.mark.parametrize("shape", [(3, 16, 16, 1), (2, 23, 23, 3)])
def test_ssim_equals_torchmetrics(shape):
    """The separable SSIM gives torchmetrics' per-image values (its reference implementation)."""
    from hpc_uc.imperceptibility import ssim_per_image

    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.random(shape)).permute(0, 3, 1, 2)
    y = (x + torch.from_numpy(rng.normal(0, 0.05, shape)).permute(0, 3, 1, 2)).clamp(0, 1)
    ref = structural_similarity_index_measure(y, x, data_range=1.0, reduction="none")
    assert torch.allclose(ssim_per_image(y, x), ref, rtol=0, atol=1e-7)


def test_prior_loss_is_the_label_entropy():
    from hpc_uc.metrics import prior_loss

    labels = np.array([[0]] * 3 + [[1]])
    assert prior_loss(labels, "binary-class", 2) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert prior_loss(np.array([[2]] * 5), "multi-class", 3) == pytest.approx(0.0)
    multi = np.array([[1, 0], [0, 0]])
    assert prior_loss(multi, "multi-label, binary-class", 2) == pytest.approx((math.log(2) + 0.0) / 2, abs=1e-9)



def test_imperceptibility_working_memory_is_bounded_at_224px():
    """One SSIM batch at the default size stays within ~160 MiB of working memory at 224 px
    RGB (100 images, i.e. more than the 83 an older batch size took at once and peaked
    ranks at 2.3-2.7 GB with). Peak RSS of a fresh process, before and after."""
    import subprocess
    import sys

    code = ("import resource, numpy as np\n"
            "from hpc_uc.imperceptibility import imperceptibility\n"
            "rng = np.random.default_rng(0)\n"
            "clean = rng.integers(0, 256, (100, 224, 224, 3), dtype=np.uint8)\n"
            "protected = np.clip(clean.astype(np.int16) + rng.integers(-8, 9, clean.shape), 0, 255).astype(np.uint8)\n"
            "imperceptibility(clean[:1], protected[:1])\n"  # torch's own first-use allocations
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "imperceptibility(clean, protected)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown < 300, f"SSIM batches grew peak RSS by {grown} MiB"
