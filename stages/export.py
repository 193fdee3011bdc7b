"""Stage 5, export: the model as one self-contained ONNX file that takes raw pixels, verified against PyTorch, and its int8 copy."""

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static
from torch import nn

from stages.errors import PipelineError, disk_fault, gist, run_stage
from stages.files import atomic_path, write_json
from stages.model import MODEL_FILE, PixelClassifier, export_form, load_checkpoint, predict_logits
from stages.params import load_params
from stages.predict import inference_session
from stages.prepared import load_split

ONNX_FILE = Path("models/model.onnx")
INT8_FILE = Path("models/model.int8.onnx")
METRICS_FILE = Path("metrics/export.json")
INPUT_NAME, OUTPUT_NAME, PROBABILITIES_NAME = "pixels", "logits", "probabilities"
VERIFY_BATCH = 1000


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
            output_names=[OUTPUT_NAME, PROBABILITIES_NAME],
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
        f"Output '{OUTPUT_NAME}': float32 (batch, {len(class_names)}) unnormalised scores; argmax is the class. "
        f"Output '{PROBABILITIES_NAME}': their softmax. Metadata 'class_names': the classes in output order."
    )
    onnx.helper.set_model_props(proto, {"class_names": ",".join(class_names)})
    onnx.checker.check_model(proto)
    onnx.save_model(proto, path)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def onnx_outputs(path: Path, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The logits and probabilities onnxruntime computes from the file, in batches, as a client runs it."""
    session = inference_session(path)
    batches = [
        session.run([OUTPUT_NAME, PROBABILITIES_NAME], {INPUT_NAME: pixels[i : i + VERIFY_BATCH]})
        for i in range(0, len(pixels), VERIFY_BATCH)
    ]
    logits, probabilities = (np.concatenate(parts) for parts in zip(*batches))
    return logits, probabilities


class CalibrationImages(CalibrationDataReader):
    """Training images, batch by batch, from which onnxruntime measures the range of every tensor it quantises."""

    def __init__(self, pixels: np.ndarray, batch_size: int = 100):
        self.batches = iter([{INPUT_NAME: pixels[i : i + batch_size]} for i in range(0, len(pixels), batch_size)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def calibration_sample(count: int, seed: int) -> np.ndarray:
    """A seeded sample of `count` training images, or all of a smaller training split; never test images,
    on which the int8 model is judged."""
    images, _ = load_split("train")
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


def main() -> None:
    params = load_params().export
    model, checkpoint = load_checkpoint(MODEL_FILE)
    images, labels = load_split("test")
    pixels = images[:, None]  # (N, 1, H, W) uint8, exactly what a client sends
    calibration = calibration_sample(params.calibration_images, params.seed)
    not_written = f"{ONNX_FILE} and {INT8_FILE} were not written"

    # Both models are renamed into place only once both pass; the int8 file is opened once the fp32 one is
    # written, so that a disk fault in either names the file it struck.
    with atomic_path(ONNX_FILE) as temp:
        exportable = export_form(model, checkpoint["architecture"])
        opset = export_onnx(exportable, temp, params.opset, images.shape[1], checkpoint["class_names"])
        reference = predict_logits(model, torch.from_numpy(pixels), VERIFY_BATCH)
        reference_probabilities = torch.softmax(reference, dim=1).numpy()
        reference = reference.numpy()
        try:
            exported, probabilities = onnx_outputs(temp, pixels)
        except Exception as error:  # onnxruntime's own types, for a file it cannot load or run
            raise PipelineError(f"onnxruntime cannot run the exported model ({gist(error)}); {not_written}") from None
        max_abs_diff = float(np.abs(exported - reference).max())
        probabilities_diff = float(np.abs(probabilities - reference_probabilities).max())
        mismatched = int((exported.argmax(1) != reference.argmax(1)).sum())
        if max(max_abs_diff, probabilities_diff) > params.tolerance or mismatched:
            raise PipelineError(
                f"the ONNX model disagrees with PyTorch on the test set: max |logit difference| {max_abs_diff:.2e}, "
                f"max |probability difference| {probabilities_diff:.2e} (export.tolerance = {params.tolerance}), "
                f"{mismatched} different predicted classes; {not_written}"
            )
        accuracy = float((exported.argmax(1) == labels).mean())
        with atomic_path(INT8_FILE) as temp_int8:
            try:
                quantize_int8(temp, temp_int8, calibration)
                int8_logits, _ = onnx_outputs(temp_int8, pixels)
            except Exception as error:  # onnxruntime's quantisation tools raise whatever their steps raise
                if disk_fault(error):
                    raise  # a full disk is no quantisation problem: run_stage names the file
                raise PipelineError(f"onnxruntime cannot quantise the model to int8 ({gist(error)}); {not_written}") from None
            int8_accuracy = float((int8_logits.argmax(1) == labels).mean())
            if accuracy - int8_accuracy > params.int8_max_accuracy_drop:
                raise PipelineError(
                    f"the int8 model's test accuracy {int8_accuracy:.4f} is {100 * (accuracy - int8_accuracy):.2f} points "
                    f"below the fp32 model's {accuracy:.4f} (export.int8_max_accuracy_drop = {params.int8_max_accuracy_drop}); "
                    f"{not_written}"
                )
            size, int8_size = temp.stat().st_size, temp_int8.stat().st_size

    metrics = {
        "onnx_accuracy": round(accuracy, 4),
        "max_abs_diff": float(f"{max_abs_diff:.3g}"),
        "probabilities_max_abs_diff": float(f"{probabilities_diff:.3g}"),
        "size_bytes": size,
        "test_images": len(labels),
        "int8_accuracy": round(int8_accuracy, 4),
        "int8_agreement": round(float((int8_logits.argmax(1) == exported.argmax(1)).mean()), 4),
        "int8_size_bytes": int8_size,
        "calibration_images": len(calibration),
    }
    write_json(METRICS_FILE, metrics)
    print(
        f"{ONNX_FILE}: {size / 1024:.0f} KiB, opset {opset}, test accuracy {metrics['onnx_accuracy']:.4f}, "
        f"max |logit difference| vs PyTorch {max_abs_diff:.1e}, predictions identical\n"
        f"{INT8_FILE}: {int8_size / 1024:.0f} KiB, test accuracy {metrics['int8_accuracy']:.4f}, "
        f"same class as fp32 for {metrics['int8_agreement']:.2%} of the test images"
    )


if __name__ == "__main__":
    run_stage(main)
