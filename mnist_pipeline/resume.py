"""Resuming a killed training run: after each epoch the run's state (weights, optimiser, schedule, random generators,
the epochs' results) is saved with its origin (params, processes, device, data, code), and a rerun of the same origin
carries on from there to the same bytes; a state of another origin is reported in one line and ignored."""

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mnist_pipeline.errors import gist
from mnist_pipeline.files import atomic_path, file_sha256, require_free_space
from mnist_pipeline.model import PixelClassifier
from mnist_pipeline.params import Params
from mnist_pipeline.training import Run, rng_states, set_rng_states


def code_digest(files: list[Path]) -> str:
    """The SHA-256 of the training code: the given files, and every module of this package."""
    digest = hashlib.sha256()
    for path in [*files, *sorted(Path(__file__).parent.glob("*.py"))]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_origin(params: Params, run: Run, code_files: list[Path]) -> dict[str, str]:
    """What a resumed run must share with the run that saved its state, by name: params, processes and threads,
    the device type (a CPU's random generator state cannot drive a GPU's), training data with pretrained
    weights, and the code (dvc.lock would record edited code beside epochs the old code trained)."""
    data = hashlib.sha256(run.train_inputs.cpu().numpy().tobytes())
    if run.weights is not None:
        data.update(file_sha256(run.weights).encode())
    settings = json.dumps([params.model.model_dump(), params.train.model_dump()])
    return {
        "params": hashlib.sha256(settings.encode()).hexdigest(),
        "processes and threads": f"{run.worker.world_size} x {torch.get_num_threads()}",
        "device": run.device.type,
        "data": data.hexdigest(),
        "code": code_digest(code_files),
    }


def origin_difference(saved: dict, origin: dict) -> str:
    """How a saved state's origin differs from this run's, in words: "other params", "device cuda, not cpu"."""

    def difference(name: str) -> str:
        shown = name in ("device", "processes and threads")
        return f"{name} {saved.get(name)}, not {origin[name]}" if shown else f"other {name}"

    return ", ".join(difference(name) for name in origin if saved.get(name) != origin[name])


def load_resume_state(path: Path, origin: dict) -> dict | None:
    """The saved state of an interrupted run of the same origin; anything else is reported in one line and
    ignored, and the next epoch's save replaces it."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file costs a fresh start, not the run
        print(f"ignoring {path}: not a readable training state ({gist(error)}); starting from epoch 1")
        return None
    saved_origin = state.get("origin")  # absent from the files of this code's earlier versions
    differences = origin_difference(saved_origin, origin) if isinstance(saved_origin, dict) else "other code"
    if differences:
        print(f"ignoring {path}: it comes from a run with {differences}; starting from epoch 1")
        return None
    return state


class ResumeFile:
    """The state of a run after its last finished epoch, saved so that a killed run carries on from there with
    the same results; a path of None saves and resumes nothing. Only the first worker reads and writes the file:
    the others get its contents from it, and send it their random generators' states."""

    def __init__(self, path: Path | None, params: Params, run: Run, code_files: list[Path] = ()):
        self.path, self.origin, self.epochs = path, {}, params.train.epochs
        if path is not None and run.worker.writes:
            # It holds the weights, the kept epoch's weights and up to two optimiser moments per weight, and
            # model.pt the weights once more: checked before the first epoch rather than found out after it.
            weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in run.model.state_dict().values())
            require_free_space(path.parent, 5 * weight_bytes, "train")
            self.origin = run_origin(params, run, list(code_files))

    def load(self, run: Run, on_epoch: Callable[[dict, PixelClassifier], None]) -> tuple[dict, list[dict]]:
        """The kept epoch (train.keep) and the results of the epochs done, loaded into the run, and those results
        replayed to on_epoch, so that the logs hold every epoch; none for a fresh run."""
        if self.path is None:
            return {"val_accuracy": -1.0}, []
        saved = run.worker.object_from_first(load_resume_state(self.path, self.origin) if run.worker.writes else None)
        if not saved:
            return {"val_accuracy": -1.0}, []
        for name, part in run.resumable().items():
            part.load_state_dict(saved[name])
        set_rng_states(saved["rng"][run.worker.rank], run.generator, run.device)
        print(f"resuming from {self.path}: epochs 1-{len(saved['history'])} of {self.epochs} already done")
        for result in saved["history"]:
            on_epoch(result, run.model)
        return saved["kept"], saved["history"]

    def save(self, run: Run, kept: dict, history: list[dict]) -> None:
        if self.path is None:
            return
        rng = run.worker.gather_objects(rng_states(run.generator, run.device))  # one per worker, in rank order
        if not run.worker.writes:
            return
        # Through a file object: given a path, torch.save reports a full disk as an iostream error without its cause.
        with atomic_path(self.path) as temp, temp.open("wb") as out:
            parts = {name: part.state_dict() for name, part in run.resumable().items()}
            state = {"origin": self.origin, "history": history, "kept": kept, "rng": rng}
            torch.save({**state, **parts}, out)


@contextlib.contextmanager
def stopped_hint(resume_file: Path) -> Iterator[None]:
    """Ctrl-C during training says whether a rerun resumes, and from where."""
    try:
        yield
    except KeyboardInterrupt:
        hint = f"run it again with the same params to resume from {resume_file}" if resume_file.exists() else ""
        raise KeyboardInterrupt(
            f"training stopped; {hint}" if hint else "training stopped before its first epoch ended"
        ) from None
