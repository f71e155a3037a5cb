# hpc-uc -- make install, make test (see README.md)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
HOROVOD ?= 1
NP ?= 2
PY := $(VENV)/bin/python

# mpirun as root needs these; oversubscribe lets NP exceed the cores of a small machine.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_rmaps_base_oversubscribe := 1
# ranks waiting in MPI give their core back (they share cores here)
export OMPI_MCA_mpi_yield_when_idle := 1
MPIRUN ?= mpirun -np $(NP) --oversubscribe

.PHONY: install mpi venv horovod test test-unit test-mpi run clean

install: mpi venv $(if $(filter 1,$(HOROVOD)),horovod)
	@echo "hpc-uc installed in $(VENV) (try: $(VENV)/bin/hpc-uc info)"

mpi:
	@bash scripts/install_mpi.sh

# The venv is rebuilt only when requirements.txt or setup.py change (stamp file).
venv: $(VENV)/.deps-stamp

$(VENV)/.deps-stamp: requirements.txt setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

horovod: venv
	@VENV=$(VENV) bash scripts/install_horovod.sh

test: test-unit test-mpi

test-unit:
	$(PY) -m pytest -q -m "not mpi" tests

test-mpi:
	$(MPIRUN) --timeout 900 $(PY) tests/mpi_pytest.py -q -m mpi tests

# The embedded default: scikit-learn's digits, the whole pipeline on NP ranks, then the report.
# User-given values reach the shell as environment variables, quoted ("$$VAR"), never as
# recipe text: `make ... PROJECT='a;echo X'` is a project name, not a command.
RUN_ARGS ?= profile=fast
BATCH_SIZES ?= 16,64,256
export RUN_ARGS BATCH_SIZES DATASET BS NODES GPUS_PER_NODE PER_GPU_BATCH PROJECT WALLTIME BACKEND \
	PROFILE RUN_DIR SET RANKS HOSTFILE NP
run:
	@test -f data/digits/manifest.json || $(PY) -m data_prep digits --shards 2 --out data/digits
	set -f; $(MPIRUN) $(VENV)/bin/hpc-uc run configs/digits.yaml $$RUN_ARGS

# ---- cluster jobs (docs/clusters.md): write RUN_DIR/job.* and submit or run it ----------------
# make summit-run DATASET=pathmnist BS=4096 [NODES= RANKS= PER_GPU_BATCH= GPUS_PER_NODE= PROJECT=
#                 WALLTIME=HH:MM BACKEND=horovod PROFILE=fast|paper RUN_DIR= SET="k=v ..." DRY_RUN=1]
# make slurm-run  (the same variables)
# make local-run  DATASET=digits BS=64 [NP=2 HOSTFILE= BACKEND= PROFILE= RUN_DIR= SET= DRY_RUN=1]
JOB_ARGS = --dataset "$$DATASET" --batch-size "$$BS" \
	$${NODES:+--nodes "$$NODES"} $${GPUS_PER_NODE:+--gpus-per-node "$$GPUS_PER_NODE"} \
	$${PER_GPU_BATCH:+--per-gpu-batch "$$PER_GPU_BATCH"} $${PROJECT:+--project "$$PROJECT"} \
	$${WALLTIME:+--walltime "$$WALLTIME"} $${BACKEND:+--backend "$$BACKEND"} \
	$${PROFILE:+--profile "$$PROFILE"} $${RUN_DIR:+--run-dir "$$RUN_DIR"} \
	$${SET:+--set $$SET} $(if $(filter 1,$(DRY_RUN)),--dry-run)

.PHONY: summit-run slurm-run local-run sweep

summit-run:
	@set -f; $(PY) -m mpi_jobs.submit lsf $(JOB_ARGS) $${RANKS:+--np "$$RANKS"}

slurm-run:
	@set -f; $(PY) -m mpi_jobs.submit slurm $(JOB_ARGS) $${RANKS:+--np "$$RANKS"}

local-run:
	@set -f; $(PY) -m mpi_jobs.submit local $(JOB_ARGS) --np "$$NP" $${HOSTFILE:+--hostfile "$$HOSTFILE"}

# The batch-size study: make sweep DATASET=digits BATCH_SIZES=16,64,256 [SEEDS=0,1,2] [NP=2] [SET="k=v ..."]
export SEEDS
sweep:
	@test -n "$$DATASET" || { echo "error: make sweep needs DATASET=<name> (configs/<name>.yaml)" >&2; exit 2; }
	set -f; $(MPIRUN) $(VENV)/bin/hpc-uc sweep "configs/$$DATASET.yaml" --batch-sizes "$$BATCH_SIZES" \
		$${SEEDS:+--seeds "$$SEEDS"} "run_dir=runs/$$DATASET-sweep" $$SET

clean:
	rm -rf build *.egg-info .pytest_cache .pytest-rank*.log
