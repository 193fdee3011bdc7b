"""The int8 model's checks: its accuracy against the fp32 model's, and its answers against what no CPU can change,
the bounds of its integer weights and onnx's reference evaluator (every operator computed from its definition in
numpy, not by onnxruntime's kernels)."""

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from mnist_pipeline.cpu import this_cpu
from mnist_pipeline.errors import PipelineError, gist
from mnist_pipeline.onnx_io import INPUT_NAME, LOGITS
from mnist_pipeline.params import ExportParams

REFERENCE_OPSET = 19  # the first opset whose DequantizeLinear onnx's reference evaluator implements
REFERENCE_IMAGES = 500  # test images the export stage checks, about 4 s on 2 cores; `make check-int8` checks all
REFERENCE_BATCH = 100
TIE_STEPS = 4  # logit quantisation steps within which the reference's two classes count as a near tie
# onnx_export.INT8_SETTINGS says why: 7-bit weights keep a pair of uint8 * int8 products within 16 bits on CPUs
# without VNNI, and each output channel's sum must fit the kernels' 32-bit accumulators.
WEIGHT_LIMIT, ACTIVATION_LIMIT, ACCUMULATOR_LIMIT = 64, 255, 2**31 - 1
OUTPUT_AXIS = {"Conv": 0, "MatMul": -1}  # of the weights; Gemm's is 0 with transB = 1 (PyTorch's Linear), else 1


def weight_bound_problem(model: onnx.ModelProto) -> str | None:
    """What in the int8 model could overflow or saturate an integer kernel on some CPU, or None: a weight beyond
    ±WEIGHT_LIMIT, or an output channel whose largest possible sum (bias included) does not fit in 32 bits."""
    stored = {tensor.name: tensor for tensor in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}

    def quantized(name: str) -> tuple[str, np.ndarray | None]:
        """The stored integers that a DequantizeLinear turns into this input, and their name, if that is what it is."""
        node = producers.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in stored:
            return name, None
        return node.input[0], numpy_helper.to_array(stored[node.input[0]]).astype(np.int64)

    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        name, weights = quantized(node.input[1])
        if weights is None:
            continue
        largest = int(np.abs(weights).max())
        if largest > WEIGHT_LIMIT:
            return (f"the {node.op_type} weights {name} hold integers up to {largest} in magnitude, beyond "
                    f"{WEIGHT_LIMIT}: CPUs without VNNI would saturate their sums")
        transposed = any(attribute.name == "transB" and attribute.i for attribute in node.attribute)
        axis = OUTPUT_AXIS.get(node.op_type, 0 if transposed else 1) % weights.ndim
        sums = np.abs(weights).sum(axis=tuple(a for a in range(weights.ndim) if a != axis))
        bias = quantized(node.input[2])[1] if len(node.input) > 2 and node.input[2] else None
        bound = int((ACTIVATION_LIMIT * sums + (0 if bias is None else np.abs(bias))).max())
        if bound > ACCUMULATOR_LIMIT:
            return (f"the {node.op_type} with weights {name} can sum to {bound}, beyond its 32-bit accumulators' "
                    f"{ACCUMULATOR_LIMIT}")
    return None


def reference_logits(model: onnx.ModelProto, pixels: np.ndarray) -> np.ndarray:
    """The logits onnx's reference evaluator computes for each image, from a copy of the model converted to
    REFERENCE_OPSET if older (opset 19 changes no operator's meaning for these models, it adds types)."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < REFERENCE_OPSET:
        model = onnx.version_converter.convert_version(model, REFERENCE_OPSET)
    evaluator = ReferenceEvaluator(model)
    starts = range(0, len(pixels), REFERENCE_BATCH)
    return np.concatenate([evaluator.run([LOGITS], {INPUT_NAME: pixels[i : i + REFERENCE_BATCH]})[0] for i in starts])


def reference_classes(model: onnx.ModelProto, pixels: np.ndarray) -> np.ndarray:
    return reference_logits(model, pixels).argmax(1)


def logit_step(model: onnx.ModelProto) -> float:
    """The quantisation step of the model's logits: the scale of the DequantizeLinear that outputs them (0 if none)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    stored = {tensor.name: tensor for tensor in model.graph.initializer}
    node = producers.get(LOGITS)
    if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in stored:
        return 0.0
    return float(numpy_helper.to_array(stored[node.input[1]]))


def compare_with_reference(model: onnx.ModelProto, pixels: np.ndarray, logits: np.ndarray) -> tuple[float, str | None]:
    """The share of `pixels` on which onnxruntime's `logits` (from this CPU) give the reference evaluator's class,
    and why they cannot be trusted on every CPU, or None.

    The reference computes each quantised operator in float32 (dequantise, operate, quantise), the kernels in
    integers; their roundings may differ by a step per layer, which in a deep network (ResNet-18) can flip a near
    tie. So a different class is a fault only where the reference's logits for the two classes lie more than
    TIE_STEPS quantisation steps apart. A saturated sum is off by far more: thousands of steps.
    """
    problem = weight_bound_problem(model)
    if problem:
        return 0.0, problem
    expected = reference_logits(model, pixels)
    classes, reference = logits.argmax(1), expected.argmax(1)
    rows = np.arange(len(pixels))
    margins = expected[rows, reference] - expected[rows, classes]
    faults = int((margins > TIE_STEPS * logit_step(model)).sum())
    agreement = float((classes == reference).mean())
    if faults:
        return agreement, (
            f"its classes in onnxruntime on this CPU ({this_cpu().describe()}) differ from onnx's reference "
            f"evaluator's for {faults} of {len(pixels)} images checked, beyond a near tie: its integer kernels here "
            f"do not compute what the file defines")
    return agreement, None


def reference_sample(count: int, total: int, seed: int) -> np.ndarray:
    """Which of `total` test images the export stage checks: a seeded sample of `count`, in order, or all."""
    return np.sort(np.random.default_rng(seed).choice(total, min(count, total), replace=False))


def check_int8(path: Path, logits: np.ndarray, fp32_logits: np.ndarray, labels: np.ndarray, pixels: np.ndarray,
               params: ExportParams, not_written: str) -> tuple[dict, int]:
    """The int8 model's metrics and how many test images the reference evaluator checked, once the model loses at
    most export.int8_max_accuracy_drop of the fp32 model's test accuracy and onnxruntime's `logits` give the
    reference's classes on a seeded sample of the test images; else a PipelineError ending with `not_written`."""
    accuracy, int8_accuracy = (float((scores.argmax(1) == labels).mean()) for scores in (fp32_logits, logits))
    if accuracy - int8_accuracy > params.int8_max_accuracy_drop:
        raise PipelineError(
            f"the int8 model's test accuracy {int8_accuracy:.4f} is {100 * (accuracy - int8_accuracy):.2f} points "
            f"below the fp32 model's {accuracy:.4f} (export.int8_max_accuracy_drop = {params.int8_max_accuracy_drop}); "
            f"{not_written}"
        )
    sample = reference_sample(REFERENCE_IMAGES, len(pixels), params.seed)
    try:
        agreement, problem = compare_with_reference(onnx.load(path), pixels[sample], logits[sample])
    except Exception as error:  # onnx's converter and evaluator raise whatever their operators raise
        raise PipelineError(f"onnx's reference evaluator cannot run the int8 model ({gist(error)}); {not_written}") from None
    if problem:
        raise PipelineError(f"the int8 model's answers depend on the CPU: {problem}; {not_written}")
    metrics = {
        "int8_accuracy": round(int8_accuracy, 4),
        "int8_agreement": round(float((logits.argmax(1) == fp32_logits.argmax(1)).mean()), 4),
        "int8_reference_agreement": round(agreement, 4),  # below 1 only by near ties: anything else fails the stage
    }
    return metrics, len(sample)
