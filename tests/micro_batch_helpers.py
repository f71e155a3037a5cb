"""A tiny in-memory data set and a BatchNorm-free net for the micro-batching tests."""
from __future__ import annotations

import torch

from hpc_uc.training import train_classifier


class TensorSplit:
    """Rank-dependent images and labels with the reader's ``batches`` interface."""

    def __init__(self, rank: int, n: int = 24) -> None:
        gen = torch.Generator().manual_seed(11 + rank)
        self.x = torch.rand(n, 1, 8, 8, generator=gen)
        self.y = torch.randint(0, 3, (n, 1), generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size, epoch=0, shuffle=True, drop_last=False):
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(epoch)) if shuffle else torch.arange(len(self))
        for i in range(0, len(self) - batch_size + 1 if drop_last else len(self), batch_size):
            j = order[i:i + batch_size]
            yield self.x[j], self.y[j], j


def trained_params(comm, micro_batch: int, optimizer: str = "sgd") -> torch.Tensor:
    """Flat parameters after 2 epochs of train_classifier at 8 images per rank per step."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3))
    train_classifier(model, TensorSplit(comm.rank), comm, epochs=2, lr=0.1, weight_decay=5e-4,
                     batch_per_rank=8, task="multi-class", optimizer=optimizer, micro_batch=micro_batch)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
