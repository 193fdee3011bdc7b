"""Benchmark: the pipeline's training, inference and overhead against the tutorial loop, side by side in one run.

`make bench` runs `dvc repro` (MNIST_PIPELINE_MIRRORS names a local copy of MNIST) and then this script;
`python tests/benchmark.py [--best] [--device cuda]` runs it alone, after `dvc repro`; `--inference` only fp32
against int8 in onnxruntime, with what each int8 step bought. Every ratio compares
two measurements taken in this same process, on this same machine, with train.threads CPU threads for both.
The last line sums it up as key=value pairs.
"""

import argparse
import contextlib
import copy
import dataclasses
import gzip
import io
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from mnist_pipeline import paths  # noqa: E402
from mnist_pipeline.checkpoint import load_checkpoint  # noqa: E402
from mnist_pipeline.cpu import this_cpu  # noqa: E402
from mnist_pipeline.device import pick_device, predict_logits  # noqa: E402
from mnist_pipeline.distributed import Worker, launch, start_workers  # noqa: E402
from mnist_pipeline.errors import run_stage  # noqa: E402
from mnist_pipeline.model import build_model, export_form  # noqa: E402
from mnist_pipeline.onnx_export import calibration_sample, export_onnx, quantize_int8  # noqa: E402
from mnist_pipeline.onnx_io import inference_session  # noqa: E402
from mnist_pipeline.params import load_params  # noqa: E402
from mnist_pipeline.prepared import load_meta, load_split  # noqa: E402
from mnist_pipeline.presets import BEST, FAST  # noqa: E402
from mnist_pipeline.runtime import cuda_has_native_bf16, keep_freed_memory, use_threads  # noqa: E402
from stages import train  # noqa: E402

# The recipes it times, FAST and BEST, come from mnist_pipeline.presets, as `mnist-seeds` and the docs take them.
# FAST trains in the fastest honest precision for the machine (fastest_precision).
TORCHVISION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class TutorialCNN(nn.Module):
    """The classic CNN exactly as the reference tutorial writes it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 32 * 7 * 7)
        return self.fc2(F.relu(self.fc1(x)))


@dataclasses.dataclass
class TrainingRun:
    """One training run as the table shows it. `seconds` is the whole run, data loading included; the
    per-epoch test evaluations that find the time to 99.0% are not counted anywhere."""

    name: str
    seconds: float
    step_seconds: float  # the optimisation steps alone
    images: int  # training images processed, every epoch counted
    accuracy: float  # test accuracy of the model the run returns
    time_to_99: float | None  # seconds until an epoch first ended at >= 99.0% test accuracy
    flops_per_image: float  # forward and backward, counted once by PyTorch
    steps_to_99: float | None = None  # the optimisation steps' seconds until then: no set-up, no validation

    def setup_seconds(self) -> float:
        """The run's seconds outside its steps: data onto the device, the model, a capture or a compilation, and
        the validation after each epoch."""
        return self.seconds - self.step_seconds

    def gflops(self) -> float:
        return self.flops_per_image * self.images / self.step_seconds / 1e9


def report(name: str, value: str, target: str = "", ok: bool | None = None) -> None:
    verdict = "" if ok is None else ("  PASS" if ok else "  MISS")
    print(f"{name:<44} {value:<36} {target}{verdict}", flush=True)


def print_table(runs: list[TrainingRun], gemm: dict[str, float]) -> None:
    shares = "".join(f" {'of ' + name:>10}" for name in gemm)
    print(f"{'training run':<34} {'seconds':>8} {'images/s':>9} {'test acc':>9} {'to 99.0%':>9} {'GFLOP/s':>8}{shares}")
    for run in runs:
        to_99 = f"{run.time_to_99:.1f} s" if run.time_to_99 is not None else "never"
        shares = "".join(f" {run.gflops() / rate:>10.0%}" for rate in gemm.values())
        print(
            f"{run.name:<34} {run.seconds:>8.1f} {run.images / run.step_seconds:>9,.0f} {run.accuracy:>9.4f} "
            f"{to_99:>9} {run.gflops():>8.0f}{shares}"
        )
    print("images/s and GFLOP/s count the optimisation steps; seconds and time to 99.0% the whole run.\n", flush=True)


def gflops_of(run, flops: float, repeats: int = 8) -> float:
    run().sum().item()  # a warm-up, finished before the clock starts
    started = time.perf_counter()
    for _ in range(repeats):
        result = run()
    result.sum().item()  # waits for a GPU
    return flops * repeats / (time.perf_counter() - started) / 1e9


def gemm_gflops(device: torch.device) -> dict[str, float]:
    """fp32 rates of large matrix multiplies: torch.matmul (MKL's sgemm on a CPU, cuBLAS on a GPU) and, on a
    CPU, the same kind of GEMM through oneDNN, the library behind PyTorch's CPU convolutions, posed as a 1x1
    convolution. MKL takes a slower code path on AMD CPUs than oneDNN does, so the two can differ twofold."""
    a, b = torch.randn(4096, 4096, device=device), torch.randn(4096, 4096, device=device)
    rates = {"matmul": gflops_of(lambda: a @ b, 2 * 4096**3)}
    if device.type == "cuda":
        # cuDNN convolutions compute fp32 in TF32 by default, matmuls strictly: fp32 training is compared with a
        # TF32 matmul, like with like.
        strict, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, True
        try:
            rates["TF32 matmul"] = gflops_of(lambda: a @ b, 2 * 4096**3)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = strict
    if device.type == "cpu":
        conv = nn.Conv2d(2048, 2048, 1, bias=False).to(memory_format=torch.channels_last)
        x = torch.randn(32, 2048, 16, 16).contiguous(
            memory_format=torch.channels_last
        )  # an 8192x2048 by 2048x2048 GEMM
        with torch.no_grad():
            rates["oneDNN"] = gflops_of(lambda: conv(x), 2 * 8192 * 2048 * 2048)
    return rates


def flops_per_training_image(network: nn.Module, image_size: int = 28) -> float:
    """Forward plus backward FLOPs of one training step, per image, counted by PyTorch."""
    images, labels = torch.randn(64, 1, image_size, image_size), torch.randint(0, 10, (64,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(network(images), labels).backward()
    return counter.get_total_flops() / 64


def accuracy_on(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        logits = predict_logits(model, pixels, 1000)
    return (logits.argmax(1) == labels).float().mean().item()


def reference_loop(epochs: int = 5) -> TrainingRun:
    """The tutorial: torchvision MNIST with ToTensor per sample, DataLoader(64, shuffle), Adam 1e-3, 5 epochs."""
    import torchvision
    from torch.utils.data import DataLoader

    with tempfile.TemporaryDirectory() as root:
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        # torchvision reads the decompressed files from <root>/MNIST/raw, by MNIST's names
        for name, mnist_name in zip(load_params().dataset.files(), TORCHVISION_MNIST_FILES, strict=True):
            (raw / mnist_name).write_bytes(gzip.decompress((Path("data/raw") / name).read_bytes()))
        to_tensor = torchvision.transforms.ToTensor()
        trainset = torchvision.datasets.MNIST(root, train=True, download=False, transform=to_tensor)
        testset = torchvision.datasets.MNIST(root, train=False, download=False, transform=to_tensor)
        # ToTensor's values, made once and without a DataLoader: iterating one draws from the global RNG,
        # and would change the training shuffle of the next epoch.
        test_images = testset.data.unsqueeze(1).float() / 255
        torch.manual_seed(0)
        model = TutorialCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
        loader = DataLoader(trainset, batch_size=64, shuffle=True)
        seconds, time_to_99 = 0.0, None
        for _ in range(epochs):
            started = time.perf_counter()
            for images, labels in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(images), labels)
                loss.backward()
                optimizer.step()
            seconds += time.perf_counter() - started
            accuracy = accuracy_on(model, test_images, testset.targets)  # off the clock
            if time_to_99 is None and accuracy >= 0.99:
                time_to_99 = seconds
    return TrainingRun(
        "reference loop: 5 epochs",
        seconds,
        seconds,
        epochs * len(trainset),
        accuracy,
        time_to_99,
        flops_per_training_image(TutorialCNN()),
    )


def fastest_precision(device: torch.device) -> tuple[str, str, str]:
    """The fastest honest precision here: its name, the train.mixed_precision that gives it, and why."""
    if device.type == "cuda":
        name = "bf16" if cuda_has_native_bf16() else "fp16"
        return name, "auto", f"CUDA {'has' if name == 'bf16' else 'lacks'} bf16"
    if this_cpu().native_bf16:
        return "bf16", "native", "this CPU computes bf16 natively"
    return (
        "fp32",
        "native",
        "this CPU has neither avx512_bf16 nor amx_bf16: bf16 would be emulated, several times slower",
    )


def print_machine(params, device: torch.device, threads: int) -> tuple[str, str]:
    """The header every figure below depends on: versions, threads, the CPU and its flags, and the precision the fast
    recipe trains in here, which it returns with its train.mixed_precision setting."""
    gpu = f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    precision, setting, why = fastest_precision(device)
    print(
        f"torch {torch.__version__}, {threads} threads (train.threads = {params.train.threads}), {os.cpu_count()} "
        f"CPUs{gpu}"
    )
    print(f"CPU: {this_cpu().describe()}")
    print(f"fast recipe's precision: {precision} (train.mixed_precision: {setting}), as {why}\n")
    return precision, setting


def with_overrides(params, overrides: dict):
    """params.yaml's params with some keys of the model and train sections replaced: model.arch, and the keys of a
    model group given as a mapping ({"cnn": {"dropout": 0.0}})."""
    model = overrides.get("model", {})
    groups = {
        name: getattr(params.model, name).model_copy(update=keys)
        for name, keys in model.items()
        if isinstance(keys, dict)
    }
    return params.model_copy(
        update={
            "model": params.model.model_copy(update={**model, **groups}),
            "train": params.train.model_copy(update=overrides.get("train", {})),
        }
    )


def timed_training(name: str, params, cache_features: bool = True) -> TrainingRun:
    """Train as the train stage does, on the device params.train names, testing after every epoch off the clock."""
    images, labels = load_split("test")
    test_pixels, test_labels = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()
    device = pick_device(params.train.device, "train.device")
    off_clock, time_to_99, steps_to_99, step_seconds = 0.0, None, None, 0.0

    def on_epoch(result: dict, model: nn.Module) -> None:
        nonlocal off_clock, time_to_99, steps_to_99, step_seconds
        epoch_ended = time.perf_counter()
        step_seconds += result["seconds"]
        if time_to_99 is None and accuracy_on(model, test_pixels, test_labels) >= 0.99:
            time_to_99, steps_to_99 = epoch_ended - started - off_clock, step_seconds
        off_clock += time.perf_counter() - epoch_ended

    started = time.perf_counter()
    model, architecture, _ = train.train(params, Worker(device), on_epoch, cache_features=cache_features)
    seconds = time.perf_counter() - started - off_clock
    images_seen = load_meta()["counts"]["train"] * params.train.epochs
    flops = flops_per_training_image(build_model(architecture, 0.0, 1.0), architecture["image_size"])
    return TrainingRun(
        name,
        seconds,
        step_seconds,
        images_seen,
        accuracy_on(model, test_pixels, test_labels),
        time_to_99,
        flops,
        steps_to_99,
    )


# ResNet-18 recipes small enough for a CPU: 32x32 inputs, three epochs, and no shifts, so that a frozen backbone's
# features are computed once; the CNN trains with the same settings. "imagenet" is whatever file data/pretrained/
# holds for the weights section of params.yaml.
TRANSFER_TRAIN = {"epochs": 3, "shift_pixels": 0}
RESNET = {"input_size": 32}
TRANSFER = {
    "ResNet-18 from scratch": ({**RESNET, "pretrained": "none", "freeze": False}, True),
    "ResNet-18 frozen, features cached": ({**RESNET, "pretrained": "imagenet", "freeze": True}, True),
    "ResNet-18 frozen, not cached": ({**RESNET, "pretrained": "imagenet", "freeze": True}, False),
    "ResNet-18 fine-tuned": ({**RESNET, "pretrained": "imagenet", "freeze": False}, True),
}


def transfer_learning(params, device: str) -> None:
    """The ResNet-18 recipes next to params.yaml's CNN: seconds (the whole run) and test accuracy of each, and
    what computing a frozen backbone's features once saves."""
    weights = paths.PRETRAINED_DIR / params.weights.file
    cnn_params = with_overrides(params, {"model": {"arch": "cnn"}, "train": {**TRANSFER_TRAIN, "device": device}})
    runs = [timed_training("CNN (params.yaml's)", cnn_params)]
    for name, (model_overrides, cache) in TRANSFER.items():
        if model_overrides["pretrained"] != "none" and not weights.exists():
            report(name, f"skipped: no {weights} (dvc repro pretrained, with model.resnet18.pretrained: imagenet)")
            continue
        transfer_params = with_overrides(
            params,
            {"model": {"arch": "resnet18", "resnet18": model_overrides}, "train": {**TRANSFER_TRAIN, "device": device}},
        )
        runs.append(timed_training(name, transfer_params, cache_features=cache))
    print(f"\n{'transfer learning':<36} {'epochs':>6} {'seconds':>8} {'s/epoch':>8} {'test acc':>9}")
    for run in runs:
        epochs = run.images // load_meta()["counts"]["train"]
        print(f"{run.name:<36} {epochs:>6} {run.seconds:>8.1f} {run.step_seconds / epochs:>8.2f} {run.accuracy:>9.4f}")
    print("seconds: the whole run (a frozen backbone's features included); s/epoch: the optimisation steps alone.\n")
    by_name = {run.name: run for run in runs}
    cached, uncached = by_name.get("ResNet-18 frozen, features cached"), by_name.get("ResNet-18 frozen, not cached")
    if cached and uncached:
        report(
            "frozen backbone, features computed once",
            f"{uncached.seconds / cached.seconds:.1f}x faster "
            f"({uncached.seconds:.1f} s -> {cached.seconds:.1f} s); epochs "
            f"{uncached.step_seconds / cached.step_seconds:.0f}x",
        )


def best_images_per_second(runtimes: dict, pixels: np.ndarray, rounds: int = 7, repeats: int = 10) -> dict[str, float]:
    """Each runtime's best rate over several rounds, the runtimes taking turns, so that a noisy moment on a
    shared machine hits them alike instead of deciding the ratio."""
    best = dict.fromkeys(runtimes, 0.0)
    for _ in range(rounds):
        for name, predict in runtimes.items():
            predict(pixels)
            started = time.perf_counter()
            for _ in range(repeats):
                predict(pixels)
            best[name] = max(best[name], repeats * len(pixels) / (time.perf_counter() - started))
    return best


# Each onnxruntime model against its fairest opponent, and the speed-up aimed for at batch 1000.
OPPONENTS = {
    "onnxruntime fp32": ("PyTorch eager, channels-last", "channels-last eager", 2.0),
    "onnxruntime int8": ("onnxruntime fp32", "fp32", 1.5),
}


def export_checkpoint(model, checkpoint: dict, path: Path, opset: int, image_size: int) -> None:
    """The loaded checkpoint's model as the export stage writes it (fp32 ONNX), at `path`."""
    export_onnx(export_form(model, checkpoint["architecture"]), path, opset, image_size, checkpoint["class_names"])


def inference(rounds: int = 7) -> dict[str, str]:
    """models/model.pt in PyTorch eager against its ONNX export in onnxruntime, fp32 and int8, at batch 1000 and
    batch 1, with the same threads. Eager runs in its best form: channels-last under inference_mode (as loaded,
    the way the evaluate stage runs it, is shown too). Each ratio is against the fairest opponent: onnxruntime
    fp32 against channels-last eager, int8 against fp32. Returns the batch-1000 ratios for the summary line."""
    params = load_params().export
    model, checkpoint = load_checkpoint(paths.MODEL_FILE)
    images, _ = load_split("test")
    pixels = np.ascontiguousarray(images[:1000, None])
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def eager(module):
        def predict(batch):
            with torch.inference_mode():
                return module(torch.from_numpy(batch))

        return predict

    with tempfile.TemporaryDirectory() as folder:
        fp32_path, int8_path = Path(folder) / "model.onnx", Path(folder) / "model.int8.onnx"
        export_checkpoint(model, checkpoint, fp32_path, params.opset, images.shape[1])
        quantize_int8(
            fp32_path, int8_path, calibration_sample(load_split("train")[0], params.calibration_images, params.seed)
        )
        sessions = {
            name: inference_session(path, torch.get_num_threads())
            for name, path in [("onnxruntime fp32", fp32_path), ("onnxruntime int8", int8_path)]
        }
        runtimes = {
            "PyTorch eager, as loaded": eager(model),
            "PyTorch eager, channels-last": eager(channels_last),
            **{
                name: (lambda batch, s=session: s.run(["logits"], {"pixels": batch})[0])
                for name, session in sessions.items()
            },
        }
        ratios = {}
        for batch, repeats in [(1000, 10), (1, 500)]:
            rates = best_images_per_second(runtimes, pixels[:batch], rounds, repeats)
            for name, rate in rates.items():
                speed = f"{rate:,.0f} images/s" if batch > 1 else f"{1000 / rate:.3f} ms per image"
                if name not in OPPONENTS:
                    report(f"batch {batch}: {name}", speed)
                    continue
                opponent, short_name, target = OPPONENTS[name]
                ratio = rate / rates[opponent]
                ratios.setdefault(name, ratio)  # batch 1000's, measured first
                report(
                    f"batch {batch}: {name}",
                    f"{speed} = {ratio:.1f}x {short_name}",
                    *((f">= {target}x", ratio >= target) if batch > 1 else ()),
                )
    return {"ort_speedup": f"{ratios['onnxruntime fp32']:.1f}", "int8_speedup": f"{ratios['onnxruntime int8']:.1f}"}


def int8_steps(rounds: int = 7) -> dict[str, str]:
    """`--inference`: the fp32 ONNX model against the int8 one at batch 1000 and batch 1, with what each step from
    quantize_static's plain output to the exported int8 model bought, all timed in this run with the same threads.
    Each step's session and file are built here from models/model.pt, as the export stage builds them."""
    params = load_params().export
    model, checkpoint = load_checkpoint(paths.MODEL_FILE)
    images, labels = load_split("test")
    pixels = np.ascontiguousarray(images[:1000, None])
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        fp32_path = Path(folder) / "model.onnx"
        export_checkpoint(model, checkpoint, fp32_path, params.opset, images.shape[1])
        calibration = calibration_sample(load_split("train")[0], params.calibration_images, params.seed)
        files = {}
        for name, raw, depthwise in [("plain", False, False), ("raw", True, False), ("depthwise", True, True)]:
            files[name] = Path(folder) / f"model.{name}.int8.onnx"
            quantize_int8(fp32_path, files[name], calibration, raw_pixels=raw, depthwise=depthwise)
        # The last step is the exported model as mnist-predict runs it; the one after it was tried and not adopted.
        steps = {
            "fp32": inference_session(fp32_path, threads),
            "int8, QDQ as quantize_static writes it": inference_session(files["plain"], threads),
            "+ raw uint8 pixels into the first conv": inference_session(files["raw"], threads),
            "+ first conv depthwise on 16 copies": inference_session(files["depthwise"], threads),
            "(tried) + QDQPropagationTransformer off": inference_session(
                files["depthwise"], threads, ("QDQPropagationTransformer",)
            ),
        }
        exported = "+ first conv depthwise on 16 copies"
        accuracy = {
            name: float(
                (
                    np.concatenate(
                        [
                            session.run(["logits"], {"pixels": images[i : i + 1000, None]})[0]
                            for i in range(0, len(images), 1000)
                        ]
                    ).argmax(1)
                    == labels
                ).mean()
            )
            for name, session in steps.items()
        }
        runtimes = {
            name: (lambda batch, s=session: s.run(["logits"], {"pixels": batch})[0]) for name, session in steps.items()
        }
        summary = {}
        for batch, repeats in [(1000, 10), (1, 500)]:
            rates = best_images_per_second(runtimes, pixels[:batch], rounds, repeats)
            previous = None
            for name, rate in rates.items():
                speed = f"{rate:,.0f} images/s" if batch > 1 else f"{1000 / rate:.3f} ms per image"
                bought = f", {rate / rates[previous]:.2f}x the step before" if previous not in (None, "fp32") else ""
                target = (1.5 if batch > 1 else 1.0) if name == exported else None
                report(
                    f"batch {batch}: {name}",
                    f"{speed} = {rate / rates['fp32']:.2f}x fp32{bought}",
                    *((f">= {target}x", rate / rates["fp32"] >= target) if target else ()),
                )
                previous = name
            summary[f"int8_speedup_{batch}"] = f"{rates[exported] / rates['fp32']:.2f}"
        for name, value in accuracy.items():
            report(f"test accuracy: {name}", f"{value:.4f} ({100 * (value - accuracy['fp32']):+.2f} points)")
        summary["int8_accuracy_drop_points"] = f"{100 * (accuracy['fp32'] - accuracy[exported]):.2f}"
    return summary


@contextlib.contextmanager
def scratch_repo(preprocess_overrides: dict):
    """A temporary working directory with data/raw linked in and params.yaml changed as given.

    Stages run there read and write its data/prepared/, so the repository's outputs stay untouched.
    """
    with tempfile.TemporaryDirectory() as folder:
        params = yaml.safe_load(Path("params.yaml").read_text())
        params["preprocess"].update(preprocess_overrides)
        (Path(folder) / "params.yaml").write_text(yaml.safe_dump(params))
        (Path(folder) / "data").mkdir()
        os.symlink(REPO_ROOT / "data/raw", Path(folder) / "data/raw")
        yield Path(folder)


def run_preprocess(folder: Path) -> float:
    """Seconds for the whole preprocess stage, Python start-up included, as `dvc repro` runs it."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "stages.preprocess"], cwd=folder, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def pipeline_overhead() -> None:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    status = subprocess.run(["dvc", "status", "--quiet"], env=env)
    if status.returncode != 0:
        report("no-op dvc repro", "skipped: the pipeline is not up to date (run dvc repro first)")
    else:
        started = time.perf_counter()
        subprocess.run(["dvc", "repro", "--quiet"], env=env, check=True)
        seconds = time.perf_counter() - started
        report("no-op dvc repro", f"{seconds:.2f} s", "<= 2 s", seconds <= 2)
    with scratch_repo({}) as folder:
        seconds = run_preprocess(folder)
    report("preprocess full MNIST (whole stage)", f"{seconds:.2f} s", "<= 5 s", seconds <= 5)


def best_preset(params, device: str, epochs: int | None = None) -> TrainingRun:
    """The best preset, on a preprocess of its own; epochs, if given, replaces the preset's (for a rehearsal)."""
    recipe = {**BEST, "train": {**BEST["train"], "device": device, **({"epochs": epochs} if epochs else {})}}
    with scratch_repo(BEST.get("preprocess", {})) as folder:
        run_preprocess(folder)
        os.chdir(folder)
        try:
            return timed_training("best preset", with_overrides(params, recipe))
        finally:
            os.chdir(REPO_ROOT)


# tuomaso/train_mnist_fast: 99.04% mean test accuracy in 0.76 s of training on a GTX 1660 Ti, the data on the GPU.
ANCHOR_SECONDS, GPU_GOAL_SECONDS = 0.76, 0.25


def spread(values: list[float]) -> str:
    return (
        f"mean {statistics.mean(values):.4f}, sd {statistics.pstdev(values):.4f}, "
        f"min {min(values):.4f}, max {max(values):.4f}, n {len(values)}"
    )


def fast_recipe_over_seeds(fast_params, seeds: int) -> dict[str, str]:
    """The fast recipe's time to 99.0% test accuracy, measured as the anchor measures it: the data already on the
    device, a warm-up run excluded (CUDA's start, cuDNN's first choices), the optimisation steps timed apart from
    the set-up (data, model, CUDA graphs' capture or compilation) and from validation, seed by seed; the median."""
    timed_training("warm-up", with_overrides(fast_params, {"train": {"seed": 10_000}}))
    runs = [
        timed_training(f"seed {seed}", with_overrides(fast_params, {"train": {"seed": seed}})) for seed in range(seeds)
    ]
    graphed = fast_params.train.device == "cuda" and fast_params.train.cuda_graphs
    eager = (
        [
            timed_training(
                "seed 0, eager steps", with_overrides(fast_params, {"train": {"seed": 0, "cuda_graphs": False}})
            )
        ]
        if graphed
        else []
    )
    if fast_params.train.device == "cuda":  # torch.compile: its compilation is in the set-up column
        try:
            eager.append(
                timed_training(
                    "seed 0, torch.compile", with_overrides(fast_params, {"train": {"seed": 0, "compile": True}})
                )
            )
        except Exception as error:  # Triton or a C compiler missing: a finding, not the end of the benchmark
            report("fast recipe, torch.compile", f"failed: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
    print(f"\n{'fast recipe':<22} {'test acc':>9} {'to 99.0%':>9} {'steps':>8} {'set-up':>8}")
    for run in [*runs, *eager]:
        to_99 = f"{run.steps_to_99:.3f}s" if run.steps_to_99 is not None else "never"
        print(f"{run.name:<22} {run.accuracy:>9.4f} {to_99:>9} {run.step_seconds:>7.3f}s {run.setup_seconds():>7.2f}s")
    print(
        "to 99.0%: the steps' seconds until an epoch first ended at >= 99.0% test accuracy; steps: all epochs' steps; "
        "set-up: the rest of the run\n(data onto the device, model, graph capture, validation).\n"
    )
    reached = [run.steps_to_99 for run in runs if run.steps_to_99 is not None]
    median = statistics.median([run.steps_to_99 if run.steps_to_99 is not None else math.inf for run in runs])
    accuracies = [run.accuracy for run in runs]
    report("fast recipe's test accuracy", spread(accuracies), ">= 0.9900 mean", statistics.mean(accuracies) >= 0.99)
    report(
        "fast recipe's time to 99.0%, median",
        f"{median:.3f} s ({len(reached)} of {seeds} seeds reached 99.0%)",
        f"<= {GPU_GOAL_SECONDS} s",
        median <= GPU_GOAL_SECONDS,
    )
    report(
        "  against the anchor's 0.76 s",
        f"{ANCHOR_SECONDS / median:.1f}x as fast" if reached else "not comparable: no seed reached 99.0%",
        "tuomaso/train_mnist_fast on a GTX 1660 Ti",
    )
    if eager:
        report(
            "  CUDA graphs against eager steps",
            f"{eager[0].step_seconds / runs[0].step_seconds:.1f}x the speed "
            f"({eager[0].step_seconds:.3f} s -> {runs[0].step_seconds:.3f} s of steps, seed 0)",
        )
    return {
        "fast_mean_accuracy": f"{statistics.mean(accuracies):.4f}",
        "fast_time_to_99_s": f"{median:.3f}",
        "fast_seeds_at_99": f"{len(reached)}/{seeds}",
        **({"anchor_ratio": f"{ANCHOR_SECONDS / median:.1f}"} if reached else {}),
    }


def resnet_epoch(params, device: str, size: int) -> dict[str, str]:
    """ResNet-18 from scratch for one epoch at size x size inputs, params.yaml's train settings otherwise."""
    recipe = with_overrides(
        params,
        {
            "model": {"arch": "resnet18", "resnet18": {"input_size": size, "pretrained": "none", "freeze": False}},
            "train": {"epochs": 1, "device": device},
        },
    )
    run = timed_training(f"ResNet-18 at {size}x{size}", recipe)
    report(
        f"ResNet-18 at {size}x{size}, 1 epoch",
        f"{run.step_seconds:.1f} s of steps, {run.images / run.step_seconds:,.0f} images/s, "
        f"{run.gflops() / 1000:.1f} TFLOP/s; test accuracy {run.accuracy:.4f}; whole run {run.seconds:.1f} s",
    )
    return {"resnet_images_per_s": f"{run.images / run.step_seconds:.0f}", "resnet_accuracy": f"{run.accuracy:.4f}"}


class WallClock:
    """Marks in host seconds: right for gloo, whose all-reduce has ended when its future completes."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start


class CudaClock:
    """Marks as CUDA events on the current stream, read once the device is done. NCCL reduces on a stream of its
    own, and a future's callback may run before those kernels end; torch runs the callback with a current stream
    that waits for them, so an event recorded there marks the true end."""

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        end.synchronize()
        return start.elapsed_time(end) / 1000


class AllReduceTimer:
    """A DDP communication hook that does what DDP's default one does (each gradient bucket averaged over the
    workers by an all-reduce) and adds up the seconds from each bucket's start to the end of its all-reduce: the
    wait for the other workers to reach that bucket included, and overlapped with the rest of the backward pass."""

    def __init__(self, clock: WallClock | CudaClock):
        self.clock = clock
        self.take()

    def hook(self, state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        started = self.clock.mark()
        gradients = bucket.buffer().div_(dist.get_world_size())
        self.calls, self.bytes = self.calls + 1, self.bytes + gradients.numel() * gradients.element_size()

        def finished(future: torch.futures.Future) -> torch.Tensor:
            self.spans.append((started, self.clock.mark()))
            return future.value()[0]

        return dist.all_reduce(gradients, async_op=True).get_future().then(finished)

    def take(self) -> dict:
        """The totals since the last take."""
        spans = getattr(self, "spans", [])
        totals = {
            "seconds": sum(self.clock.seconds(*span) for span in spans),
            "calls": getattr(self, "calls", 0),
            "bytes": getattr(self, "bytes", 0),
        }
        self.spans, self.calls, self.bytes = [], 0, 0
        return totals


def timed_worker(params, worker: Worker) -> dict:
    """One worker process of a data-parallel run: it trains as the stage does, DDP's all-reduce timed; its epochs."""
    keep_freed_memory()
    use_threads(worker.threads)
    timer = AllReduceTimer(CudaClock() if worker.device.type == "cuda" else WallClock())
    if worker.distributed:  # in this worker process only: the DDP module that the training code builds gets the timer
        wrap = Worker.wrap
        Worker.wrap = lambda self, module: with_comm_hook(wrap(self, module), timer)
    epochs = []
    with contextlib.redirect_stdout(io.StringIO()):  # the table is the output
        train.train(
            params, worker, lambda result, model: epochs.append({"seconds": result["seconds"], "reduce": timer.take()})
        )
    return {"threads": torch.get_num_threads(), "epochs": epochs}


def with_comm_hook(module: nn.Module, hook: AllReduceTimer) -> nn.Module:
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module.register_comm_hook(None, hook.hook)
    return module


def cpu_name() -> str:
    """The CPU's model name and what it has of AVX-512 and AMX, from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "a CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    features = [flag for flag in ["avx2", "avx512f", "avx512_bf16", "amx_tile"] if flag in flags]
    return f"{name}, {len(os.sched_getaffinity(0))} cores ({' '.join(features) or 'no AVX2'})"


DATA_PARALLEL_EPOCHS, DATA_PARALLEL_ROUNDS = 2, 2


def data_parallel(params, device: torch.device) -> dict[str, str]:
    """params.yaml's recipe for DATA_PARALLEL_EPOCHS epochs as one plain process, as one DDP worker, and as several
    (2 on a CPU, one per GPU), with params.yaml's train.threads in all: seconds of the best epoch, images/s, and
    the all-reduce of the gradients that DDP adds. The runs take turns, DATA_PARALLEL_ROUNDS times, so that a busy
    moment of a shared machine hits them alike. Returns the summary's key=value pairs."""
    recipe = with_overrides(params, {"train": {"epochs": DATA_PARALLEL_EPOCHS, "device": device.type}})
    several = torch.cuda.device_count() if device.type == "cuda" else 2
    backend = "nccl" if device.type == "cuda" else "gloo"
    runs = {
        "1 process, no DDP": (
            "plain",
            1,
            lambda: launch(timed_worker, with_overrides(recipe, {"train": {"processes": 1}}), load_meta()["counts"]),
        ),
        f"1 process, DDP ({backend})": (
            "ddp_1",
            1,
            lambda: start_workers(timed_worker, recipe, 1, load_meta()["counts"]),
        ),
    }
    if several > 1:
        runs[f"{several} processes, DDP ({backend})"] = (
            f"ddp_{several}",
            several,
            lambda: start_workers(timed_worker, recipe, several, load_meta()["counts"]),
        )
    print(
        f"data parallel on {torch.cuda.get_device_name() if device.type == 'cuda' else cpu_name()}: "
        f"{DATA_PARALLEL_ROUNDS} runs of {DATA_PARALLEL_EPOCHS} epochs of params.yaml's recipe each, the best "
        "epoch's figures"
    )
    print(
        f"{'run':<26} {'threads':>7} {'s/epoch':>8} {'images/s':>9} {'all-reduce':>10} {'of epoch':>8} {'calls':>6} "
        f"{'MB':>6} {'whole run':>9}"
    )
    results = {name: [] for name in runs}
    for _ in range(DATA_PARALLEL_ROUNDS):
        for name, (_, _, run) in runs.items():
            started = time.perf_counter()
            results[name].append({**run(), "whole": time.perf_counter() - started})
    images, summary = load_meta()["counts"]["train"], {}
    for name, (key, processes, _) in runs.items():
        epoch = min(
            (epoch for result in results[name] for epoch in result["epochs"]), key=lambda epoch: epoch["seconds"]
        )
        whole, threads = min(result["whole"] for result in results[name]), results[name][0]["threads"]
        reduce, summary[f"{key}_images_per_s"] = epoch["reduce"], f"{images / epoch['seconds']:.0f}"
        reduced = (
            (
                f"{reduce['seconds']:>9.2f}s {reduce['seconds'] / epoch['seconds']:>8.0%} {reduce['calls']:>6} "
                f"{reduce['bytes'] / 1e6:>6.1f}"
            )
            if reduce["calls"]
            else f"{'-':>10} {'-':>8} {'-':>6} {'-':>6}"
        )
        if reduce["calls"]:
            summary[f"{key}_allreduce_share"] = f"{reduce['seconds'] / epoch['seconds']:.2f}"
        print(
            f"{name:<26} {f'{processes}x{threads}':>7} {epoch['seconds']:>8.2f} {images / epoch['seconds']:>9,.0f} "
            f"{reduced} {whole:>8.1f}s",
            flush=True,
        )
    print(
        "threads: processes x CPU threads each; all-reduce: from each gradient bucket's start to the end of its "
        "all-reduce, summed\n(the wait for the other workers included; it overlaps the backward pass); whole run: "
        "the shortest, the workers' start included.\n"
    )
    return summary


def best_preset_over_seeds(params, device: str, seeds: int, epochs: int | None) -> dict[str, str]:
    """The best preset with train.seed 0, 1, ...: each run's seconds and test accuracy (the kept epoch is chosen on
    the validation split), then their spread."""
    runs = [best_preset(with_overrides(params, {"train": {"seed": seed}}), device, epochs) for seed in range(seeds)]
    for seed, run in enumerate(runs):
        epochs_run = run.images // load_meta()["counts"]["train"]
        print(
            f"best preset, seed {seed}: {run.seconds:.0f} s ({run.step_seconds / epochs_run:.2f} s/epoch), test "
            f"accuracy {run.accuracy:.4f}"
        )
    accuracies = [run.accuracy for run in runs]
    report("best preset", f"{spread(accuracies)}; {max(run.seconds for run in runs):.0f} s at most")
    return {
        "best_accuracy": f"{statistics.mean(accuracies):.4f}",
        "best_seconds": f"{max(run.seconds for run in runs):.0f}",
    }


def seeds_and_best(params, args, precision_setting: str) -> dict[str, str]:
    fast_params = with_overrides(
        params, {**FAST, "train": {**FAST["train"], "device": args.device, "mixed_precision": precision_setting}}
    )
    summary = fast_recipe_over_seeds(fast_params, args.seeds)
    if args.best:
        summary.update(best_preset_over_seeds(params, args.device, args.best_seeds, args.best_epochs))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--best", action="store_true", help="also train the `best` preset (about 10 minutes on 2 cores)"
    )
    parser.add_argument(
        "--transfer",
        action="store_true",
        help="only the ResNet-18 recipes (from scratch, frozen with and without cached features, fine-tuned) and the "
        "CNN",
    )
    parser.add_argument(
        "--processes",
        action="store_true",
        help="only data-parallel training: 1 process against 2 (on a CPU) or one per GPU, the all-reduce timed",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="only the fast recipe over N seeds after a warm-up, its time to 99.0% timed as on a GPU; with --best, "
        "the best preset too",
    )
    parser.add_argument(
        "--best-epochs",
        type=int,
        metavar="N",
        help="with --seeds and --best: N epochs of the best preset instead of its own",
    )
    parser.add_argument(
        "--best-seeds",
        type=int,
        default=1,
        metavar="N",
        help="with --seeds and --best: the best preset with seeds 0 to N-1",
    )
    parser.add_argument(
        "--inference",
        action="store_true",
        help="only fp32 against int8 in onnxruntime at batch 1000 and 1, with what each int8 step bought",
    )
    parser.add_argument(
        "--resnet", type=int, metavar="SIZE", help="only ResNet-18 from scratch for one epoch at SIZE x SIZE inputs"
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the project's training runs; the reference loop and inference stay on the CPU",
    )
    args = parser.parse_args()
    os.chdir(REPO_ROOT)  # the stages read params.yaml and data/ relative to the repository root
    params = load_params()
    device = pick_device(args.device, "--device")
    keep_freed_memory()  # the process-wide tunings of the train stage's main, for its runs here
    threads = use_threads(params.train.threads)
    precision, precision_setting = print_machine(params, device, threads)
    if args.transfer:
        transfer_learning(params, args.device)
        return
    only = {
        "processes": args.processes and (lambda: data_parallel(params, device)),
        "resnet": args.resnet and (lambda: resnet_epoch(params, args.device, args.resnet)),
        "seeds": args.seeds and (lambda: seeds_and_best(params, args, precision_setting)),
        "inference": args.inference and int8_steps,
    }
    for section in filter(None, only.values()):
        summary = section()
        print(" ".join(f"{key}={value}" for key, value in summary.items()))
        return

    gemm = gemm_gflops(device)
    for name, rate in gemm.items():
        report(f"fp32 GEMM on {device.type}, {name}", f"{rate:.0f} GFLOP/s")
    fast_params = with_overrides(
        params, {**FAST, "train": {**FAST["train"], "device": args.device, "mixed_precision": precision_setting}}
    )
    runs = [] if device.type == "cuda" else [reference_loop()]
    fast_name = f"fast recipe: 1 epoch, {precision}"
    runs.append(timed_training(fast_name, fast_params))
    if precision != "fp32":  # efficiency is judged in fp32, the precision of the matmul it is compared with
        runs.append(
            timed_training("fast recipe in fp32", with_overrides(fast_params, {"train": {"mixed_precision": "never"}}))
        )
    runs.append(timed_training("params.yaml defaults", with_overrides(params, {"train": {"device": args.device}})))
    if device.type == "cuda":
        runs.append(
            timed_training("fast recipe, torch.compile", with_overrides(fast_params, {"train": {"compile": True}}))
        )
    if args.best:
        runs.append(best_preset(params, args.device))
    print()
    print_table(runs, gemm)

    by_name = {run.name: run for run in runs}
    fast, default = by_name[fast_name], by_name["params.yaml defaults"]
    fp32 = by_name.get("fast recipe in fp32", fast)
    summary = {
        "precision": precision,
        "gemm_fraction": f"{fp32.gflops() / gemm.get('TF32 matmul', gemm['matmul']):.2f}",
        "default_accuracy": f"{default.accuracy:.4f}",
    }
    if "oneDNN" in gemm:
        summary["onednn_gemm_fraction"] = f"{fp32.gflops() / gemm['oneDNN']:.2f}"
    fast_to_99 = fast.time_to_99 if fast.time_to_99 is not None else float("inf")
    if device.type == "cpu":
        reference = by_name["reference loop: 5 epochs"]
        ratio = fast_to_99 / reference.seconds
        report(
            "time to 99.0%, fast recipe",
            f"{fast_to_99:.2f} s = {ratio:.3f}x the reference's 5 epochs",
            "<= 0.08x",
            ratio <= 0.08,
        )
        summary = {"time_to_99_ratio": f"{ratio:.3f}", **summary}
    else:
        report(
            "time to 99.0%, fast recipe on CUDA", f"{fast_to_99:.2f} s, {fast.images / fast.step_seconds:,.0f} images/s"
        )
        summary = {
            "time_to_99_s": f"{fast_to_99:.2f}",
            "images_per_s": f"{fast.images / fast.step_seconds:.0f}",
            **summary,
        }
    if fp32 is not fast:
        report(
            f"fast recipe in {precision} against fp32",
            f"{fp32.step_seconds / fast.step_seconds:.1f}x the speed "
            f"({fp32.step_seconds:.1f} s -> {fast.step_seconds:.1f} s of steps)",
        )
    like = "TF32 matmul" if "TF32 matmul" in gemm else "matmul"
    report(
        "fp32 training throughput",
        f"{fp32.gflops():.0f} GFLOP/s = {fp32.gflops() / gemm[like]:.0%} of {like}",
        ">= 50%",
        fp32.gflops() / gemm[like] >= 0.5,
    )
    if "oneDNN" in gemm:
        report("  against oneDNN's GEMM", f"{fp32.gflops() / gemm['oneDNN']:.0%}")
    report(
        "params.yaml defaults",
        f"{default.seconds:.1f} s, test accuracy {default.accuracy:.4f}",
        ">= 0.994 in <= 60 s",
        default.accuracy >= 0.994 and default.seconds <= 60,
    )
    if "best preset" in by_name:
        best = by_name["best preset"]
        report(
            "best preset",
            f"{best.seconds:.0f} s, test accuracy {best.accuracy:.4f}",
            ">= 0.9965 in < 600 s",
            best.accuracy >= 0.9965 and best.seconds < 600,
        )
        summary["best_accuracy"] = f"{best.accuracy:.4f}"
    if device.type == "cpu":
        summary.update(inference())
        pipeline_overhead()
    keys = [
        "precision",
        "time_to_99_ratio",
        "time_to_99_s",
        "images_per_s",
        "gemm_fraction",
        "ort_speedup",
        "int8_speedup",
        "default_accuracy",
        "best_accuracy",
        "onednn_gemm_fraction",
    ]
    print(" ".join(f"{key}={summary[key]}" for key in keys if key in summary))


if __name__ == "__main__":
    run_stage(main)
