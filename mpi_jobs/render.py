"""Fill a job template for one run: ``python -m mpi_jobs.render lsf|slurm|mpirun --dataset D
--batch-size BS [...] [--out FILE]`` (docs/clusters.md).

Templates (templates/*.sh.tmpl) are ``string.Template`` text: lowercase ``$name`` /
``${name}`` are placeholders filled here; UPPERCASE ``$NAME`` are shell variables and pass
through untouched. ``common.sh.tmpl`` is the run itself, shared by every scheduler.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Sequence

from hpc_uc.config import get, load_config
from hpc_uc.errors import UserError

from .plan import Plan, plan, positive_int

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = Path(__file__).with_name("templates")
BACKENDS = ("horovod", "torch", "auto")
PROFILES = ("fast", "paper")
RESERVED = ("batch_size", "run_dir", "backend", "profile")  # each has its own option


@dataclass(frozen=True)
class Scheduler:
    """What differs between schedulers besides the template text."""

    gpus_per_node: int
    backend: str            # default: horovod; mpirun auto (horovod if it imports, else torch)
    project_directive: str  # "" when the scheduler has no project/account
    script_name: str        # file name of the job script in the run dir


SCHEDULERS = {
    "lsf": Scheduler(6, "horovod", "#BSUB -P {}", "job.lsf"),
    "slurm": Scheduler(4, "horovod", "#SBATCH -A {}", "job.slurm"),
    "mpirun": Scheduler(1, "auto", "", "job.sh"),
}


class ScriptTemplate(Template):
    """$placeholders are lowercase only, so shell variables ($RUN_DIR, ${CMD[@]}) stay."""

    flags = 0
    idpattern = r"[a-z][a-z0-9_]*"


@dataclass(frozen=True)
class JobOptions:
    """One job as asked for; numbers may be strings (from the command line or make)."""

    scheduler: str
    dataset: str
    batch_size: int | str
    nodes: int | str | None = None
    gpus_per_node: int | str | None = None  # None: the scheduler's default
    per_gpu_batch: int | str | None = None  # None: plan.PER_GPU_BATCH
    np: int | str | None = None
    project: str | None = None
    walltime: str = "02:00"
    backend: str | None = None              # None: the scheduler's default
    profile: str | None = None              # None: the config's own
    run_dir: str | None = None              # None: runs/<dataset>-bs<BS>-<date-time>
    hostfile: str | None = None
    overrides: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Job:
    """A rendered job script and what it was computed from."""

    scheduler: str
    plan: Plan
    config: dict
    run_dir: Path  # absolute
    script: str

    @property
    def script_name(self) -> str:
        return SCHEDULERS[self.scheduler].script_name


def config_path(dataset: str) -> Path:
    """configs/<dataset>.yaml, or a UserError naming the datasets there are."""
    path = REPO / "configs" / f"{dataset}.yaml"
    if not dataset:
        raise UserError("no dataset given (--dataset, DATASET=)")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", dataset) or not path.is_file():
        known = ", ".join(sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))) or "none"
        raise UserError(f"unknown dataset {dataset!r}: no configs/{dataset}.yaml (known: {known})")
    return path


def parse_walltime(text: str) -> tuple[int, int]:
    """'HH:MM' -> (hours, minutes); at least one minute."""
    match = re.fullmatch(r"(\d{1,3}):([0-5]\d)", text.strip())
    if not match or int(match[1]) == int(match[2]) == 0:
        raise UserError(f"walltime must be HH:MM (e.g. 02:00), not {text!r}")
    return int(match[1]), int(match[2])


def check_overrides(items: Sequence[str]) -> None:
    """Each extra override is key=value, and not a key that has its own option."""
    for item in items:
        key = item.split("=", 1)[0]
        if any(ord(ch) < 32 for ch in item):
            raise UserError(f"--set value {item!r} holds a control character (a newline?)")
        if "=" not in item or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
            raise UserError(f"--set takes key=value, not {item!r}")
        if key in RESERVED:
            raise UserError(f"set {key} with --{key.replace('_', '-')}, not --set")


def other_batches(cfg: dict) -> dict[str, int]:
    """The run's other global batches, which the ranks must split evenly as well: the
    surrogate's (when it is pre-trained in the run) and the victim's (evaluation)."""
    keys = ["surrogate.batch_size"] if cfg["surrogate"]["weights"] == "pretrain" else []
    keys += ["victim.batch_size"] if "victim" in cfg else []
    return {key: get(cfg, key) for key in keys}


def resolve(opts: JobOptions) -> tuple[Plan, dict]:
    """Check every option, then the resolved config against the rank count."""
    if opts.scheduler not in SCHEDULERS:
        raise UserError(f"scheduler must be one of {', '.join(SCHEDULERS)}, not {opts.scheduler!r}")
    path = config_path(opts.dataset)
    if opts.hostfile is not None and opts.scheduler != "mpirun":
        raise UserError("--hostfile is for mpirun; the scheduler places the ranks")
    batch = positive_int(opts.batch_size, "batch size (--batch-size, BS=)")
    backend = opts.backend or SCHEDULERS[opts.scheduler].backend
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if opts.profile is not None and opts.profile not in PROFILES:
        raise UserError(f"profile must be one of {', '.join(PROFILES)}, not {opts.profile!r}")
    check_overrides(opts.overrides)
    fixed = [f"batch_size={batch}", f"backend={backend}"]
    fixed += [f"profile={opts.profile}"] if opts.profile else []
    try:
        cfg = load_config(path, [*fixed, *opts.overrides])
    except UserError as exc:
        raise UserError(f"configs/{path.name} with these options: {exc}") from None
    gpn = SCHEDULERS[opts.scheduler].gpus_per_node if opts.gpus_per_node is None else opts.gpus_per_node
    job_plan = plan(batch, gpn, nodes=opts.nodes, np=opts.np, per_gpu_batch=opts.per_gpu_batch,
                    also=other_batches(cfg))
    return job_plan, cfg


def fill(name: str, values: dict[str, object]) -> str:
    """Fill templates/<name>; a placeholder without a value is a bug in this module."""
    template = ScriptTemplate((TEMPLATES / name).read_text())
    missing = set(template.get_identifiers()) - set(values)
    if missing:
        raise RuntimeError(f"{name}: no value for ${', $'.join(sorted(missing))}")
    return template.safe_substitute(values)


def render(opts: JobOptions) -> Job:
    """Check ``opts`` and fill the scheduler's template; raises UserError on bad input."""
    hours, minutes = parse_walltime(opts.walltime)
    job_plan, cfg = resolve(opts)
    run_dir = opts.run_dir or f"runs/{opts.dataset}-bs{job_plan.batch_size}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not run_dir.strip() or re.search(r"\s", run_dir):
        raise UserError(f"run dir must be a path without spaces, not {run_dir!r}")
    run_path = Path(run_dir) if Path(run_dir).is_absolute() else REPO / run_dir
    hostfile = ""
    if opts.hostfile:
        hostfile = os.path.abspath(opts.hostfile)
        if not os.path.isfile(hostfile):
            raise UserError(f"hostfile {opts.hostfile} not found")
    if opts.project is not None and not re.fullmatch(r"[A-Za-z0-9_.+-]+", opts.project):
        raise UserError(f"project must be a scheduler account name (letters, digits, _ . + -), not {opts.project!r}")
    directive = SCHEDULERS[opts.scheduler].project_directive
    if not opts.project:  # commented out, ready to fill in
        directive = "#" + directive.format("PROJECT") + "  # none given: --project, PROJECT=" if directive else ""
    values: dict[str, object] = {
        "dataset": opts.dataset, "batch_size": job_plan.batch_size, "ranks": job_plan.ranks,
        "nodes": job_plan.nodes, "gpus_per_node": job_plan.gpus_per_node, "gpus": job_plan.gpus,
        "ranks_per_node": job_plan.ranks_per_node, "per_rank_batch": job_plan.per_rank_batch,
        "backend": cfg["backend"], "profile": cfg["profile"], "run_path": run_path,
        "run_dir": shlex.quote(run_dir), "repo": shlex.quote(str(REPO)),
        "overrides": "".join(f" {shlex.quote(o)}" for o in opts.overrides),
        "hostfile": shlex.quote(hostfile), "job_name": f"uc-{opts.dataset}-bs{job_plan.batch_size}",
        "walltime": f"{hours:02d}:{minutes:02d}", "walltime_hms": f"{hours}:{minutes:02d}:00",
        "project_directive": directive.format(opts.project),
        "rendered_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    values["common"] = fill("common.sh.tmpl", values).rstrip("\n")
    script = fill(f"{opts.scheduler}.sh.tmpl", values)
    return Job(opts.scheduler, job_plan, cfg, run_path, script)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one UserError line instead of usage text."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def build_parser(prog: str, schedulers: Sequence[str]) -> argparse.ArgumentParser:
    """The job options shared by render and submit."""
    p = _Parser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("scheduler", choices=schedulers)
    p.add_argument("--dataset", required=True, help="configs/<dataset>.yaml")
    p.add_argument("--batch-size", required=True, help="global batch (config batch_size)")
    p.add_argument("--nodes", help="nodes, all GPUs used (default: from --per-gpu-batch)")
    p.add_argument("--gpus-per-node", help="GPUs per node (lsf 6, slurm 4, mpirun 1)")
    p.add_argument("--per-gpu-batch", help="largest per-GPU batch when --nodes/--np are not given (256)")
    p.add_argument("--np", help="rank count (default: from --nodes or --per-gpu-batch)")
    p.add_argument("--project", help="LSF project (-P) / Slurm account (-A)")
    p.add_argument("--walltime", default="02:00", help="HH:MM (default 02:00)")
    p.add_argument("--backend", help="horovod (default for lsf, slurm), torch or auto (default for mpirun)")
    p.add_argument("--profile", help="fast or paper (default: the config's)")
    p.add_argument("--run-dir", help="default runs/<dataset>-bs<BS>-<date-time>, relative to the repo")
    p.add_argument("--hostfile", help="mpirun hostfile (lines 'HOST slots=GPUS'); default: this machine")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="extra config overrides (e.g. generator.epochs=3)")
    return p


def options_from_args(args: argparse.Namespace, scheduler: str) -> JobOptions:
    return JobOptions(
        scheduler=scheduler, dataset=args.dataset, batch_size=args.batch_size, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, per_gpu_batch=args.per_gpu_batch, np=args.np,
        project=args.project, walltime=args.walltime, backend=args.backend, profile=args.profile,
        run_dir=args.run_dir, hostfile=args.hostfile, overrides=tuple(args.overrides))


def write_script(path: Path, text: str) -> None:
    """Write an executable script atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def summary(job: Job) -> str:
    """One line: ranks, where they go (the hostfile decides that for mpirun), per-rank batch."""
    p = job.plan
    where = "" if job.scheduler == "mpirun" else f" on {p.nodes} node(s) x {p.gpus_per_node} GPUs"
    return f"{p.ranks} rank(s){where}, {p.per_rank_batch} per rank; run dir {job.run_dir}"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser("python -m mpi_jobs.render", tuple(SCHEDULERS))
        parser.add_argument("--out", help="write the script here (default: print it)")
        args = parser.parse_args(argv)
        job = render(options_from_args(args, args.scheduler))
        if args.out:
            write_script(Path(args.out), job.script)
            print(f"wrote {args.out}: {summary(job)}")
        else:
            sys.stdout.write(job.script)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
