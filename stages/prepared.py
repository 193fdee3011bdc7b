"""The data/prepared/ format that preprocess writes and the later stages read: one .npz per split, plus meta.json."""

import json
from pathlib import Path

import numpy as np

from stages.errors import PipelineError
from stages.files import atomic_path, write_json

PREPARED_DIR = Path("data/prepared")


def save_split(name: str, images: np.ndarray, labels: np.ndarray) -> None:
    """uint8 images (N, H, W) and uint8 labels (N,), uncompressed: small on disk and fast to load."""
    with atomic_path(PREPARED_DIR / f"{name}.npz") as temp, temp.open("wb") as out:
        np.savez(out, images=images, labels=labels)


def save_meta(meta: dict) -> None:
    write_json(PREPARED_DIR / "meta.json", meta)


def load_split(name: str) -> tuple[np.ndarray, np.ndarray]:
    path = PREPARED_DIR / f"{name}.npz"
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return arrays["images"], arrays["labels"]
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the preprocess stage first (dvc repro preprocess)") from None
    except (OSError, ValueError, KeyError) as error:
        raise PipelineError(f"{path} is corrupt ({error}): rerun the preprocess stage (dvc repro -f preprocess)") from None


def load_meta() -> dict:
    path = PREPARED_DIR / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the preprocess stage first (dvc repro preprocess)") from None
    except json.JSONDecodeError as error:
        raise PipelineError(f"{path} is corrupt ({error}): rerun the preprocess stage (dvc repro -f preprocess)") from None
