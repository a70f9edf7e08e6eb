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

demo: $(STAMP)
	@$(VENV)/bin/pipeline make-sample --out $(SAMPLE)
	@$(VENV)/bin/pipeline cache-teacher --dataset sample --root $(SAMPLE) --teacher-root $(SAMPLE)/teacher
	@$(VENV)/bin/pipeline cache-info cache/sample.zarr
	@$(MAKE) --no-print-directory metrics/mss.json
	@cat metrics/report.md

# stage two reruns only when its inputs changed (the DVC pipeline will take this over)
runs/sample/best.pt: params.yaml cache/sample.zarr/zarr.json
	@$(VENV)/bin/pipeline train --dataset sample --root $(SAMPLE) --cache cache/sample.zarr --out runs/sample

metrics/mss.json: runs/sample/best.pt
	@$(VENV)/bin/pipeline evaluate --checkpoint runs/sample/best.pt --root $(SAMPLE) --setting all --out metrics > metrics.tmp.md && mkdir -p metrics && mv metrics.tmp.md metrics/report.md

clean-demo:
	rm -rf $(SAMPLE)
