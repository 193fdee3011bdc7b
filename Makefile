# Entry points: `make repro` runs the pipeline, `make test` the tests, `make bench` the benchmark; each sets up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1

.PHONY: repro test bench compare seeds check-int8 plots-template clean-venv gpu-kit gpu-rehearsal

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

# ruff's lint and format checks first (pyproject.toml configures them; `ruff format .` fixes the format), then the suite.
test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest

# Experiments side by side, best validation accuracy first: the validation and test accuracies and the params that
# differ between them. Not the file hashes (deps, and the sha256 params), nor the scores `dvc metrics show` has.
# DVC matches each --drop pattern at the start of a column's name (re.match): hence the leading .* of some.
compare: $(VENV)/.installed
	$(BIN)/dvc exp show --no-pager --only-changed --sort-by val_accuracy --sort-order desc \
		--drop 'Created|State|Executor|metrics/export.json:accuracy|int8_|(precision|recall|f1)$$|.*sha256$$|models/|data/|.*\.py$$'

# A preset (default, fast or best; mnist_pipeline/presets.py) over N seeds as queued DVC experiments, run one at a
# time; prints each run's accuracies and seconds, then their mean, standard deviation, min and max. Needs the pipeline
# in a git commit (each queued run starts from HEAD plus the workspace's changes, in a copy: the workspace stays as it
# is). SEEDS_ARGS passes more options to mnist-seeds (mnist-seeds --help).
PRESET ?= default
N ?= 5
seeds: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mnist-seeds --preset $(PRESET) --seeds $(N) $(SEEDS_ARGS)

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

# The offline kit for a GPU server without internet (docs/gpu.md): wheels for its Python (GPU_PYTHON) of all the
# pipeline needs beyond the server's PyTorch stack, and MNIST from MNIST_PIPELINE_MIRRORS; at most 50 MiB.
GPU_PYTHON ?= 3.12
gpu-kit: $(VENV)/.installed
	$(BIN)/mnist-gpu-kit --python-version $(GPU_PYTHON) --out gpu-kit

# tests/gpu_check.sh rehearsed here as a GPU server would run it, in CPU mode: a clean clone of HEAD without .git,
# beside no ../shared, a Python holding only a server's packages (its PyTorch stack), the rest installed from a kit
# for this Python with pip --no-index. Its log, metrics and summary land in build/gpu-rehearsal/out/. The kit takes
# MNIST from MNIST_PIPELINE_MIRRORS; the check itself sees only the kit's copy.
REHEARSAL := build/gpu-rehearsal
HERE_PYTHON = $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
$(REHEARSAL)/server/.installed:
	$(PYTHON) -m venv $(REHEARSAL)/server
	$(REHEARSAL)/server/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1 onnx==1.23.1 onnxruntime==1.30.0 \
		numpy pandas scikit-learn pyyaml tqdm
	touch $@

$(REHEARSAL)/kit/manifest.json: pyproject.toml | $(VENV)/.installed
	$(BIN)/mnist-gpu-kit --python-version $(HERE_PYTHON) --out $(REHEARSAL)/kit

gpu-rehearsal: $(REHEARSAL)/server/.installed $(REHEARSAL)/kit/manifest.json
	rm -rf $(REHEARSAL)/checkout $(REHEARSAL)/out
	git clone --quiet . $(REHEARSAL)/checkout && rm -rf $(REHEARSAL)/checkout/.git
	cd $(REHEARSAL)/checkout && env -u MNIST_PIPELINE_MIRRORS PIP_NO_INDEX=1 PYTHON=$(CURDIR)/$(REHEARSAL)/server/bin/python \
		MNIST_PIPELINE_GPU_KIT=$(CURDIR)/$(REHEARSAL)/kit OUT=$(CURDIR)/$(REHEARSAL)/out bash tests/gpu_check.sh --cpu

clean-venv:
	rm -rf $(VENV)
