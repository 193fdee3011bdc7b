"""Stage 4, train: fit the model on --prepared's splits, keep the epoch train.keep names (the best on validation, or
the last) in --model.
With train.processes > 1, or under torchrun, several processes share each batch (mnist_pipeline/distributed.py)."""

import argparse
import copy
import functools
from collections.abc import Callable
from pathlib import Path

import torch
from dvclive import Live

from mnist_pipeline.checkpoint import save_checkpoint
from mnist_pipeline.distributed import Worker, launch
from mnist_pipeline.errors import run_stage
from mnist_pipeline.files import atomic_directory, atomic_path, write_json
from mnist_pipeline.model import PixelClassifier
from mnist_pipeline.params import Params, load_params
from mnist_pipeline.paths import MODEL_FILE, PREPARED_DIR, PRETRAINED_DIR, TRAIN_LOGS_DIR, TRAIN_METRICS, stage_paths
from mnist_pipeline.prepared import load_meta
from mnist_pipeline.resume import ResumeFile, stopped_hint
from mnist_pipeline.runtime import tune_process
from mnist_pipeline.training import epoch_line, evaluate, prepare, prepare_steps, train_epoch


def train(
    params: Params,
    worker: Worker,
    on_epoch: Callable[[dict, PixelClassifier], None],
    prepared: Path = PREPARED_DIR,
    pretrained: Path = PRETRAINED_DIR,
    resume_file: Path | None = None,
    cache_features: bool = True,
) -> tuple[PixelClassifier, dict, dict]:
    """Fit a new model on the prepared splits (and pretrained weights, if the params ask); after each epoch, on_epoch
    gets its losses, accuracies and seconds, and the model. With resume_file, a run of the same origin (params,
    device, data, code) carries on from the state saved there after each epoch."""
    torch.manual_seed(params.train.seed)
    run = prepare(params, worker, prepared, pretrained, cache_features)
    print(run.summary())
    state = ResumeFile(resume_file, params, run, code_files=[Path(__file__)])
    kept, history = state.load(run, on_epoch)
    if len(history) < params.train.epochs:
        prepare_steps(run, params.train)
    for epoch in range(len(history) + 1, params.train.epochs + 1):
        train_loss, train_accuracy, seconds = train_epoch(run, params.train, f"epoch {epoch}/{params.train.epochs}")
        val_loss, val_accuracy = evaluate(run.scored(), run.val_inputs, run.val_labels, worker)
        history.append(
            {
                "epoch": epoch,
                "train/loss": train_loss,
                "train/accuracy": train_accuracy,
                "val/loss": val_loss,
                "val/accuracy": val_accuracy,
                "seconds": seconds,
            }
        )
        if params.train.keep == "last" or val_accuracy > kept["val_accuracy"]:
            kept = {
                "epoch": epoch,
                "val_accuracy": val_accuracy,
                "state_dict": copy.deepcopy(run.kept_model().network.state_dict()),
            }
        state.save(run, kept, history)
        on_epoch(history[-1], run.model)
    run.model.network.load_state_dict(kept["state_dict"])
    return (
        run.model,
        run.architecture,
        {"epoch": kept["epoch"], "val_accuracy": kept["val_accuracy"], "device": worker.device.type},
    )


def log_epoch(live: Live, epochs: int, result: dict) -> None:
    # The curves' x is the epoch as the log counts it, 1 to epochs, not DVCLive's 0-based step.
    live.step = result["epoch"]
    for name in ["train/loss", "train/accuracy", "val/loss", "val/accuracy"]:
        live.log_metric(name, round(result[name], 6))
    live.next_step()
    print(epoch_line(result, epochs))


def resume_file_of(model_file: Path) -> Path:
    """The state after the last finished epoch, beside the model; deleted once the model is written."""
    return model_file.with_name("train_state.pt")


def train_and_write(params: Params, worker: Worker, paths: argparse.Namespace) -> None:
    """What each training process does: train; the first (with train.processes: 1, the only) one writes the outputs:
    the model, DVCLive's logs (the curves, and a summary with the kept epoch) and the metrics file."""
    tune_process(worker.threads)  # in each process
    inputs = {"prepared": paths.prepared, "pretrained": paths.pretrained, "resume_file": resume_file_of(paths.model)}
    if not worker.writes:
        train(params, worker, lambda result, model: None, **inputs)
        return
    # DVCLive writes file by file: into a temp directory that replaces the last run's logs only if training ends.
    with (
        atomic_directory(paths.logs) as live_dir,
        Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None) as live,
    ):
        model, architecture, kept = train(
            params, worker, lambda result, model: log_epoch(live, params.train.epochs, result), **inputs
        )
        # DVCLive's summary is the kept epoch; the last epoch's numbers end the curves.
        live.summary = {"kept": {"epoch": kept["epoch"], "val_accuracy": round(kept["val_accuracy"], 6)}}
    with atomic_path(paths.model) as temp:
        network = model.network.to("cpu", memory_format=torch.contiguous_format)
        save_checkpoint(temp, network, architecture, load_meta(paths.prepared), extra=kept)
    write_json(paths.metrics, {"val_accuracy": round(kept["val_accuracy"], 6)})  # one row of `dvc metrics show`
    inputs["resume_file"].unlink(missing_ok=True)
    print(f"kept epoch {kept['epoch']} (val accuracy {kept['val_accuracy']:.4f}) in {paths.model}")


def main(argv: list[str] | None = None) -> None:
    paths = stage_paths(
        __doc__,
        argv,
        prepared=PREPARED_DIR,
        pretrained=PRETRAINED_DIR,
        model=MODEL_FILE,
        logs=TRAIN_LOGS_DIR,
        metrics=TRAIN_METRICS,
    )
    params = load_params()
    resume_file = resume_file_of(paths.model)
    with stopped_hint(resume_file):
        launch(
            functools.partial(train_and_write, paths=paths),
            params,
            load_meta(paths.prepared)["counts"],
            outputs=(paths.logs, paths.model, paths.metrics, resume_file),
        )


if __name__ == "__main__":
    run_stage(main)
