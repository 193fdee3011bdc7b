"""Stage 5, evaluate: the trained model on the held-out test set, as headline metrics and the data of its plots.

metrics/eval.json holds the headline numbers, test accuracy and macro precision, recall and F1, one short row in
`dvc metrics show`; the counts and the device go to metrics/eval_details.json. The per-class numbers
(metrics/per_class.csv), every prediction (metrics/predictions.csv, for the confusion matrices) and a gallery of the
surest mistakes (metrics/misclassified/) are plots, declared in dvc.yaml.
"""

from pathlib import Path

import torch

from mnist_pipeline.checkpoint import MODEL_FILE, load_checkpoint
from mnist_pipeline.device import pick_device, predict_logits
from mnist_pipeline.errors import run_stage
from mnist_pipeline.evaluation import (
    overall_scores,
    per_class_scores,
    predictions_table,
    write_csv,
    write_gallery,
)
from mnist_pipeline.files import atomic_path, dump_json, write_json
from mnist_pipeline.params import load_params
from mnist_pipeline.prepared import load_split

METRICS_FILE = Path("metrics/eval.json")
DETAILS_FILE = Path("metrics/eval_details.json")
PREDICTIONS_FILE = Path("metrics/predictions.csv")
PER_CLASS_FILE = Path("metrics/per_class.csv")
GALLERY_DIR = Path("metrics/misclassified")


def main() -> None:
    params = load_params().evaluate
    device = pick_device(params.device, "evaluate.device")
    model, checkpoint = load_checkpoint(MODEL_FILE)
    images, actual = load_split("test")
    logits = predict_logits(model.to(device), torch.from_numpy(images).unsqueeze(1), params.batch_size)
    predicted = logits.argmax(1).numpy()

    class_names = checkpoint["class_names"]
    scores = overall_scores(actual, predicted, len(class_names))
    details = {
        "misclassified": int((predicted != actual).sum()),
        "test_images": len(actual),
        "best_epoch": checkpoint["epoch"],
        "device": device.type,
    }
    # eval.json is renamed last, once every plot file is written: a failed run leaves the last complete set.
    with atomic_path(METRICS_FILE) as metrics_temp:
        dump_json(metrics_temp, scores)
        write_csv(PER_CLASS_FILE, per_class_scores(actual, predicted, class_names))
        write_csv(PREDICTIONS_FILE, predictions_table(actual, predicted, class_names))
        write_gallery(GALLERY_DIR, images, actual, predicted, logits, class_names, params.gallery_size)
        write_json(DETAILS_FILE, details)
    print(
        f"test accuracy {scores['accuracy']:.4f}, macro precision {scores['precision']:.4f}, "
        f"recall {scores['recall']:.4f}, F1 {scores['f1']:.4f} on {len(actual)} images ({device.type})"
    )


if __name__ == "__main__":
    run_stage(main)
