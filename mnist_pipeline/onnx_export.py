"""ONNX export: the model as one self-contained file that takes raw pixels, and its int8 copy quantised by onnxruntime."""

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static
from torch import nn

from mnist_pipeline.model import PixelClassifier
from mnist_pipeline.onnx_io import INPUT_NAME, LOGITS, PROBABILITIES



class WithProbabilities(nn.Module):
    """What the ONNX file computes: the logits, and their softmax beside them for clients that want probabilities."""

    def __init__(self, model: PixelClassifier):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(pixels)
        return logits, torch.softmax(logits, dim=1)


def export_onnx(model: PixelClassifier, path: Path, opset: int, image_size: int, class_names: list[str]) -> int:
    """Trace the model (in its export_form) with a dynamic batch dimension and write it, weights included, to one file.

    Returns the opset the file declares for the default ONNX domain.
    """
    example = torch.zeros(2, 1, image_size, image_size, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes about its own internals are not the user's concern
        program = torch.onnx.export(
            WithProbabilities(model),
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[LOGITS, PROBABILITIES],
            opset_version=opset,
            dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}},
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    # The exporter annotates every node with the Python source it came from, absolute paths included:
    # nothing a client needs, and it would make the file differ between checkouts of the same model.
    for node in proto.graph.node:
        del node.metadata_props[:]
    proto.doc_string = (
        f"MNIST-format digit classifier. Input '{INPUT_NAME}': uint8 raw pixels 0-255, shape (batch, 1, "
        f"{image_size}, {image_size}), white digit on black; normalisation is inside the model. "
        f"Output '{LOGITS}': float32 (batch, {len(class_names)}) unnormalised scores; argmax is the class. "
        f"Output '{PROBABILITIES}': their softmax. Metadata 'class_names': the classes in output order."
    )
    onnx.helper.set_model_props(proto, {"class_names": ",".join(class_names)})
    onnx.checker.check_model(proto)
    onnx.save_model(proto, path)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


class CalibrationImages(CalibrationDataReader):
    """Training images, batch by batch, from which onnxruntime measures the range of every tensor it quantises."""

    def __init__(self, pixels: np.ndarray, batch_size: int = 100):
        self.batches = iter([{INPUT_NAME: pixels[i : i + batch_size]} for i in range(0, len(pixels), batch_size)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def calibration_sample(images: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A seeded sample of `count` of the (training) images, or all of fewer, as (N, 1, H, W); never test images,
    on which the int8 model is judged."""
    chosen = np.sort(np.random.default_rng(seed).choice(len(images), min(count, len(images)), replace=False))
    return images[chosen][:, None]


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> None:
    """onnxruntime's static quantisation: int8 weights per output channel and uint8 activations, their ranges
    calibrated on `calibration`, in the QDQ format that onnxruntime fuses into integer kernels on x86.

    The convolutions, activations, poolings and matrix products run in 8 bits from the first convolution to the
    logits; the input scaling and the softmax stay in float, so the probabilities keep their precision.
    """
    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference and graph clean-up, as quantisation expects
        quantize_static(
            str(prepared),
            str(int8_path),
            CalibrationImages(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "Relu", "LeakyRelu", "MaxPool", "Reshape", "Flatten", "Gemm", "MatMul"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    fp32, int8 = onnx.load(fp32_path), onnx.load(int8_path)
    int8.doc_string = fp32.doc_string + " Weights and activations quantised to 8 bits."
    onnx.helper.set_model_props(int8, {p.key: p.value for p in fp32.metadata_props})
    onnx.save_model(int8, int8_path)
