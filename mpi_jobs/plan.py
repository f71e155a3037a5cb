"""Rank and node arithmetic: how a global batch is spread over GPUs (docs/clusters.md).

One rank per GPU; every rank gets ``batch_size / ranks`` samples, which must be whole.

* ``np`` given: ``ranks = np``; ``nodes`` as given, else ``ceil(np / gpus_per_node)``.
* else ``nodes`` given: every GPU of those nodes, ``ranks = nodes * gpus_per_node``.
* else: the fewest ranks whose share is at most ``per_gpu_batch`` and divides the batch:
  ``ranks`` = the smallest divisor of ``batch_size`` that is >= ``ceil(batch_size /
  per_gpu_batch)``, ``nodes = ceil(ranks / gpus_per_node)``.

``also`` names other global batches of the same job (the surrogate's): the ranks must
divide them too, and the default rule picks the smallest rank count dividing all of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from hpc_uc.errors import UserError

PER_GPU_BATCH = 256


@dataclass(frozen=True)
class Plan:
    """Where a job's ranks go."""

    batch_size: int
    ranks: int
    nodes: int
    gpus_per_node: int

    @property
    def per_rank_batch(self) -> int:
        return self.batch_size // self.ranks

    @property
    def ranks_per_node(self) -> int:
        """Most ranks on one node (the last node may hold fewer)."""
        return min(self.ranks, self.gpus_per_node)

    @property
    def gpus(self) -> int:
        """GPUs allocated: nodes x GPUs per node (some may idle)."""
        return self.nodes * self.gpus_per_node


def positive_int(value: int | str, what: str) -> int:
    """``value`` as an int >= 1, or a UserError naming ``what``."""
    text = str(value).strip()
    if isinstance(value, bool) or not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise UserError(f"{what} must be a positive integer, not {str(value)!r}")
    return int(text)


def smallest_common_divisor(values: list[int], low: int) -> int | None:
    """The smallest d >= ``low`` dividing every value, or None."""
    return next((d for d in range(max(1, low), min(values) + 1) if all(v % d == 0 for v in values)), None)


def largest_divisor_at_most(n: int, high: int) -> int:
    return next(d for d in range(min(n, high), 0, -1) if n % d == 0)


def plan(batch_size: int | str, gpus_per_node: int | str, *, nodes: int | str | None = None,
         np: int | str | None = None, per_gpu_batch: int | str | None = None,
         also: Mapping[str, int] | None = None) -> Plan:
    """Ranks and nodes for a global ``batch_size`` (rules in the module docstring)."""
    batch = positive_int(batch_size, "batch size (--batch-size, BS=)")
    gpn = positive_int(gpus_per_node, "GPUs per node (--gpus-per-node)")
    n_nodes = None if nodes is None else positive_int(nodes, "nodes (--nodes, NODES=)")
    also = dict(also or {})
    if per_gpu_batch is not None and (nodes is not None or np is not None):
        raise UserError("--per-gpu-batch only applies when neither --nodes nor --np is given")
    if np is not None:
        ranks = positive_int(np, "rank count (--np)")
        if n_nodes is None:
            n_nodes = math.ceil(ranks / gpn)
        elif ranks > n_nodes * gpn:
            raise UserError(f"{ranks} ranks do not fit on {n_nodes} node(s) x {gpn} GPUs")
    elif n_nodes is not None:
        ranks = n_nodes * gpn
    else:
        share = positive_int(PER_GPU_BATCH if per_gpu_batch is None else per_gpu_batch,
                             "per-GPU batch (--per-gpu-batch)")
        low = math.ceil(batch / share)
        found = smallest_common_divisor([batch, *also.values()], low)
        if found is None:
            names = " and ".join(f"{k}={v}" for k, v in also.items())
            raise UserError(f"batch size {batch} needs at least {low} ranks of at most {share}, but no such "
                            f"rank count also divides {names}: change it with --set, or --per-gpu-batch")
        ranks = found
        n_nodes = math.ceil(ranks / gpn)
    if batch % ranks:
        fit = largest_divisor_at_most(batch, ranks)
        where = "" if np is not None else f" ({n_nodes} node(s) x {gpn} GPUs)"
        hint = "" if np is not None else ", or leave out --nodes"
        raise UserError(f"batch size {batch} is not divisible by {ranks} ranks{where}: use a batch "
                        f"that is a multiple of {ranks}, or --np {fit}{hint}")
    for name, value in also.items():
        if value % ranks:
            raise UserError(f"{name}={value} is not divisible by {ranks} ranks: "
                            f"add --set {name}=<a multiple of {ranks}>")
    return Plan(batch, ranks, n_nodes, gpn)
