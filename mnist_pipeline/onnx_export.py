"""ONNX export: the model as one self-contained file that takes raw pixels, and its int8 copy from onnxruntime."""

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static
from torch import nn

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.int8_depthwise import depthwise_single_channel_convs
from mnist_pipeline.int8_input import read_raw_pixels
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


def check_fp32(
    logits: np.ndarray, probabilities: np.ndarray, reference: torch.Tensor, tolerance: float, not_written: str
) -> dict:
    """How far onnxruntime's outputs for the exported file are from PyTorch's `reference` logits, once within
    `tolerance` with every predicted class the same; else a PipelineError ending with `not_written`."""
    max_abs_diff = float(np.abs(logits - reference.numpy()).max())
    probabilities_diff = float(np.abs(probabilities - torch.softmax(reference, dim=1).numpy()).max())
    mismatched = int((logits.argmax(1) != reference.numpy().argmax(1)).sum())
    if max(max_abs_diff, probabilities_diff) > tolerance or mismatched:
        raise PipelineError(
            f"the ONNX model disagrees with PyTorch on the test set: max |logit difference| {max_abs_diff:.2e}, "
            f"max |probability difference| {probabilities_diff:.2e} (export.tolerance = {tolerance}), "
            f"{mismatched} different predicted classes; {not_written}"
        )
    return {
        "max_abs_diff": float(f"{max_abs_diff:.3g}"),
        "probabilities_max_abs_diff": float(f"{probabilities_diff:.3g}"),
    }


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


# onnxruntime's static quantisation settings. Weights are 7-bit (reduce_range: int8 values in [-64, 64]) so that no
# integer kernel can overflow or saturate, whatever the CPU: the file then computes the same classes everywhere.
# Activations are uint8, a in [0, 255], and each output sums the products a * w of K inputs. onnxruntime's kernels:
# - x86 without VNNI (AVX2, and AVX-512 before VNNI): VPMADDUBSW adds each PAIR of u8 * s8 products into a signed
#   16-bit lane that SATURATES at 32,767. With 8-bit weights a pair reaches 2 * 255 * 127 = 64,770 and is clipped
#   silently: what made int8 predictions differ on AVX2-only CPUs. 7-bit: at most 2 * 255 * 64 = 32,640, exact.
# - x86 with VNNI (AVX512-VNNI, AVX-VNNI) or AMX, and ARM's u8 kernels (UMLAL, UDOT, UMMLA): products go straight
#   into 32-bit accumulators. (ARM's s8 * s8 kernel, SMULL then SMLAL, adds pairs into 16 bits too; it is not used
#   with uint8 activations, and 7-bit weights keep its pairs within 2 * 128 * 64 = 16,384 all the same.)
# - The 32-bit sums, |sum of a * w| + |bias| <= 255 * sum |w| + |bias| per output channel, stay below 2^31:
#   int8_verification.weight_bound_problem checks it for every layer of the written file.
# The cost is one bit of weight precision per output channel, which the export stage's accuracy check measures.
INT8_SETTINGS = {
    "quant_format": QuantFormat.QDQ,
    "op_types_to_quantize": ["Conv", "Relu", "LeakyRelu", "MaxPool", "Reshape", "Flatten", "Gemm", "MatMul"],
    "per_channel": True,
    "reduce_range": True,
    "activation_type": QuantType.QUInt8,
    "weight_type": QuantType.QInt8,
}


def quantize_int8(
    fp32_path: Path, int8_path: Path, calibration: np.ndarray, raw_pixels: bool = True, depthwise: bool = True
) -> None:
    """onnxruntime's static quantisation (INT8_SETTINGS): 7-bit int8 weights per output channel and uint8
    activations, their ranges calibrated on `calibration`, in the QDQ format that onnxruntime fuses into integer
    kernels on x86.

    The convolutions, activations, poolings and matrix products run in 8 bits from the first convolution to the
    logits; the softmax stays in float, so the probabilities keep their precision. With raw_pixels, where the input
    preparation is the normalisation alone (the CNN), the first convolution reads the uint8 pixels as its quantised
    input (int8_input.py); else, and for ResNet-18's resize, the input is prepared in float and quantised. With
    depthwise, a convolution over one input channel (the CNN's first) runs as a depthwise one over copies of it,
    the same integers by a faster kernel (int8_depthwise.py). The benchmark turns each off to show what it buys.
    """
    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference and graph clean-up, as quantisation expects
        quantize_static(str(prepared), str(int8_path), CalibrationImages(calibration), **INT8_SETTINGS)
    fp32, int8 = onnx.load(fp32_path), onnx.load(int8_path)
    if raw_pixels:
        read_raw_pixels(int8)
    if depthwise:
        depthwise_single_channel_convs(int8)
    int8.doc_string = (
        fp32.doc_string + " Activations quantised to 8 bits, weights to 7 (the same answers on every CPU)."
    )
    onnx.helper.set_model_props(int8, {p.key: p.value for p in fp32.metadata_props})
    onnx.checker.check_model(int8)
    onnx.save_model(int8, int8_path)
