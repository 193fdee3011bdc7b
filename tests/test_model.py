"""The CNN: its size arithmetic follows the conv output-size formula, and every configuration builds and runs."""

import pytest
import torch
from benchmark import (
    TutorialCNN,  # the tutorial's model, as the benchmark's baseline runs it
)
from torch import nn

from mnist_pipeline.checkpoint import load_checkpoint, save_checkpoint
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.model import CNN, PixelClassifier, conv_output_size, normalize


@pytest.mark.parametrize(
    "size, kernel, stride, padding, dilation",
    [
        (28, 3, 1, 1, 1),
        (28, 3, 1, 0, 1),
        (28, 5, 2, 2, 1),
        (27, 3, 2, 0, 1),
        (28, 3, 1, 2, 2),
        (28, 2, 2, 0, 1),
        (7, 2, 2, 0, 1),
    ],
)
def test_conv_output_size_matches_pytorch(size, kernel, stride, padding, dilation):
    conv = nn.Conv2d(1, 1, kernel, stride=stride, padding=padding, dilation=dilation)
    actual = conv(torch.zeros(1, 1, size, size)).shape[-1]
    assert conv_output_size(size, kernel, stride, padding, dilation) == actual


def test_formula_by_hand():
    assert conv_output_size(28, 3, padding=1) == 28  # floor((28 + 2 - 2 - 1) / 1 + 1)
    assert conv_output_size(28, 2, stride=2) == 14
    assert conv_output_size(7, 2, stride=2) == 3  # the floor drops the odd row


def test_default_is_the_classic_cnn():
    model = CNN()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 16, (3, 3)), (16, 32, (3, 3))]
    assert [(linear.in_features, linear.out_features) for linear in linears] == [(32 * 7 * 7, 128), (128, 10)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "sigmoid"])
@pytest.mark.parametrize(
    "channels, per_block, kernel, batch_norm", [([16, 32], 1, 3, False), ([8, 16, 32], 2, 5, True), ([4], 1, 7, False)]
)
def test_every_configuration_produces_logits(activation, channels, per_block, kernel, batch_norm):
    model = CNN(
        conv_channels=channels,
        convs_per_block=per_block,
        kernel_size=kernel,
        batch_norm=batch_norm,
        activation=activation,
    )
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_too_many_pooling_blocks_is_a_clear_error():
    with pytest.raises(PipelineError, match="too many pooling steps for 8x8 images"):
        CNN(image_size=8, conv_channels=[4, 4, 4, 4])


def test_normalize_maps_raw_pixels_to_standard_scores():
    pixels = torch.tensor([0, 255], dtype=torch.uint8)
    assert normalize(pixels, 0.5, 0.25).tolist() == pytest.approx([-2.0, 2.0])


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path):
    architecture = {"image_size": 28, "num_classes": 10, "conv_channels": [4, 8], "fc_units": 16}
    network = CNN(**architecture)
    meta = {"mean": 0.13, "std": 0.31, "class_names": [str(d) for d in range(10)]}
    save_checkpoint(tmp_path / "model.pt", network, architecture, meta, extra={"epoch": 3, "device": "cpu"})
    model, checkpoint = load_checkpoint(tmp_path / "model.pt")  # uses torch.load(weights_only=True)
    pixels = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    expected = PixelClassifier(network, 0.13, 0.31).eval()(pixels)
    torch.testing.assert_close(model(pixels), expected)
    assert checkpoint["epoch"] == 3 and checkpoint["class_names"][9] == "9"


def test_default_model_computes_the_tutorial_function():
    torch.manual_seed(0)
    model, reference = CNN().eval(), TutorialCNN().eval()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for mine, theirs in zip(layers, [reference.conv1, reference.conv2, reference.fc1, reference.fc2], strict=True):
        theirs.load_state_dict(mine.state_dict())
    images = torch.randn(8, 1, 28, 28)
    torch.testing.assert_close(model(images), reference(images))


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "sigmoid"])
def test_pooling_before_any_offered_activation_equals_pooling_after(activation):
    conv, pool, act = CNN(activation=activation).features[:3]
    images = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(act(pool(conv(images))), nn.functional.max_pool2d(act(conv(images)), 2))
