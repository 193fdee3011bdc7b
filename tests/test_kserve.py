"""mnist-kserve's output checked by the schemas of the engines that would run it: config.pbtxt parsed by Triton's
own ModelConfig protobuf (unknown fields fail), its shapes against the ONNX model's, and the InferenceService manifest.
Nothing here runs on Kubernetes."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import yaml
from conftest import write_linear_model


def triton_model_config():
    """Triton's ModelConfig message, from tritonclient's copy of model_config.proto (loaded without gRPC)."""
    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_repository_and_manifest_are_what_triton_and_kserve_take(tmp_path):
    from google.protobuf import text_format

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    model = write_linear_model(tmp_path / "letters.onnx", np.random.default_rng(0).normal(size=(784, 26)), letters)
    out = tmp_path / "kserve"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mnist_pipeline.kserve",
            "--out",
            str(out),
            "--model",
            str(model),
            "--storage-uri",
            "gs://bucket/mnist",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    repository = out / "model-repository" / "mnist"
    assert (repository / "1" / "model.onnx").read_bytes() == model.read_bytes()

    config = text_format.Parse((repository / "config.pbtxt").read_text(), triton_model_config().ModelConfig())
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert config.name == "mnist" and config.backend == "onnxruntime" and config.max_batch_size == 64
    (onnx_input,) = session.get_inputs()
    assert [(i.name, list(i.dims)) for i in config.input] == [(onnx_input.name, onnx_input.shape[1:])]
    assert config.input[0].data_type == triton_model_config().TYPE_UINT8
    assert [(o.name, list(o.dims)) for o in config.output] == [(o.name, [26]) for o in session.get_outputs()]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert config.parameters["class_names"].string_value == ",".join(letters)

    manifest = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    predictor = manifest["spec"]["predictor"]["model"]
    assert predictor["modelFormat"] == {"name": "onnx"} and predictor["protocolVersion"] == "v2"
    assert predictor["runtime"] == "kserve-tritonserver" and predictor["storageUri"] == "gs://bucket/mnist"
    assert manifest["metadata"]["name"] == "mnist", "the name mnist-serve serves, so the same v2 requests work"


@pytest.mark.parametrize("case", ["not a model", "not empty"])
def test_bad_input_writes_nothing_and_is_one_line(tmp_path, case):
    out = tmp_path / "out"
    model = tmp_path / "model.onnx"
    if case == "not a model":
        model.write_bytes(b"junk")
    else:
        write_linear_model(model, np.zeros((784, 10)), [str(d) for d in range(10)])
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.kserve", "--out", str(out), "--model", str(model)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == ["keep.txt"]
