"""Where the stages read and write by default: the layout that dvc.yaml's commands spell out, in one place.

Each stage takes every input and output as an option (`python -m stages.train --help`), and dvc.yaml's commands
pass them all, so that dvc.yaml alone shows the data flow. These are the defaults, for a stage run by hand and for
the tools that read the pipeline's files (`make check-int8`, the benchmark). params.yaml is DVC's default params file.
"""

import argparse
from pathlib import Path

RAW_DIR = Path("data/raw")  # download → preprocess: the dataset's four IDX files
PRETRAINED_DIR = Path("data/pretrained")  # pretrained → train: the ImageNet weights, or a note that none are needed
PREPARED_DIR = Path("data/prepared")  # preprocess → train, evaluate, export: the splits as arrays, and meta.json
MODEL_FILE = Path("models/model.pt")  # train → evaluate, export: the kept weights and their architecture
TRAIN_LOGS_DIR = Path("metrics/train")  # train: DVCLive's per-epoch curves and its summary
TRAIN_METRICS = Path("metrics/train.json")  # train: the kept epoch's validation accuracy
EVAL_METRICS = Path("metrics/eval.json")  # evaluate: test accuracy, macro precision, recall and F1
EVAL_DETAILS = Path("metrics/eval_details.json")  # evaluate: counts, the kept epoch, the device
PREDICTIONS_FILE = Path("metrics/predictions.csv")  # evaluate: every test image's class and prediction
PER_CLASS_FILE = Path("metrics/per_class.csv")  # evaluate: precision, recall and F1 of each class
GALLERY_DIR = Path("metrics/misclassified")  # evaluate: the surest mistakes, as PNGs
ONNX_FILE = Path("models/model.onnx")  # export: the model as ONNX, fp32
INT8_FILE = Path("models/model.int8.onnx")  # export: its int8 copy
EXPORT_METRICS = Path("metrics/export.json")  # export: both files' test accuracy, and int8's agreement with fp32
EXPORT_DETAILS = Path("metrics/export_details.json")  # export: differences, sizes, the int8 checks' counts


def stage_paths(description: str, argv: list[str] | None, **defaults: Path) -> argparse.Namespace:
    """The stage's inputs and outputs from its command line: an option --NAME for each default (an underscore in
    NAME reads as a dash), each a Path."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    for name, default in defaults.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=Path, default=default, metavar="PATH", help=f"default: {default}"
        )
    return parser.parse_args(argv)
