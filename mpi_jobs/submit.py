"""Render a job into its run directory and start it: ``python -m mpi_jobs.submit
lsf|slurm|local --dataset D --batch-size BS [...] [--dry-run]`` (the make *-run targets).

``lsf`` submits with ``bsub < RUN_DIR/job.lsf``, ``slurm`` with ``sbatch RUN_DIR/job.slurm``,
``local`` runs ``bash RUN_DIR/job.sh`` (mpirun) here and waits. ``--dry-run`` prints the
script and writes nothing. Any error is one line, before anything is written or submitted.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hpc_uc.errors import UserError

from .render import REPO, Job, JobOptions, build_parser, options_from_args, render, summary, write_script


@dataclass(frozen=True)
class Target:
    scheduler: str  # template
    tool: str       # what starts the script
    missing: str    # why the tool may be missing, and what to do instead


TARGETS = {
    "lsf": Target("lsf", "bsub", "not an LSF login node? DRY_RUN=1 (--dry-run) prints the job "
                  "script without submitting; make local-run runs it here with mpirun"),
    "slurm": Target("slurm", "sbatch", "not a Slurm login node? DRY_RUN=1 (--dry-run) prints the job "
                    "script without submitting; make local-run runs it here with mpirun"),
    "local": Target("mpirun", "mpirun", "install MPI (make install) or DRY_RUN=1 (--dry-run) "
                    "to print the job script"),
}


def check_data(job: Job) -> None:
    """The job would fail at once without its data: say so before it waits in a queue."""
    data_dir = Path(job.config["data_dir"])
    if not (data_dir if data_dir.is_absolute() else REPO / data_dir).is_dir():
        raise UserError(f"data_dir {data_dir} does not exist: prepare it first "
                        f"(python -m data_prep ..., see docs/clusters.md) or --set data_dir=DIR")


def submit(kind: str, opts: JobOptions, dry_run: bool = False) -> int:
    """Render, write RUN_DIR/<script>, and submit or run it; the exit status of that."""
    target = TARGETS[kind]
    job = render(opts)
    if dry_run:
        sys.stdout.write(job.script)
        return 0
    if shutil.which(target.tool) is None:
        raise UserError(f"{target.tool} not found on PATH: {target.missing}")
    check_data(job)
    script = job.run_dir / job.script_name
    write_script(script, job.script)
    print(f"hpc-uc: job script {script} ({summary(job)})", flush=True)
    if kind == "lsf":
        with open(script, "rb") as stdin:
            rc = subprocess.call([target.tool], stdin=stdin, cwd=REPO)
    else:
        rc = subprocess.call([target.tool if kind == "slurm" else "bash", str(script)], cwd=REPO)
    print(f"hpc-uc: run dir {job.run_dir}", flush=True)
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser("python -m mpi_jobs.submit", tuple(TARGETS))
        parser.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
        args = parser.parse_args(argv)
        return submit(args.scheduler, options_from_args(args, TARGETS[args.scheduler].scheduler), args.dry_run)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
