"""The prepared data's format (one .npz per split, plus meta.json, in data/prepared/ by default) and the seeded split
of the training images."""

import contextlib
import json
from pathlib import Path

import numpy as np

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import atomic_path, dump_json, require_free_space
from mnist_pipeline.paths import PREPARED_DIR


def write_split(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """uint8 images (N, H, W) and uint8 labels (N,), uncompressed: small on disk and fast to load."""
    with path.open("wb") as out:
        np.savez(out, images=images, labels=labels)


def save_split(name: str, images: np.ndarray, labels: np.ndarray, directory: Path = PREPARED_DIR) -> None:
    with atomic_path(directory / f"{name}.npz") as temp:
        write_split(temp, images, labels)


def save_prepared(directory: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict) -> None:
    """Every split and meta.json, after checking the disk has room for them, renamed into place together once all
    are written: a failure half-way (a full disk) keeps the whole previous set, never new splits beside old ones."""
    require_free_space(directory, sum(array.nbytes for pair in splits.values() for array in pair), "preprocess")
    with contextlib.ExitStack() as renamed_at_the_end:  # each atomic_path renames on leaving: all at the block's end
        for name, (images, labels) in splits.items():
            write_split(renamed_at_the_end.enter_context(atomic_path(directory / f"{name}.npz")), images, labels)
        dump_json(renamed_at_the_end.enter_context(atomic_path(directory / "meta.json")), meta)


def split_indices(count: int, val_size: int, train_limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded disjoint (train, validation) index sets of a training part of `count` images, each in ascending
    order; train_limit > 0 subsamples the training set (the validation set stays the same)."""
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


def prepared_meta(splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str]) -> dict:
    """meta.json: each split's image count, the image size, the class names, and the pixel mean and standard deviation
    that normalise every split. Those come from the training split only, so nothing leaks from validation or test."""
    train_images = splits["train"][0]
    train_pixels = train_images / np.float32(255)
    return {
        "counts": {name: len(labels) for name, (_, labels) in splits.items()},
        "image_size": list(train_images.shape[1:]),
        "class_names": class_names,
        "mean": round(float(train_pixels.mean(dtype=np.float64)), 6),
        "std": round(float(train_pixels.std(dtype=np.float64)), 6),
    }


def load_split(name: str, directory: Path = PREPARED_DIR) -> tuple[np.ndarray, np.ndarray]:
    path = directory / f"{name}.npz"
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return arrays["images"], arrays["labels"]
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the preprocess stage first (dvc repro preprocess)") from None
    except (PermissionError, IsADirectoryError):
        raise  # the file system's doing, not a corrupt file: mnist_pipeline.errors.run_stage says so
    except (OSError, ValueError, KeyError) as error:
        raise PipelineError(
            f"{path} is corrupt ({error}): rerun the preprocess stage (dvc repro -f preprocess)"
        ) from None


def load_meta(directory: Path = PREPARED_DIR) -> dict:
    path = directory / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the preprocess stage first (dvc repro preprocess)") from None
    except json.JSONDecodeError as error:
        raise PipelineError(
            f"{path} is corrupt ({error}): rerun the preprocess stage (dvc repro -f preprocess)"
        ) from None
