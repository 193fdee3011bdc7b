# Entry points: `make repro` runs the pipeline, `make test` the tests, `make bench` the benchmark; each sets up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1

.PHONY: repro test bench compare check-int8 plots-template clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the dependency list changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

repro: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(VENV)/.installed-test
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest

# Experiments side by side, best validation accuracy first: the accuracies and the params that differ between them.
compare: $(VENV)/.installed
	$(BIN)/dvc exp show --no-pager --only-changed --sort-by val_accuracy --sort-order desc \
		--drop 'Created|metrics/export.json:accuracy|int8_|^models/|^data/|\.py$$'

# The pipeline first (MNIST_PIPELINE_MIRRORS names a local copy of MNIST), then the benchmark on its data.
bench: repro
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tests/benchmark.py $(BENCH_ARGS)

# The int8 model against onnx's reference evaluator on every test image, on this CPU (under 2 minutes on 2 cores;
# the export stage checks a sample). CHECK_INT8_ARGS="--images N" checks the first N only.
check-int8: repro
	$(BIN)/python -m mnist_pipeline.check_int8 $(CHECK_INT8_ARGS)

# Regenerate .dvc/plots/offline.html, the committed offline page template of `dvc plots`, after bumping vl-convert-python.
plots-template: $(VENV)/.installed-test
	$(BIN)/mnist-plots-template

clean-venv:
	rm -rf $(VENV)
