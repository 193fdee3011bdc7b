"""Stage 5, export: the model as one self-contained ONNX file that takes raw pixels, verified against PyTorch."""

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from stages.errors import PipelineError, gist, run_stage
from stages.files import atomic_path, write_json
from stages.model import MODEL_FILE, PixelClassifier, load_checkpoint, predict_logits
from stages.params import load_params
from stages.prepared import load_split

ONNX_FILE = Path("models/model.onnx")
METRICS_FILE = Path("metrics/export.json")
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
VERIFY_BATCH = 1000


def export_onnx(model: PixelClassifier, path: Path, opset: int, image_size: int, class_names: list[str]) -> int:
    """Trace the model with a dynamic batch dimension and write it, weights included, to one file.

    Returns the opset the file declares for the default ONNX domain.
    """
    example = torch.zeros(2, 1, image_size, image_size, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes about its own internals are not the user's concern
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
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
        f"Output '{OUTPUT_NAME}': float32 (batch, {len(class_names)}) unnormalised scores; argmax is the class."
    )
    onnx.helper.set_model_props(proto, {"class_names": ",".join(class_names)})
    onnx.checker.check_model(proto)
    onnx.save_model(proto, path)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def onnx_logits(path: Path, pixels: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batches = [
        session.run([OUTPUT_NAME], {INPUT_NAME: pixels[i : i + VERIFY_BATCH]})[0]
        for i in range(0, len(pixels), VERIFY_BATCH)
    ]
    return np.concatenate(batches)


def main() -> None:
    params = load_params().export
    model, checkpoint = load_checkpoint(MODEL_FILE)
    images, labels = load_split("test")
    pixels = images[:, None]  # (N, 1, H, W) uint8, exactly what a client sends

    with atomic_path(ONNX_FILE) as temp:
        opset = export_onnx(model, temp, params.opset, images.shape[1], checkpoint["class_names"])
        reference = predict_logits(model, torch.from_numpy(pixels), VERIFY_BATCH).numpy()
        try:
            exported = onnx_logits(temp, pixels)
        except Exception as error:  # onnxruntime's own types, for a file it cannot load or run
            raise PipelineError(f"onnxruntime cannot run the exported model ({gist(error)}); {ONNX_FILE} was not written") from None
        max_abs_diff = float(np.abs(exported - reference).max())
        mismatched = int((exported.argmax(1) != reference.argmax(1)).sum())
        if max_abs_diff > params.tolerance or mismatched:
            raise PipelineError(
                f"the ONNX model disagrees with PyTorch on the test set: max |logit difference| {max_abs_diff:.2e} "
                f"(export.tolerance = {params.tolerance}), {mismatched} different predicted classes; "
                f"{ONNX_FILE} was not written"
            )
        size = temp.stat().st_size

    metrics = {
        "onnx_accuracy": round(float((exported.argmax(1) == labels).mean()), 4),
        "max_abs_diff": float(f"{max_abs_diff:.3g}"),
        "size_bytes": size,
        "test_images": len(labels),
    }
    write_json(METRICS_FILE, metrics)
    print(
        f"{ONNX_FILE}: {size / 1024:.0f} KiB, opset {opset}, test accuracy {metrics['onnx_accuracy']:.4f}, "
        f"max |logit difference| vs PyTorch {max_abs_diff:.1e}, predictions identical"
    )


if __name__ == "__main__":
    run_stage(main)
