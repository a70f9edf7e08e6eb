# Fresh-machine set-up for `make test` and `make demo`: creates (or reuses) .venv and
# installs exactly requirements.lock (then the project itself, without dependencies);
# reinstalls only when the lock or pyproject.toml changed. Quiet on the second run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LOCK   := requirements.lock
STAMP  := $(VENV)/.any2seg-installed
SAMPLE ?= data/deliver-sample
# pytest workers for `make test` (pytest-xdist); how tests are shared out and how many
# torch threads each process gets: tests/conftest.py; measured times: docs/development.md
TEST_WORKERS ?= 2
# pip's own constraint file where a machine has one (these machines cap torch at what lies
# on disk); `make lock` honours it, as pip-compile does not read it from pip's config
PIP_CONSTRAINT_FILE := $(shell $(PYTHON) -m pip config get global.constraint 2>/dev/null)
# free space the install needs where $(VENV) lives: the installed lock is 6.2 GB (torch's
# CUDA libraries 3.2 GB of it, on x86-64 Linux), plus room for pip to unpack; what a partly
# installed $(VENV) already holds counts towards it. Checked first, so a full disk gets one
# line saying so rather than pip's OSError halfway through torch.
SETUP_FREE_GB ?= 7
define CHECK_DISK
import shutil, subprocess, sys
from pathlib import Path
venv, need = Path(sys.argv[1]).absolute(), float(sys.argv[2])
have = 0.0
if venv.exists():
    have = int(subprocess.run(["du", "-sk", str(venv)], capture_output=True, text=True).stdout.split()[0]) / 2**20
where = next(p for p in (venv, *venv.parents) if p.exists())
free = shutil.disk_usage(where).free / 2**30
if free + have < need:
    sys.exit(f"make setup: {free:.1f} GB free under {where}, the install needs about {need - have:.1f} GB more; "
             f"free some space, or put the environment on a larger disk with VENV=/path/to/venv")
endef
export CHECK_DISK

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test test-e2e demo demo-codealign lint lock lock-upgrade clean-demo

setup: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml setup.py
	@$(PYTHON) -c "$$CHECK_DISK" $(VENV) $(SETUP_FREE_GB)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing $(LOCK) into $(VENV) (first time only; torch is large)..."
	@$(PY) -m pip install --quiet --quiet --disable-pip-version-check -r $(LOCK)
	@$(PY) -m pip install --quiet --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# two tiers (docs/development.md): `make test` is every test but the end-to-end flows
# (under 4 minutes on 2 cores); `make test-e2e` runs tests/e2e, the DVC, README real-data,
# ablation, resume, damaged-file and GPU-check flows, whose ~150 command processes need
# about 5.5 minutes; CI (.ci/run) runs both
test: $(STAMP)
	@$(PY) tests/check_lock.py
	@$(VENV)/bin/ruff check --quiet any2seg pipeline stages tests benchmarks
	@$(PY) -m pytest -n $(TEST_WORKERS) --durations=15 --ignore=tests/e2e

test-e2e: $(STAMP)
	@$(PY) -m pytest -n $(TEST_WORKERS) --durations=15 tests/e2e

# regenerate requirements.lock from pyproject.toml, keeping every pin that still fits;
# lock-upgrade moves every package to the newest release the ranges allow
LOCK_FLAGS = --quiet --extra dev --extra export --allow-unsafe --strip-extras --no-emit-index-url \
	--no-emit-find-links \
	$(if $(PIP_CONSTRAINT_FILE),--constraint $(PIP_CONSTRAINT_FILE))
lock: $(STAMP)
	@CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile $(LOCK_FLAGS) --output-file $(LOCK) pyproject.toml
	@echo "$(LOCK) written; 'make setup' installs it"

lock-upgrade: $(STAMP)
	@CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile $(LOCK_FLAGS) --upgrade --output-file $(LOCK) pyproject.toml
	@echo "$(LOCK) upgraded; run 'make test' before committing it"

lint: $(STAMP)
	@$(VENV)/bin/ruff check any2seg pipeline stages tests benchmarks

# the embedded default end to end: sample -> teacher -> cache_teacher -> train -> evaluate
# (about 4 minutes on 2 CPU cores); CodeAlign's own chain on the same sample is
# `make demo-codealign` (about 3.5 minutes more), `dvc repro` runs both
demo: $(STAMP)
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro evaluate
	@cat metrics/report.md

demo-codealign: $(STAMP)
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro codealign_evaluate
	@$(PY) -c "import json; from stages.student.codealign.evaluate import markdown; \
		print(markdown(json.load(open('metrics/codealign.json'))))"

clean-demo:
	rm -rf $(SAMPLE) data/sample-teacher cache/sample.zarr runs/sample metrics

# the prepared GPU check (docs/performance.md); `make gpu-check ARGS="--sections training"`
.PHONY: gpu-check
gpu-check: $(STAMP)
	@$(PY) benchmarks/gpu_check.py $(ARGS)
