# Two commands on a fresh machine with Python 3.11: `make repro` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Packages whose data we read but whose declared dependencies we must not pull
# (pneumonia-model-package declares TensorFlow; torchxrayvision's data folder is all we use).
DATA_PACKAGES := torchxrayvision==1.5.7 pneumonia-model-package==0.3.0 pydicom-data==1.0.0

.PHONY: venv repro test bench lint mlflow-ui clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[pipeline,dev]'
	$(BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

repro: venv
	@if [ -f dvc.yaml ]; then $(BIN)/dvc repro; else \
	  echo "NOT BUILT YET: the pipeline stages (ingest, reports, similarity, pretrain, evaluate,"; \
	  echo "publish) and dvc.yaml are open issues; no pre-training or evaluation result exists."; \
	  echo "Running what exists: the SISTA loss benchmark (vectorised vs per-sample loop)."; \
	  $(BIN)/python -m bench.losses; fi

test: venv
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python -m bench.losses

lint: venv
	$(BIN)/ruff check sista_core components pipeline tests bench
	$(BIN)/ruff format --check sista_core components pipeline tests bench

clean:
	rm -rf $(VENV) .pytest_cache bench/results
