"""Micro-batched supervised training (surrogate.micro_batch, victim.micro_batch), one process."""
from __future__ import annotations

import pytest
import torch

from hpc_uc.comm import Comm
from hpc_uc.training import micro_slices
from micro_batch_helpers import trained_params


def test_micro_slices_cover_the_batch_in_bounded_pieces():
    assert micro_slices(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert micro_slices(8, 0) == [slice(0, 8)] and micro_slices(8, 8) == [slice(0, 8)]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_micro_batched_training_equals_the_whole_batch(optimizer):
    """Pieces of 3, 3 and 2 images accumulate to the 8-image step (a net without BatchNorm)."""
    comm = Comm.local()
    whole = trained_params(comm, 0, optimizer)
    assert torch.allclose(trained_params(comm, 3, optimizer), whole, atol=1e-6)


def test_micro_batch_keys_are_checked():
    from hpc_uc.config import load_config
    from hpc_uc.errors import UserError
    assert load_config(None, ["victim.micro_batch=16", "surrogate.micro_batch=4"])["victim"]["micro_batch"] == 16
    with pytest.raises(UserError):
        load_config(None, ["victim.micro_batch=-1"])
