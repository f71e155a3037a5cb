"""Activation memory of one generator step's surrogate forward + backward, per micro-batch.

`python bench/micro_batch_memory.py [--arch resnet50] [--size 224] [--micro 1,2,4,8]` runs, for
each micro-batch m, a fresh process that loads the frozen surrogate, then pushes m perturbed
images through it and back to the perturbation (what `generator.micro_batch` bounds), and
reports the peak RSS above the loaded model. A line a + b*m is fitted: b is the memory one
more image per forward costs; docs/memory.md turns it into per-GPU figures.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import numpy as np


def one(arch: str, size: int, micro: int) -> float:
    """Peak RSS (MiB) of the step above the loaded model, in this process."""
    import torch

    from hpc_uc.models import ResNetWithFeature

    torch.set_num_threads(1)
    model = ResNetWithFeature(arch, 10, 3, small_stem=False).eval().requires_grad_(False)
    with torch.no_grad():
        model(torch.rand(1, 3, size, size))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    delta = torch.zeros(1, 3, size, size, requires_grad=True)
    x = torch.rand(micro, 3, size, size)
    _, feats = model((x + delta).clamp(0, 1))
    feats.logsumexp(1).sum().backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--micro", default="1,2,4,8")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.arch, args.size, args.one)))
        return
    micro = [int(m) for m in args.micro.split(",")]
    mib = [json.loads(subprocess.run([sys.executable, __file__, "--arch", args.arch, "--size", str(args.size),
                                      "--one", str(m)], capture_output=True, text=True, check=True).stdout)
           for m in micro]
    slope, intercept = np.polyfit(micro, mib, 1)
    print(f"{args.arch} at {args.size} px, float32, CPU (peak RSS above the loaded model):")
    print("| micro-batch | MiB | MiB per image |")
    print("|---|---|---|")
    for m, v in zip(micro, mib):
        print(f"| {m} | {v:.0f} | {v / m:.0f} |")
    print(f"fit: {intercept:.0f} + {slope:.0f} MiB x images")


if __name__ == "__main__":
    main()
