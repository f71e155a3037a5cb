"""Peak memory of export's per-image refinement against its batch (`refine.batch_mib`).

`python bench/refine_memory.py [--budget 1024] [--cases resnet18:small:28:1,...]` takes, for each
case (surrogate arch : stem : image size : channels), the batch export now picks
(hpc_uc.refine.fitting_batch at ``--budget`` MiB) and the one it picked before session 25
(256 images, or the whole export chunk at `export.chunk_mib` 64 when smaller), and runs each
in a fresh process: the frozen surrogate as export loads it (BatchNorm folded, channels-last),
two targeted refinement steps through the `ue` crop and flip, 1 thread. It prints the peak RSS
during the refinement above the RSS before it (Linux: the high-water mark reset through
/proc/self/clear_refs), and the seconds per image and step.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

CASES = "resnet18:standard:28:1,resnet18:small:28:1,resnet18:small:64:1,resnet18:standard:224:3,resnet50:standard:224:3"
OLD_CAP, CHUNK_MIB = 256, 64  # before session 25: refine.BATCH, within export.chunk_mib's chunk


def surrogate(arch: str, stem: str, channels: int):
    import torch

    from hpc_uc.models import ResNetWithFeature
    from hpc_uc.surrogate import frozen

    torch.manual_seed(0)
    return frozen(ResNetWithFeature(arch, 2, channels, small_stem=stem == "small"), torch.device("cpu"))


def rss_kib(field: str) -> int:
    """VmRSS or VmHWM (the peak since the last reset) of this process, KiB."""
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1))


def one(case: str, batch: int) -> dict:
    """Peak RSS (MiB) above the loaded surrogate, and seconds per image and step, in this process."""
    import numpy as np
    import torch

    from hpc_uc.refine import keyed_augment, next_class_loss, refine

    arch, stem, size, channels = case.split(":")
    size, channels = int(size), int(channels)
    torch.set_num_threads(1)
    model = surrogate(arch, stem, channels)
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, channels), dtype=np.uint8)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the high-water mark starts again from the RSS now
    base = rss_kib("VmRSS")
    began = time.perf_counter()
    refine([model], images, np.zeros(images.shape, np.float32), next_class_loss(np.zeros((batch, 1), int), 2),
           16 / 255, "linf", 2, 0.1, torch.device("cpu"), batch=batch, augment=keyed_augment(np.arange(batch), 0, 4))
    return {"peak_mib": (rss_kib("VmHWM") - base) / 1024,
            "s_per_image_step": (time.perf_counter() - began) / (2 * batch)}


def batches(case: str, budget: float) -> tuple[float, int, int]:
    """(estimated MiB per image, the batch now, the batch before) for ``case``."""
    import torch

    from hpc_uc.reader import chunk_rows
    from hpc_uc.refine import activation_bytes, fitting_batch

    arch, stem, size, channels = case.split(":")
    shape = (int(channels), int(size), int(size))
    model = surrogate(arch, stem, shape[0])
    per_image = activation_bytes(model, shape, torch.device("cpu")) / 2**20
    before = min(OLD_CAP, chunk_rows(CHUNK_MIB * 2**20, shape[0] * shape[1] * shape[2], 4))
    return per_image, fitting_batch(model, shape, torch.device("cpu"), budget), before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1024, help="refine.batch_mib")
    parser.add_argument("--cases", default=CASES)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return

    def run(case: str, batch: int) -> dict:
        out = subprocess.run([sys.executable, __file__, "--one", case, str(batch)], capture_output=True, text=True,
                             check=True).stdout
        return json.loads(out)

    print(f"refine.batch_mib = {args.budget:g}; peak RSS during the refinement above the RSS before it, 2 steps, 1 thread")
    print("| surrogate (arch:stem:px:channels) | estimate MiB/image | batch now | peak MiB | s/image/step "
          "| batch before | peak MiB | s/image/step |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        per_image, now, before = batches(case, args.budget)
        a = run(case, now)
        b = a if before == now else run(case, before)
        print(f"| {case} | {per_image:.1f} | {now} | {a['peak_mib']:.0f} | {a['s_per_image_step']:.3f} "
              f"| {before} | {b['peak_mib']:.0f} | {b['s_per_image_step']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
