"""A classifier's results on a test set: headline metrics, per-class scores, predictions, its surest mistakes."""

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from mnist_pipeline.files import atomic_directory, atomic_path

GALLERY_SCALE = 4  # 28x28 digits drawn 4x larger, pixel for pixel
SCORES = ["precision", "recall", "f1"]  # the per-class columns rounded like the headline metrics


def rounded(value: float) -> float:
    """Four decimals, by Python's round: numpy's (DataFrame.round) is not correctly rounded, and 1/160 would
    come out 0.0062 instead of 0.0063, changing the committed plot data."""
    return round(float(value), 4)


def overall_scores(actual: np.ndarray, predicted: np.ndarray, class_count: int) -> dict:
    """Accuracy and macro precision, recall and F1 over the whole test set: the headline metrics of eval.json, named
    short so that `dvc metrics show` fits a 120-column terminal (macro: the unweighted mean over the classes)."""
    precision, recall, f1, _ = precision_recall_fscore_support(
        actual, predicted, labels=list(range(class_count)), average="macro", zero_division=0
    )
    return {
        "accuracy": rounded(accuracy_score(actual, predicted)),
        "precision": rounded(precision),
        "recall": rounded(recall),
        "f1": rounded(f1),
    }


def per_class_scores(actual: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """One `class, precision, recall, f1, support` row per class, in label order: the data of the per-class chart."""
    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=list(range(len(class_names))), average=None, zero_division=0
    )
    table = pd.DataFrame({"class": class_names, "precision": precision, "recall": recall, "f1": f1, "support": support})
    table[SCORES] = table[SCORES].map(rounded)
    return table


def predictions_table(actual: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """One `actual, predicted` row of class names per test image: the input of both confusion-matrix plots."""
    names = np.asarray(class_names, dtype=object)
    return pd.DataFrame({"actual": names[actual], "predicted": names[predicted]})


def write_csv(path: Path, table: pd.DataFrame) -> None:
    """The table as CSV with a header row, atomically; in the csv module's dialect (CRLF line ends), which the
    files had before pandas wrote them, so their bytes and DVC hashes stay the same."""
    with atomic_path(path) as temp:
        table.to_csv(temp, index=False, lineterminator="\r\n")


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
    directory: Path,
    images: np.ndarray,
    actual: np.ndarray,
    predicted: np.ndarray,
    logits: torch.Tensor,
    class_names: list[str],
    size: int,
) -> None:
    """The `size` surest mistakes as PNGs named by rank alone (01.png, ...), replacing the whole directory, so DVC
    shows them in that order and `dvc plots diff` puts the same rank of each revision side by side."""
    confidence = logits.softmax(1).max(1).values.numpy()
    with atomic_directory(directory) as temp:
        for rank, index in enumerate(surest_mistakes(actual, confidence, predicted, size), start=1):
            caption = [
                f"true: {class_names[actual[index]]}",
                f"predicted: {class_names[predicted[index]]}",
                f"confidence: {confidence[index]:.1%}",
            ]
            labelled_image(images[index], caption).save(temp / f"{rank:0{len(str(size))}d}.png", optimize=True)
