# TW-LB: every target sets up the virtual environment it needs from requirements.lock.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
UV_VERSION := 0.13.8

# The repository has a top-level operator/ folder (mapped to twlb.operator); never let
# `python -m ...` run from here put it ahead of the standard library's `operator`.
export PYTHONSAFEPATH := 1

.PHONY: venv system-deps test lint architecture demo bench lock clean chaos-local kind-up kind-down crd train

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv==$(UV_VERSION)
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

## make system-deps: the Debian packages the tests and the demo use, installed when
## missing (as root or with passwordless sudo; otherwise it names the command to run)
system-deps:
	scripts/system-deps

## make test: the whole test suite (real servers on loopback)
test: system-deps
	@$(MAKE) --no-print-directory venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## make lint: ruff, and the import layers (pyproject.toml's import-linter contracts)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/imports.py lint

## make architecture: redraw docs/architecture.svg, the packages and their imports
architecture: system-deps
	@$(MAKE) --no-print-directory venv
	$(BIN)/python scripts/imports.py draw docs/architecture.svg

## make demo: the main job on the embedded runtime
demo: system-deps
	@$(MAKE) --no-print-directory venv
	$(BIN)/twlb demo --out reports/demo

## make lock: re-resolve pinned dependencies after editing pyproject.toml
lock: $(STAMP)
	$(BIN)/uv pip compile -q pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache reports build *.egg-info

## make chaos-local: the local chaos experiments on the embedded runtime (journals,
## recordings, labelled dataset and a model trained on it under reports/chaos/)
chaos-local: $(STAMP)
	BIN=$(BIN) OUT=reports/chaos chaos/run-local.sh

## make crd: regenerate k8s/crd.yaml from the TrustCluster spec model
crd: $(STAMP)
	$(BIN)/twlb crd > k8s/crd.yaml

KIND_CLUSTER ?= twlb
IMAGE        ?= twlb:0.1.0

## make kind-up: a kind cluster with the image loaded, the CRD, the operator and Prometheus
kind-up:
	kind create cluster --name $(KIND_CLUSTER) --config kind-config.yaml
	docker build -t $(IMAGE) .
	kind load docker-image $(IMAGE) --name $(KIND_CLUSTER)
	kubectl apply -f k8s/
	kubectl wait --for=condition=Established crd/trustclusters.twlb.dev --timeout=60s
	kubectl -n twlb rollout status deployment/twlb-operator --timeout=180s
	kubectl -n twlb rollout status deployment/prometheus --timeout=180s

## make kind-down: delete the kind cluster
kind-down:
	kind delete cluster --name $(KIND_CLUSTER)

## make train: collect labelled windows from 32 seeded chaos runs on loopback (real
## backends, balancer and Prometheus: 16 runs of six nodes at 120-260 req/s and 16 of 3-6
## nodes at 30-260 req/s, about 24 minutes on 2 idle cores), then train, compare and
## export the trust model with its card into ml/models. Training alone on the shipped
## data takes seconds:
##   twlb train --data ml/data/train.parquet --data ml/data/train-small.parquet --out ml/models
TRAIN_SEED ?= 0
TRAIN_DATA := ml/data/train.parquet ml/data/train-small.parquet
train: $(STAMP)
	$(BIN)/twlb collect --out ml/data/train.parquet --runs 16 --duration 35 --seed $(TRAIN_SEED)
	$(BIN)/twlb collect --out ml/data/train-small.parquet --runs 16 --duration 35 \
		--seed $$(( $(TRAIN_SEED) + 100 )) --backends 3-6 --rate 30-260
	$(BIN)/twlb train $(addprefix --data ,$(TRAIN_DATA)) --out ml/models --seed $(TRAIN_SEED)
