"""Stage 4, train: fit the model on data/prepared/, keep the epoch with the best validation accuracy in models/model.pt.
With train.processes > 1, or under torchrun, several processes share each batch (mnist_pipeline/distributed.py)."""

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from dvclive import Live

from mnist_pipeline.checkpoint import MODEL_FILE, save_checkpoint
from mnist_pipeline.distributed import Worker, launch
from mnist_pipeline.errors import run_stage
from mnist_pipeline.files import atomic_directory, atomic_path, write_json
from mnist_pipeline.model import PixelClassifier
from mnist_pipeline.params import Params, load_params
from mnist_pipeline.prepared import load_meta
from mnist_pipeline.resume import ResumeFile, stopped_hint
from mnist_pipeline.runtime import tune_process
from mnist_pipeline.training import epoch_line, evaluate, prepare, prepare_steps, train_epoch

LIVE_DIR = Path("metrics/train")  # DVCLive's curves, and its metrics.json: the kept epoch and the last step
METRICS_FILE = Path("metrics/train.json")  # the headline number, one row of `dvc metrics show`
RESUME_FILE = Path("models/train_state.pt")  # the state after the last finished epoch; deleted once model.pt is written


def train(
    params: Params,
    worker: Worker,
    on_epoch: Callable[[dict, PixelClassifier], None],
    resume_file: Path | None = None,
    cache_features: bool = True,
) -> tuple[PixelClassifier, dict, dict]:
    """Fit a new model; after each epoch, on_epoch gets its losses, accuracies and seconds, and the model. With
    resume_file, a run of the same origin (params, device, data, code) carries on from the state saved there after
    each epoch."""
    torch.manual_seed(params.train.seed)
    run = prepare(params, worker, cache_features)
    print(run.summary())
    state = ResumeFile(resume_file, params, run, code_files=[Path(__file__)])
    best, history = state.load(run, on_epoch)
    if len(history) < params.train.epochs:
        prepare_steps(run, params.train)
    for epoch in range(len(history) + 1, params.train.epochs + 1):
        train_loss, train_accuracy, seconds = train_epoch(run, params.train, f"epoch {epoch}/{params.train.epochs}")
        val_loss, val_accuracy = evaluate(run.trained, run.val_inputs, run.val_labels, worker)
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
        if val_accuracy > best["val_accuracy"]:
            best = {
                "epoch": epoch,
                "val_accuracy": val_accuracy,
                "state_dict": copy.deepcopy(run.model.network.state_dict()),
            }
        state.save(run, best, history)
        on_epoch(history[-1], run.model)
    run.model.network.load_state_dict(best["state_dict"])
    return (
        run.model,
        run.architecture,
        {"epoch": best["epoch"], "val_accuracy": best["val_accuracy"], "device": worker.device.type},
    )


def log_epoch(live: Live, epochs: int, result: dict) -> None:
    live.step = result[
        "epoch"
    ]  # the curves' x is the epoch as the log counts it, 1 to epochs, not DVCLive's 0-based step
    for name in ["train/loss", "train/accuracy", "val/loss", "val/accuracy"]:
        live.log_metric(name, round(result[name], 6))
    live.next_step()
    print(epoch_line(result, epochs))


def train_and_write(params: Params, worker: Worker) -> None:
    """What each training process does: train; the first (with train.processes: 1, the only) one writes the outputs."""
    tune_process(worker.threads)  # in each process
    if not worker.writes:
        train(params, worker, lambda result, model: None, RESUME_FILE)
        return
    # DVCLive writes file by file: into a temp directory that replaces the last run's logs only if training ends.
    with (
        atomic_directory(LIVE_DIR) as live_dir,
        Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None) as live,
    ):
        model, architecture, best = train(
            params, worker, lambda result, model: log_epoch(live, params.train.epochs, result), RESUME_FILE
        )
        # DVCLive's summary is the kept epoch; the last epoch's numbers end the curves.
        live.summary = {"best": {"epoch": best["epoch"], "val_accuracy": round(best["val_accuracy"], 6)}}
    with atomic_path(MODEL_FILE) as temp:
        save_checkpoint(
            temp, model.network.to("cpu", memory_format=torch.contiguous_format), architecture, load_meta(), extra=best
        )
    write_json(METRICS_FILE, {"val_accuracy": round(best["val_accuracy"], 6)})
    RESUME_FILE.unlink(missing_ok=True)
    print(f"kept epoch {best['epoch']} (val accuracy {best['val_accuracy']:.4f}) in {MODEL_FILE}")


def main() -> None:
    params = load_params()
    with stopped_hint(RESUME_FILE):
        launch(train_and_write, params, outputs=(LIVE_DIR, MODEL_FILE, METRICS_FILE, RESUME_FILE))


if __name__ == "__main__":
    run_stage(main)
