"""``python -m data_prep {medmnist,imagefolder,digits} ... --out DIR``: write a shard set.

Bad input ends with one line ``error: ...`` on stderr and exit status 2; under mpirun the
whole job is aborted. Nothing is left at ``--out`` unless the shard set is complete.
"""
from __future__ import annotations

import argparse
import sys

from hpc_uc.errors import UserError, describe
from hpc_uc.shards import COMPRESSIONS


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one line) instead of printing usage and exiting."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m data_prep", description="Write a shard set (docs/shard_format.md) "
                     "from a MedMNIST npz, an ImageFolder tree or scikit-learn's digits.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--shards", type=int, default=1, help="shards per split (default 1)")
        p.add_argument("--out", required=True, help="output directory (the shard set)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing shard set at --out")
        p.add_argument("--compression", choices=COMPRESSIONS, default="lzf")

    med = sub.add_parser("medmnist", help="an official MedMNIST 2D npz")
    med.add_argument("name", help="dataset flag as in medmnist.INFO, e.g. breastmnist")
    src = med.add_mutually_exclusive_group(required=True)
    src.add_argument("--npz", help="the official npz file")
    src.add_argument("--download", action="store_true", help="download with medmnist (needs internet)")
    med.add_argument("--root", default=None, help="download directory (default: medmnist's, ~/.medmnist)")
    med.add_argument("--size", type=int, default=28, choices=(28, 64, 128, 224))
    med.add_argument("--allow-md5-mismatch", action="store_true",
                     help="use an npz whose md5 differs from medmnist.INFO (warns)")
    common(med)

    folder = sub.add_parser("imagefolder", help="ROOT/{train,val,test}/<class>/<image> trees")
    folder.add_argument("root")
    folder.add_argument("--size", type=int, required=True, help="output side S (short-side resize, center crop)")
    folder.add_argument("--name", default=None, help="dataset name (default: ROOT's directory name)")
    common(folder)

    digits = sub.add_parser("digits", help="scikit-learn's bundled handwritten digits at 28x28")
    common(digits)
    return parser


def run(args: argparse.Namespace, comm) -> dict:
    """Dispatch a parsed command; returns the manifest written."""
    opts = dict(overwrite=args.overwrite, compression=args.compression, comm=comm)
    if args.command == "medmnist":
        from . import medmnist
        root = None
        if args.download:
            from medmnist.info import DEFAULT_ROOT
            root = args.root or DEFAULT_ROOT
            if root is None:
                raise UserError("medmnist has no default download directory; pass --root DIR")
        return medmnist.prepare(args.name, args.out, args.shards, npz=args.npz, download_root=root,
                                size=args.size, allow_md5_mismatch=args.allow_md5_mismatch, **opts)
    if args.command == "imagefolder":
        from . import imagefolder
        return imagefolder.prepare(args.root, args.out, args.size, args.shards, name=args.name, **opts)
    from . import digits
    return digits.prepare(args.out, args.shards, **opts)


def main(argv: list[str] | None = None) -> int:
    comm = None
    try:
        args = build_parser().parse_args(argv)
        from hpc_uc.comm import get_comm
        comm = get_comm("mpi")
        manifest = run(args, comm)
    except (UserError, OSError) as exc:
        print(f"error: {describe(exc)}", file=sys.stderr, flush=True)
        if comm is not None and comm.size > 1:
            comm.abort(2)
        return 2
    if comm.is_root:
        counts = ", ".join(f"{split} {info['count']} ({len(info['shards'])} shards)"
                           for split, info in manifest["splits"].items())
        print(f"wrote {args.out}: {manifest['dataset']} {manifest['image_size']}px, {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
