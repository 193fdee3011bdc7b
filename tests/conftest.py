"""Shared test fixtures: synthetic MNIST-format data, a local HTTP mirror on 127.0.0.1, a scratch working dir."""

import contextlib
import functools
import gzip
import hashlib
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mnist_pipeline.idx import write_idx
from mnist_pipeline.params import DATASET_FILES

REPO_ROOT = Path(__file__).resolve().parents[1]
# The four files of MNIST, as every mirror names them, in the order of DATASET_FILES.
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def synthetic_digits(count: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Learnable stand-ins for digits: class k is a bright bar at a class-specific row, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(count, size, size), dtype=np.uint8)
    for k in range(10):
        row = 3 + 2 * k
        images[labels == k, row : row + 2, 4:-4] = 255
    return images, labels.astype(np.uint8)


def write_synthetic_mnist(directory: Path, train: int = 300, test: int = 100) -> dict[str, str]:
    """The four MNIST files, gzipped IDX, in `directory`; returns their content SHA-256s like params.yaml."""
    directory.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = synthetic_digits(train, seed=1)
    test_images, test_labels = synthetic_digits(test, seed=2)
    for name, array in zip(MNIST_FILES, (train_images, train_labels, test_images, test_labels), strict=True):
        write_idx(array, directory / name)
    return {name: hashlib.sha256(gzip.decompress((directory / name).read_bytes())).hexdigest() for name in MNIST_FILES}


def dataset_files(hashes: dict[str, str]) -> dict[str, dict]:
    """write_synthetic_mnist's hashes as the file entries of params.yaml's dataset section."""
    return {key: {"file": name, "sha256": hashes[name]} for key, name in zip(DATASET_FILES, MNIST_FILES, strict=True)}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(root: Path, handler: type[http.server.SimpleHTTPRequestHandler] = QuietHandler) -> Iterator[str]:
    """Serve a directory over HTTP on 127.0.0.1 with `handler`; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()  # quick shutdown
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_root(tmp_path):
    """A directory served over HTTP on 127.0.0.1; yields (root directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    with serving(root) as url:
        yield root, url


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run the test inside an empty directory with the repository's params.yaml, like a stage in the repo."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    monkeypatch.chdir(work)
    monkeypatch.delenv("MNIST_PIPELINE_MIRRORS", raising=False)
    return work


TINY_ARCHITECTURE = {"image_size": 28, "num_classes": 10, "conv_channels": [4, 8], "fc_units": 16}


def write_checkpoint(path: Path, **changes) -> Path:
    """A small model.pt as the train stage writes it; `changes` replace its entries, to make foreign ones."""
    import torch

    from mnist_pipeline.checkpoint import save_checkpoint
    from mnist_pipeline.model import CNN

    torch.manual_seed(0)
    meta = {"mean": 0.13, "std": 0.31, "class_names": [str(d) for d in range(10)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, CNN(**TINY_ARCHITECTURE), TINY_ARCHITECTURE, meta, extra={"epoch": 3, "device": "cpu"})
    if changes:
        torch.save({**torch.load(path, weights_only=True), **changes}, path)
    return path


# A stage's environment as DVC gives it, without MNIST_PIPELINE_MIRRORS and never reporting analytics.
STAGE_ENV = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "DVC_NO_ANALYTICS": "1"}


def stage_command(stage: str) -> list[str]:
    return [sys.executable, "-m", f"stages.{stage}"]


def run_stage_cli(stage: str, cwd: Path | None = None, **options) -> subprocess.CompletedProcess:
    """`python -m stages.<stage>` in `cwd` (the current directory by default), as DVC runs it; `options` go to
    subprocess.run (a preexec_fn that limits the child, another env, for instance)."""
    options.setdefault("env", STAGE_ENV)
    return subprocess.run(stage_command(stage), cwd=cwd, capture_output=True, text=True, **options)


def assert_one_line_error(result: subprocess.CompletedProcess, start: str) -> None:
    """The contract of mnist_pipeline/errors.py: exit status 1 and one line on stderr, `error: ...`, no traceback."""
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"error: {start}") and result.stderr.count("\n") == 1, result.stderr


# Small enough for the whole pipeline to run in seconds on synthetic data.
TINY_PARAMS = {
    "preprocess": {"val_size": 60},
    "model": {"cnn": {"conv_channels": [4, 8], "fc_units": 16, "dropout": 0.0}},
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.01},
    "evaluate": {"batch_size": 64},
    # A tiny model of 4 and 8 channels, weakly trained, loses up to a few points in 7-bit int8 (10 of 200 images
    # after a lr of 0.02); the same on every CPU, since the export checks onnxruntime against the reference.
    "export": {"int8_max_accuracy_drop": 0.1},
}


def update_params(path: Path, changes: dict) -> None:
    """Overwrite the given keys of a params.yaml, section by section; a section may be a dotted group ("model.cnn"),
    and a mapping given for a group ({"model": {"cnn": {...}}}) changes only the keys it names."""
    import yaml

    def merge(target: dict, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(target.get(key), dict) and "sha256" not in value:
                merge(target[key], value)
            else:
                target[key] = value

    params = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        target = params
        for part in section.split("."):
            target = target[part]
        merge(target, values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def write_linear_model(path: Path, weights: np.ndarray, class_names: list[str], bias: np.ndarray | None = None) -> Path:
    """A tiny ONNX model with the exported model's contract (uint8 'pixels' (N, 1, H, W) in, 'logits' and
    'probabilities' out, class names in its metadata): logits = pixels/255 . weights (H*W, classes) + bias."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    side = int(round(np.sqrt(weights.shape[0])))
    classes = weights.shape[1]
    bias = np.zeros(classes, np.float32) if bias is None else bias
    nodes = [
        helper.make_node("Cast", ["pixels"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["as_float", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weights"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    initializers = [
        numpy_helper.from_array(np.array([-1, side * side], np.int64), "flat_shape"),
        numpy_helper.from_array((weights / 255).astype(np.float32), "weights"),
        numpy_helper.from_array(bias.astype(np.float32), "bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 1, side, side])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", classes])
            for name in ("logits", "probabilities")
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"class_names": ",".join(class_names)})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path)
    return path


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def mnist_serve(*args: str, cwd: Path | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """The real `mnist-serve` command on a free port of 127.0.0.1; yields its base URL and process once it is live."""
    import time
    import urllib.request

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_pipeline.serve", "--port", str(port), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/v2/health/live", timeout=2).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"mnist-serve did not start: {process.communicate()[0]}") from None
                time.sleep(0.1)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
