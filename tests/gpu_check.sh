#!/usr/bin/env bash
# GPU check: on a bare CUDA machine, install, run the pipeline on the GPU, and print throughput and time to 99.0%;
# then data-parallel training: plain single-GPU training against NCCL with 1 process and with one process per
# visible GPU, and the train stage itself on every GPU (train.processes=auto).
# Usage: MNIST_PIPELINE_MIRRORS=/path/to/mnist bash tests/gpu_check.sh   (the mirrors in params.yaml otherwise)
# It takes about 8 minutes: about 2 to install PyTorch and the rest, under 1 for `dvc repro`, 1 for the benchmark,
# 2 to 3 for the data-parallel comparison and 1 for the experiment on every GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
make .venv/.installed  # PyPI's Linux wheel of torch==2.14.1 carries its own CUDA runtime
export PATH="$PWD/.venv/bin:$PATH"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: PyTorch sees no CUDA device')"

# train.device and evaluate.device are `auto`, so every stage that can use the GPU does.
time dvc repro
grep -E '"(accuracy|device)"' metrics/eval_details.json
python tests/benchmark.py --device cuda

# 1 GPU without torch.distributed, 1 NCCL process, and one NCCL process per visible GPU (when there are several):
# seconds per epoch, images/s, and the time in DDP's all-reduce.
python tests/benchmark.py --device cuda --processes
# The stage as dvc runs it, on every GPU: its workers started through torch's elastic launcher, rank 0 writing.
dvc exp run -S train.processes=auto
grep -E '"(accuracy|device)"' metrics/eval_details.json
