"""The UE protocol's batched crop + flip: correct pixels, and deterministic per (seed, rank, epoch)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hpc_uc import augment
from hpc_uc.augment import crop_flip, epoch_generator, random_crop


def batch(n=16, c=1, size=28):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(0))


def test_same_seed_rank_epoch_same_batch_and_others_differ():
    x = batch()
    a = crop_flip(x, epoch_generator(0, 0, 3))
    assert torch.equal(a, crop_flip(x, epoch_generator(0, 0, 3)))
    for other in (epoch_generator(1, 0, 3), epoch_generator(0, 1, 3), epoch_generator(0, 0, 4)):
        assert not torch.equal(a, crop_flip(x, other))


def test_crop_is_a_shift_inside_a_zero_border():
    x = batch(n=8, c=3, size=12)
    gen = epoch_generator(5, 0, 0)
    got = random_crop(x, gen, padding=4)
    gen = epoch_generator(5, 0, 0)
    dy, dx = (torch.randint(0, 9, (8,), generator=gen) for _ in range(2))
    padded = F.pad(x, (4,) * 4)
    for i in range(8):
        assert torch.equal(got[i], padded[i, :, dy[i]:dy[i] + 12, dx[i]:dx[i] + 12])
    assert (got == 0).any()  # some border came in


def test_flip_mirrors_about_half_the_images():
    x = batch(n=200)
    out = crop_flip(x, epoch_generator(0, 0, 0), padding=0)
    flipped = sum(torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x))
    same = sum(torch.equal(o, xi) for o, xi in zip(out, x))
    assert flipped + same == 200 and 70 < flipped < 130


def test_large_images_get_resized_crops_of_the_same_size():
    x = batch(n=4, c=3, size=96)
    out = crop_flip(x, epoch_generator(0, 0, 0))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out, x) and not torch.equal(out, x.flip(-1))
    assert torch.equal(out, crop_flip(x, epoch_generator(0, 0, 0)))


def test_keyed_draws_depend_on_the_image_key_alone():
    """refine.augment's crop + flip: image i's draws come from its key only (any batch, any
    rank), each draw a shift inside the zero border and a flip about half the time."""
    from hpc_uc.augment import augment_keys, keyed_crop_flip

    x = batch(n=200, c=1, size=12)
    ids = torch.arange(1000, 1200).numpy()
    whole = keyed_crop_flip(x, augment_keys(3, ids, step=7))
    parts = torch.cat([keyed_crop_flip(x[i:i + 37], augment_keys(3, ids[i:i + 37], step=7)) for i in range(0, 200, 37)])
    assert torch.equal(whole, parts)
    reordered = keyed_crop_flip(x.flip(0), augment_keys(3, ids[::-1].copy(), step=7))
    assert torch.equal(reordered, whole.flip(0))
    for other in (augment_keys(4, ids, 7), augment_keys(3, ids, 8), augment_keys(3, ids + 1, 7)):
        assert not torch.equal(keyed_crop_flip(x, other), whole)
    padded = F.pad(x, (4,) * 4)
    offsets, flips = set(), 0
    for i in range(200):
        windows = {(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
                   if torch.equal(whole[i], (lambda w: w.flip(-1) if f else w)(padded[i, :, dy:dy + 12, dx:dx + 12]))}
        assert len(windows) == 1
        dy, dx, f = windows.pop()
        offsets.add((dy, dx)); flips += f
    assert len(offsets) > 40 and 70 < flips < 130
    big = batch(n=4, c=3, size=96)
    out = keyed_crop_flip(big, augment_keys(0, ids[:4], 0))
    assert out.shape == big.shape and not torch.equal(out, big) and 0 <= out.min() and out.max() <= 1


def test_seeded_draws_are_pinned(monkeypatch):
    """The ue victim's augmentation is what every measured figure was trained with: its draws
    from (seed, rank, epoch) must not move when the code around them does (checksums taken
    before the draws were split from their application, session 20)."""
    drawn = {}
    resize, flip = augment.resized_crop, augment.flipped_where
    monkeypatch.setattr(augment, "resized_crop", lambda images, *draws: (
        drawn.setdefault("crop", [d.tolist() for d in draws]), resize(images, *draws))[1])
    monkeypatch.setattr(augment, "flipped_where", lambda images, mask: (
        drawn.setdefault("flip", mask.tolist()), flip(images, mask))[1])
    torch.manual_seed(0)
    small, large = torch.rand(8, 3, 28, 28), torch.rand(4, 3, 96, 96)
    a = crop_flip(small, epoch_generator(1, 0, 2))
    assert float(a.double().sum()) == pytest.approx(8269.379005789757, abs=1e-9)
    drawn.clear()
    b = crop_flip(large, epoch_generator(1, 0, 3))
    # above 64 px the crop is resized (bilinear, float32), whose rounding differs between CPUs
    # (3.7e-4 in this sum on an Intel Sapphire Rapids against the AMD EPYC the sum was pinned
    # on): the draws themselves are pinned (area, aspect, centre x, centre y per image; flips),
    # and the resized sum to where another draw would move it (by ~100)
    assert drawn["crop"] == [pytest.approx(v, rel=1e-6) for v in PINNED_96PX_CROP]
    assert drawn["flip"] == [False, True, False, False]
    assert float(b.double().sum()) == pytest.approx(55230.74709724379, abs=1e-2)


# crop_flip's draws for 4 images at 96 px from epoch_generator(1, 0, 3), recorded session 25 on
# the code whose resized output matches the session-20 sum above
PINNED_96PX_CROP = [
    [0.9125970005989075, 0.40525493025779724, 0.9276758432388306, 0.521899938583374],
    [0.8429921865463257, 0.8038118481636047, 0.9450477361679077, 0.8836567997932434],
    [0.13290035724639893, 0.34308063983917236, 0.5367578864097595, 0.5758383870124817],
    [0.1848219633102417, 0.2987022399902344, 0.21389520168304443, 0.6152356863021851],
]
