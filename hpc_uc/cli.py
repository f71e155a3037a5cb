"""The `hpc-uc` command line: one subcommand per stage, plus info, verify and prepare."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

from .errors import UserError, describe
from .stages import STAGES


def cmd_info(args: argparse.Namespace) -> int:
    """Print library versions, usable backends, world size, rank and device."""
    from .info import info_lines

    for line in info_lines(args.backend):
        print(line, flush=True)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    """Run one stage, or every stage (`run`), for CONFIG plus key=value overrides."""
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    from .pipeline import check_inputs, run_all, run_stage, start

    comm, run = start(cfg)
    if args.command == "run":
        run_all(cfg, comm, run)
    else:
        check_inputs(args.command, cfg, run)
        run_stage(args.command, cfg, comm, run)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print RUN_DIR/results.json as a table (report.md), or combine sweeps (--sweep)."""
    if args.sweep:
        from pathlib import Path

        from .sweep import combine

        out = combine(args.run_dirs, Path(args.out))
        print((out / "sweep.md").read_text(), end="")
        print(f"plot: {out / 'sweep.png'}")
        return 0
    from .report import report

    for run_dir in args.run_dirs:
        print(report(run_dir), end="")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Train -> export -> evaluate for each global batch size, surrogate/clusters shared."""
    from .config import load_config
    from .sweep import parse_batch_sizes, parse_seeds, run_sweep

    sizes = parse_batch_sizes(args.batch_sizes)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    load_config(args.config, args.overrides)  # a bad config fails here, before any work
    run_sweep(args.config, args.overrides, sizes, seeds)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every shard of a shard set against its manifest."""
    from .shards import verify

    verify(args.dir)
    print(f"{args.dir}: OK")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Forward to `python -m data_prep`."""
    from data_prep.__main__ import main as prepare_main

    return prepare_main(args.args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpc-uc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, backends, world size and device")
    info.add_argument("--backend", default="auto", help="communicator to start (auto|horovod|torch|mpi)")
    info.set_defaults(func=cmd_info)
    commands = {**{s.name: s.help for s in STAGES.values()},
                "run": "every stage of the method in order, skipping those already complete"}
    for name, text in commands.items():
        stage = sub.add_parser(name, help=text)
        stage.add_argument("config", help="YAML config (configs/*.yaml)")
        stage.add_argument("overrides", nargs="*", metavar="key=value", help="override a config key")
        stage.set_defaults(func=cmd_stage)
    rep = sub.add_parser("report", help="results.json of a run as a table (also report.md)")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--sweep", action="store_true", help="combine sweep directories into one plot")
    rep.add_argument("--out", default=".", help="where --sweep writes sweep.png and sweep.md")
    rep.set_defaults(func=cmd_report)
    sweep = sub.add_parser("sweep", help="the batch-size study: train/export/evaluate per batch size")
    sweep.add_argument("config")
    sweep.add_argument("overrides", nargs="*", metavar="key=value")
    sweep.add_argument("--batch-sizes", required=True, help="comma-separated global batch sizes")
    sweep.add_argument("--seeds", help="comma-separated seeds, a point per (seed, batch); default: the config's seed")
    sweep.set_defaults(func=cmd_sweep)
    verify = sub.add_parser("verify", help="check a shard set's files against its manifest")
    verify.add_argument("dir")
    verify.set_defaults(func=cmd_verify)
    prepare = sub.add_parser("prepare", help="same as `python -m data_prep ...`", add_help=False)
    prepare.add_argument("args", nargs=argparse.REMAINDER)
    prepare.set_defaults(func=cmd_prepare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a subcommand; a failure prints one line and ends every MPI rank."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also follow an option (e.g. after --batch-sizes)
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        _fail(f"error: {describe(exc)}", 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # one line, then end the whole job
        if os.environ.get("HPC_UC_TRACEBACK"):
            raise
        _fail(f"error: {describe(exc)} (set HPC_UC_TRACEBACK=1 for the traceback)", 1)
    return 1


def _fail(message: str, code: int) -> None:
    """Print ``message`` once and end the job; under MPI, abort every rank."""
    rank, size = _mpi_rank_size()
    if size > 1:
        if rank != 0:
            time.sleep(1.0)  # a failure on every rank is then reported once, by rank 0
        print(f"hpc-uc: rank {rank}/{size}: {message}", file=sys.stderr, flush=True)
        time.sleep(0.5)  # let mpirun forward the line before the job is killed
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(code)
    _fail_before_mpi(message, code)


RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


def _fail_before_mpi(message: str, code: int) -> None:
    """A failure before MPI started (a bad config, a missing file: the same on every rank) is
    printed by rank 0; another rank prints only if the launcher has not ended it a moment later."""
    rank = next((int(os.environ[v]) for v in RANK_VARIABLES if os.environ.get(v, "").isdigit()), 0)
    if rank:
        time.sleep(3.0)
        message = f"rank {rank}: {message}"
    print(f"hpc-uc: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _mpi_rank_size() -> tuple[int, int]:
    if "mpi4py.MPI" not in sys.modules:
        return 0, 1
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


if __name__ == "__main__":
    sys.exit(main())
