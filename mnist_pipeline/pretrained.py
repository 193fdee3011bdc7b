"""Where the pretrained stage puts, and the train stage finds, the ImageNet weights of model.resnet18.pretrained."""

from pathlib import Path

from mnist_pipeline.params import Params

PRETRAINED_DIR = Path("data/pretrained")


def weights_file(params: Params) -> Path | None:
    """The weights file the params ask for; None where the chosen architecture starts from none."""
    return PRETRAINED_DIR / params.weights.file if params.model.pretrained == "imagenet" else None
