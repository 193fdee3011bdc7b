"""The checkpoint format of the train stage's model (models/model.pt by default): everything needed to rebuild the
trained model, written by the train stage and read, with weights_only=True, by evaluate, export and the tools."""

import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from mnist_pipeline.errors import PipelineError, gist
from mnist_pipeline.model import PixelClassifier, build_model, output_layer


def save_checkpoint(path: Path, network: nn.Module, architecture: dict, meta: dict, extra: dict) -> None:
    """Everything needed to rebuild the model, in types that torch.load(weights_only=True) accepts.

    Saved through a file object: given a path, torch.save names the archive's inner folder after the file,
    and a temp file's random name would make identical models differ byte for byte.
    """
    with open(path, "wb") as out:
        torch.save(
            {
                "state_dict": network.state_dict(),
                "architecture": architecture,
                "mean": float(meta["mean"]),
                "std": float(meta["std"]),
                "class_names": list(meta["class_names"]),
                **extra,
            },
            out,
        )


CHECKPOINT_KEYS = (
    "state_dict",
    "architecture",
    "mean",
    "std",
    "class_names",
    "epoch",
    "device",
)  # what the stages read
RETRAIN = "rerun the train stage (dvc repro -f train)"


def load_checkpoint(path: Path | str) -> tuple[PixelClassifier, dict]:
    """Rebuild the trained model in eval mode from a checkpoint written by save_checkpoint.

    weights_only=True: only tensors and plain data are unpickled, never arbitrary objects, so a foreign
    file cannot run code. A missing, damaged or foreign file is a PipelineError naming it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # torch's notes on a foreign file's pickle protocol: the error below says more
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the train stage first (dvc repro train)") from None
    except (PermissionError, IsADirectoryError):
        raise  # the file system's doing, not a damaged file: mnist_pipeline.errors.run_stage says so
    except pickle.UnpicklingError:
        raise PipelineError(
            f"{path} is not a model checkpoint: it holds something other than tensors and plain data, "
            f"which is never unpickled; {RETRAIN}"
        ) from None
    except Exception as error:  # torch raises several types for a damaged file: RuntimeError, EOFError, OSError
        raise PipelineError(f"{path} is damaged or not a PyTorch file ({gist(error)}); {RETRAIN}") from None
    missing = (
        [key for key in CHECKPOINT_KEYS if key not in checkpoint] if isinstance(checkpoint, dict) else CHECKPOINT_KEYS
    )
    if missing:
        raise PipelineError(f"{path} is not a checkpoint of this pipeline: it lacks {', '.join(missing)}; {RETRAIN}")
    try:
        architecture = checkpoint["architecture"]
        model = build_model(architecture, float(checkpoint["mean"]), float(checkpoint["std"]))
        model.network.load_state_dict(checkpoint["state_dict"])
        outputs = output_layer(model, architecture).out_features
        if len(checkpoint["class_names"]) != outputs:
            raise ValueError(f"{len(checkpoint['class_names'])} class names for {outputs} outputs")
    except (TypeError, ValueError, KeyError, RuntimeError, AttributeError) as error:
        raise PipelineError(
            f"{path} is not a checkpoint of this pipeline: its contents do not fit together ({gist(error)}); {RETRAIN}"
        ) from None
    # Channels-last, as it trained: so oneDNN's CPU convolutions ran the best preset's model 1.7x faster at batch 1,000
    # (AVX2-only EPYC Milan, 2 cores), with the same logits to float32 rounding (2e-6).
    return model.to(memory_format=torch.channels_last).eval(), checkpoint
