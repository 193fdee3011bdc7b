"""Stage 6, export: the model as one ONNX file that takes raw pixels, verified against PyTorch, and its int8 copy."""

import torch

from mnist_pipeline.checkpoint import load_checkpoint
from mnist_pipeline.device import predict_logits
from mnist_pipeline.errors import PipelineError, disk_fault, gist, run_stage
from mnist_pipeline.files import atomic_path, write_json
from mnist_pipeline.int8_verification import agreement_phrase, check_int8
from mnist_pipeline.model import export_form
from mnist_pipeline.onnx_export import (
    calibration_sample,
    check_fp32,
    export_onnx,
    quantize_int8,
)
from mnist_pipeline.onnx_io import BATCH, onnx_outputs
from mnist_pipeline.params import load_params
from mnist_pipeline.paths import (
    EXPORT_DETAILS,
    EXPORT_METRICS,
    INT8_FILE,
    MODEL_FILE,
    ONNX_FILE,
    PREPARED_DIR,
    stage_paths,
)
from mnist_pipeline.prepared import load_split


def main(argv: list[str] | None = None) -> None:
    paths = stage_paths(
        __doc__,
        argv,
        prepared=PREPARED_DIR,
        model=MODEL_FILE,
        onnx=ONNX_FILE,
        int8=INT8_FILE,
        metrics=EXPORT_METRICS,  # the headline numbers, one row of `dvc metrics show`
        details=EXPORT_DETAILS,  # the checks' diagnostics: differences, sizes, counts
    )
    params = load_params().export
    model, checkpoint = load_checkpoint(paths.model)
    images, labels = load_split("test", paths.prepared)
    pixels = images[:, None]  # (N, 1, H, W) uint8, exactly what a client sends
    calibration = calibration_sample(load_split("train", paths.prepared)[0], params.calibration_images, params.seed)
    not_written = f"{paths.onnx} and {paths.int8} were not written"

    # Both models are renamed into place only once both pass; the int8 file is opened once the fp32 one is
    # written, so that a disk fault in either names the file it struck.
    with atomic_path(paths.onnx) as temp:
        exportable = export_form(model, checkpoint["architecture"])
        opset = export_onnx(exportable, temp, params.opset, images.shape[1], checkpoint["class_names"])
        reference = predict_logits(model, torch.from_numpy(pixels), BATCH)
        try:
            exported, probabilities = onnx_outputs(temp, pixels)
        except Exception as error:  # onnxruntime's own types, for a file it cannot load or run
            raise PipelineError(f"onnxruntime cannot run the exported model ({gist(error)}); {not_written}") from None
        differences = check_fp32(exported, probabilities, reference, params.tolerance, not_written)
        with atomic_path(paths.int8) as temp_int8:
            try:
                quantize_int8(temp, temp_int8, calibration)
                int8_logits, _ = onnx_outputs(temp_int8, pixels)
            except Exception as error:  # onnxruntime's quantisation tools raise whatever their steps raise
                if disk_fault(error):
                    raise  # a full disk is no quantisation problem: run_stage names the file
                raise PipelineError(
                    f"onnxruntime cannot quantise the model to int8 ({gist(error)}); {not_written}"
                ) from None
            int8, int8_details = check_int8(temp_int8, int8_logits, exported, labels, pixels, params, not_written)
            size, int8_size = temp.stat().st_size, temp_int8.stat().st_size

    metrics = {"accuracy": round(float((exported.argmax(1) == labels).mean()), 4), **int8}
    details = {
        **differences,
        "size_bytes": size,
        "int8_size_bytes": int8_size,
        "test_images": len(labels),
        "calibration_images": len(calibration),
        **int8_details,
    }
    write_json(paths.details, details)
    write_json(paths.metrics, metrics)  # last: a failed run leaves the last complete pair
    print(
        f"{paths.onnx}: {size / 1024:.0f} KiB, opset {opset}, test accuracy {metrics['accuracy']:.4f}, "
        f"max |logit difference| vs PyTorch {details['max_abs_diff']:.1e}, predictions identical\n"
        f"{paths.int8}: {int8_size / 1024:.0f} KiB, test accuracy {metrics['int8_accuracy']:.4f}, "
        f"same class as fp32 for {metrics['int8_agreement']:.2%} of the test images; each layer "
        f"{agreement_phrase(details['int8_layer_max_steps'])} onnx's reference evaluator on the "
        f"{details['int8_reference_images']} checked, whose class it gives for "
        f"{details['int8_reference_agreement']:.2%}"
    )


if __name__ == "__main__":
    run_stage(main)
