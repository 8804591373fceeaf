# Two commands on a fresh machine with Python 3.11: `make repro` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Packages whose data we read but whose declared dependencies we must not pull
# (pneumonia-model-package declares TensorFlow; torchxrayvision's data folder is all we use).
DATA_PACKAGES := torchxrayvision==1.5.7 pneumonia-model-package==0.3.0 pydicom-data==1.0.0

# Stage commands in dvc.yaml call `python`: make it the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export HF_HUB_OFFLINE := 1

.PHONY: venv repro test test-system test-cluster bench profile lint mlflow-ui mlflow-server cluster-demo clean sweep kubeflow image infra-check

venv: $(STAMP)

# --no-cache-dir: the wheels (torch and its CUDA libraries, ~5 GB) are not kept twice on disk;
# CI once ran out of space during this install.
# Byte-code: pip compiles file by file (--no-compile skips that), compileall on every core.
# Left to first use, every process of the first pipeline run compiled what it imported, the
# same modules in the driver, the Ray workers and the Ray Train workers at once. Measured on
# 2 cores: compileall 66 s; the first `make repro` 18 min 48 s with it, 22 min 44 s without.
# Files that are not Python 3.11 (templates in some packages) fail to compile, which is
# harmless: nothing imports them.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-cache-dir --upgrade pip
	$(BIN)/pip install --quiet --no-cache-dir --no-compile -c requirements.lock -e '.[pipeline,dev]'
	$(BIN)/pip install --quiet --no-cache-dir --no-compile --no-deps $(DATA_PACKAGES)
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $(STAMP)

repro: venv
	$(BIN)/dvc repro
	@$(BIN)/sista status
	@cat data/publish/results.md

# The suite: 13 min 14 s on 2 cores in a fresh clone (9d4639d). The system tests bring up
# whole systems (a two-node Ray cluster, S3 + MLflow servers with a DVC remote, a Ray Tune
# sweep, kfp's local runner) and take longer: `make test-system`, which CI runs after it.
test: venv
	$(BIN)/python -m pytest -m "not system"

test-system: venv
	$(BIN)/python -m pytest -m system

# Only the two-node Ray cluster tests (part of `make test-system`).
test-cluster: venv
	$(BIN)/python -m pytest -m cluster

bench: venv
	$(BIN)/python -m bench.run_all

# A flame graph of one stage with its Ray workers: make profile STAGE=evaluate
STAGE ?= evaluate
profile: venv
	$(BIN)/py-spy record --subprocesses --rate 20 --output profile-$(STAGE).svg -- \
	  $(BIN)/python -m pipeline.launch $(STAGE)

lint: venv
	$(BIN)/ruff check sista_core components pipeline tests bench
	$(BIN)/ruff format --check sista_core components pipeline tests bench

mlflow-ui: venv
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db \
	  --host 127.0.0.1 --port 5000 --uvicorn-opts "--workers 1"

# Ray Tune over the loss weights on the current params.yaml (needs `dvc repro similarity`).
sweep: venv
	$(BIN)/sista sweep

# infra/: the compiled Kubeflow pipeline (commit it: a test compares), the image, the checks.
IMAGE ?= ghcr.io/your-org/sista:0.1.0
kubeflow: venv
	$(BIN)/python -m pipeline.kubeflow compile

image:
	docker build -f infra/Dockerfile -t $(IMAGE) .

infra-check: venv
	$(BIN)/python -m pytest tests/test_infra.py

# MLflow tracking server: SQLite database, artifacts proxied to MLFLOW_ARTIFACTS (a folder,
# or s3://bucket/prefix with AWS_ENDPOINT_URL_S3 / credentials in the environment).
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_BACKEND_STORE ?= sqlite:///mlflow-server.db
MLFLOW_ARTIFACTS ?= mlflow-server-artifacts
MLFLOW_WORKERS ?= 1
mlflow-server: venv
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server \
	  --backend-store-uri $(MLFLOW_BACKEND_STORE) --artifacts-destination $(MLFLOW_ARTIFACTS) \
	  --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers $(MLFLOW_WORKERS)

# The CI-profile pipeline on a two-node Ray cluster on this machine (S3 and MLflow servers
# included), checked and stopped; see pipeline/cluster_demo.py.
cluster-demo: venv
	$(BIN)/python -m pipeline.cluster_demo

clean:
	rm -rf $(VENV) .pytest_cache bench/results
