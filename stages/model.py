"""The CNN: conv blocks, then a two-layer classifier, with its checkpoint format and input normalisation."""

import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from stages.errors import PipelineError, gist

MODEL_FILE = Path("models/model.pt")  # written by train, read by evaluate and export
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
                    f"model.conv_channels has {len(conv_channels)} blocks: too many pooling steps for "
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
    """The network plus its input normalisation: pixels on the 0-255 scale, shape (N, 1, H, W), in; logits out.

    Clients send uint8; training also sends the float pixels that rotation and zoom produce.
    """

    def __init__(self, network: CNN, mean: float, std: float):
        super().__init__()
        self.network, self.mean, self.std = network, mean, std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network(normalize(pixels, self.mean, self.std))


def save_checkpoint(path: Path, network: CNN, architecture: dict, meta: dict, extra: dict) -> None:
    """Everything needed to rebuild the model, in types that torch.load(weights_only=True) accepts.

    Saved through a file object: given a path, torch.save names the archive's inner folder after the file,
    and a temp file's random name would make identical models differ byte for byte.
    """
    with open(path, "wb") as out:
        torch.save(
            {
                "state_dict": network.state_dict(),
                "architecture": architecture,
                "mean": float(meta["mean"]),
                "std": float(meta["std"]),
                "class_names": list(meta["class_names"]),
                **extra,
            },
            out,
        )


CHECKPOINT_KEYS = ("state_dict", "architecture", "mean", "std", "class_names", "epoch", "device")  # what the stages read
RETRAIN = "rerun the train stage (dvc repro -f train)"


def load_checkpoint(path: Path | str) -> tuple[PixelClassifier, dict]:
    """Rebuild the trained model in eval mode from a checkpoint written by save_checkpoint.

    weights_only=True: only tensors and plain data are unpickled, never arbitrary objects, so a foreign
    file cannot run code. A missing, damaged or foreign file is a PipelineError naming it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on a foreign file's pickle protocol: the error below says more
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the train stage first (dvc repro train)") from None
    except (PermissionError, IsADirectoryError):
        raise  # the file system's doing, not a damaged file: stages.errors.run_stage says so
    except pickle.UnpicklingError:
        raise PipelineError(
            f"{path} is not a model checkpoint: it holds something other than tensors and plain data, "
            f"which is never unpickled; {RETRAIN}"
        ) from None
    except Exception as error:  # torch raises several types for a damaged file: RuntimeError, EOFError, OSError
        raise PipelineError(f"{path} is damaged or not a PyTorch file ({gist(error)}); {RETRAIN}") from None
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint] if isinstance(checkpoint, dict) else CHECKPOINT_KEYS
    if missing:
        raise PipelineError(f"{path} is not a checkpoint of this pipeline: it lacks {', '.join(missing)}; {RETRAIN}")
    try:
        network = CNN(**checkpoint["architecture"])
        network.load_state_dict(checkpoint["state_dict"])
        model = PixelClassifier(network, float(checkpoint["mean"]), float(checkpoint["std"]))
        if len(checkpoint["class_names"]) != network.classifier[-1].out_features:
            raise ValueError(f"{len(checkpoint['class_names'])} class names for {network.classifier[-1].out_features} outputs")
    except (TypeError, ValueError, KeyError, RuntimeError) as error:
        raise PipelineError(
            f"{path} is not a checkpoint of this pipeline: its contents do not fit together ({gist(error)}); {RETRAIN}"
        ) from None
    return model.eval(), checkpoint


def pick_device(setting: str, key: str) -> torch.device:
    """'auto' takes CUDA when present; asking for CUDA without one is an error, not a silent fallback."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{key} = 'cuda' but PyTorch sees no CUDA device; use 'auto' or 'cpu'")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(setting)


@torch.no_grad()
def predict_logits(model: nn.Module, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits for uint8 pixels (N, 1, H, W) in batches, on the model's device, returned on the CPU."""
    device = next(model.parameters()).device
    batches = [model(pixels[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(pixels), batch_size)]
    return torch.cat(batches)
