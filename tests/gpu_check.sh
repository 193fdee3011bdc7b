#!/usr/bin/env bash
# The GPU check: on a CUDA server without internet, with its own Python and PyTorch (2.11 or newer) and the kit that
# `make gpu-kit` builds (gpu-kit/ in this checkout), install the rest from the kit alone, run every stage on the GPU
# and the GPU measurements; the whole log, every metrics file and a summary go to $OUT, the summary printed last.
#
#   OUT=/some/dir bash tests/gpu_check.sh           # about 5 minutes on an H200, installation included
#   OUT=/some/dir bash tests/gpu_check.sh --cpu     # its rehearsal without a GPU, on 2,000 training images
#
# PYTHON names the server's Python (python3); MNIST_PIPELINE_GPU_KIT another kit folder; GPU_CHECK_STEPS some of the
# steps only, by name (repro tests seeds resume processes resnet; the data is prepared in any case);
# GPU_CHECK_BEST_SEEDS the number of seeds of the best preset (1). Without .git (a copy of the
# working tree), DVC runs with core.no_scm. The rehearsal edits params.yaml, so it runs only in such a copy:
# `make gpu-rehearsal` makes one from a clean clone and runs it, as the first run on a GPU would.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
device=cuda
if [ "${1:-}" = "--cpu" ]; then
    device=cpu
    [ -d .git ] && { echo "error: --cpu edits params.yaml: run it in a copy without .git (make gpu-rehearsal)" >&2; exit 2; }
fi
OUT=${OUT:-$repo/gpu-check-out}
KIT=${MNIST_PIPELINE_GPU_KIT:-$repo/gpu-kit}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
site=$(mktemp -d)  # the kit's packages, and each step's output for the summary
export PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1 MNIST_PIPELINE_MIRRORS="$KIT/mnist"
started=$SECONDS
summary=()
failures=0
say() { summary+=("$*"); }
step() { echo; echo "=== $* (at $((SECONDS - started)) s)"; }
wanted() { [[ " ${GPU_CHECK_STEPS:-repro tests seeds resume processes resnet} " == *" $1 "* ]]; }
# A step's command, its output shown; its status and seconds go into the summary.
run() {
    local name=$1; shift
    local begun=$SECONDS
    step "$name"
    "$@" 2>&1 | tee "$site/step.log"
    local status=${PIPESTATUS[0]}
    [ $status = 0 ] || failures=$((failures + 1))
    say "$(printf '%-40s %s, %d s' "$name" "$([ $status = 0 ] && echo ok || echo "FAILED (exit $status)")" $((SECONDS - begun)))"
    return $status
}
finish() {
    mkdir -p "$OUT/metrics" && cp -r metrics/*.json metrics/*.csv metrics/train "$OUT/metrics/" 2>/dev/null
    tar -czf "$OUT/metrics.tar.gz" -C "$OUT" metrics && rm -rf "$OUT/metrics"
    printf '%s\n' "${summary[@]}" "whole check: $((SECONDS - started)) s" > "$OUT/summary.txt"
    echo; echo "=== summary"; cat "$OUT/summary.txt"
}
# The exit status: 0 when every step that ran passed.
finished() { local status=$?; finish; [ $status != 0 ] && exit $status; exit $((failures > 0)); }
trap finished EXIT

[ -d "$KIT/wheels" ] || { echo "error: no kit at $KIT: build one with 'make gpu-kit' where pip reaches PyPI, and copy it here" >&2; exit 2; }
[ "$device" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# The kit's wheels beside the server's own packages, not over them; `python` is the server's Python, for dvc.yaml.

install_kit() {
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check --target "$site/lib" "$KIT"/wheels/*.whl || return
    mkdir -p "$site/bin" && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v "$PYTHON")" > "$site/bin/python" && chmod +x "$site/bin/python"
}
run "install from the kit" install_kit || exit 1
export PYTHONPATH="$site/lib:$repo" PATH="$site/bin:$site/lib/bin:$PATH"
python -c "
import sys, torch
print(f'Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs: {torch.cuda.device_count()}')
major, minor = (int(part) for part in torch.__version__.split('.')[:2])
sys.exit(0 if (major, minor) >= (2, 11) else f'error: torch {torch.__version__} is older than 2.11, the oldest this pipeline supports')
if '$device' == 'cuda' and not torch.cuda.is_available(): sys.exit('error: PyTorch sees no CUDA device')
" || exit 1
say "$(python -c "import sys, torch; print(f'Python {sys.version.split()[0]}, torch {torch.__version__}', *(torch.cuda.get_device_name() for _ in [0] if torch.cuda.is_available()))")"

[ -d .git ] || printf '[core]\n    no_scm = True\n' > .dvc/config.local
if [ "$device" = cpu ]; then  # the rehearsal's scale: every step, on little data
    python - <<'EOF'
import yaml
params = yaml.safe_load(open("params.yaml"))
params["preprocess"]["train_limit"] = 2000
params["train"]["epochs"] = 2
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
EOF
fi
seeds=$([ "$device" = cuda ] && echo 10 || echo 2)
best_epochs=$([ "$device" = cuda ] && echo 20 || echo 1)
resnet_size=$([ "$device" = cuda ] && echo 224 || echo 32)

if wanted repro; then
    run "dvc repro, every stage" dvc repro &&
    say "  $(grep -E "^training on" "$site/step.log" | cut -d: -f1); $(python -c "
import json; details, export = json.load(open('metrics/eval_details.json')), json.load(open('metrics/export.json'))
scores = json.load(open('metrics/eval.json'))
print(f\"evaluated on {details['device']}: test accuracy {scores['accuracy']}; ONNX {export['accuracy']}, int8 {export['int8_accuracy']}\")" 2>&1)"
else
    dvc repro preprocess  # the data every other step trains on
fi

wanted tests && run "CUDA tests" python -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_cpu.py

wanted seeds && run "fast recipe over $seeds seeds, best preset" python tests/benchmark.py --device $device --seeds $seeds --best --best-epochs $best_epochs --best-seeds ${GPU_CHECK_BEST_SEEDS:-1}
wanted seeds && while read -r line; do say "  $line"; done < <(grep -E "^(fast recipe's (test|time)|  against|  CUDA graphs|seed 0, torch|best preset)" "$site/step.log")

# Kill training once its first epoch's state is saved, then rerun: it resumes on the same device.
resume() {
    local work; work=$(mktemp -d)
    mkdir -p "$work/data" && ln -s "$repo/data/prepared" "$work/data/prepared"
    [ -d data/pretrained ] && ln -s "$repo/data/pretrained" "$work/data/pretrained"
    python -c "
import yaml; params = yaml.safe_load(open('params.yaml')); params['train']['epochs'] = 4
yaml.safe_dump(params, open('$work/params.yaml', 'w'), sort_keys=False)"
    (cd "$work" && exec python -m stages.train > first.log 2>&1) &
    local pid=$!
    while [ ! -f "$work/models/train_state.pt" ] && kill -0 $pid 2>/dev/null; do sleep 0.05; done
    kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
    echo "killed after the state of epoch 1 was saved:"; tr '\r' '\n' < "$work/first.log" | grep -E "^(training on|epoch|CUDA)"
    (cd "$work" && python -m stages.train) 2>&1 | tr '\r' '\n' | grep -vE "^epoch [0-9]+/[0-9]+: +[0-9]+%|^\s*$" | tee "$work/second.log"
    grep -q "^resuming from models/train_state.pt" "$work/second.log" && grep -q "^kept epoch" "$work/second.log"
}
wanted resume && run "kill and resume on $device" resume
wanted resume && say "  $(grep -E "^resuming|^kept" "$site/step.log" | tr '\n' ' ')"

wanted processes && run "data parallel: plain against 1 process" python tests/benchmark.py --device $device --processes
wanted processes && while read -r line; do say "  $line"; done < <(grep -E "^(1 process|[0-9]+ processes)" "$site/step.log")

wanted resnet && run "ResNet-18 at $resnet_size, 1 epoch" python tests/benchmark.py --device $device --resnet $resnet_size
wanted resnet && say "  $(grep -E "^ResNet-18 at" "$site/step.log" | tail -1)"

exit 0  # the EXIT trap then answers whether every step passed
