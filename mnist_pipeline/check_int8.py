"""`make check-int8`: the int8 model's layers in onnxruntime on this CPU against onnx's reference evaluator, on
every test image (the export stage checks a sample), and its weights against the bounds that keep every CPU exact.

    python -m mnist_pipeline.check_int8 [--model models/model.int8.onnx] [--images N]

About 25 ms per image on 2 shared cores (the layer check 16, the end-to-end reference the rest): 4 minutes for
MNIST's 10,000. Exit status 1 on any difference.
"""

import argparse
import time
from pathlib import Path

import onnx

from mnist_pipeline.cpu import this_cpu
from mnist_pipeline.errors import PipelineError, run_stage
from mnist_pipeline.int8_verification import agreement_phrase, compare_with_reference
from mnist_pipeline.onnx_io import onnx_outputs
from mnist_pipeline.prepared import load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.int8.onnx"), help="the int8 ONNX file")
    parser.add_argument("--images", type=int, default=0, help="check the first N test images only (0: all)")
    args = parser.parse_args()

    def check() -> None:
        if not args.model.is_file():
            raise PipelineError(f"{args.model} not found: run the export stage first (dvc repro export)")
        images, _ = load_split("test")
        pixels = images[: args.images or len(images), None]
        started = time.perf_counter()
        logits = onnx_outputs(args.model, pixels)[0]
        figures, problem = compare_with_reference(onnx.load(args.model), pixels, logits)
        if problem:
            raise PipelineError(f"{args.model} failed its check against its definition: {problem}")
        print(
            f"{args.model}: on {len(pixels)} test images on this CPU ({this_cpu().describe()}), every layer in "
            f"onnxruntime {agreement_phrase(figures['int8_layer_max_steps'])} onnx's reference evaluator "
            f"given the same inputs, and onnxruntime's class the reference's end to end for "
            f"{figures['int8_reference_agreement']:.2%}; weights within the bounds that keep every CPU exact "
            f"({time.perf_counter() - started:.0f} s)"
        )

    run_stage(check)


if __name__ == "__main__":
    main()
