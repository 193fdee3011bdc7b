"""The int8 model's convolutions over one input channel run as depthwise convolutions over copies of that channel,
which onnxruntime's integer kernels compute several times faster, with the same integers out.

onnxruntime computes an int8 convolution as rows of products, one row per output: a convolution over one input
channel (the CNN's first, on the grey pixels) has rows of nine, far too short for its matrix kernels, and was its
int8 model's slowest layer by far: 4 times the time of the fp32 convolution (docs/performance.md). A depthwise
convolution (group = channels) has a kernel of its own, made for exactly that shape: each output channel from one
input channel. Copying the one input channel to as many channels as there are outputs (an Expand of the uint8
tensor) turns the convolution into a depthwise one with the very same weights, shape (outputs, 1, k, k), and the
very same sums, so nothing changes but the kernel onnxruntime picks. The copy costs one pass over uint8 memory.
"""

import numpy as np
import onnx
from onnx import helper, numpy_helper


def depthwise_single_channel_convs(model: onnx.ModelProto) -> int:
    """Rewrite the QDQ model in place: each convolution with one input channel, its input a DequantizeLinear of a
    uint8 tensor, reads that tensor copied to its output channels, as a depthwise convolution. Returns how many."""
    stored = {tensor.name: tensor for tensor in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    replaced = []
    for conv in [node for node in model.graph.node if node.op_type == "Conv"]:
        group = next((helper.get_attribute_value(a) for a in conv.attribute if a.name == "group"), 1)
        dequantize, weights = producers.get(conv.input[0]), producers.get(conv.input[1])
        if group != 1 or any(node is None or node.op_type != "DequantizeLinear" for node in (dequantize, weights)):
            continue
        shape = stored[weights.input[0]].dims if weights.input[0] in stored else []
        if len(shape) != 4 or shape[1] != 1:
            continue
        outputs, copies = int(shape[0]), f"{conv.output[0]}_input_copies"
        model.graph.initializer.append(
            numpy_helper.from_array(np.array([1, outputs, 1, 1], np.int64), f"{copies}_shape")
        )
        expand = helper.make_node("Expand", [dequantize.input[0], f"{copies}_shape"], [copies])
        dequantize_copies = helper.make_node("DequantizeLinear", [copies, *dequantize.input[1:]], [f"{copies}_float"])
        dequantize_copies.attribute.extend(dequantize.attribute)
        index = list(model.graph.node).index(conv)
        model.graph.node.insert(index, dequantize_copies)
        model.graph.node.insert(index, expand)
        conv.input[0] = dequantize_copies.output[0]
        for attribute in [a for a in conv.attribute if a.name == "group"]:
            conv.attribute.remove(attribute)
        conv.attribute.append(helper.make_attribute("group", outputs))
        replaced.append(dequantize)
    read = {name for node in model.graph.node for name in node.input} | {output.name for output in model.graph.output}
    for dequantize in replaced:
        if dequantize.output[0] not in read and dequantize in model.graph.node:
            model.graph.node.remove(dequantize)
    return len(replaced)
