"""The evaluate stage's plot data: per-class scores, and the gallery of the surest mistakes, labelled and ranked."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import synthetic_digits, update_params, write_checkpoint
from PIL import Image

from mnist_pipeline import evaluation, paths
from mnist_pipeline.checkpoint import load_checkpoint
from mnist_pipeline.device import predict_logits
from mnist_pipeline.prepared import save_split
from stages import evaluate

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.fixture
def evaluated(workdir):
    """evaluate.main run on 60 test images with an untrained model whose class names are not digits."""
    images, labels = synthetic_digits(60, seed=5)
    save_split("test", images, labels)
    write_checkpoint(workdir / paths.MODEL_FILE, class_names=CLASS_NAMES)
    update_params(workdir / "params.yaml", {"evaluate": {"gallery_size": 5}})
    evaluate.main([])
    return workdir, images, labels


def test_surest_mistakes_come_first_and_ties_keep_test_set_order():
    actual = np.array([0, 1, 2, 3, 4, 5])
    predicted = np.array([0, 2, 2, 0, 1, 0])
    confidence = np.array([0.99, 0.6, 0.99, 0.9, 0.6, 0.7])
    assert evaluation.surest_mistakes(actual, confidence, predicted, 10).tolist() == [3, 5, 1, 4]
    assert evaluation.surest_mistakes(actual, confidence, predicted, 2).tolist() == [3, 5]
    assert evaluation.surest_mistakes(actual, confidence, predicted, 0).tolist() == []


def test_gallery_shows_the_surest_mistakes_in_rank_order_with_their_labels(evaluated, monkeypatch):
    workdir, images, labels = evaluated
    model, _ = load_checkpoint(paths.MODEL_FILE)
    probabilities = predict_logits(model, torch.from_numpy(images).unsqueeze(1), 64).softmax(1)
    confidence, predicted = probabilities.max(1)
    wrong = [i for i in range(len(labels)) if predicted[i] != labels[i]]
    expected = sorted(wrong, key=lambda i: -confidence[i])[:5]

    gallery = sorted((workdir / paths.GALLERY_DIR).iterdir())
    assert [p.name for p in gallery] == [f"{rank}.png" for rank in range(1, len(expected) + 1)] and len(expected) == 5
    first = Image.open(gallery[0])
    assert first.width >= 28 * evaluation.GALLERY_SCALE and first.height > 28 * evaluation.GALLERY_SCALE, (
        "digit plus caption"
    )
    digit = np.asarray(first)[: 28 * evaluation.GALLERY_SCALE]
    left = (first.width - 28 * evaluation.GALLERY_SCALE) // 2
    np.testing.assert_array_equal(digit[::4, left : left + 112 : 4], images[expected[0]])  # pixel for pixel, 4x
    assert (np.asarray(first)[28 * evaluation.GALLERY_SCALE :] < 128).any(), "the caption is drawn under the digit"

    captions = []
    monkeypatch.setattr(
        evaluation, "labelled_image", lambda pixels, lines: captions.append(lines) or Image.new("L", (1, 1))
    )
    evaluate.main([])
    assert captions == [
        [
            f"true: {CLASS_NAMES[labels[i]]}",
            f"predicted: {CLASS_NAMES[predicted[i]]}",
            f"confidence: {float(confidence[i]):.1%}",
        ]
        for i in expected
    ]


def test_eval_json_has_accuracy_and_macro_scores_and_per_class_scores_are_a_csv(evaluated):
    workdir, _, labels = evaluated
    metrics = json.loads((workdir / paths.EVAL_METRICS).read_text())
    details = json.loads((workdir / paths.EVAL_DETAILS).read_text())
    assert set(metrics) == {"accuracy", "precision", "recall", "f1"}, (
        "the headline numbers: `dvc metrics show` shows them"
    )
    assert set(details) == {"misclassified", "test_images", "best_epoch", "device"}, "each number in one file only"
    assert metrics["accuracy"] == pytest.approx(1 - details["misclassified"] / details["test_images"], abs=1e-4)
    rows = list(csv.DictReader((workdir / paths.PER_CLASS_FILE).open()))
    assert [row["class"] for row in rows] == CLASS_NAMES
    assert [int(row["support"]) for row in rows] == np.bincount(labels, minlength=10).tolist()
    mean_recall = np.mean([float(row["recall"]) for row in rows])
    assert mean_recall == pytest.approx(metrics["recall"], abs=1e-3)


def test_a_new_run_replaces_the_whole_gallery(evaluated):
    workdir, _, _ = evaluated
    (workdir / paths.GALLERY_DIR / "99_stale.png").write_bytes(b"old")
    update_params(workdir / "params.yaml", {"evaluate": {"gallery_size": 0}})
    evaluate.main([])
    assert list((workdir / paths.GALLERY_DIR).iterdir()) == []
    assert [p.name for p in (workdir / "metrics").iterdir() if p.name.startswith(".")] == [], "no temp directory left"


def test_csv_files_keep_the_csv_modules_bytes(tmp_path):
    """pandas writes the plot data as the csv module did (CRLF, quoting), with Python's correctly rounded scores:
    numpy's rounding (DataFrame.round) would give 1/160 as 0.0062, and change the committed per_class.csv."""
    actual = np.array([0] * 160 + [1] * 10)
    predicted = np.array([0] + [1] * 159 + [1] * 10)
    table = evaluation.per_class_scores(actual, predicted, ['say "hi"', "b "])
    evaluation.write_csv(tmp_path / "per_class.csv", table)
    assert (tmp_path / "per_class.csv").read_bytes() == (
        b'class,precision,recall,f1,support\r\n"say ""hi""",1.0,0.0063,0.0124,160\r\nb ,0.0592,1.0,0.1117,10\r\n'
    )
    evaluation.write_csv(
        tmp_path / "predictions.csv", evaluation.predictions_table(actual[158:161], predicted[158:161], ["0", "1"])
    )
    assert (tmp_path / "predictions.csv").read_bytes() == b"actual,predicted\r\n0,1\r\n0,1\r\n1,1\r\n"
