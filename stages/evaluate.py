"""Stage 4, evaluate: the trained model on the held-out test set, as metrics/eval.json and a confusion-matrix plot."""

import csv
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from stages.errors import run_stage
from stages.files import atomic_path, dump_json
from stages.model import MODEL_FILE, load_checkpoint, pick_device, predict_logits
from stages.params import load_params
from stages.prepared import load_split

METRICS_FILE = Path("metrics/eval.json")
PREDICTIONS_FILE = Path("metrics/predictions.csv")


def rounded(value: float) -> float:
    return round(float(value), 4)


def classification_metrics(actual: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, macro and per-class precision/recall/F1/support, and the confusion matrix (rows: actual)."""
    labels = list(range(len(class_names)))
    macro = precision_recall_fscore_support(actual, predicted, labels=labels, average="macro", zero_division=0)
    per_class = precision_recall_fscore_support(actual, predicted, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": rounded(accuracy_score(actual, predicted)),
        "precision_macro": rounded(macro[0]),
        "recall_macro": rounded(macro[1]),
        "f1_macro": rounded(macro[2]),
        "per_class": {
            name: {
                "precision": rounded(per_class[0][i]),
                "recall": rounded(per_class[1][i]),
                "f1": rounded(per_class[2][i]),
                "support": int(per_class[3][i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(actual, predicted, labels=labels).tolist(),
    }


def write_predictions(actual: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> None:
    """One `actual,predicted` row per test image: the input of DVC's confusion template."""
    with atomic_path(PREDICTIONS_FILE) as temp, temp.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["actual", "predicted"])
        writer.writerows((class_names[a], class_names[p]) for a, p in zip(actual, predicted))


def main() -> None:
    params = load_params().evaluate
    device = pick_device(params.device, "evaluate.device")
    model, checkpoint = load_checkpoint(MODEL_FILE)
    images, actual = load_split("test")
    logits = predict_logits(model.to(device), torch.from_numpy(images).unsqueeze(1), params.batch_size)
    predicted = logits.argmax(1).numpy()

    class_names = checkpoint["class_names"]
    metrics = classification_metrics(actual, predicted, class_names)
    metrics = {
        **metrics,
        "test_images": len(actual),
        "device": device.type,
        "train_device": checkpoint["device"],
        "best_epoch": checkpoint["epoch"],
    }
    with atomic_path(METRICS_FILE) as metrics_temp:  # renamed once predictions.csv is written too: both or neither
        dump_json(metrics_temp, metrics)
        write_predictions(actual, predicted, class_names)
    print(
        f"test accuracy {metrics['accuracy']:.4f}, macro precision {metrics['precision_macro']:.4f}, "
        f"recall {metrics['recall_macro']:.4f}, F1 {metrics['f1_macro']:.4f} on {len(actual)} images ({device.type})"
    )


if __name__ == "__main__":
    run_stage(main)
