"""Stage 5, evaluate: the trained model (--model) on the held-out test set (in --prepared), as headline metrics and
the data of its plots.

--metrics (metrics/eval.json) holds the headline numbers, test accuracy and macro precision, recall and F1, one
short row in `dvc metrics show`; the counts and the device go to --details. The per-class numbers (--per-class),
every prediction (--predictions, for the confusion matrices) and a gallery of the surest mistakes (--gallery) are
plots, declared in dvc.yaml.
"""

import torch

from mnist_pipeline.checkpoint import load_checkpoint
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
from mnist_pipeline.paths import (
    EVAL_DETAILS,
    EVAL_METRICS,
    GALLERY_DIR,
    MODEL_FILE,
    PER_CLASS_FILE,
    PREDICTIONS_FILE,
    PREPARED_DIR,
    stage_paths,
)
from mnist_pipeline.prepared import load_split


def main(argv: list[str] | None = None) -> None:
    paths = stage_paths(
        __doc__,
        argv,
        prepared=PREPARED_DIR,
        model=MODEL_FILE,
        metrics=EVAL_METRICS,
        details=EVAL_DETAILS,
        predictions=PREDICTIONS_FILE,
        per_class=PER_CLASS_FILE,
        gallery=GALLERY_DIR,
    )
    params = load_params().evaluate
    device = pick_device(params.device, "evaluate.device")
    model, checkpoint = load_checkpoint(paths.model)
    images, actual = load_split("test", paths.prepared)
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
    with atomic_path(paths.metrics) as metrics_temp:
        dump_json(metrics_temp, scores)
        write_csv(paths.per_class, per_class_scores(actual, predicted, class_names))
        write_csv(paths.predictions, predictions_table(actual, predicted, class_names))
        write_gallery(paths.gallery, images, actual, predicted, logits, class_names, params.gallery_size)
        write_json(paths.details, details)
    print(
        f"test accuracy {scores['accuracy']:.4f}, macro precision {scores['precision']:.4f}, "
        f"recall {scores['recall']:.4f}, F1 {scores['f1']:.4f} on {len(actual)} images ({device.type})"
    )


if __name__ == "__main__":
    run_stage(main)
