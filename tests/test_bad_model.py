"""A missing, damaged or foreign models/model.pt: one clear line naming it, no code run, nothing written by
evaluate or export; export never leaves a half-written or unverified models/model.onnx."""

import json
import os
import pickle
import random
import re

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import (
    TINY_ARCHITECTURE,
    assert_one_line_error,
    run_stage_cli,
    synthetic_digits,
    write_checkpoint,
)

from mnist_pipeline import int8_verification, onnx_export, paths
from mnist_pipeline.checkpoint import load_checkpoint
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.prepared import save_split
from stages import evaluate, export


class RunsCodeWhenUnpickled:
    """What a malicious model.pt could hold: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def numpy_file(path):
    with path.open("wb") as out:
        np.save(out, np.zeros(3))


BAD_CHECKPOINTS = {
    "missing": (lambda path: path.unlink(), "not found: run the train stage first (dvc repro train)"),
    "empty": (lambda path: path.write_bytes(b""), "is damaged or not a PyTorch file (EOFError)"),
    "truncated": (cut_in_half, "is damaged or not a PyTorch file ("),
    "random bytes": (
        lambda path: path.write_bytes(random.Random(0).randbytes(4096)),
        "is not a model checkpoint: it holds something other than tensors",
    ),
    "numpy file": (numpy_file, "is not a model checkpoint: it holds something other than tensors"),
    "torch code object": (
        lambda path: torch.save({"state_dict": RunsCodeWhenUnpickled(path.parent / "pwned")}, path),
        "is not a model checkpoint: it holds something other than tensors and plain data, which is never unpickled",
    ),
    "pickled code object": (
        lambda path: path.write_bytes(pickle.dumps(RunsCodeWhenUnpickled(path.parent / "pwned"))),
        "is not a model checkpoint: it holds something other than tensors and plain data, which is never unpickled",
    ),
    "plain dict": (
        lambda path: torch.save({"weights": torch.zeros(3)}, path),
        "is not a checkpoint of this pipeline: it lacks state_dict, architecture, mean, std, class_names, epoch, "
        "device",
    ),
    "tensor": (
        lambda path: torch.save(torch.zeros(3), path),
        "is not a checkpoint of this pipeline: it lacks state_dict",
    ),
    "other architecture": (
        lambda path: write_checkpoint(path, architecture={**TINY_ARCHITECTURE, "fc_units": 32}),
        "is not a checkpoint of this pipeline: its contents do not fit together (Error(s) in loading state_dict for "
        "CNN: size mismatch for classifier.1.weight",
    ),
    "unknown activation": (
        lambda path: write_checkpoint(path, architecture={**TINY_ARCHITECTURE, "activation": "gelu"}),
        "is not a checkpoint of this pipeline: its contents do not fit together ('gelu')",
    ),
    "too few class names": (
        lambda path: write_checkpoint(path, class_names=["0", "1"]),
        "is not a checkpoint of this pipeline: its contents do not fit together (2 class names for 10 outputs)",
    ),
}


@pytest.mark.parametrize("damage", BAD_CHECKPOINTS)
def test_bad_checkpoint_is_a_one_line_error_naming_the_file_and_runs_no_code(tmp_path, damage):
    path = write_checkpoint(tmp_path / "model.pt")
    make_bad, message = BAD_CHECKPOINTS[damage]
    make_bad(path)
    with pytest.raises(PipelineError) as raised:
        load_checkpoint(path)
    assert str(raised.value).startswith(f"{path} {message}") and "\n" not in str(raised.value)
    assert not (tmp_path / "pwned").exists(), "loading a checkpoint must never run code it carries"


OUTPUTS = {
    "evaluate": [paths.EVAL_METRICS, paths.PREDICTIONS_FILE, paths.PER_CLASS_FILE, paths.GALLERY_DIR],
    "export": [paths.ONNX_FILE, paths.INT8_FILE, paths.EXPORT_METRICS],
}


@pytest.fixture
def trained(workdir):
    """A workdir as the train stage leaves it: the prepared train and test splits and a small models/model.pt."""
    images, labels = synthetic_digits(50, seed=3)
    save_split("test", images, labels)
    save_split("train", *synthetic_digits(200, seed=4))
    write_checkpoint(workdir / paths.MODEL_FILE)
    return workdir


@pytest.mark.parametrize("damage", ["missing", "truncated", "plain dict", "torch code object", "other architecture"])
@pytest.mark.parametrize("stage", OUTPUTS)
def test_bad_model_pt_stops_the_stage_before_it_writes(trained, stage, damage):
    make_bad, message = BAD_CHECKPOINTS[damage]
    make_bad(trained / paths.MODEL_FILE)
    with pytest.raises(PipelineError, match=re.escape(f"{paths.MODEL_FILE} {message}")):
        # No arguments: the stage's default paths, whatever pytest was run with.
        {"evaluate": evaluate.main, "export": export.main}[stage]([])
    assert not any(path.exists() for path in OUTPUTS[stage])
    assert not (trained / "models/pwned").exists()


def test_stages_report_a_bad_model_pt_in_one_line(trained):
    (trained / paths.MODEL_FILE).write_bytes((trained / paths.MODEL_FILE).read_bytes()[:1000])
    assert_one_line_error(run_stage_cli("evaluate"), f"{paths.MODEL_FILE} is damaged or not a PyTorch file (")
    (trained / paths.MODEL_FILE).write_bytes(pickle.dumps(RunsCodeWhenUnpickled(trained / "models/pwned")))
    assert_one_line_error(
        run_stage_cli("export"), f"{paths.MODEL_FILE} is not a model checkpoint: it holds something other"
    )
    assert not (trained / "models/pwned").exists()


def fake_export(model, path, opset, image_size, class_names):
    """Stands in for the ONNX exporter: writes what a damaged or incompatible export would hold."""
    path.write_bytes(b"\x08\x07 not an ONNX protobuf")
    return opset


@pytest.mark.parametrize("fault", ["onnxruntime cannot load it", "its predictions differ"])
def test_export_keeps_the_last_model_onnx_when_the_new_one_fails_verification(trained, monkeypatch, fault):
    (trained / paths.ONNX_FILE).write_bytes(b"the last good model")
    monkeypatch.setattr(export, "export_onnx", fake_export)
    if fault == "its predictions differ":
        zeros = lambda path, pixels: (np.zeros((len(pixels), 10), dtype=np.float32),) * 2  # noqa: E731
        monkeypatch.setattr(export, "onnx_outputs", zeros)
    message = (
        "onnxruntime cannot run the exported model"
        if fault == "onnxruntime cannot load it"
        else "disagrees with PyTorch"
    )
    with pytest.raises(
        PipelineError, match=f"{message}.*models/model.onnx and models/model.int8.onnx were not written"
    ):
        export.main([])
    assert (trained / paths.ONNX_FILE).read_bytes() == b"the last good model"
    assert sorted(p.name for p in (trained / "models").iterdir()) == ["model.onnx", "model.pt"], "no temp file left"
    assert not (trained / paths.EXPORT_METRICS).exists()


def test_an_int8_model_that_loses_accuracy_fails_the_export_and_writes_nothing(trained, monkeypatch):
    """The int8 check compares accuracies on the test set: an int8 model that gets every image wrong stops the
    stage, and neither model nor the metrics are written."""
    (trained / paths.ONNX_FILE).write_bytes(b"the last good model")
    _, labels = synthetic_digits(50, seed=3)
    real_outputs = export.onnx_outputs

    def int8_always_wrong(path, pixels):
        logits, probabilities = real_outputs(path, pixels)
        if path.name.startswith(f".{paths.INT8_FILE.name}."):  # atomic_path's temp file for the int8 model
            logits = np.eye(10, dtype=np.float32)[(labels + 1) % 10]
        return logits, probabilities

    monkeypatch.setattr(export, "onnx_outputs", int8_always_wrong)
    with pytest.raises(
        PipelineError,
        match=r"the int8 model's test accuracy 0\.0000 is \d+ of 50 images below the fp32 "
        r"model's .*, where export\.int8_max_accuracy_drop = 0\.002 allows 0; models/model.onnx and "
        r"models/model.int8.onnx were not written",
    ):
        export.main([])
    assert (trained / paths.ONNX_FILE).read_bytes() == b"the last good model"
    assert sorted(p.name for p in (trained / "models").iterdir()) == ["model.onnx", "model.pt"], "no temp file left"
    assert not (trained / paths.EXPORT_METRICS).exists()


@pytest.mark.parametrize("fault", ["8-bit weights", "a layer unlike the reference's"])
def test_an_int8_model_unlike_its_definition_fails_the_export_and_writes_nothing(trained, monkeypatch, fault):
    """Weights that could saturate on a CPU without VNNI, or a layer that onnxruntime on this CPU computes more than
    a step from onnx's reference evaluator, stop the stage in one line, and neither model nor metrics are written."""
    (trained / paths.ONNX_FILE).write_bytes(b"the last good model")
    if fault == "8-bit weights":
        monkeypatch.setitem(onnx_export.INT8_SETTINGS, "reduce_range", False)
        problem = (
            r"the Conv weights \S+ hold integers up to 127 in magnitude, beyond 64: "
            r"CPUs without VNNI would saturate their sums"
        )
    else:
        # onnxruntime's first quantised tensor, as the check reads it, is 3 steps above what it computed.
        real_session = int8_verification.inference_session

        class ThreeStepsOff:
            def __init__(self, model_bytes):
                self.session = real_session(model_bytes)

            def run(self, names, feeds):
                outputs = self.session.run(names, feeds)
                outputs[0] = outputs[0].astype(np.int64).__add__(3).clip(0, 255).astype(outputs[0].dtype)
                return outputs

        monkeypatch.setattr(int8_verification, "inference_session", ThreeStepsOff)
        problem = (
            r"onnxruntime on this CPU \(.+\) computes \S+ \(.+\) up to 3 quantisation steps away from onnx's "
            r"reference evaluator given the same inputs, on 50 of 50 images checked \(float32 rounding accounts "
            r"for 1 at most\)"
        )
    with pytest.raises(PipelineError) as raised:
        export.main([])
    assert re.fullmatch(
        f"the int8 model failed its check against its definition: {problem}; models/model.onnx and "
        f"models/model.int8.onnx were not written",
        str(raised.value),
    ), str(raised.value)
    assert (trained / paths.ONNX_FILE).read_bytes() == b"the last good model"
    assert sorted(p.name for p in (trained / "models").iterdir()) == ["model.onnx", "model.pt"], "no temp file left"
    assert not (trained / paths.EXPORT_METRICS).exists()


def test_export_writes_a_verified_int8_model_with_the_class_names(trained):
    export.main([])
    metrics = json.loads((trained / paths.EXPORT_METRICS).read_text())
    details = json.loads((trained / paths.EXPORT_DETAILS).read_text())
    assert set(metrics) == {"accuracy", "int8_accuracy", "int8_agreement"}, "headline only"
    assert metrics["accuracy"] - metrics["int8_accuracy"] <= 0.002 and 0 <= metrics["int8_agreement"] <= 1
    assert details["int8_size_bytes"] == (trained / paths.INT8_FILE).stat().st_size < details["size_bytes"]
    assert details["calibration_images"] == 200 and details["probabilities_max_abs_diff"] <= 1e-4
    assert details["int8_reference_images"] == 50 and details["int8_reference_agreement"] == 1.0
    assert details["int8_layer_max_steps"] <= 1
    for path in [paths.ONNX_FILE, paths.INT8_FILE]:
        session = onnxruntime.InferenceSession(str(trained / path))
        assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]
        assert session.get_modelmeta().custom_metadata_map["class_names"] == ",".join(str(d) for d in range(10))
    ops = {node.op_type for node in onnx.load(trained / paths.INT8_FILE).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Softmax"} <= ops, "quantised, with the softmax in float"
