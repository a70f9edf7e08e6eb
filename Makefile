# Fresh-machine set-up for `make test` and `make demo`: creates (or reuses) .venv and
# reinstalls only when pyproject.toml changed. Quiet on the second run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.any2seg-installed
SAMPLE ?= data/deliver-sample

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test demo lint clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing any2seg-pipeline and its dependencies into $(VENV) (first time only; torch is large)..."
	@$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP)
	@$(VENV)/bin/ruff check --quiet pipeline stages tests benchmarks
	@$(PY) -m pytest

lint: $(STAMP)
	@$(VENV)/bin/ruff check pipeline stages tests benchmarks

# the embedded default end to end: sample -> cache_teacher -> train -> evaluate (dvc.yaml)
demo: $(STAMP)
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro
	@cat metrics/report.md

clean-demo:
	rm -rf $(SAMPLE) cache/sample.zarr runs/sample metrics
