"""Benchmark: the pipeline's training, inference and overhead against the tutorial loop, side by side in one run.

Run `make benchmark` (or `python tests/benchmark.py [--best]`) after `dvc repro`: it needs data/raw and
data/prepared. Every ratio compares two measurements taken in this same process, on this same machine.
"""

import argparse
import contextlib
import copy
import dataclasses
import gzip
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from stages import train  # noqa: E402
from stages.export import export_onnx  # noqa: E402
from stages.model import CNN, MODEL_FILE, load_checkpoint, pick_device, predict_logits  # noqa: E402
from stages.params import MNIST_FILES, load_params  # noqa: E402
from stages.prepared import load_meta, load_split  # noqa: E402

# One epoch, tuned for time to 99.0% test accuracy with the default (classic) architecture, in bf16
# autocast (this CPU has AVX512-BF16; weights and optimiser state stay fp32).
FAST = {
    "model": {"dropout": 0.0},
    "train": {"epochs": 1, "lr": 0.006, "betas": [0.8, 0.95], "shift_pixels": 0, "mixed_precision": "always"},
}
# The `best` preset, as the README's `dvc exp run -S` recipe gives it (tests check that the two agree).
BEST = {
    "model": {"conv_channels": [32, 64], "convs_per_block": 2, "batch_norm": True, "fc_units": 256},
    "train": {"epochs": 20, "rotate_degrees": 10, "zoom_percent": 10},
}


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


def report(name: str, value: str, target: str = "", ok: bool | None = None) -> None:
    verdict = "" if ok is None else ("  PASS" if ok else "  MISS")
    print(f"{name:<44} {value:<34} {target}{verdict}", flush=True)


def matmul_gflops(size: int = 4096, repeats: int = 8) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def reference_loop(epochs: int = 5) -> tuple[float, float]:
    """The tutorial: torchvision MNIST with ToTensor per sample, DataLoader(64, shuffle), Adam 1e-3, 5 epochs."""
    import torchvision
    from torch.utils.data import DataLoader

    with tempfile.TemporaryDirectory() as root:
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for name in MNIST_FILES:  # torchvision reads the decompressed files from <root>/MNIST/raw
            (raw / name.removesuffix(".gz")).write_bytes(gzip.decompress((REPO_ROOT / "data/raw" / name).read_bytes()))
        to_tensor = torchvision.transforms.ToTensor()
        trainset = torchvision.datasets.MNIST(root, train=True, download=False, transform=to_tensor)
        testset = torchvision.datasets.MNIST(root, train=False, download=False, transform=to_tensor)
        torch.manual_seed(0)
        model = TutorialCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
        loader = DataLoader(trainset, batch_size=64, shuffle=True)
        started = time.perf_counter()
        for _ in range(epochs):
            for images, labels in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(images), labels)
                loss.backward()
                optimizer.step()
        seconds = time.perf_counter() - started
        correct = 0
        with torch.no_grad():
            for images, labels in DataLoader(testset, batch_size=1000):
                correct += (model(images).argmax(1) == labels).sum().item()
    return seconds, correct / len(testset)


def with_overrides(params, overrides: dict):
    """params.yaml's model and train sections with some keys replaced."""
    return (
        dataclasses.replace(params.model, **overrides.get("model", {})),
        dataclasses.replace(params.train, **overrides.get("train", {})),
    )


def measured_test_accuracy(model) -> float:
    images, labels = load_split("test")
    logits = predict_logits(model, torch.from_numpy(images).unsqueeze(1), 1000)
    return float((logits.argmax(1).numpy() == labels).mean())


def timed_training(model_params, train_params) -> dict:
    """Train as the train stage does; wall seconds include loading the data and validating every epoch."""
    epochs = []
    started = time.perf_counter()
    device = pick_device(train_params.device, "train.device")
    model, _, best = train.train(model_params, train_params, device, lambda result, _: epochs.append(result))
    wall = time.perf_counter() - started
    return {
        "wall": wall,
        "loop": sum(e["seconds"] for e in epochs),  # the optimisation steps alone
        "accuracy": measured_test_accuracy(model.to("cpu")),
        "best": best,
    }


def training_flops_per_image(model_params) -> float:
    """Forward plus backward FLOPs of one training step, per image, counted by PyTorch."""
    meta = load_meta()
    network = CNN(image_size=meta["image_size"][0], num_classes=10, **dataclasses.asdict(model_params))
    images, labels = torch.randn(64, 1, meta["image_size"][0], meta["image_size"][0]), torch.randint(0, 10, (64,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(network(images), labels).backward()
    return counter.get_total_flops() / 64


def images_per_second(predict, pixels: np.ndarray, repeats: int) -> float:
    predict(pixels)
    started = time.perf_counter()
    for _ in range(repeats):
        predict(pixels)
    return repeats * len(pixels) / (time.perf_counter() - started)


def median_latency_ms(predict, pixels: np.ndarray, repeats: int = 300) -> float:
    predict(pixels)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predict(pixels)
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def inference() -> None:
    """models/model.pt in PyTorch eager (as loaded, and in channels-last) against its ONNX export in onnxruntime."""
    model, checkpoint = load_checkpoint(MODEL_FILE)
    images, _ = load_split("test")
    pixels = np.ascontiguousarray(images[:1000, None])
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def eager(module):
        def predict(batch):
            with torch.no_grad():
                return module(torch.from_numpy(batch))

        return predict

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(model, path, load_params().export.opset, images.shape[1], checkpoint["class_names"])
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        runtimes = {
            "PyTorch eager, as loaded": eager(model),
            "PyTorch eager, channels-last": eager(channels_last),
            "onnxruntime": lambda batch: session.run(None, {"pixels": batch})[0],
        }
        rates = {name: images_per_second(predict, pixels, 10) for name, predict in runtimes.items()}
        fastest_torch = max(rates["PyTorch eager, as loaded"], rates["PyTorch eager, channels-last"])
        for name, rate in rates.items():
            if name == "onnxruntime":
                ratio = rate / fastest_torch
                report(f"batch 1000: {name}", f"{rate:,.0f} images/s ({ratio:.1f}x faster eager)", ">= 4x", ratio >= 4)
            else:
                report(f"batch 1000: {name}", f"{rate:,.0f} images/s")
        for name, predict in runtimes.items():
            report(f"1 image: {name}", f"{median_latency_ms(predict, pixels[:1]):.3f} ms median latency")


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
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-m", "stages.preprocess"], cwd=folder, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def pipeline_overhead() -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
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


def best_preset(params) -> None:
    with scratch_repo(BEST.get("preprocess", {})) as folder:
        run_preprocess(folder)
        os.chdir(folder)
        try:
            best = timed_training(*with_overrides(params, BEST))
        finally:
            os.chdir(REPO_ROOT)
    report("best preset", f"{best['wall']:.0f} s, test accuracy {best['accuracy']:.4f} (val {best['best']['val_accuracy']:.4f})",
           ">= 0.9965 in < 600 s", best["accuracy"] >= 0.9965 and best["wall"] < 600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--best", action="store_true", help="also train the `best` preset (about 10 minutes)")
    args = parser.parse_args()
    os.chdir(REPO_ROOT)  # the stages read params.yaml and data/ relative to the repository root
    params = load_params()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs\n", flush=True)

    peak = matmul_gflops()
    report("fp32 matmul 4096x4096", f"{peak:.0f} GFLOP/s")
    reference_seconds, reference_accuracy = reference_loop()
    report("reference loop: 5 epochs", f"{reference_seconds:.1f} s, test accuracy {reference_accuracy:.4f}")

    fast_model, fast_train = with_overrides(params, FAST)
    fast = timed_training(fast_model, fast_train)
    ratio = fast["wall"] / reference_seconds
    report("fast recipe: 1 epoch, bf16 autocast", f"{fast['wall']:.1f} s ({ratio:.3f}x), test accuracy {fast['accuracy']:.4f}",
           ">= 0.99 in <= 0.08x", fast["accuracy"] >= 0.99 and ratio <= 0.08)

    # Efficiency is judged in fp32, the precision of the matmul it is compared with.
    fp32 = timed_training(fast_model, dataclasses.replace(fast_train, mixed_precision="never"))
    report("same recipe in fp32", f"{fp32['wall']:.1f} s ({fp32['wall'] / reference_seconds:.3f}x), test accuracy {fp32['accuracy']:.4f}")
    flops = training_flops_per_image(fast_model)
    images = load_meta()["counts"]["train"]
    achieved = flops * images * fast_train.epochs / fp32["loop"] / 1e9
    report("fp32 training throughput", f"{achieved:.0f} GFLOP/s = {achieved / peak:.0%} of matmul", ">= 50%", achieved / peak >= 0.5)
    report("  counted training FLOPs per image", f"{flops / 1e6:.2f} MFLOP")

    default = timed_training(params.model, params.train)
    report("params.yaml defaults", f"{default['wall']:.1f} s, test accuracy {default['accuracy']:.4f}",
           ">= 0.994 in <= 60 s", default["accuracy"] >= 0.994 and default["wall"] <= 60)
    inference()
    pipeline_overhead()

    if args.best:
        best_preset(params)


if __name__ == "__main__":
    main()
