#!/usr/bin/env bash
# GPU check: on a bare CUDA machine, install, run the pipeline on the GPU, and print throughput and time to 99.0%.
# Usage: MNIST_PIPELINE_MIRRORS=/path/to/mnist bash tests/gpu_check.sh   (the mirrors in params.yaml otherwise)
# It takes under 5 minutes: about 2 to install PyTorch and the rest, under 1 for `dvc repro`, 1 for the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
make .venv/.installed  # PyPI's Linux wheel of torch==2.14.1 carries its own CUDA runtime
export PATH="$PWD/.venv/bin:$PATH"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: PyTorch sees no CUDA device')"

# train.device and evaluate.device are `auto`, so every stage that can use the GPU does.
time dvc repro
grep -E '"(accuracy|device)"' metrics/eval.json
python tests/benchmark.py --device cuda
