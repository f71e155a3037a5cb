"""The UE protocol's batched crop + flip: correct pixels, and deterministic per (seed, rank, epoch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
