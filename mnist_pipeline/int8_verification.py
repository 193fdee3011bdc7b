"""The int8 model's checks: its accuracy against the fp32 model's, counted in images, and its answers against what no
CPU can change, the bounds of its integer weights and onnx's reference evaluator (every operator computed from its
definition in numpy, not by onnxruntime's kernels), layer by layer."""

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops.op_max_pool import MaxPool as LoopedMaxPool

from mnist_pipeline.cpu import this_cpu
from mnist_pipeline.errors import PipelineError, gist
from mnist_pipeline.onnx_io import INPUT_NAME, LOGITS, inference_session
from mnist_pipeline.params import ExportParams

REFERENCE_OPSET = 19  # the first opset whose DequantizeLinear onnx's reference evaluator implements
REFERENCE_IMAGES = 500  # test images the export stage checks, 3 s for the best model on 2 cores; `make check-int8`: all
REFERENCE_BATCH = 100
STEP_LIMIT = 1  # quantisation steps a layer may differ from the reference by: float32 rounding (check_layers)
FLOAT_LIMIT = 1e-5  # relative difference allowed in a float output (the softmax): float32 rounding too
# onnx_export.INT8_SETTINGS says why: 7-bit weights keep a pair of uint8 * int8 products within 16 bits on CPUs
# without VNNI, and each output channel's sum must fit the kernels' 32-bit accumulators.
WEIGHT_LIMIT, ACTIVATION_LIMIT, ACCUMULATOR_LIMIT = 64, 255, 2**31 - 1
OUTPUT_AXIS = {"Conv": 0, "MatMul": -1}  # of the weights; Gemm's is 0 with transB = 1 (PyTorch's Linear), else 1


def agreement_phrase(max_steps: int) -> str:
    """How the largest layer difference reads between 'each layer' and "onnx's reference evaluator": where no layer
    differs (as on a CPU whose kernels round as the reference does), there is no step to count."""
    return "identical to" if max_steps == 0 else f"within {max_steps} quantisation step{'s' * (max_steps != 1)} of"


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
            return (
                f"the {node.op_type} weights {name} hold integers up to {largest} in magnitude, beyond "
                f"{WEIGHT_LIMIT}: CPUs without VNNI would saturate their sums"
            )
        transposed = any(attribute.name == "transB" and attribute.i for attribute in node.attribute)
        axis = OUTPUT_AXIS.get(node.op_type, 0 if transposed else 1) % weights.ndim
        sums = np.abs(weights).sum(axis=tuple(a for a in range(weights.ndim) if a != axis))
        bias = quantized(node.input[2])[1] if len(node.input) > 2 and node.input[2] else None
        bound = int((ACTIVATION_LIMIT * sums + (0 if bias is None else np.abs(bias))).max())
        if bound > ACCUMULATOR_LIMIT:
            return (
                f"the {node.op_type} with weights {name} can sum to {bound}, beyond its 32-bit accumulators' "
                f"{ACCUMULATOR_LIMIT}"
            )
    return None


class MaxPool(LoopedMaxPool):
    """onnx's reference MaxPool, computed by numpy at once over a view of every window: floor mode, no dilation, and
    padding narrower than the kernel, so that every window holds a real value (the CNN's 2×2 pooling, ResNet-18's
    3×3 with stride 2 and padding 1). onnx strides through every window in a Python loop there, which took 18 of the
    default model's 30 s of export, and 20 of a frozen ResNet-18's 48 s, on an AVX2-only EPYC Milan's 2 cores. A
    maximum involves no rounding, and padding with the lowest value never wins, as onnx's loop skips it: the same
    definition, not another kernel. Its inputs are dequantised integers, never NaN, where the two could differ."""

    op_domain = ""

    def _run(
        self,
        x,
        auto_pad=None,
        ceil_mode=None,
        dilations=None,
        kernel_shape=None,
        pads=None,
        storage_order=None,
        strides=None,
    ):
        attributes = auto_pad, ceil_mode, dilations, kernel_shape, pads, storage_order, strides
        kernel = tuple(kernel_shape)
        top, left, bottom, right = pads or (0, 0, 0, 0)  # ONNX's order: each axis's start, then each axis's end
        in_numpy = (
            x.ndim == 4
            and len(self.output) == 1  # no Indices output asked for
            and auto_pad in (None, "NOTSET")
            and not ceil_mode
            and all(d == 1 for d in dilations or ())
            and max(top, bottom) < kernel[0]
            and max(left, right) < kernel[1]
        )
        if not in_numpy:
            return super()._run(x, *attributes)
        lowest = -np.inf if np.issubdtype(x.dtype, np.floating) else np.iinfo(x.dtype).min
        padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=lowest)
        row_step, column_step = strides or (1, 1)
        # Floor mode: the windows that fit in the padded image, every stride-th one.
        windows = sliding_window_view(padded, kernel, axis=(2, 3))[:, :, ::row_step, ::column_step]
        return (windows.max(axis=(4, 5)),)


def reference_evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    """onnx's reference evaluator for the model, with the MaxPool above."""
    return ReferenceEvaluator(model, new_ops=[MaxPool])


def reference_logits(model: onnx.ModelProto, pixels: np.ndarray) -> np.ndarray:
    """The logits onnx's reference evaluator computes for each image, from a copy of the model converted to
    REFERENCE_OPSET if older (opset 19 changes no operator's meaning for these models, it adds types)."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < REFERENCE_OPSET:
        model = onnx.version_converter.convert_version(model, REFERENCE_OPSET)
    evaluator = reference_evaluator(model)
    starts = range(0, len(pixels), REFERENCE_BATCH)
    return np.concatenate([evaluator.run([LOGITS], {INPUT_NAME: pixels[i : i + REFERENCE_BATCH]})[0] for i in starts])


def quantized_outputs(model: onnx.ModelProto) -> dict[str, int]:
    """Every tensor a QuantizeLinear writes, in graph order, with its ONNX element type (uint8 unless its zero point
    says otherwise): the values each quantised layer hands to the next."""
    stored = {tensor.name: tensor for tensor in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            zero = stored.get(node.input[2]) if len(node.input) > 2 else None
            found[node.output[0]] = zero.data_type if zero is not None else TensorProto.UINT8
    return found


def exposing(model: onnx.ModelProto, names: dict[str, int]) -> onnx.ModelProto:
    """A copy of the model that also outputs `names`: onnxruntime still fuses each DequantizeLinear, operator,
    QuantizeLinear group into one integer kernel, whose output is the QuantizeLinear's, so these are the values its
    kernels computed."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    known = {output.name for output in copy.graph.output}
    copy.graph.output.extend(
        helper.make_tensor_value_info(name, kind, None) for name, kind in names.items() if name not in known
    )
    return copy


def layer(model: onnx.ModelProto, target: str, boundary: set[str]) -> onnx.ModelProto:
    """The nodes that compute `target` from tensors in `boundary` (quantised tensors, graph inputs) and the stored
    ones, as a model of its own whose inputs are those boundary tensors."""
    producers = {output: node for node in model.graph.node for output in node.output}
    stored = {tensor.name: tensor for tensor in model.graph.initializer}
    nodes, inputs, pending, seen = [], [], [target], set()
    while pending:
        name = pending.pop()
        if name in seen or not name or name in stored:
            continue
        seen.add(name)
        if name in boundary and name != target or name not in producers:
            inputs.append(name)
            continue
        node = producers[name]
        if node not in nodes:
            nodes.append(node)
            pending.extend(node.input)
    order = {id(node): i for i, node in enumerate(model.graph.node)}
    nodes.sort(key=lambda node: order[id(node)])
    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(
        nodes,
        target,
        [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None) for name in inputs],
        [helper.make_tensor_value_info(target, TensorProto.UNDEFINED, None)],
        [stored[name] for name in sorted(used & stored.keys())],
    )
    return helper.make_model(graph, opset_imports=model.opset_import)


def reference_classes(model: onnx.ModelProto, pixels: np.ndarray) -> np.ndarray:
    return reference_logits(model, pixels).argmax(1)


@dataclass
class LayerCheck:
    """How far onnxruntime's layers are from their definitions: the most quantisation steps any quantised tensor
    differs by, and the largest difference of a float output, over the images checked."""

    steps: int
    float_difference: float
    problem: str | None
    logits: np.ndarray | None = None  # onnxruntime's, from the session that exposed the layers


def check_layers(model: onnx.ModelProto, pixels: np.ndarray) -> LayerCheck:
    """Each quantised layer as onnxruntime computes it on this CPU against onnx's reference evaluator given the same
    inputs, onnxruntime's own: within STEP_LIMIT quantisation step for every quantised tensor, and within
    FLOAT_LIMIT (relative) for the float outputs, or a problem saying which layer differs and by how much.

    Why this is sound. A layer (DequantizeLinear, operator, QuantizeLinear) defines its uint8 output exactly from
    its uint8 inputs: round(operator(dequantised inputs) / scale) + zero point. onnxruntime computes it with integer
    sums and one float requantisation, the reference in float32 throughout; for the same inputs the two differ only
    by where a float32 rounding error (far below a step for these sums) tips a value across a rounding midpoint: one
    step at most. Anything a kernel gets wrong is larger: a saturated 16-bit pair sum is off by thousands of steps
    before requantisation (126 of the output's 255 in tests/test_int8_any_cpu.py), an overflowed 32-bit sum by more.
    Because every layer is fed onnxruntime's inputs, not the reference's, the one-step differences do not accumulate
    over depth as they do end to end, where ResNet-18's 20 layers move a logit by up to 8 steps; so a deep network
    is judged as fairly as a shallow one, and a difference the kernels make on any layer still shows, whatever the
    layers after it do. The bounds of weight_bound_problem say which CPUs could differ; this check shows what this
    CPU's kernels computed.
    """
    quantized = quantized_outputs(model)
    outputs = [output.name for output in model.graph.output]
    session = inference_session(exposing(model, quantized).SerializeToString())
    names = list(quantized) + [name for name in outputs if name not in quantized]
    starts = range(0, len(pixels), REFERENCE_BATCH)
    computed = {
        name: np.concatenate(parts)
        for name, parts in zip(
            names,
            zip(*(session.run(names, {INPUT_NAME: pixels[i : i + REFERENCE_BATCH]}) for i in starts), strict=True),
            strict=False,
        )
    }
    computed[INPUT_NAME] = pixels
    opset = max(REFERENCE_OPSET, next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))
    boundary = set(quantized) | {INPUT_NAME}
    worst = LayerCheck(0, 0.0, None)
    for name in names:
        part = layer(model, name, boundary)
        # Opset 19 only adds types to the operators these models use, so the layer means the same under it.
        del part.opset_import[:]
        part.opset_import.append(helper.make_opsetid("", opset))
        evaluator = reference_evaluator(part)
        feeds = [graph_input.name for graph_input in part.graph.input]
        expected = np.concatenate(
            [evaluator.run([name], {f: computed[f][i : i + REFERENCE_BATCH] for f in feeds})[0] for i in starts]
        )
        ours = computed[name]
        what = (
            " then ".join(
                f"{node.op_type} {node.name}".strip()
                for node in part.graph.node
                if node.op_type not in ("QuantizeLinear", "DequantizeLinear")
            )
            or "QuantizeLinear"
        )
        if name in quantized:
            steps = np.abs(ours.astype(np.int64) - expected.astype(np.int64)).reshape(len(pixels), -1).max(1)
            worst.steps = max(worst.steps, int(steps.max()))
            if steps.max() > STEP_LIMIT and worst.problem is None:
                worst.problem = (
                    f"onnxruntime on this CPU ({this_cpu().describe()}) computes {name} ({what}) up to "
                    f"{int(steps.max())} quantisation steps away from onnx's reference evaluator given the same "
                    f"inputs, on {int((steps > STEP_LIMIT).sum())} of {len(pixels)} images checked "
                    f"(float32 rounding accounts for {STEP_LIMIT} at most)"
                )
        else:
            # np.fmax, not np.maximum: numpy's float32 maximum against a scalar crashes qemu 7.2's emulated Haswell
            # (a segfault in the emulator) once torch is loaded, and this check must run there (tests/test_pipeline.py).
            scale = np.fmax(1.0, np.abs(expected)).reshape(len(pixels), -1)
            relative = (np.abs(ours - expected).reshape(len(pixels), -1) / scale).max(1)
            worst.float_difference = max(worst.float_difference, float(relative.max()))
            if relative.max() > FLOAT_LIMIT and worst.problem is None:
                worst.problem = (
                    f"onnxruntime on this CPU ({this_cpu().describe()}) computes {name} ({what}) up to "
                    f"{float(relative.max()):.2g} (relative) away from onnx's reference evaluator given the same "
                    f"inputs, on {int((relative > FLOAT_LIMIT).sum())} of {len(pixels)} images checked "
                    f"(limit {FLOAT_LIMIT})"
                )
    worst.logits = computed.get(LOGITS)
    return worst


def compare_with_reference(model: onnx.ModelProto, pixels: np.ndarray, logits: np.ndarray) -> tuple[dict, str | None]:
    """The int8 model checked on `pixels`, whose logits onnxruntime computed on this CPU: the weight bounds that keep
    every CPU's kernels exact, then every layer against the reference evaluator (check_layers); and, for the
    record, how often onnxruntime's class is the reference's end to end. Returns those figures and the first
    problem found, or None."""
    problem = weight_bound_problem(model)
    if problem:
        return {}, problem
    layers = check_layers(model, pixels)
    if layers.problem is None and layers.logits is not None and not np.array_equal(layers.logits, logits):
        # The layers were read from a session that outputs them too; the check speaks for the client's session only
        # if onnxruntime computed the same there, bit for bit.
        differ = int((layers.logits != logits).any(1).sum())
        return {}, (
            f"onnxruntime's logits change when its layers are read out, on {differ} of {len(pixels)} images, "
            f"by up to {float(np.abs(layers.logits - logits).max()):.3g}"
        )
    figures = {
        "int8_reference_agreement": round(float((logits.argmax(1) == reference_classes(model, pixels)).mean()), 4),
        "int8_layer_max_steps": layers.steps,
    }
    return figures, layers.problem


def reference_sample(count: int, total: int, seed: int) -> np.ndarray:
    """Which of `total` test images the export stage checks: a seeded sample of `count`, in order, or all."""
    return np.sort(np.random.default_rng(seed).choice(total, min(count, total), replace=False))


def images_allowed(limit: float, total: int) -> int:
    """How many of `total` images a limit given as a share of them allows, computed exactly from the limit as written:
    0.002 of 2,000 is 4 images, where in floats 0.9005 - 0.8985 is 0.0020000000000000018, above 0.002."""
    return math.floor(Fraction(repr(limit)) * total)


def check_int8(
    path: Path,
    logits: np.ndarray,
    fp32_logits: np.ndarray,
    labels: np.ndarray,
    pixels: np.ndarray,
    params: ExportParams,
    not_written: str,
) -> tuple[dict, dict]:
    """The int8 model's headline metrics and the reference check's details, once the int8 model gets at most
    export.int8_max_accuracy_drop of the test images fewer right than the fp32 model, its weights are within the
    bounds, and each of its layers in onnxruntime computes what the reference evaluator does from the same inputs on
    a seeded sample of the test images; else a PipelineError ending with `not_written`."""
    right, int8_right = (int((scores.argmax(1) == labels).sum()) for scores in (fp32_logits, logits))
    allowed = images_allowed(params.int8_max_accuracy_drop, len(labels))
    if right - int8_right > allowed:
        raise PipelineError(
            f"the int8 model's test accuracy {int8_right / len(labels):.4f} is {right - int8_right} of {len(labels)} "
            f"images below the fp32 model's {right / len(labels):.4f}, where export.int8_max_accuracy_drop = "
            f"{params.int8_max_accuracy_drop} allows {allowed}; {not_written}"
        )
    sample = reference_sample(REFERENCE_IMAGES, len(pixels), params.seed)
    try:
        figures, problem = compare_with_reference(onnx.load(path), pixels[sample], logits[sample])
    except Exception as error:  # onnx's converter and evaluator raise whatever their operators raise
        raise PipelineError(
            f"onnx's reference evaluator cannot run the int8 model ({gist(error)}); {not_written}"
        ) from None
    if problem:
        raise PipelineError(f"the int8 model failed its check against its definition: {problem}; {not_written}")
    metrics = {
        "int8_accuracy": round(int8_right / len(labels), 4),
        "int8_agreement": round(float((logits.argmax(1) == fp32_logits.argmax(1)).mean()), 4),
    }
    return metrics, {**figures, "int8_reference_images": len(sample)}
