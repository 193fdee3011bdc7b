"""Where the pretrained stage puts, and the train stage finds, the ImageNet weights of model.resnet18.pretrained."""

from pathlib import Path

from mnist_pipeline.params import Params


def weights_file(params: Params, directory: Path) -> Path | None:
    """The weights file the params ask for in the pretrained stage's directory; None where the chosen architecture
    starts from none."""
    return directory / params.weights.file if params.model.pretrained == "imagenet" else None
