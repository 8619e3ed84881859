# Everything runs from a .venv at the repo root, created on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench clean java

# TorchServe 0.12 needs a Java 17 runtime (serving in the demo, the TorchServe tests).
java:
	@command -v java >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q openjdk-17-jre-headless; }

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,pipeline,serve,bench]"
	touch $(STAMP)

demo: $(STAMP) java  ## the main job on the embedded default world
	$(BIN)/genco demo --out runs/demo

test: $(STAMP) java  ## the whole test suite
	$(BIN)/python -m pytest -q

lint: $(STAMP)  ## ruff, and the import contract of pyproject.toml [tool.importlinter]
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: $(STAMP)  ## benchmarks print JSON; figures are kept in BENCHMARKS.md
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/reward.py
	$(BIN)/python bench/quality.py --worlds interactions contextual aes large
	$(BIN)/python bench/ablation.py
	$(BIN)/python bench/serving.py

clean:
	rm -rf runs build .pytest_cache
