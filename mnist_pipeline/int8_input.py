"""The int8 model reads the client's uint8 pixels as its first quantised tensor, instead of casting them to float,
normalising and quantising them again.

A uint8 image already is a quantised tensor: the normalisation (p / 255 - mean) / std is affine in the pixel p, so
it equals (p - zero point) * scale with scale = 1 / (255 std) and zero point = 255 mean. onnxruntime's calibration
gives the normalised input nearly that scale anyway (its range is the pixels'); reading the pixels directly drops
three operators and a quantisation pass, and lets the first convolution run as one integer kernel on the input.
The zero point must be an integer: 255 mean rounded, which moves each normalised pixel by at most 0.5 / (255 std)
(0.006 on MNIST), below the quantisation step of every later layer; the export stage's accuracy check measures it.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from mnist_pipeline.onnx_io import INPUT_NAME

ELEMENTWISE = {"Cast", "Sub", "Div", "Mul", "Add"}  # what normalise() exports to, each with a scalar constant
AFFINE_TOLERANCE = 1e-3  # of the scale: float32 rounding in the chain (1e-5 of it), not a non-affine step


def affine_chain(model: onnx.ModelProto, quantize: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """The elementwise nodes (each with one scalar constant) that take the pixels to this QuantizeLinear's input,
    or None if its input is anything else (a resize, say, for ResNet-18's input_size)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    stored = {tensor.name: tensor for tensor in model.graph.initializer}
    chain, name = [], quantize.input[0]
    while name != INPUT_NAME:
        node = producers.get(name)
        if node is None or node.op_type not in ELEMENTWISE:
            return None
        dynamic = [i for i in node.input if i not in stored]
        if len(dynamic) != 1 or any(numpy_helper.to_array(stored[i]).size != 1 for i in node.input if i in stored):
            return None
        chain.append(node)
        name = dynamic[0]
    return chain[::-1] or None


def read_raw_pixels(model: onnx.ModelProto) -> bool:
    """Rewrite the QDQ model in place so that the DequantizeLinear nodes after the input's QuantizeLinear read the
    pixels themselves, with the scale and zero point of the normalisation; True if it did, False if the model's
    input preparation is not an affine map of the pixels (then the model is left as it was)."""
    stored = {tensor.name: tensor for tensor in model.graph.initializer}
    for quantize in [node for node in model.graph.node if node.op_type == "QuantizeLinear"]:
        chain = affine_chain(model, quantize)
        if chain is None:
            continue
        used = sorted({name for node in chain for name in node.input if name in stored})
        graph = helper.make_graph(
            chain,
            "preparation",
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, None)],
            [helper.make_tensor_value_info(quantize.input[0], TensorProto.FLOAT, None)],
            [stored[name] for name in used],
        )
        prepared = ReferenceEvaluator(helper.make_model(graph, opset_imports=model.opset_import))
        values = prepared.run(None, {INPUT_NAME: np.arange(256, dtype=np.uint8)})[0].astype(np.float64).reshape(-1)
        scale = (values[255] - values[0]) / 255
        if scale <= 0 or np.abs(values - (values[0] + scale * np.arange(256))).max() > AFFINE_TOLERANCE * scale:
            continue
        zero_point = int(round(-values[0] / scale))
        if not 0 <= zero_point <= 255:
            continue
        name = f"{INPUT_NAME}_normalised"
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(np.float32(scale), f"{name}_scale"),
                numpy_helper.from_array(np.uint8(zero_point), f"{name}_zero_point"),
            ]
        )
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] == quantize.output[0]:
                node.input[:3] = [INPUT_NAME, f"{name}_scale", f"{name}_zero_point"]
        for node in [quantize, *chain]:
            model.graph.node.remove(node)
        # The removed preparation's constants: no node reads them now (onnxruntime would warn as it drops them).
        read = {name for node in model.graph.node for name in node.input}
        unread = [tensor for tensor in model.graph.initializer if tensor.name not in read]
        for tensor in unread:
            model.graph.initializer.remove(tensor)
        return True
    return False
