"""Job scripts (mpi_jobs): rank/node/batch arithmetic, rendered text, errors, and end-to-end
runs through stand-in bsub/jsrun and sbatch/srun that map onto a local mpirun."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_job
from hpc_uc.errors import UserError
from mpi_jobs.plan import plan
from mpi_jobs.render import SCHEDULERS, JobOptions, render

REPO = Path(__file__).resolve().parents[1]
GPN = {name: s.gpus_per_node for name, s in SCHEDULERS.items()}


def bash_n(script: str) -> None:
    """The script parses as bash."""
    proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def directive(script: str, prefix: str, name: str) -> str:
    """Value of `#BSUB -x VALUE` / `#SBATCH --x=VALUE` in a script."""
    match = re.search(rf"^{prefix} {re.escape(name)}[ =](\S+)$", script, re.M)
    assert match, f"no {prefix} {name}"
    return match[1]


def launcher_ranks(scheduler: str, script: str) -> int:
    pattern = {"lsf": r"^jsrun -n (\d+) -a1 -g1 -c7 -bpacked:7 ",
               "slurm": r"^srun --ntasks=(\d+) --ntasks-per-node=\d+ --gpus-per-task=1 --gpu-bind=closest ",
               "mpirun": r"^LAUNCH=\(mpirun -np (\d+)\)$"}[scheduler]
    match = re.search(pattern, script, re.M)
    assert match, f"no launch line in the {scheduler} script"
    return int(match[1])


def check_script(scheduler: str, script: str, batch: int, ranks: int, nodes: int) -> None:
    """Every number in the script agrees with (batch, ranks, nodes)."""
    bash_n(script)
    assert launcher_ranks(scheduler, script) == ranks
    assert re.search(rf"^#   per-rank batch  {batch // ranks} \(= {batch} / {ranks}\)$", script, re.M)
    assert re.search(rf"^CMD=\(\"\$HPC_UC\" run configs/digits\.yaml batch_size={batch} ", script, re.M)
    if scheduler == "lsf":
        assert directive(script, "#BSUB", "-nnodes") == str(nodes)
    if scheduler == "slurm":
        assert directive(script, "#SBATCH", "--nodes") == str(nodes)
        assert directive(script, "#SBATCH", "--ntasks") == str(ranks)
        assert directive(script, "#SBATCH", "--ntasks-per-node") == str(min(ranks, GPN["slurm"]))
        assert directive(script, "#SBATCH", "--gpus-per-task") == "1"


# ---- arithmetic -----------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["lsf", "slurm", "mpirun"])
@pytest.mark.parametrize("nodes", [1, 2, 4, 16])
@pytest.mark.parametrize("batch", [64, 4096])
def test_explicit_nodes_use_every_gpu(scheduler, nodes, batch):
    ranks = nodes * GPN[scheduler]
    opts = JobOptions(scheduler, "digits", batch, nodes=nodes, run_dir="runs/t")
    if batch % ranks:  # e.g. Summit's 6 GPUs per node never divide a power of two
        with pytest.raises(UserError, match=f"not divisible by {ranks} ranks"):
            render(opts)
        return
    job = render(opts)
    assert (job.plan.ranks, job.plan.nodes, job.plan.per_rank_batch) == (ranks, nodes, batch // ranks)
    check_script(scheduler, job.script, batch, ranks, nodes)


@pytest.mark.parametrize("scheduler", ["lsf", "slurm", "mpirun"])
@pytest.mark.parametrize("np", [1, 2, 4, 16])
@pytest.mark.parametrize("batch", [64, 4096])
def test_explicit_rank_count(scheduler, np, batch):
    job = render(JobOptions(scheduler, "digits", batch, np=np, run_dir="runs/t"))
    nodes = math.ceil(np / GPN[scheduler])
    assert (job.plan.ranks, job.plan.nodes) == (np, nodes)
    check_script(scheduler, job.script, batch, np, nodes)


@pytest.mark.parametrize("scheduler, batch, per_gpu, ranks, nodes", [
    ("lsf", 4096, None, 16, 3),     # the Summit example: 16 ranks x 256, 3 nodes (2 GPUs idle)
    ("lsf", 64, None, 1, 1),
    ("lsf", 8192, None, 32, 6),
    ("lsf", 768, None, 4, 1),       # 3 ranks would not divide surrogate.batch_size=128
    ("lsf", 1000, None, 4, 1),      # ceil(1000/256) = 4 divides 1000: 250 per rank
    ("slurm", 4096, None, 16, 4),
    ("slurm", 64, 32, 2, 1),
    ("mpirun", 4096, 1024, 4, 4),
])
def test_default_rule(scheduler, batch, per_gpu, ranks, nodes):
    job = render(JobOptions(scheduler, "digits", batch, per_gpu_batch=per_gpu, run_dir="runs/t"))
    assert (job.plan.ranks, job.plan.nodes) == (ranks, nodes)
    check_script(scheduler, job.script, batch, ranks, nodes)


def test_default_rule_is_fewest_ranks_that_divide():
    for per_gpu in (7, 64, 256):
        for batch in range(1, 1500):
            p = plan(batch, 6, per_gpu_batch=per_gpu)
            assert batch % p.ranks == 0 and p.per_rank_batch <= per_gpu
            assert not any(batch % r == 0 for r in range(math.ceil(batch / per_gpu), p.ranks))
            assert p.nodes == math.ceil(p.ranks / 6)


def test_default_rule_divides_the_surrogate_batch_too():
    assert plan(768, 6, also={"surrogate.batch_size": 128}).ranks == 4
    assert plan(768, 6).ranks == 3
    with pytest.raises(UserError, match="no such rank count also divides surrogate.batch_size=128"):
        plan(65536, 6, also={"surrogate.batch_size": 128})
    with pytest.raises(UserError, match="surrogate.batch_size=96 is not divisible by 64 ranks"):
        plan(4096, 4, nodes=16, also={"surrogate.batch_size": 96})


def test_np_must_fit_the_nodes():
    assert plan(64, 6, nodes=2, np=8).nodes == 2
    with pytest.raises(UserError, match="do not fit"):
        plan(64, 6, nodes=1, np=8)


# ---- rendered text --------------------------------------------------------------------------

def test_directives_walltime_project_and_defaults():
    lsf = render(JobOptions("lsf", "digits", 4096, project="ABC123", walltime="0:30")).script
    assert directive(lsf, "#BSUB", "-W") == "00:30"
    assert directive(lsf, "#BSUB", "-P") == "ABC123"
    assert directive(lsf, "#BSUB", "-J") == "uc-digits-bs4096"
    run_dir = re.search(r"^RUN_DIR=(runs/digits-bs4096-\d{8}-\d{6})$", lsf, re.M)[1]
    assert directive(lsf, "#BSUB", "-o") == f"{REPO}/{run_dir}/job-%J.out"
    assert f"\ncd {REPO}\n" in lsf and 'HPC_UC="${HPC_UC:-$PWD/.venv/bin/hpc-uc}"' in lsf
    slurm = render(JobOptions("slurm", "digits", 64, walltime="12:05", run_dir="/scratch/r")).script
    assert directive(slurm, "#SBATCH", "-t") == "12:05:00"  # Slurm reads a bare MM:SS as minutes
    assert directive(slurm, "#SBATCH", "-o") == "/scratch/r/job-%j.out"
    assert directive(slurm, "#SBATCH", "--gpu-bind") == "closest"
    assert "\n#SBATCH -A" not in slurm and "\n##SBATCH -A PROJECT" in slurm
    local = render(JobOptions("mpirun", "digits", 64, np=2)).script
    assert " backend=horovod profile=" in lsf and " backend=auto profile=" in local
    for script in (lsf, slurm, local):
        assert "CUDA_VISIBLE_DEVICES" not in script and "set -euo pipefail" in script


@pytest.mark.parametrize("dataset", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
def test_every_dataset_config_renders(dataset):
    for scheduler in SCHEDULERS:
        job = render(JobOptions(scheduler, dataset, 4096, run_dir="runs/t"))
        bash_n(job.script)
        assert f"run configs/{dataset}.yaml batch_size=4096 " in job.script


def test_overrides_profile_backend_and_hostfile_are_quoted(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("node01 slots=4\nnode02 slots=4\n")
    weights = tmp_path / "my weights.pt"
    job = render(JobOptions("mpirun", "digits", 64, np=8, hostfile=str(hosts), backend="torch",
                            profile="paper", overrides=(f"surrogate.weights={weights}", "generator.epochs=3")))
    bash_n(job.script)
    assert f"HOSTFILE=${{HOSTFILE-{hosts}}}" in job.script
    assert (f"backend=torch profile=paper {shlex.quote(f'surrogate.weights={weights}')} generator.epochs=3)"
            in job.script)
    assert job.config["generator"]["epochs"] == 3 and job.config["profile"] == "paper"


@pytest.mark.parametrize("args, message", [
    (["lsf", "--dataset", "nosuch", "--batch-size", "64"], "unknown dataset 'nosuch'"),
    (["lsf", "--dataset", "../configs/digits", "--batch-size", "64"], "unknown dataset"),
    (["lsf", "--dataset", "", "--batch-size", "64"], "no dataset given"),
    (["lsf", "--dataset", "digits", "--batch-size", "abc"], "must be a positive integer, not 'abc'"),
    (["lsf", "--dataset", "digits", "--batch-size", "0"], "must be a positive integer, not '0'"),
    (["lsf", "--dataset", "digits", "--batch-size", "-64"], "must be a positive integer"),
    (["lsf", "--dataset", "digits", "--batch-size", ""], "must be a positive integer, not ''"),
    (["lsf", "--dataset", "digits", "--batch-size", "64", "--nodes", "1"], "not divisible by 6 ranks"),
    (["slurm", "--dataset", "digits", "--batch-size", "100", "--nodes", "2"], "not divisible by 8 ranks"),
    (["mpirun", "--dataset", "digits", "--batch-size", "64", "--np", "3"], "not divisible by 3 ranks"),
    (["lsf", "--dataset", "digits", "--batch-size", "64", "--nodes", "0"], "nodes (--nodes, NODES=) must be"),
    (["lsf", "--dataset", "digits", "--batch-size", "64", "--walltime", "2h"], "walltime must be HH:MM"),
    (["lsf", "--dataset", "digits", "--batch-size", "64", "--walltime", "1:75"], "walltime must be HH:MM"),
    (["lsf", "--dataset", "digits", "--batch-size", "64", "--walltime", "0:00"], "walltime must be HH:MM"),
    (["lsf", "--dataset", "digits", "--batch-size", "64", "--backend", "mpi"], "backend must be one of"),
    (["lsf", "--dataset", "digits", "--batch-size", "64", "--set", "batch_size=8"], "with --batch-size"),
    (["lsf", "--dataset", "digits", "--batch-size", "64", "--set", "epochs"], "--set takes key=value"),
    (["lsf", "--dataset", "digits", "--batch-size", "64", "--set", "nosuch.key=1"], "unknown config key"),
    (["lsf", "--dataset", "digits", "--batch-size", "1024", "--np", "256"], "surrogate.batch_size=128"),
    (["lsf", "--dataset", "digits", "--batch-size", "64", "--hostfile", "h"], "--hostfile is for mpirun"),
    (["slurm", "--dataset", "digits", "--batch-size", "64", "--nodes", "1", "--per-gpu-batch", "8"],
     "--per-gpu-batch only applies"),
])
def test_render_errors_are_one_line_and_write_nothing(args, message, tmp_path):
    out = tmp_path / "job.sh"
    proc = subprocess.run([sys.executable, "-m", "mpi_jobs.render", *args, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_render_cli_writes_an_executable_script(tmp_path):
    out = tmp_path / "job.lsf"
    proc = subprocess.run([sys.executable, "-m", "mpi_jobs.render", "lsf", "--dataset", "digits",
                           "--batch-size", "4096", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "16 rank(s) on 3 node(s) x 6 GPUs, 256 per rank" in proc.stdout
    assert os.access(out, os.X_OK) and out.read_text().startswith("#!/bin/bash\n")


# ---- submit ---------------------------------------------------------------------------------

def submit(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return run_job([sys.executable, "-m", "mpi_jobs.submit", *args], cwd=REPO, env=env, timeout=300)


@pytest.mark.parametrize("kind, tool", [("lsf", "bsub"), ("slurm", "sbatch")])
def test_submit_without_scheduler_names_the_alternatives(kind, tool, tmp_path):
    path = "/usr/bin:/bin"
    if shutil.which(tool, path=path):
        pytest.skip(f"{tool} is installed here")
    run_dir = tmp_path / "run"
    proc = submit([kind, "--dataset", "digits", "--batch-size", "64", "--run-dir", str(run_dir)],
                  env={**os.environ, "PATH": path})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{tool} not found" in proc.stderr and "DRY_RUN=1" in proc.stderr and "make local-run" in proc.stderr
    assert not run_dir.exists()


def test_submit_dry_run_prints_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = submit(["lsf", "--dataset", "digits", "--batch-size", "4096", "--run-dir", str(run_dir), "--dry-run"],
                  env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash\n") and "jsrun -n 16 " in proc.stdout
    assert not run_dir.exists()


@pytest.mark.parametrize("variable", ["PROJECT=a;echo INJECTED", "RUN_DIR=r;echo INJECTED", "SET=a=1;echo INJECTED",
                                      "DATASET=digits;echo INJECTED"])
def test_make_variables_are_values_not_shell(variable, tmp_path):
    """A make variable reaches the launcher as one quoted value: no command in it runs, and
    DRY_RUN=1 is never dropped."""
    proc = subprocess.run(["make", "-s", "-C", str(REPO), "summit-run", "BS=256", "DATASET=digits", variable,
                           "DRY_RUN=1"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert proc.stdout == ""  # nothing ran, no job script was printed
    assert proc.returncode != 0 and proc.stderr.count("error:") == 1, proc.stderr


@pytest.mark.parametrize("option", [["--project", "a\ntouch F"], ["--set", "seed=1\ntouch F"]])
def test_newlines_never_reach_the_job_script(option, tmp_path):
    proc = submit(["lsf", "--dataset", "digits", "--batch-size", "64", "--run-dir", str(tmp_path / "run"),
                   *option, "--dry-run"], env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "touch F" not in proc.stdout and proc.stderr.count("\n") == 1, proc.stderr


def test_submit_without_data_submits_nothing(tmp_path, fake_bin):
    run_dir = tmp_path / "run"
    proc = submit(["lsf", "--dataset", "digits", "--batch-size", "64", "--run-dir", str(run_dir),
                   "--set", f"data_dir={tmp_path / 'missing'}"], env=fake_bin)
    assert proc.returncode == 2 and "data_dir" in proc.stderr and "does not exist" in proc.stderr
    assert not run_dir.exists() and "submitted" not in proc.stdout


# ---- end to end with stand-in schedulers ----------------------------------------------------

FAKE_SCHEDULER = r'''
"""Stand-ins for bsub, jsrun, sbatch and srun: submission runs the job at once, its output
to the log file of its -o directive; jsrun and srun become `mpirun -np N --oversubscribe`."""
import os, subprocess, sys, tempfile

JOB_ID = "4242"


def directives(text, prefix):
    """Words of the #BSUB/#SBATCH lines before the first command (where schedulers stop)."""
    words = []
    for line in text.splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith(prefix + " "):
            words += line[len(prefix):].split()
    return words


def option(words, name):
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    sys.exit(f"fake scheduler: no {name} directive")


def run_job(text, log, env):
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as fh:
        fh.write(text)
    with open(log, "w") as out:
        subprocess.call(["bash", fh.name], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})


def launch(n, cmd, tool):
    if n is None or not cmd:
        sys.exit(f"fake {tool}: no rank count or no command")
    os.execvp("mpirun", ["mpirun", "-np", n, "--oversubscribe", *cmd])


def bsub(args):
    if args:
        sys.exit("fake bsub: pass the script on stdin (bsub < script)")
    text = sys.stdin.read()
    words = directives(text, "#BSUB")
    for name in ("-J", "-nnodes", "-W"):
        option(words, name)
    print(f"Job <{JOB_ID}> is submitted to default queue <batch>.", flush=True)
    run_job(text, option(words, "-o").replace("%J", JOB_ID), {"LSB_JOBID": JOB_ID})


def jsrun(args):
    n = None
    while args and args[0].startswith("-"):
        word = args.pop(0)
        if word in ("-n", "--nrs"):
            n = args.pop(0)
        elif word not in ("-a1", "-g1", "-c7", "-bpacked:7"):
            sys.exit(f"fake jsrun: unexpected option {word}")
    launch(n, args, "jsrun")


def sbatch(args):
    text = open(args[0]).read()
    words = directives(text, "#SBATCH")
    for name in ("-J", "--nodes", "--ntasks", "--ntasks-per-node", "--gpus-per-task", "-t"):
        option(words, name)
    print(f"Submitted batch job {JOB_ID}", flush=True)
    run_job(text, option(words, "-o").replace("%j", JOB_ID), {"SLURM_JOB_ID": JOB_ID})


def srun(args):
    n = None
    while args and args[0].startswith("-"):
        word = args.pop(0)
        if word in ("-n", "--ntasks"):
            n = args.pop(0)
        elif word.startswith("--ntasks="):
            n = word.split("=", 1)[1]
        elif not (word.startswith("--") and "=" in word):
            sys.exit(f"fake srun: unexpected option {word}")
    launch(n, args, "srun")


{"bsub": bsub, "jsrun": jsrun, "sbatch": sbatch, "srun": srun}[sys.argv[1]](sys.argv[2:])
'''


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory) -> dict:
    """An environment whose PATH starts with the stand-in schedulers."""
    bin_dir = tmp_path_factory.mktemp("fake-bin")
    program = bin_dir / "fake_scheduler.py"
    program.write_text(FAKE_SCHEDULER)
    for tool in ("bsub", "jsrun", "sbatch", "srun"):
        wrapper = bin_dir / tool
        wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(program))} {tool} \"$@\"\n")
        wrapper.chmod(0o755)
    hpc_uc = Path(sys.executable).with_name("hpc-uc")
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HPC_UC": str(hpc_uc)}


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "digits"
    subprocess.run([sys.executable, "-m", "data_prep", "digits", "--shards", "2", "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True)
    return out


# As small as the pipeline allows: the launchers are under test, not the method.
EVALUATES = (REPO / "hpc_uc" / "evaluate.py").exists()  # the last stage, still being written
TINY = ["surrogate.epochs=0", "clusters=2", "generator.epochs=1", "generator.base_filters=8", "refine.steps=0",
        "generator.n_blocks=1", "generator.train_on=cluster", *(["victim.epochs=1", "victim.ue.epochs=1"] if EVALUATES else [])]


@pytest.mark.parametrize("kind, sizing, backend", [
    ("lsf", ["--nodes", "1", "--gpus-per-node", "2"], "horovod"),  # bsub < job.lsf -> jsrun -n 2
    ("slurm", ["--per-gpu-batch", "32"], "torch"),                 # sbatch job.slurm -> srun --ntasks=2
    ("local", ["--np", "2"], "torch"),                             # bash job.sh -> mpirun -np 2
])
def test_end_to_end(kind, sizing, backend, fake_bin, digits_data, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    from hpc_uc.comm import horovod_available
    from hpc_uc.stages import STAGES

    backend = backend if backend != "horovod" or horovod_available() else "torch"
    run_dir = tmp_path / "run"
    proc = submit([kind, "--dataset", "digits", "--batch-size", "64", *sizing, "--backend", backend,
                   "--profile", "fast", "--run-dir", str(run_dir), "--set", f"data_dir={digits_data}", *TINY],
                  env=fake_bin)
    log = proc.stdout if kind == "local" else (run_dir / "job-4242.out").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr + log
    assert f"hpc-uc: run dir {run_dir}" in proc.stdout
    assert "over 2 ranks (32 per rank)" in log and f"({backend}, 2 ranks" in log, log
    assert f"hpc-uc: finished; results in {run_dir}" in log, log
    assert set(STAGES) <= set(json.loads((run_dir / "stages.json").read_text())), log
    assert (run_dir / "protected" / "manifest.json").is_file()
    if EVALUATES:
        assert (run_dir / "results.json").is_file()
