"""Print the params.yaml `dataset` section for a directory of four MNIST-format files, ready to paste.

    mnist-describe-dataset /path/to/fashion-mnist

Finds the training and test images and labels (gzipped IDX files, named *ubyte* or *idx*; images have three
dimensions, labels one, and the names say train, or test or t10k), hashes their decompressed content as the
download stage checks it, and names the classes after the label values found; labels that start at 1 get
label_offset 1. Then point MNIST_PIPELINE_MIRRORS at the directory and run dvc repro.
"""

import sys
from pathlib import Path

import numpy as np
import yaml

from mnist_pipeline.download import DownloadFailed, content_sha256
from mnist_pipeline.errors import PipelineError, run_stage
from mnist_pipeline.idx import read_idx
from mnist_pipeline.params import DATASET_FILES

USAGE = "usage: mnist-describe-dataset DIRECTORY (four gzipped MNIST-format IDX files)"


def role_of(path: Path, array: np.ndarray) -> str | None:
    """train_images, train_labels, test_images or test_labels, from the name and the array's dimensions."""
    name = path.name.lower()
    split = "train" if "train" in name else "test" if ("test" in name or "t10k" in name) else None
    kind = {3: "images", 1: "labels"}.get(array.ndim)
    return f"{split}_{kind}" if split and kind else None


def describe(directory: Path) -> tuple[dict, str]:
    """The dataset section for the files in `directory`, and a one-line summary of what they hold."""
    if not directory.is_dir():
        raise PipelineError(f"{directory} is not a directory; {USAGE}")
    found: dict[str, tuple[Path, np.ndarray]] = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.name.startswith(".") or not ("ubyte" in path.name or "idx" in path.name):
            continue  # a README, checksums: not an IDX file by its name
        if path.suffix != ".gz":
            raise PipelineError(f"{path} is not gzipped: the pipeline downloads .gz files; run `gzip {path}` first")
        array = read_idx(path)
        role = role_of(path, array)
        if role is None:
            raise PipelineError(
                f"{path} holds an array of shape {array.shape}: expected images (count, height, width) or labels "
                f"(count,), with train, or test or t10k, in the file name"
            )
        if role in found:
            raise PipelineError(f"{found[role][0]} and {path} both look like the {role.replace('_', ' ')}; keep one")
        found[role] = (path, array)
    missing = [role.replace("_", " ") for role in DATASET_FILES if role not in found]
    if missing:
        raise PipelineError(f"{directory} lacks the {', '.join(missing)} file(s); expected four gzipped IDX files")

    labels = np.concatenate([found["train_labels"][1], found["test_labels"][1]])
    first, last = int(labels.min()), int(labels.max())
    offset = 1 if first == 1 else 0  # files that count from 1 (EMNIST letters); anything else counts from 0
    section = {}
    for role in DATASET_FILES:
        path = found[role][0]
        try:
            section[role] = {"file": path.name, "sha256": content_sha256(path)}
        except DownloadFailed as failure:
            raise PipelineError(f"{path} is corrupt: {failure}") from None
    section["class_names"] = [str(label) for label in range(offset, last + 1)]
    section["label_offset"] = offset
    (train_count, height, width), test_count = found["train_images"][1].shape, len(found["test_images"][1])
    summary = (
        f"{train_count} training and {test_count} test images of {height}x{width}, labels {first} to {last}; "
        f"class_names are the label values: rename them as you like, keeping their order"
    )
    return section, summary


def print_section(argv: list[str]) -> None:
    if len(argv) != 1 or argv[0].startswith("-"):
        raise PipelineError(USAGE)
    directory = Path(argv[0])
    section, summary = describe(directory)
    print(f"# {directory}: {summary}")
    print(yaml.safe_dump({"dataset": section}, sort_keys=False, width=120, default_flow_style=None), end="")


def main() -> None:
    """The mnist-describe-dataset command: a bad directory or file is one line, as in every stage."""
    run_stage(lambda: print_section(sys.argv[1:]))


if __name__ == "__main__":
    main()
