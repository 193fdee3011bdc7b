"""The int8 model computes what its file defines on every CPU: each layer in onnxruntime, natively and on an emulated
CPU without AVX-512 or VNNI (qemu's Haswell), against onnx's reference evaluator given the same inputs, and the weight
bounds that make it hold on every kernel path; and its accuracy limit counted in images."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import REPO_ROOT
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from mnist_pipeline import int8_verification, onnx_export
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.int8_verification import (
    agreement_phrase,
    check_layers,
    compare_with_reference,
    weight_bound_problem,
)
from mnist_pipeline.params import ExportParams

QEMU = shutil.which("qemu-x86_64")
LAYERS = ("Gemm", "Conv")  # onnxruntime's QGEMM and its convolution kernels, both u8 * s8 on x86
MODELS = (*LAYERS, "ConvDepthwise")  # and the Conv as the export writes it, for its depthwise kernel


def saturating_model(layer: str) -> onnx.ModelProto:
    """A two-class model built to saturate 16-bit pair sums. Class 0's weights are all 1.0: in 8 bits, pairs of
    bright pixels give 2 * 255 * 127. Class 1's are 0.5 (its 1.0 meets a pixel that is always black, so 0.5 becomes
    64 and its pairs fit) and a bias of 20. With N bright pixels class 0 wins by 0.5 N - 20 in float; with pairs
    clipped at 32,767 it scores about 0.506 N, and class 1 wins."""
    weights = np.full((2, 28 * 28), 0.5, np.float32)
    weights[0], weights[1, 0] = 1.0, 1.0
    nodes = [
        helper.make_node("Cast", ["pixels"], ["float_pixels"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["float_pixels", "scale"], ["inputs"]),
    ]
    if layer == "Gemm":
        nodes += [
            helper.make_node("Flatten", ["inputs"], ["rows"]),
            helper.make_node("Gemm", ["rows", "w", "b"], ["logits"], transB=1),
        ]
    else:  # one 28x28 kernel per class: the same sums as a convolution
        nodes += [
            helper.make_node("Conv", ["inputs", "w", "b"], ["maps"]),
            helper.make_node("Flatten", ["maps"], ["logits"]),
        ]
        weights = weights.reshape(2, 1, 28, 28)
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    stored = [
        numpy_helper.from_array(np.float32(255), "scale"),
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(np.array([0, 20], np.float32), "b"),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", 2]) for name in ("logits", "probabilities")]
    pixels = helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["n", 1, 28, 28])
    graph = helper.make_graph(nodes, "saturating", [pixels], outputs, stored)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def bright_runs(count: int = 32) -> np.ndarray:
    """Images with one run of 100 to 300 white pixels (in row-major order, from an even position) on black."""
    rng = np.random.default_rng(0)
    pixels = np.zeros((count, 1, 28, 28), np.uint8)
    for image in pixels:
        length = 2 * rng.integers(50, 150)
        start = 2 + 2 * rng.integers(0, (28 * 28 - 4 - length) // 2)
        image.reshape(-1)[start : start + length] = 255
    return pixels


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each layer's int8 model as quantize_int8 makes it, and as the full-range 8-bit weights of before made it."""
    folder = tmp_path_factory.mktemp("int8")
    pixels = bright_runs()
    np.save(folder / "pixels.npy", pixels)
    # The Conv model has one input channel, which the export runs as a depthwise convolution (int8_depthwise.py):
    # "Conv" keeps onnxruntime's general convolution kernel, the one that pairs products, and "ConvDepthwise" is
    # what the export writes.
    for layer, source, depthwise in [("Gemm", "Gemm", True), ("Conv", "Conv", False), ("ConvDepthwise", "Conv", True)]:
        onnx.save(saturating_model(source), folder / f"{source}.onnx")
        onnx_export.quantize_int8(folder / f"{source}.onnx", folder / f"{layer}.int8.onnx", pixels, depthwise=depthwise)
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(onnx_export.INT8_SETTINGS, "reduce_range", False)
            onnx_export.quantize_int8(
                folder / f"{source}.onnx", folder / f"{layer}.8-bit.onnx", pixels, depthwise=depthwise
            )
    return folder


@pytest.mark.parametrize("layer", LAYERS)
def test_the_weights_fit_every_kernel_and_8_bit_weights_do_not(models, layer):
    assert weight_bound_problem(onnx.load(models / f"{layer}.int8.onnx")) is None
    problem = weight_bound_problem(onnx.load(models / f"{layer}.8-bit.onnx"))
    assert problem == (
        f"the {layer} weights w_quantized hold integers up to 127 in magnitude, beyond 64: CPUs without "
        f"VNNI would saturate their sums"
    )


def test_a_sum_too_large_for_32_bits_is_found(models):
    """7-bit weights, but so many of them that one output's sum could pass 2^31: 255 * 64 * 140,000 = 2.3e9."""
    model = onnx.load(models / "Gemm.int8.onnx")
    weights = next(t for t in model.graph.initializer if t.name == "w_quantized")
    weights.CopyFrom(numpy_helper.from_array(np.full((2, 140_000), 64, np.int8), weights.name))
    problem = weight_bound_problem(model)
    found = re.fullmatch(
        r"the Gemm with weights w_quantized can sum to (\d+), beyond its 32-bit accumulators' 2147483647", problem
    )
    assert found and int(found[1]) >= 255 * 64 * 140_000, problem  # the bias adds its own bit


def test_on_this_cpu_onnxruntime_matches_the_reference(models):
    from mnist_pipeline.onnx_io import onnx_outputs

    pixels = np.load(models / "pixels.npy")
    for layer in MODELS:
        path = models / f"{layer}.int8.onnx"
        logits = onnx_outputs(path, pixels)[0]
        figures, problem = compare_with_reference(onnx.load(path), pixels, logits)
        assert problem is None and figures["int8_reference_agreement"] == 1.0 and figures["int8_layer_max_steps"] <= 1
        assert (logits.argmax(1) == 0).all(), "the float model's class for every image"


def on_emulated_avx2(script: str, folder: Path) -> str:
    """What `script` prints, run with `folder` as its argument by this Python under qemu's Haswell: AVX2, no AVX-512."""
    result = subprocess.run(
        [QEMU, "-cpu", "Haswell", sys.executable, "-c", script, str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


# Run under qemu: each model's largest layer difference from the reference, in quantisation steps, and its logits.
LAYER_STEPS = """
import json, sys
from pathlib import Path
import numpy as np, onnx
from mnist_pipeline.int8_verification import check_layers
from mnist_pipeline.onnx_io import onnx_outputs
folder = Path(sys.argv[1])
pixels = np.load(folder / "pixels.npy")
steps = {}
for path in sorted(folder.glob("*-*.onnx")) + sorted(folder.glob("*.int8.onnx")):
    steps[path.name] = check_layers(onnx.load(path), pixels).steps
    np.save(folder / f"{path.name}.emulated.npy", onnx_outputs(path, pixels)[0])
print(json.dumps(steps))
"""


# CI sets MNIST_PIPELINE_REQUIRE_QEMU, so that there a missing qemu fails the suite instead of skipping the check.
@pytest.mark.skipif(
    QEMU is None and not os.environ.get("MNIST_PIPELINE_REQUIRE_QEMU"),
    reason="no qemu-x86_64 (Debian's qemu-user) to emulate a CPU without VNNI",
)
def test_on_an_emulated_avx2_cpu_8_bit_weights_fail_the_layer_check_and_7_bit_ones_match_native(models):
    """qemu's TCG has AVX2 but neither AVX-512 nor VNNI, so onnxruntime picks its AVX2 kernels (VPMADDUBSW) even on
    a VNNI machine. The 8-bit models' saturated layers are over 100 steps from the reference there, which shows
    that the emulation reaches the saturating path and that the layer check sees it; the 7-bit ones are within a
    step, and their logits are bit for bit the native ones."""
    assert QEMU, "MNIST_PIPELINE_REQUIRE_QEMU is set, but there is no qemu-x86_64 (apt-get install qemu-user)"
    from mnist_pipeline.onnx_io import onnx_outputs

    steps = json.loads(on_emulated_avx2(LAYER_STEPS, models))
    assert set(steps) == {f"{layer}.{bits}.onnx" for layer in MODELS for bits in ("8-bit", "int8")}
    assert steps["Conv.8-bit.onnx"] > 100 and steps["Gemm.8-bit.onnx"] > 100, steps
    assert steps["Conv.int8.onnx"] <= 1 and steps["Gemm.int8.onnx"] <= 1, steps
    # The depthwise kernel sums each output in 32 bits, pairing nothing: even 8-bit weights are exact there.
    assert steps["ConvDepthwise.8-bit.onnx"] <= 1 and steps["ConvDepthwise.int8.onnx"] <= 1, steps
    pixels = np.load(models / "pixels.npy")
    for layer in MODELS:
        native = onnx_outputs(models / f"{layer}.int8.onnx", pixels)[0]
        assert np.array_equal(native, np.load(models / f"{layer}.int8.onnx.emulated.npy"))


def test_a_layer_more_than_a_step_from_the_reference_is_named_with_its_difference(models, monkeypatch):
    """The layer check feeds each layer onnxruntime's own inputs, so one layer off by 2 steps is found at that layer,
    and the message says which tensor differs, by how much and on how many images, not why."""
    model = onnx.load(models / "Gemm.int8.onnx")
    pixels = np.load(models / "pixels.npy")
    real_session = int8_verification.inference_session

    class OffByTwo:
        def __init__(self, model_bytes):
            self.session = real_session(model_bytes)

        def run(self, names, feeds):
            outputs = self.session.run(names, feeds)
            target = names.index("rows_QuantizeLinear_Output")
            outputs[target] = outputs[target].copy()
            outputs[target][0, 100] += 2  # one pixel of the first image: no saturation, 255 was 253 at most
            return outputs

    assert check_layers(model, pixels).problem is None
    monkeypatch.setattr(int8_verification, "inference_session", OffByTwo)
    found = check_layers(model, pixels)
    assert found.steps >= 2
    assert re.fullmatch(
        r"onnxruntime on this CPU \(.+\) computes rows_QuantizeLinear_Output \(Cast then Div then Flatten\) up to 2 "
        r"quantisation steps away from onnx's reference evaluator given the same inputs, on 1 of 32 "
        r"images checked \(float32 rounding accounts for 1 at most\)",
        found.problem,
    ), found.problem


def test_the_largest_layer_difference_reads_as_a_sentence():
    """Where no layer differs from the reference (seen for the tests' small model under qemu on an AVX2-only host),
    there is no step to count."""
    assert agreement_phrase(0) == "identical to"
    assert agreement_phrase(1) == "within 1 quantisation step of"
    assert agreement_phrase(2) == "within 2 quantisation steps of"


@pytest.mark.parametrize(
    "size, attributes, in_numpy",
    [
        (28, {"kernel_shape": [2, 2], "strides": [2, 2]}, True),  # the CNN's pooling
        (7, {"kernel_shape": [2, 2], "strides": [2, 2]}, True),  # floor mode drops the last row and column
        (16, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, True),  # ResNet-18's
        (9, {"kernel_shape": [3, 2], "strides": [1, 3], "pads": [2, 0, 0, 1]}, True),
        (7, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, False),
        (8, {"kernel_shape": [2, 2], "dilations": [2, 2]}, False),
        (8, {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [2, 0, 0, 0]}, False),  # a window of padding only
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_the_reference_max_pool_gives_exactly_what_onnx_s_looped_one_does(
    size, attributes, in_numpy, dtype, monkeypatch
):
    """The export's reference check pools with numpy in one step (int8_verification.MaxPool) where onnx loops in
    Python: the same values, bit for bit, with repeated maxima and negative values among them, and onnx's own loop
    for the settings the numpy form does not cover."""
    node = helper.make_node("MaxPool", ["x"], ["y"], **attributes)
    kind = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = helper.make_model(
        helper.make_graph(
            [node],
            "pool",
            [helper.make_tensor_value_info("x", kind, None)],
            [helper.make_tensor_value_info("y", kind, None)],
        ),
        opset_imports=[helper.make_opsetid("", 19)],
    )
    values = np.random.default_rng(0).integers(0 if dtype == np.uint8 else -8, 8, (3, 4, size, size))
    images = {"x": values.astype(dtype)}
    onnx_own = ReferenceEvaluator(model).run(None, images)[0]
    if in_numpy:  # so that the comparison is not onnx's loop against itself

        def looped(*args, **kwargs):
            raise AssertionError("onnx's looped MaxPool ran where numpy's should")

        monkeypatch.setattr(int8_verification.LoopedMaxPool, "_run", looped)
    ours = int8_verification.reference_evaluator(model).run(None, images)[0]
    assert ours.dtype == onnx_own.dtype and ours.shape == onnx_own.shape
    np.testing.assert_array_equal(ours, onnx_own)


@pytest.mark.parametrize("fp32_right, int8_right, passes", [(1801, 1797, True), (1801, 1796, False)])
def test_the_accuracy_limit_counts_images_so_a_drop_of_exactly_the_limit_passes(
    monkeypatch, fp32_right, int8_right, passes
):
    """0.002 of 2,000 test images is 4: 0.9005 to 0.8985 passes, though in floats their difference is
    0.0020000000000000018; 5 images fail, with the counts in the message."""
    assert 0.9005 - 0.8985 > 0.002 and int8_verification.images_allowed(0.002, 2000) == 4
    assert int8_verification.images_allowed(0.29, 100) == 29, "0.29 * 100 is 28.999999999999996 in floats"
    labels = np.zeros(2000, np.int64)
    fp32_logits, int8_logits = (
        np.eye(2, dtype=np.float32)[(np.arange(2000) >= right).astype(int)] for right in (fp32_right, int8_right)
    )
    monkeypatch.setattr(int8_verification, "compare_with_reference", lambda model, pixels, logits: ({}, None))
    monkeypatch.setattr(int8_verification.onnx, "load", lambda path: None)
    params = ExportParams.model_validate(
        {"opset": 18, "tolerance": 1e-4, "int8_max_accuracy_drop": 0.002, "calibration_images": 10, "seed": 0}
    )
    pixels = np.zeros((2000, 1, 2, 2), np.uint8)
    if passes:
        metrics, _ = int8_verification.check_int8(
            None, int8_logits, fp32_logits, labels, pixels, params, "nothing written"
        )
        assert metrics["int8_accuracy"] == 0.8985
    else:
        with pytest.raises(
            PipelineError,
            match=r"^the int8 model's test accuracy 0\.8980 is 5 of 2000 images below the "
            r"fp32 model's 0\.9005, where export\.int8_max_accuracy_drop = 0\.002 allows 4; nothing written$",
        ):
            int8_verification.check_int8(None, int8_logits, fp32_logits, labels, pixels, params, "nothing written")


def tent_network(width: int = 100, iterations: int = 12, slope: float = 1.93) -> onnx.ModelProto:
    """A deep network (2 + 2 * iterations layers) whose float32 rounding differences grow end to end: each of `width`
    numbers in [0, 1] starts as a random average of the pixels and goes through the tent map x -> slope * min(x, 1 - x)
    `iterations` times, two MatMul+Relu layers each, so that a difference of one step nearly doubles at every step.
    The constant 1 the map needs travels as a channel of its own, set by the first layer's bias."""
    rng = np.random.default_rng(0)
    first = rng.random((width + 1, 28 * 28)).astype(np.float32)
    first /= first.sum(1, keepdims=True)
    first[width] = 0
    bias = np.zeros(width + 1, np.float32)
    bias[width] = 1
    eye, zero, one = np.eye(width, dtype=np.float32), np.zeros((width, 1), np.float32), np.ones((1, 1), np.float32)
    split = np.block([[eye, zero], [2 * eye, zero - 1], [zero.T, one]])  # x, 2x - 1 (then Relu), 1
    fold = np.block([[slope * eye, -slope * eye, zero], [zero.T, zero.T, one]])  # slope * (x - relu(2x - 1)), 1
    vote = np.zeros((width + 1, 10), np.float32)
    vote[np.arange(width), np.arange(width) % 10] = 1
    nodes = [
        helper.make_node("Cast", ["pixels"], ["float_pixels"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["float_pixels", "scale"], ["inputs"]),
        helper.make_node("Flatten", ["inputs"], ["rows"]),
        helper.make_node("Gemm", ["rows", "first", "bias"], ["x0"], transB=1),
    ]
    for i in range(iterations):
        nodes += [
            helper.make_node("MatMul", [f"x{i}", "split"], [f"s{i}"]),
            helper.make_node("Relu", [f"s{i}"], [f"r{i}"]),
            helper.make_node("MatMul", [f"r{i}", "fold"], [f"f{i}"]),
            helper.make_node("Relu", [f"f{i}"], [f"x{i + 1}"]),
        ]
    nodes += [
        helper.make_node("MatMul", [f"x{iterations}", "vote"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    stored = [
        numpy_helper.from_array(array, name)
        for name, array in [
            ("scale", np.float32(255)),
            ("first", first),
            ("bias", bias),
            ("split", split.T.copy()),
            ("fold", fold.T.copy()),
            ("vote", vote),
        ]
    ]
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", 10]) for name in ("logits", "probabilities")
    ]
    pixels = helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["n", 1, 28, 28])
    return helper.make_model(
        helper.make_graph(nodes, "tent", [pixels], outputs, stored), opset_imports=[helper.make_opsetid("", 18)]
    )


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """The tent network quantised as the export stage quantises, and 300 images of varied brightness."""
    folder = tmp_path_factory.mktemp("deep")
    rng = np.random.default_rng(1)
    pixels = (rng.random((300, 1, 28, 28)) * rng.random((300, 1, 1, 1)) * 512).clip(0, 255).astype(np.uint8)
    np.save(folder / "pixels.npy", pixels)
    onnx.save(tent_network(), folder / "tent.onnx")
    onnx_export.quantize_int8(folder / "tent.onnx", folder / "tent.int8.onnx", pixels)
    return folder


def test_a_deep_network_the_end_to_end_rule_rejected_passes_the_layer_check(deep):
    """The rule this check replaced compared classes end to end and allowed the reference's two classes to lie 4
    logit steps apart. Here the reference's one-step roundings grow through 26 layers into classes tens of steps
    apart on many images, yet every layer onnxruntime computes is within a step of the reference given its inputs."""
    from mnist_pipeline.onnx_io import onnx_outputs

    model, pixels = onnx.load(deep / "tent.int8.onnx"), np.load(deep / "pixels.npy")
    logits = onnx_outputs(deep / "tent.int8.onnx", pixels)[0]
    expected = int8_verification.reference_logits(model, pixels)
    rows, step = (
        np.arange(len(pixels)),
        float(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "logits_scale"))),
    )
    margins = expected[rows, expected.argmax(1)] - expected[rows, logits.argmax(1)]
    assert (margins > 4 * step).sum() >= 10, "the old rule rejects it"
    figures, problem = compare_with_reference(model, pixels, logits)
    assert problem is None and figures["int8_layer_max_steps"] == 1 and figures["int8_reference_agreement"] < 0.95


DEEP_LOGITS = """
import sys
from pathlib import Path
from pathlib import Path
import numpy as np
from mnist_pipeline.onnx_io import onnx_outputs
folder = Path(sys.argv[1])
np.save(folder / "emulated.npy", onnx_outputs(folder / "tent.int8.onnx", np.load(folder / "pixels.npy"))[0])
"""


@pytest.mark.skipif(
    QEMU is None and not os.environ.get("MNIST_PIPELINE_REQUIRE_QEMU"),
    reason="no qemu-x86_64 (Debian's qemu-user) to emulate a CPU without VNNI",
)
def test_the_deep_networks_onnxruntime_logits_are_the_same_native_and_on_an_emulated_avx2_cpu(deep):
    """What the end-to-end rule took for a CPU's fault was the reference's rounding: onnxruntime's own answers are
    bit for bit the same on its AVX2 kernels as on this CPU's."""
    assert QEMU, "MNIST_PIPELINE_REQUIRE_QEMU is set, but there is no qemu-x86_64 (apt-get install qemu-user)"
    from mnist_pipeline.onnx_io import onnx_outputs

    on_emulated_avx2(DEEP_LOGITS, deep)
    native = onnx_outputs(deep / "tent.int8.onnx", np.load(deep / "pixels.npy"))[0]
    assert np.array_equal(native, np.load(deep / "emulated.npy"))


def normalising_conv(mean: float = 0.1307, std: float = 0.3081) -> onnx.ModelProto:
    """Raw pixels, normalised as model.normalize does, into a 3x3 convolution of 4 channels and a Gemm to 2 classes."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Cast", ["pixels"], ["float_pixels"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["float_pixels", "scale"], ["unit"]),
        helper.make_node("Sub", ["unit", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["inputs"]),
        helper.make_node("Conv", ["inputs", "w", "b"], ["maps"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["maps"], ["active"]),
        helper.make_node("Flatten", ["active"], ["rows"]),
        helper.make_node("Gemm", ["rows", "v", "c"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    stored = [
        numpy_helper.from_array(array, name)
        for name, array in [
            ("scale", np.float32(255)),
            ("mean", np.float32(mean)),
            ("std", np.float32(std)),
            ("w", rng.standard_normal((4, 1, 3, 3)).astype(np.float32)),
            ("b", np.zeros(4, np.float32)),
            ("v", rng.standard_normal((2, 4 * 28 * 28)).astype(np.float32) / 50),
            ("c", np.zeros(2, np.float32)),
        ]
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", 2]) for name in ("logits", "probabilities")]
    pixels = helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["n", 1, 28, 28])
    return helper.make_model(
        helper.make_graph(nodes, "normalising", [pixels], outputs, stored), opset_imports=[helper.make_opsetid("", 18)]
    )


def test_the_first_convolution_reads_the_raw_pixels_with_the_normalisations_scale_and_zero_point(tmp_path):
    """The normalisation is affine in the pixel, so the uint8 pixels are the first convolution's quantised input:
    scale 1 / (255 std), zero point 255 mean rounded (33 for MNIST's 0.1307). No Cast is left, the logits stay
    within a few steps of the float-normalised int8 model's, and the layer check passes."""
    from mnist_pipeline.onnx_io import onnx_outputs

    rng = np.random.default_rng(2)
    pixels = (rng.random((64, 1, 28, 28)) < 0.2).astype(np.uint8) * rng.integers(
        0, 256, (64, 1, 28, 28), dtype=np.uint8
    )
    onnx.save(normalising_conv(), tmp_path / "float.onnx")
    onnx_export.quantize_int8(tmp_path / "float.onnx", tmp_path / "raw.onnx", pixels)
    onnx_export.quantize_int8(tmp_path / "float.onnx", tmp_path / "plain.onnx", pixels, raw_pixels=False)
    raw = onnx.load(tmp_path / "raw.onnx")
    assert "Cast" not in {node.op_type for node in raw.graph.node}
    assert "Cast" in {node.op_type for node in onnx.load(tmp_path / "plain.onnx").graph.node}
    stored = {tensor.name: numpy_helper.to_array(tensor) for tensor in raw.graph.initializer}
    assert stored["pixels_normalised_zero_point"] == 33 and stored["pixels_normalised_zero_point"].dtype == np.uint8
    assert stored["pixels_normalised_scale"] == pytest.approx(1 / (255 * 0.3081), rel=1e-6)
    step = float(stored["logits_scale"])
    raw_logits, plain_logits = (onnx_outputs(tmp_path / f"{name}.onnx", pixels)[0] for name in ("raw", "plain"))
    assert np.abs(raw_logits - plain_logits).max() <= 4 * step
    figures, problem = compare_with_reference(raw, pixels, raw_logits)
    assert problem is None and figures["int8_layer_max_steps"] <= 1


def test_an_input_preparation_that_is_not_affine_keeps_its_float_input(tmp_path):
    """A Resize between the pixels and the first quantised tensor (ResNet-18's input_size) is no affine map of each
    pixel: the model is left as quantize_static wrote it."""
    model = normalising_conv()
    model.graph.node[3].input[0], model.graph.node[4].input[0] = "centred", "resized"
    model.graph.node.insert(4, helper.make_node("Relu", ["centred_std"], ["resized"]))
    model.graph.node[3].output[0] = "centred_std"
    from mnist_pipeline.int8_input import read_raw_pixels

    pixels = np.random.default_rng(2).integers(0, 256, (16, 1, 28, 28), dtype=np.uint8)
    onnx.save(model, tmp_path / "float.onnx")
    onnx_export.quantize_int8(tmp_path / "float.onnx", tmp_path / "plain.onnx", pixels, raw_pixels=False)
    quantized = onnx.load(tmp_path / "plain.onnx")
    assert not read_raw_pixels(quantized)
    assert "Cast" in {node.op_type for node in quantized.graph.node}


def test_a_convolution_over_one_channel_runs_depthwise_on_copies_with_the_same_logits(tmp_path):
    """The first convolution reads its one channel copied to its 4 output channels, as a depthwise convolution
    (group 4) with the same weights: onnxruntime's logits are bit for bit those of the convolution as quantize_static
    wrote it, and the layer check against onnx's reference passes. A second rewrite finds nothing left to do."""
    from mnist_pipeline.int8_depthwise import depthwise_single_channel_convs
    from mnist_pipeline.onnx_io import onnx_outputs

    pixels = np.random.default_rng(3).integers(0, 256, (64, 1, 28, 28), dtype=np.uint8)
    onnx.save(normalising_conv(), tmp_path / "float.onnx")
    onnx_export.quantize_int8(tmp_path / "float.onnx", tmp_path / "depthwise.onnx", pixels)
    onnx_export.quantize_int8(tmp_path / "float.onnx", tmp_path / "general.onnx", pixels, depthwise=False)
    model = onnx.load(tmp_path / "depthwise.onnx")
    (conv,) = [node for node in model.graph.node if node.op_type == "Conv"]
    assert {a.name: helper.get_attribute_value(a) for a in conv.attribute}["group"] == 4
    assert [node.op_type for node in model.graph.node].count("Expand") == 1
    logits = onnx_outputs(tmp_path / "depthwise.onnx", pixels)[0]
    assert np.array_equal(logits, onnx_outputs(tmp_path / "general.onnx", pixels)[0])
    figures, problem = compare_with_reference(model, pixels, logits)
    assert problem is None and figures["int8_layer_max_steps"] <= 1
    assert depthwise_single_channel_convs(model) == 0
