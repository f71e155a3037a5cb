"""GeneratorBank under 2 real ranks: split generators, synchronised through d loss / d delta."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import single_rank
from hpc_uc.config import load_config
from hpc_uc.generator import GeneratorBank
from hpc_uc.models import Generator, perturbation

pytestmark = pytest.mark.mpi
K, C, SIZE, LR = 3, 1, 8, 1e-2
CFG = ["generator.base_filters=4", "generator.n_blocks=1", "generator.weight_decay=0"]


def local_loss(delta: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    """A rank-dependent loss of all K perturbations (different data on every rank)."""
    x = torch.rand(4, C, SIZE, SIZE, generator=torch.Generator().manual_seed(100 * rank + step))
    xp = (x.unsqueeze(0) + delta.unsqueeze(1)).clamp(0, 1)
    return (xp.mean(dim=(2, 3, 4)) - 0.3 * (torch.arange(K) + 1).view(K, 1)).square().mean()


def replicated_reference(cfg: dict, size: int, steps: int) -> dict:
    """What the bank must equal: every generator trained on the mean loss over all ranks."""
    torch.manual_seed(cfg["seed"])
    gens = nn.ModuleList(Generator(C, 4, 2, 1) for _ in range(K))
    noise = torch.rand(K, 1, C, SIZE, SIZE, generator=torch.Generator().manual_seed(cfg["seed"] + 1))
    opts = [torch.optim.Adam(g.parameters(), lr=LR) for g in gens]
    for step in range(steps):
        delta = torch.cat([perturbation(g, z, cfg["epsilon"]) for g, z in zip(gens, noise)])
        loss = sum(local_loss(delta, r, step) for r in range(size)) / size
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
    return gens.state_dict()


def test_bank_equals_replicated_training(comm):
    cfg = load_config(None, CFG)
    bank = GeneratorBank(cfg, K, C, SIZE, comm, lr=LR)
    assert bank.owned == list(range(comm.rank, K, comm.size))
    for step in range(3):
        own, delta = bank.forward()
        local_loss(delta, comm.rank, step).backward()
        bank.step(own, delta, LR)
    deltas = bank.deltas()
    assert torch.equal(torch.stack(comm.allgather(deltas)).amax(0), torch.stack(comm.allgather(deltas)).amin(0))
    state = bank.state()
    if comm.is_root:
        expected = replicated_reference(cfg, comm.size, 3)
        assert state["generators"].keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(state["generators"][name], value, rtol=1e-4, atol=1e-6)
        assert sorted(state["optimizers"]) == list(range(K))
    else:
        assert state is None


def test_bank_state_reloads_on_any_world_size(comm):
    """A checkpoint written by N ranks resumes on 1: same generators and Adam moments."""
    cfg = load_config(None, CFG)
    bank = GeneratorBank(cfg, K, C, SIZE, comm, lr=LR)
    own, delta = bank.forward()
    local_loss(delta, comm.rank, 0).backward()
    bank.step(own, delta, LR)
    state = comm.broadcast(bank.state())
    expected = comm.broadcast(bank.deltas())
    solo = GeneratorBank(cfg, K, C, SIZE, single_rank(), lr=LR)
    solo.load(state)
    assert torch.equal(solo.deltas(), expected)
    assert all(solo.opts[i].state_dict()["state"] for i in range(K))
