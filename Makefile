# LeukoCam — the commands people type. `make` alone prints this menu.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?=
DATA ?= data/synthetic/cells
MODEL ?= runs/latest/model.keras
BUNDLE ?= runs/latest/bundle
PYTEST_ARGS ?=
BCCD ?=
PI ?=
OUT ?= runs/latest
FOLDS ?= 5
ARGS ?=
BCCD ?=

.DEFAULT_GOAL := help
.PHONY: help install install-train run test soak lint demo-model inspect train cv evaluate convert deploy bench finder-eval clean

help:
	@echo "LeukoCam — make targets"
	@echo "  make run          start the appliance (replay camera, demo model) on http://127.0.0.1:8080"
	@echo "  make test         create .venv, install everything, run the whole test suite"
	@echo "  make install      .venv with the device side only (no TensorFlow)"
	@echo "  make install-train .venv with the workstation side too (TensorFlow)"
	@echo "  make soak         the long hostile tests (100 power cuts, 3000 fuzzed requests, memory) on loopback"
	@echo "  make lint         ruff: lint rules and formatting (CI runs it)"
	@echo "  make demo-model   regenerate the shipped synthetic demo bundle and sample fields"
	@echo "  make inspect      DATA=...                 dataset counts, subjects, duplicates, unreadable files"
	@echo "  make train        DATA=... [OUT=runs/latest]  two-stage training + report"
	@echo "  make cv           DATA=... [FOLDS=5]       subject-grouped cross-validation"
	@echo "  make evaluate     MODEL=... DATA=...       report for an existing model"
	@echo "  make convert      MODEL=... DATA=... BUNDLE=...  verified (gated) bundle from a trained Keras model"
	@echo "  make deploy PI=pi@leukocam.local [BUNDLE=...]  copy a bundle to the Pi, install (checked there), restart"
	@echo "  make bench        models, pipeline, finder, dashboard and training benchmarks in one run -> runs/bench/bench.md"
	@echo "  make finder-eval  [BCCD=dir]               finder stress table (stains, scales, density) + crop gallery"
	@echo "  make pi-check     install and run the device side on an emulated Raspberry Pi OS arm64 (root; 5-10 min)"
	@echo "  make pi-bench     [ARGS=--bundle DIR]      pipeline stages and peak RSS against the Pi's budgets -> runs/pi-bench"
	@echo "  make clean        remove build outputs (keeps .venv)"
	@echo "Variables: PY=$(PY) CONFIG=$(CONFIG)"

# Stamps make a second `make run` / `make test` quick: pip runs again only when pyproject.toml changes.
# TensorFlow's wheel is about 570 MB: an interrupted download is resumed up to 50 times, and the whole
# install is tried 3 times (pip's cache keeps what already arrived), so a flaky link does not fail CI.
# (--resume-retries needs pip 25.1: an older venv's pip is upgraded first.)
PIP_INSTALL = for try in 1 2 3; do $(BIN)/python -m pip install -q --retries 10 --timeout 60 "pip>=25.1" && \
	$(BIN)/python -m pip install -q --retries 10 --timeout 60 --resume-retries 50 -e ".[$(EXTRAS)]" && break; [ $$try -lt 3 ] || exit 1; echo "pip install failed (try $$try of 3); trying again"; sleep 10; done

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --retries 10 --timeout 60 --upgrade pip

$(VENV)/.stamp-device: EXTRAS = device
$(VENV)/.stamp-device: pyproject.toml | $(BIN)/python
	@$(PIP_INSTALL)
	@touch $@

$(VENV)/.stamp-test: EXTRAS = device,train,dev
$(VENV)/.stamp-test: pyproject.toml | $(BIN)/python
	@$(PIP_INSTALL)
	@touch $@ $(VENV)/.stamp-device

install: $(VENV)/.stamp-device

install-train: $(VENV)/.stamp-test

run: $(VENV)/.stamp-device
	$(BIN)/leukocam serve $(if $(CONFIG),--config $(CONFIG),)

test: $(VENV)/.stamp-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The long versions of the hostile tests, outside `make test`: bounded counts, loopback only (about 10 minutes).
soak: $(VENV)/.stamp-test
	LEUKOCAM_SOAK=1 $(BIN)/python -m pytest -q tests/test_hostile.py tests/test_store.py -k "hostile or fuzz or slow or peak or power_cut" $(PYTEST_ARGS)

lint: $(VENV)/.stamp-test
	$(BIN)/ruff check device training convert tests
	$(BIN)/ruff format --check device training convert tests

demo-model: $(VENV)/.stamp-test
	$(BIN)/leukocam demo-model

inspect: $(VENV)/.stamp-test
	$(BIN)/leukocam data inspect $(DATA)

train: $(VENV)/.stamp-test
	$(BIN)/leukocam train $(DATA) --out $(OUT) $(ARGS)

cv: $(VENV)/.stamp-test
	$(BIN)/leukocam cv $(DATA) --folds $(FOLDS) --out runs/cv $(ARGS)

evaluate: $(VENV)/.stamp-test
	$(BIN)/leukocam evaluate $(MODEL) --data $(DATA)

convert: $(VENV)/.stamp-test
	$(BIN)/leukocam convert $(MODEL) --data $(DATA) --out $(BUNDLE)

bench: $(VENV)/.stamp-test
	$(BIN)/leukocam bench --out runs/bench

finder-eval: $(VENV)/.stamp-test
	$(BIN)/leukocam finder-eval --build --out runs/finder-eval $(if $(BCCD),--bccd $(BCCD),)

deploy: $(VENV)/.stamp-device
	@test -n "$(PI)" || { echo "usage: make deploy PI=user@host [BUNDLE=$(BUNDLE)]"; exit 2; }
	$(BIN)/leukocam deploy $(BUNDLE) --host $(PI)

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache

.PHONY: pi-check pi-bench
# A release check, not part of `make test`: Debian Bookworm arm64 (debootstrap, cached in
# ~/.cache/leukocam/pi-rootfs) under qemu-user-static, install.sh inside, then doctor, the bundle
# self-test, a replay capture and a dashboard request. Needs root; ARGS=--rebuild builds the rootfs again.
pi-check:
	@if [ "$$(id -u)" -eq 0 ]; then bash firmware_config/pi-check.sh $(ARGS); else sudo bash firmware_config/pi-check.sh $(ARGS); fi

# On a Pi, docs/pi.md runs the same with the installed venv and the deployed bundle.
pi-bench: $(VENV)/.stamp-device
	$(BIN)/python -m device.pi_bench --out runs/pi-bench $(ARGS)
