"""The raw files (data/raw/ by default) that params.yaml's dataset section names, as image and label arrays, checked."""

from pathlib import Path

import numpy as np

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.idx import read_idx
from mnist_pipeline.params import DatasetParams


def load_part(images_path: Path, labels_path: Path, dataset: DatasetParams) -> tuple[np.ndarray, np.ndarray]:
    """A pair of IDX files, checked against each other and against the dataset's classes; every error names
    the file at fault. The labels come back counted from 0 (the file's minus dataset.label_offset)."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise PipelineError(f"{images_path} holds an array of shape {images.shape}; expected (count, height, width)")
    if labels.ndim != 1:
        raise PipelineError(f"{labels_path} holds an array of shape {labels.shape}; expected (count,)")
    if len(images) != len(labels):
        raise PipelineError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    first, last = dataset.label_offset, dataset.label_offset + len(dataset.class_names) - 1
    outside = labels[(labels < first) | (labels > last)]
    if len(outside):
        raise PipelineError(
            f"{labels_path} has label {outside[0]}; expected {first} to {last} "
            f"({len(dataset.class_names)} dataset.class_names from dataset.label_offset = {first})"
        )
    return images, labels - np.uint8(first)


def load_dataset(dataset: DatasetParams, raw_dir: Path) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The (images, labels) of the training part and of the test part, whose images are square and of one size."""
    train_images, train_labels, test_images, test_labels = (raw_dir / name for name in dataset.files())
    train, test = load_part(train_images, train_labels, dataset), load_part(test_images, test_labels, dataset)
    (_, height, width), test_size = train[0].shape, test[0].shape[1:]
    if (height, width) != test_size:
        raise PipelineError(
            f"{train_images} holds {height}x{width} images but {test_images} holds {test_size[0]}x{test_size[1]}; "
            f"expected the same size"
        )
    if height != width:
        raise PipelineError(f"{train_images} holds {height}x{width} images; the CNN expects square images")
    return train, test
