"""The command line shared by the bench scripts that write a MedMNIST npz in another form
(``rgb_tree.py``, ``class_sorted_npz.py``): FLAG --npz --size --out, one ``error:`` line and
exit 2 on bad input, the class counts per split on success."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from hpc_uc.errors import UserError

Writer = Callable[[str, Path, Path, int], dict[str, list[int]]]


def run(doc: str, write: Writer, flag_help: str, out_help: str) -> int:
    """Parse the arguments, call ``write(flag, npz, out, size)`` and report; the exit status."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("flag", help=flag_help)
    parser.add_argument("--npz", type=Path, required=True, help="its official npz")
    parser.add_argument("--size", type=int, default=28, help="the npz's image side (default 28)")
    parser.add_argument("--out", type=Path, required=True, help=out_help)
    args = parser.parse_args()
    try:
        counts = write(args.flag, args.npz, args.out, args.size)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, count in counts.items():
        print(f"{split}: {sum(count)} images, per class {count}")
    return 0
