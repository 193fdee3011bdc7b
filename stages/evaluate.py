"""Stage 5, evaluate: the trained model on the held-out test set, as headline metrics and the data of its plots.

metrics/eval.json holds the headline numbers only, one short row in `dvc metrics show`; the per-class numbers
(metrics/per_class.csv), every prediction (metrics/predictions.csv, for the confusion matrices) and a gallery of
the surest mistakes (metrics/misclassified/) are plots, declared in dvc.yaml.
"""

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from mnist_pipeline.errors import run_stage
from mnist_pipeline.files import atomic_directory, atomic_path, dump_json
from mnist_pipeline.model import MODEL_FILE, load_checkpoint, pick_device, predict_logits
from mnist_pipeline.params import load_params
from mnist_pipeline.prepared import load_split

METRICS_FILE = Path("metrics/eval.json")
PREDICTIONS_FILE = Path("metrics/predictions.csv")
PER_CLASS_FILE = Path("metrics/per_class.csv")
GALLERY_DIR = Path("metrics/misclassified")
GALLERY_SCALE = 4  # 28x28 digits drawn 4x larger, pixel for pixel


def rounded(value: float) -> float:
    return round(float(value), 4)


def headline_metrics(actual: np.ndarray, predicted: np.ndarray, class_count: int) -> dict:
    """Accuracy and macro precision/recall/F1."""
    precision, recall, f1, _ = precision_recall_fscore_support(
        actual, predicted, labels=list(range(class_count)), average="macro", zero_division=0
    )
    return {
        "accuracy": rounded(accuracy_score(actual, predicted)),
        "precision_macro": rounded(precision),
        "recall_macro": rounded(recall),
        "f1_macro": rounded(f1),
    }


def write_per_class(actual: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> None:
    """One `class,precision,recall,f1,support` row per class: the data of the per-class bar chart."""
    scores = precision_recall_fscore_support(
        actual, predicted, labels=list(range(len(class_names))), average=None, zero_division=0
    )
    with atomic_path(PER_CLASS_FILE) as temp, temp.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        for i, name in enumerate(class_names):
            writer.writerow([name, rounded(scores[0][i]), rounded(scores[1][i]), rounded(scores[2][i]), int(scores[3][i])])


def write_predictions(actual: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> None:
    """One `actual,predicted` row per test image: the input of both confusion-matrix plots."""
    with atomic_path(PREDICTIONS_FILE) as temp, temp.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["actual", "predicted"])
        writer.writerows((class_names[a], class_names[p]) for a, p in zip(actual, predicted))


def surest_mistakes(actual: np.ndarray, confidence: np.ndarray, predicted: np.ndarray, count: int) -> np.ndarray:
    """Indices of up to `count` misclassified images, the most confident first (ties: in test-set order)."""
    wrong = np.flatnonzero(predicted != actual)
    return wrong[np.argsort(-confidence[wrong], kind="stable")][:count]


def labelled_image(pixels: np.ndarray, lines: list[str]) -> Image.Image:
    """The digit enlarged pixel for pixel, white on black as in the data set, with caption lines beneath it."""
    height, width = pixels.shape
    digit = Image.fromarray(pixels).resize((width * GALLERY_SCALE, height * GALLERY_SCALE), Image.NEAREST)
    font = ImageFont.load_default(size=13)
    line_height = 16
    card_width = max(digit.width, *(int(font.getlength(line)) + 8 for line in lines))
    card = Image.new("L", (card_width, digit.height + line_height * len(lines) + 4), 255)
    card.paste(digit, ((card_width - digit.width) // 2, 0))
    draw = ImageDraw.Draw(card)
    for row, line in enumerate(lines):
        draw.text((4, digit.height + 2 + row * line_height), line, fill=0, font=font)
    return card


def write_gallery(
    images: np.ndarray, actual: np.ndarray, predicted: np.ndarray, logits: torch.Tensor, class_names: list[str], size: int
) -> None:
    """metrics/misclassified/: the `size` surest mistakes as PNGs named by rank alone (01.png, ...), so DVC shows them
    in that order and `dvc plots diff` puts the same rank of each revision side by side."""
    confidence = logits.softmax(1).max(1).values.numpy()
    with atomic_directory(GALLERY_DIR) as temp:
        for rank, index in enumerate(surest_mistakes(actual, confidence, predicted, size), start=1):
            caption = [
                f"true: {class_names[actual[index]]}",
                f"predicted: {class_names[predicted[index]]}",
                f"confidence: {confidence[index]:.1%}",
            ]
            labelled_image(images[index], caption).save(temp / f"{rank:0{len(str(size))}d}.png", optimize=True)


def main() -> None:
    params = load_params().evaluate
    device = pick_device(params.device, "evaluate.device")
    model, checkpoint = load_checkpoint(MODEL_FILE)
    images, actual = load_split("test")
    logits = predict_logits(model.to(device), torch.from_numpy(images).unsqueeze(1), params.batch_size)
    predicted = logits.argmax(1).numpy()

    class_names = checkpoint["class_names"]
    metrics = {
        **headline_metrics(actual, predicted, len(class_names)),
        "misclassified": int((predicted != actual).sum()),
        "test_images": len(actual),
        "best_epoch": checkpoint["epoch"],
        "device": device.type,
    }
    # eval.json is renamed last, once every plot file is written: a failed run leaves the last complete set.
    with atomic_path(METRICS_FILE) as metrics_temp:
        dump_json(metrics_temp, metrics)
        write_per_class(actual, predicted, class_names)
        write_predictions(actual, predicted, class_names)
        write_gallery(images, actual, predicted, logits, class_names, params.gallery_size)
    print(
        f"test accuracy {metrics['accuracy']:.4f}, macro precision {metrics['precision_macro']:.4f}, "
        f"recall {metrics['recall_macro']:.4f}, F1 {metrics['f1_macro']:.4f} on {len(actual)} images ({device.type})"
    )


if __name__ == "__main__":
    run_stage(main)
