"""Generator-training throughput: the reference UC step against hpc-uc's, per rank.

The step: one generator's perturbation added to a batch, the surrogate's features of the
perturbed batch, KL to a target centroid, backward, Adam step with gradients all-reduced.

* ``reference``: surrogate in eval mode with parameter gradients on (as the public UC code
  leaves it), standard memory layout.
* ``frozen``: the same without parameter gradients.
* ``hpc-uc``: frozen, BatchNorm folded into the convolutions, channels-last, and the
  generator's gradient synchronised as d loss / d delta through ``GeneratorBank`` (what
  ``hpc-uc train`` runs: with one generator, rank 0 owns it and the other ranks only run
  the surrogate).

Run alone for 1 rank, under ``mpirun -np 2`` for 2 (weak scaling: the per-rank batch is
fixed). Prints one Markdown row per variant (rank 0).

    python bench/generator_step.py --size 28 --arch resnet18 --batch 64
    mpirun -np 2 python bench/generator_step.py --size 224 --arch resnet50 --batch 8 --steps 3
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from hpc_uc.comm import get_comm
from hpc_uc.config import load_config
from hpc_uc.generator import GeneratorBank, kl_to_target
from hpc_uc.models import Generator, ResNetWithFeature, fold_batchnorm, perturbation

VARIANTS = ("reference", "frozen", "hpc-uc")


def surrogate_for(variant: str, arch: str, size: int, channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ResNetWithFeature(arch, 10, channels, small_stem=size <= 64).eval()
    if variant == "reference":
        return model
    model.requires_grad_(False)
    if variant == "hpc-uc":
        model = fold_batchnorm(model).to(memory_format=torch.channels_last)
    return model


def reference_step(comm, args, surrogate, target):
    """The reference's synchronisation: the generator's parameter gradients all-reduced."""
    gen = Generator(args.channels, base_filters=64, n_down=2, n_blocks=6)
    comm.broadcast_model(gen)
    opt = comm.distributed_optimizer(torch.optim.Adam(gen.parameters(), lr=1e-4), gen)
    z = torch.rand(1, args.channels, args.size, args.size)

    def step(x):
        opt.zero_grad()
        xp = (x + perturbation(gen, z, 16 / 255)).clamp(0, 1)
        kl_to_target(surrogate(xp)[1], target).mean().backward()
        opt.step()
    return step


def bank_step(comm, args, surrogate, target):
    """hpc-uc's: the generator's owner backpropagates the all-reduced d loss / d delta."""
    cfg = load_config(None, ["generator.base_filters=64", "generator.n_blocks=6"])
    bank = GeneratorBank(cfg, 1, args.channels, args.size, comm, lr=1e-4)

    def step(x):
        own, delta = bank.forward()
        xp = (x + delta[0]).clamp(0, 1)
        kl_to_target(surrogate(xp)[1], target).mean().backward()
        bank.step(own, delta, 1e-4)
    return step


def images_per_second(comm, variant: str, args) -> float:
    surrogate = surrogate_for(variant, args.arch, args.size, args.channels)
    target = torch.softmax(torch.randn(1, surrogate.feature_dim), 1).expand(args.batch, -1)
    step = (bank_step if variant == "hpc-uc" else reference_step)(comm, args, surrogate, target)
    x = torch.rand(args.batch, args.channels, args.size, args.size)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            comm.barrier()
            began = time.perf_counter()
        step(x)
    comm.barrier()
    return args.batch * args.steps / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    comm = get_comm(args.backend)
    for variant in args.variants.split(","):
        rate = images_per_second(comm, variant, args)
        if comm.is_root:
            print(f"| {args.arch} {args.size} px | {variant} | {comm.size} | {comm.backend} | "
                  f"{args.batch} | {torch.get_num_threads()} | {rate:.1f} | {rate * comm.size:.1f} |",
                  flush=True)
    if comm.is_root:
        print(f"<!-- {platform.processor() or platform.machine()}, torch {torch.__version__} -->")


if __name__ == "__main__":
    main()
