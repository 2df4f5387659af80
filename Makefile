# `make demo` and `make test` each work from a fresh clone: they create .venv when missing, install
# the package (torch pinned to the local CPU wheel; an unpinned torch would pull a multi-GB CUDA
# build), then run. Re-installs only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0
DEMO_DATA := work/data/demo
DEMO_MODEL := work/models/tiny-llava
PIP_QUIET := --quiet --disable-pip-version-check

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export OMP_WAIT_POLICY := PASSIVE

.PHONY: install demo test lint compile clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (first time: about 3 minutes)"
	$(BIN)/python -m pip install $(PIP_QUIET) "$(TORCH_PIN)" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install $(PIP_QUIET) -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch, kfp, mlflow, deepspeed, great_expectations, safe_rlhf_v" \
		|| { echo "install failed: see the pip output above"; exit 1; }
	@touch $(STAMP)

$(DEMO_DATA)/train.parquet: | $(STAMP)
	$(BIN)/safe-rlhf-v make-demo-data --out $(DEMO_DATA)

$(DEMO_MODEL)/config.json: $(DEMO_DATA)/train.parquet | $(STAMP)
	$(BIN)/safe-rlhf-v make-demo-model --data $(DEMO_DATA) --out $(DEMO_MODEL)

demo: $(STAMP) $(DEMO_DATA)/train.parquet $(DEMO_MODEL)/config.json
	$(BIN)/safe-rlhf-v run --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

compile: $(STAMP)
	$(BIN)/safe-rlhf-v compile --out pipelines/safe_rlhf_v.yaml

clean:
	rm -rf work .pytest_cache
