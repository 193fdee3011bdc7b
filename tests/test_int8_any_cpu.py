"""The int8 model computes the same classes on every CPU: onnxruntime on an emulated CPU without AVX-512 or VNNI
(qemu's Haswell) against onnx's reference evaluator, and the weight bounds that make it hold on every kernel path."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import REPO_ROOT
from mnist_pipeline import int8_verification, onnx_export
from mnist_pipeline.int8_verification import compare_with_reference, weight_bound_problem

QEMU = shutil.which("qemu-x86_64")
LAYERS = ("Gemm", "Conv")  # onnxruntime's QGEMM and its convolution kernels, both u8 * s8 on x86


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
        nodes += [helper.make_node("Flatten", ["inputs"], ["rows"]), helper.make_node("Gemm", ["rows", "w", "b"], ["logits"], transB=1)]
    else:  # one 28x28 kernel per class: the same sums as a convolution
        nodes += [helper.make_node("Conv", ["inputs", "w", "b"], ["maps"]), helper.make_node("Flatten", ["maps"], ["logits"])]
        weights = weights.reshape(2, 1, 28, 28)
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    stored = [numpy_helper.from_array(np.float32(255), "scale"), numpy_helper.from_array(weights, "w"),
              numpy_helper.from_array(np.array([0, 20], np.float32), "b")]
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
    for layer in LAYERS:
        onnx.save(saturating_model(layer), folder / f"{layer}.onnx")
        onnx_export.quantize_int8(folder / f"{layer}.onnx", folder / f"{layer}.int8.onnx", pixels)
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(onnx_export.INT8_SETTINGS, "reduce_range", False)
            onnx_export.quantize_int8(folder / f"{layer}.onnx", folder / f"{layer}.8-bit.onnx", pixels)
    return folder


@pytest.mark.parametrize("layer", LAYERS)
def test_the_weights_fit_every_kernel_and_8_bit_weights_do_not(models, layer):
    assert weight_bound_problem(onnx.load(models / f"{layer}.int8.onnx")) is None
    problem = weight_bound_problem(onnx.load(models / f"{layer}.8-bit.onnx"))
    assert problem == (f"the {layer} weights w_quantized hold integers up to 127 in magnitude, beyond 64: CPUs without "
                       f"VNNI would saturate their sums")


def test_a_sum_too_large_for_32_bits_is_found(models):
    """7-bit weights, but so many of them that one output's sum could pass 2^31: 255 * 64 * 140,000 = 2.3e9."""
    model = onnx.load(models / "Gemm.int8.onnx")
    weights = next(t for t in model.graph.initializer if t.name == "w_quantized")
    weights.CopyFrom(numpy_helper.from_array(np.full((2, 140_000), 64, np.int8), weights.name))
    problem = weight_bound_problem(model)
    found = re.fullmatch(r"the Gemm with weights w_quantized can sum to (\d+), beyond its 32-bit accumulators' 2147483647", problem)
    assert found and int(found[1]) >= 255 * 64 * 140_000, problem  # the bias adds its own bit


def test_on_this_cpu_onnxruntime_matches_the_reference(models):
    from mnist_pipeline.onnx_io import onnx_outputs

    pixels = np.load(models / "pixels.npy")
    for layer in LAYERS:
        path = models / f"{layer}.int8.onnx"
        logits = onnx_outputs(path, pixels)[0]
        assert compare_with_reference(onnx.load(path), pixels, logits) == (1.0, None)
        assert (logits.argmax(1) == 0).all(), "the float model's class for every image"


# Run under qemu: onnxruntime's and the reference evaluator's classes for each model, as mismatch counts.
MISMATCHES = """
import json, sys
from pathlib import Path
import numpy as np, onnx
from mnist_pipeline.int8_verification import reference_classes
from mnist_pipeline.onnx_io import onnx_outputs
folder = Path(sys.argv[1])
pixels = np.load(folder / "pixels.npy")
counts = {}
for path in sorted(folder.glob("*-*.onnx")) + sorted(folder.glob("*.int8.onnx")):
    classes = onnx_outputs(path, pixels)[0].argmax(1)
    counts[path.name] = int((classes != reference_classes(onnx.load(path), pixels)).sum())
print(json.dumps(counts))
"""


# CI sets MNIST_PIPELINE_REQUIRE_QEMU, so that there a missing qemu fails the suite instead of skipping the check.
@pytest.mark.skipif(QEMU is None and not os.environ.get("MNIST_PIPELINE_REQUIRE_QEMU"),
                    reason="no qemu-x86_64 (Debian's qemu-user) to emulate a CPU without VNNI")
def test_on_an_emulated_avx2_cpu_the_int8_model_matches_the_reference(models):
    """qemu's TCG has AVX2 but neither AVX-512 nor VNNI, so onnxruntime picks its AVX2 kernels (VPMADDUBSW) even on
    a VNNI machine. The 8-bit models going wrong there shows that the emulation reaches the saturating path."""
    assert QEMU, "MNIST_PIPELINE_REQUIRE_QEMU is set, but there is no qemu-x86_64 (apt-get install qemu-user)"
    result = subprocess.run(
        [QEMU, "-cpu", "Haswell", sys.executable, "-c", MISMATCHES, str(models)],
        capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    counts = json.loads(result.stdout)
    assert counts == {
        "Conv.8-bit.onnx": 32, "Gemm.8-bit.onnx": 32, "Conv.int8.onnx": 0, "Gemm.int8.onnx": 0,
    }, "8-bit weights saturate on AVX2 (every image), 7-bit ones never"


def test_a_near_tie_with_the_reference_is_no_fault_but_a_clear_difference_is(models, monkeypatch):
    """The reference rounds in float32 where the kernels round in integers, a step at most per layer: classes that
    the reference puts within TIE_STEPS logit steps of each other may flip, any further apart may not."""
    model = onnx.load(models / "Gemm.int8.onnx")
    step = int8_verification.logit_step(model)
    assert step > 0
    ours = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    near_tie = np.array([[0.0, (int8_verification.TIE_STEPS - 1) * step, 0.0]])
    clear = np.array([[0.0, (int8_verification.TIE_STEPS + 1) * step, 0.0]])
    for reference, expected_faults in [(np.concatenate([near_tie, near_tie]), 0), (np.concatenate([near_tie, clear]), 1)]:
        monkeypatch.setattr(int8_verification, "reference_logits", lambda model, pixels, reference=reference: reference)
        agreement, problem = int8_verification.compare_with_reference(model, np.zeros((2, 1, 28, 28), np.uint8), ours)
        assert agreement == 0.0
        assert (problem is None) == (expected_faults == 0), problem
        assert expected_faults == 0 or f"for {expected_faults} of 2 images checked, beyond a near tie" in problem
