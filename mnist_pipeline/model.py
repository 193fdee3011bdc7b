"""The networks the pipeline trains (one registry: the CNN and torchvision's ResNet-18), their input preparation
(raw pixels in, normalised inside the model), and their pretrained weights."""

import copy
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline.errors import PipelineError, gist
from mnist_pipeline.params import ModelParams

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def conv_output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """H_out = floor((H_in + 2P - D(K - 1) - 1) / S + 1), for convolutions and pooling alike."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


class CNN(nn.Module):
    """Per block: conv (same padding) → [batch norm] → activation, repeated, then 2×2 max-pool.

    The defaults are the classic MNIST CNN: conv 1→16, pool, conv 16→32, pool, fc 1568→128, fc 128→10.
    """

    def __init__(
        self,
        image_size: int = 28,
        num_classes: int = 10,
        conv_channels: tuple[int, ...] = (16, 32),
        convs_per_block: int = 1,
        kernel_size: int = 3,
        batch_norm: bool = False,
        fc_units: int = 128,
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        activation_layer = ACTIVATIONS[activation]
        padding = kernel_size // 2
        layers: list[nn.Module] = []
        channels, size = 1, image_size
        for out_channels in conv_channels:
            for conv in range(convs_per_block):
                layers.append(nn.Conv2d(channels, out_channels, kernel_size, padding=padding, bias=not batch_norm))
                channels, size = out_channels, conv_output_size(size, kernel_size, padding=padding)
                if batch_norm:
                    layers.append(nn.BatchNorm2d(out_channels))
                if conv == convs_per_block - 1:
                    # Every activation offered is monotonic, so max-pooling before it computes the same
                    # function as after it, with the activation (and its backward pass) on a quarter of the values.
                    layers.append(nn.MaxPool2d(2))
                    size = conv_output_size(size, kernel_size=2, stride=2)
                layers.append(activation_layer())
            if size < 1:
                raise PipelineError(
                    f"model.cnn.conv_channels has {len(conv_channels)} blocks: too many pooling steps for "
                    f"{image_size}x{image_size} images (each halves the size)"
                )
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * size * size, fc_units),
            activation_layer(),
            nn.Dropout(dropout),
            nn.Linear(fc_units, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def normalize(pixels: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Raw uint8 pixels (0-255) to the standardised float input the network is trained on."""
    return (pixels.float() / 255.0 - mean) / std


class PixelClassifier(nn.Module):
    """The network plus its input preparation: pixels on the 0-255 scale, shape (N, 1, H, W), in; logits out.

    Clients send uint8; training also sends the float pixels that rotation and zoom produce. With input_size,
    for networks made for RGB photos, the grey image is resized to input_size² and repeated to three channels,
    and mean and std are per channel; all of it inside the model, so the ONNX export takes raw pixels too.
    """

    def __init__(self, network: nn.Module, mean: float | list, std: float | list, input_size: int | None = None):
        super().__init__()
        self.network, self.mean, self.std, self.input_size = network, mean, std, input_size
        if input_size is not None:
            self.register_buffer("channel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("channel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """The network's input for these pixels."""
        if self.input_size is None:
            return normalize(pixels, self.mean, self.std)
        size = (self.input_size, self.input_size)
        images = F.interpolate(pixels.float() / 255.0, size=size, mode="bilinear", align_corners=False)
        return (images.expand(-1, 3, -1, -1) - self.channel_mean) / self.channel_std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network(self.prepare(pixels))


# What ImageNet-trained weights expect: images scaled to 0-1, then standardised per RGB channel with these.
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class Architecture:
    """One kind of network: how to build it from an architecture dict (see architecture_for), where its output
    layer is, what part of it can be frozen, and what input it wants."""

    build: Callable[[dict], nn.Module]  # a new, randomly initialised network
    head: str  # the output layer's name in the network: a new Linear(features, classes)
    inputs: Callable[[dict, float, float], dict]  # PixelClassifier's arguments, given the data's mean and std
    backbone: Callable[[nn.Module], nn.Module] | None = None  # everything before the head; None: never frozen
    # The network as its ONNX file holds it, computing the same function in the form onnxruntime runs fastest.
    exported: Callable[[nn.Module], nn.Module] = lambda network: network


def _activation_before_pooling(network: CNN) -> CNN:
    """The CNN pools before each activation, which trains faster; onnxruntime fuses an activation into the
    convolution before it but not into a pooling, so the exported CNN applies it first. The same function:
    every activation offered is monotonic."""
    layers = list(network.features)
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.MaxPool2d) and isinstance(layers[i + 1], tuple(ACTIVATIONS.values())):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    network.features = nn.Sequential(*layers)
    return network


def _resnet18(architecture: dict) -> nn.Module:
    import torchvision  # here: only this architecture needs it, and it takes a while to import

    return torchvision.models.resnet18(weights=None, num_classes=architecture["num_classes"])


def _resnet_inputs(architecture: dict, mean: float, std: float) -> dict:
    """ImageNet weights were trained on ImageNet's statistics; a network from scratch gets the data's."""
    pretrained = architecture["pretrained"] == "imagenet"
    return {
        "mean": IMAGENET_MEAN if pretrained else [mean] * 3,
        "std": IMAGENET_STD if pretrained else [std] * 3,
        "input_size": architecture["input_size"],
    }


ARCHITECTURES = {
    "cnn": Architecture(
        build=lambda architecture: CNN(**{key: value for key, value in architecture.items() if key != "arch"}),
        head="classifier.4",
        inputs=lambda architecture, mean, std: {"mean": mean, "std": std},
        exported=_activation_before_pooling,
    ),
    "resnet18": Architecture(
        build=_resnet18,
        head="fc",
        inputs=_resnet_inputs,
        # torchvision's forward: every child in order, flattened before fc, its last child
        backbone=lambda network: nn.Sequential(*list(network.children())[:-1], nn.Flatten()),
    ),
}
DEFAULT_ARCH = "cnn"  # the one architecture before there were several: its checkpoints do not name it


def architecture_for(model: ModelParams, image_size: int, num_classes: int) -> dict:
    """What models/model.pt records to rebuild the network: its name, the data's shape, and the model keys
    the architecture reads. The CNN's lacks the name, so its model.pt is byte for byte what it always was."""
    named = {"arch": model.arch} if model.arch != DEFAULT_ARCH else {}
    keys = model.chosen.model_dump()
    return {**named, "image_size": image_size, "num_classes": num_classes, **keys}


def registry_entry(architecture: dict) -> Architecture:
    return ARCHITECTURES[architecture.get("arch", DEFAULT_ARCH)]


def build_model(architecture: dict, mean: float, std: float) -> PixelClassifier:
    """A new, randomly initialised model for an architecture dict, with the input preparation it needs."""
    entry = registry_entry(architecture)
    return PixelClassifier(entry.build(architecture), **entry.inputs(architecture, mean, std))


def export_form(model: PixelClassifier, architecture: dict) -> PixelClassifier:
    """A copy of the model in the form its ONNX file holds (the registry entry's `exported`)."""
    exported = copy.deepcopy(model)
    exported.network = registry_entry(architecture).exported(exported.network)
    return exported


def output_layer(model: PixelClassifier, architecture: dict) -> nn.Linear:
    return model.network.get_submodule(registry_entry(architecture).head)


def frozen_backbone(model: PixelClassifier, architecture: dict) -> nn.Module | None:
    """With model.resnet18.freeze, everything before the head, its parameters made constant; else None.

    The caller keeps it in eval mode too, so its batch-norm statistics stay as they are.
    """
    if not architecture.get("freeze"):
        return None
    backbone = registry_entry(architecture).backbone(model.network)
    backbone.requires_grad_(False)
    return backbone


def load_pretrained(model: PixelClassifier, architecture: dict, path: Path) -> None:
    """Pretrained weights (a state dict, as torchvision publishes them) into every layer but the head, which
    stays new for our classes. weights_only=True, so the file cannot run code."""
    head = registry_entry(architecture).head + "."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            weights = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the pretrained stage first (dvc repro pretrained)") from None
    except pickle.UnpicklingError:
        raise PipelineError(
            f"{path} holds something other than tensors and plain data, which is never unpickled"
        ) from None
    except Exception as error:
        raise PipelineError(f"{path} is damaged or not a PyTorch file ({gist(error)})") from None
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise PipelineError(f"{path} is not a state dict of {architecture['arch']} weights")
    backbone = {name: value for name, value in weights.items() if not name.startswith(head)}
    try:
        missing, unexpected = model.network.load_state_dict(backbone, strict=False)
    except RuntimeError as error:
        raise PipelineError(f"{path} does not fit {architecture['arch']} ({gist(error)})") from None
    missing = [name for name in missing if not name.startswith(head)]
    if missing or unexpected:
        raise PipelineError(
            f"{path} does not fit {architecture['arch']}: "
            + "; ".join(
                f"{what} {', '.join(names[:3])}"
                for what, names in [("missing", missing), ("unexpected", unexpected)]
                if names
            )
        )
