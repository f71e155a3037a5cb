"""Collectives and gradient averaging across 2 real MPI ranks, for every backend."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc_uc.comm import get_comm, horovod_available

pytestmark = pytest.mark.mpi

def test_allreduce_sum_and_mean(comm):
    x = torch.tensor([comm.rank + 1.0, 10.0 * comm.rank], dtype=torch.float64)
    n = comm.size
    total = torch.tensor([n * (n + 1) / 2, 10.0 * n * (n - 1) / 2], dtype=torch.float64)
    assert torch.equal(comm.allreduce(x, op="sum"), total)
    assert torch.allclose(comm.allreduce(x, op="mean"), total / n)
    assert torch.equal(x, torch.tensor([comm.rank + 1.0, 10.0 * comm.rank], dtype=torch.float64))


def test_broadcast_tensor_array_object(comm):
    t = comm.broadcast(torch.arange(4.0) + comm.rank, root=1)
    assert torch.equal(t, torch.arange(4.0) + 1)
    a = comm.broadcast(np.full(3, comm.rank, dtype=np.int32))
    assert a.dtype == np.int32 and (a == 0).all()
    obj = comm.broadcast({"rank": comm.rank, "text": "hi"} if comm.is_root else None)
    assert obj == {"rank": 0, "text": "hi"}


def test_gather_and_barrier(comm):
    got = comm.gather(np.arange(comm.rank + 1))
    if comm.is_root:
        assert [g.tolist() for g in got] == [list(range(r + 1)) for r in range(comm.size)]
    else:
        assert got is None
    assert comm.allgather(comm.rank) == list(range(comm.size))
    comm.barrier()


def _train_five_steps(comm) -> torch.Tensor:
    """Train a small net 5 steps on rank-dependent data; return its flat parameters."""
    torch.manual_seed(100 + comm.rank)  # different init per rank: broadcast must fix it
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3))
    comm.broadcast_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = comm.distributed_optimizer(opt, model)
    gen = torch.Generator().manual_seed(7 + comm.rank)
    for _ in range(5):
        x = torch.rand(8, 1, 8, 8, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_distributed_optimizer_keeps_ranks_identical(comm):
    params = _train_five_steps(comm)
    every = comm.allgather(params)
    for other in every[1:]:
        assert torch.equal(other, every[0])


def test_backends_train_identically():
    ref = get_comm("torch")
    if ref.size < 2:
        pytest.skip("needs mpirun -np 2 or more")
    names = ["torch", "mpi"] + (["horovod"] if horovod_available() else [])
    results = {name: _train_five_steps(get_comm(name)) for name in names}
    for name in names[1:]:
        diff = (results[name] - results["torch"]).abs().max().item()
        assert diff <= 1e-6, f"{name} differs from torch by {diff}"


@pytest.mark.parametrize("chunk_bytes", [1, 100, 1 << 28])
def test_gather_rows_orders_by_index_in_bounded_rounds(comm, chunk_bytes):
    """Uneven ranks (rank r holds 7 + 5r rows), ids interleaved across ranks; one row per
    message at chunk_bytes=1: the result equals the unchunked gather, sorted by id."""
    n = 7 + 5 * comm.rank
    rng = np.random.default_rng(comm.rank)
    index = np.arange(n) * comm.size + comm.rank
    scores = rng.normal(size=(n, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (n, 1))
    got = comm.gather_rows((scores, labels), index, chunk_bytes=chunk_bytes)
    everything = comm.allgather((scores, labels, index))
    if not comm.is_root:
        assert got is None
        return
    ids = np.concatenate([p[2] for p in everything])
    order = np.argsort(ids)
    (s, y), i = got
    assert np.array_equal(i, ids[order]) and np.array_equal(s, np.concatenate([p[0] for p in everything])[order])
    assert np.array_equal(y, np.concatenate([p[1] for p in everything])[order])


def test_micro_batched_training_equals_the_whole_batch_across_ranks(comm):
    """train_classifier with micro_batch=3 (pieces 3, 3, 2 of each rank's 8): one gradient
    exchange per step (Horovod: backward_passes_per_step), the same parameters as the whole
    batch, identical on every rank."""
    from micro_batch_helpers import trained_params

    whole, micro = trained_params(comm, 0), trained_params(comm, 3)
    assert torch.allclose(micro, whole, atol=1e-6)
    every = comm.allgather(micro)
    assert all(torch.equal(other, every[0]) for other in every[1:])
