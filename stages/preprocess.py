"""Stage 3, preprocess: the IDX files to compact uint8 arrays with a seeded validation split, in data/prepared/."""

from pathlib import Path

import numpy as np

from mnist_pipeline.errors import PipelineError, run_stage
from mnist_pipeline.idx import read_idx
from mnist_pipeline.params import DatasetParams, load_params
from mnist_pipeline.prepared import save_prepared

RAW_DIR = Path("data/raw")


def load_images_and_labels(images_file: str, labels_file: str, dataset: DatasetParams) -> tuple[np.ndarray, np.ndarray]:
    """A pair of IDX files, checked against each other and against the dataset's classes; every error names
    the file at fault. The labels come back counted from 0 (the file's minus dataset.label_offset)."""
    images_path, labels_path = RAW_DIR / images_file, RAW_DIR / labels_file
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


def split_indices(count: int, val_size: int, train_limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded disjoint (train, validation) index sets; train_limit > 0 subsamples the training part."""
    if val_size >= count:
        raise PipelineError(
            f"preprocess.val_size = {val_size} is too large for the {count} training images; "
            f"expected at most {count - 1}, to leave some for training"
        )
    order = np.random.default_rng(seed).permutation(count)
    val, train = order[:val_size], order[val_size:]
    if train_limit > len(train):
        raise PipelineError(
            f"preprocess.train_limit = {train_limit} exceeds the {len(train)} training images left after "
            f"the validation split; expected at most {len(train)}, or 0 for all of them"
        )
    if train_limit:
        train = train[:train_limit]
    return np.sort(train), np.sort(val)


def main() -> None:
    all_params = load_params()
    params, dataset = all_params.preprocess, all_params.dataset
    train_images_file, train_labels_file, test_images_file, test_labels_file = dataset.files()
    images, labels = load_images_and_labels(train_images_file, train_labels_file, dataset)
    test_images, test_labels = load_images_and_labels(test_images_file, test_labels_file, dataset)
    if images.shape[1:] != test_images.shape[1:]:
        raise PipelineError(
            f"{RAW_DIR / train_images_file} holds {images.shape[1]}x{images.shape[2]} images but "
            f"{RAW_DIR / test_images_file} holds {test_images.shape[1]}x{test_images.shape[2]}; expected the same size"
        )
    if images.shape[1] != images.shape[2]:
        raise PipelineError(
            f"{RAW_DIR / train_images_file} holds {images.shape[1]}x{images.shape[2]} images; the CNN expects square images"
        )

    train, val = split_indices(len(images), params.val_size, params.train_limit, params.seed)
    splits = {
        "train": (images[train], labels[train]),
        "val": (images[val], labels[val]),
        "test": (test_images, test_labels),
    }
    # Normalisation statistics come from the training split only, so nothing leaks from validation or test.
    train_pixels = splits["train"][0] / np.float32(255)
    save_prepared(
        splits,
        {
            "counts": {name: len(split_labels) for name, (_, split_labels) in splits.items()},
            "image_size": list(images.shape[1:]),
            "class_names": dataset.class_names,
            "mean": round(float(train_pixels.mean(dtype=np.float64)), 6),
            "std": round(float(train_pixels.std(dtype=np.float64)), 6),
        },
    )
    print(", ".join(f"{name}: {len(split_labels)}" for name, (_, split_labels) in splits.items()))


if __name__ == "__main__":
    run_stage(main)
