"""Stage 4, train: fit the model on data/prepared/, keep the epoch with the best validation accuracy in models/model.pt."""

import copy
import ctypes
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from dvclive import Live
from tqdm import tqdm

from mnist_pipeline.download import file_sha256
from mnist_pipeline.errors import gist, run_stage
from mnist_pipeline.files import atomic_directory, atomic_path, require_free_space
from mnist_pipeline.model import (
    MODEL_FILE,
    PixelClassifier,
    architecture_for,
    build_model,
    frozen_backbone,
    load_pretrained,
    output_layer,
    pick_device,
    predict_logits,
    save_checkpoint,
)
from mnist_pipeline.params import ModelParams, Params, TrainParams, load_params
from mnist_pipeline.prepared import load_meta, load_split
from mnist_pipeline.pretrained import weights_file

LIVE_DIR = Path("metrics/train")
# The state after the last finished epoch, so a killed run resumes; deleted once model.pt is written.
RESUME_FILE = Path("models/train_state.pt")
EVAL_BATCH = 1000
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h


def keep_freed_memory() -> None:
    """Stop glibc from returning each freed activation buffer to the OS, only to fault it back in next step.

    Its default mmap threshold makes every large tensor a fresh mmap; on a small CPU that page-fault churn
    doubled the time of the first epoch.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def use_threads(threads: int) -> int:
    """Set PyTorch's CPU thread count (0: every core this process may run on) and return it."""
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    return torch.get_num_threads()


def as_tensors(split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as uint8 pixels (N, 1, H, W) and int64 labels, resident on the training device."""
    images, labels = load_split(split)
    return torch.from_numpy(images).unsqueeze(1).to(device), torch.from_numpy(labels).long().to(device)


def random_shift(pixels: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift]² pixels, filling with black.

    Never a flip, and rotations stay small (train.rotate_degrees): either can turn a digit into another.
    The generator lives on the pixels' device, so on a GPU the augmentation never touches the host.
    """
    n, _, height, width = pixels.shape
    device = pixels.device
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator, device=device)
    rows = offsets[0] + torch.arange(height, device=device)  # (n, height)
    cols = offsets[1] + torch.arange(width, device=device)  # (n, width)
    padded = F.pad(pixels[:, 0], (max_shift,) * 4)
    batch = torch.arange(n, device=device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def random_affine(pixels: torch.Tensor, max_degrees: float, max_zoom: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image about its centre by a random angle in ±max_degrees and zoom it by a random factor
    in 1 ± max_zoom, bilinearly; returns float pixels on the same 0-255 scale, black where the border shows.
    """
    n, device = len(pixels), pixels.device
    angles = (torch.rand(n, generator=generator, device=device) * 2 - 1) * math.radians(max_degrees)
    zooms = 1 + (torch.rand(n, generator=generator, device=device) * 2 - 1) * max_zoom
    cos, sin, zero = angles.cos() / zooms, angles.sin() / zooms, torch.zeros(n, device=device)
    # theta maps each output pixel to where it samples the input: a rotation scaled by 1/zoom.
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def make_optimizer(params: TrainParams, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The optimiser of the parameters that train: a frozen backbone's are not among them."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            trainable, lr=params.lr, momentum=params.momentum, nesterov=True, weight_decay=params.weight_decay
        )
    optimizer = torch.optim.AdamW if params.optimizer == "adamw" else torch.optim.Adam
    return optimizer(
        trainable,
        lr=params.lr,
        betas=tuple(params.betas),
        weight_decay=params.weight_decay,
        fused=device.type == "cuda",  # one kernel for every parameter's update instead of several per tensor
    )


def make_schedule(params: TrainParams, optimizer: torch.optim.Optimizer, total_steps: int):
    """A learning-rate schedule stepped once per batch."""
    if params.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=params.lr, total_steps=total_steps, pct_start=params.warmup_fraction, cycle_momentum=False
        )
    if params.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)


def autocast_for(device: torch.device, mixed_precision: str) -> tuple[torch.autocast, torch.amp.GradScaler]:
    """Mixed precision where asked ('auto': on CUDA only): bf16 where the device has it, else fp16 with loss
    scaling. Weights, optimiser state and the saved model stay fp32 either way."""
    enabled = mixed_precision == "always" or (mixed_precision == "auto" and device.type == "cuda")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    else:
        dtype = torch.bfloat16
    autocast = torch.autocast(device.type, dtype=dtype, enabled=enabled)
    return autocast, torch.amp.GradScaler(device.type, enabled=enabled and dtype == torch.float16)


@torch.no_grad()
def evaluate(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the model in eval mode."""
    model.eval()
    logits = predict_logits(model, pixels, EVAL_BATCH)
    labels = labels.cpu()
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def run_fingerprint(
    model_params: ModelParams, params: TrainParams, train_pixels: torch.Tensor, threads: int, weights: Path | None = None
) -> str:
    """What a resumed run must share with the run that saved its state: params, thread count, training data
    and pretrained weights."""
    digest = hashlib.sha256(json.dumps([model_params.model_dump(), params.model_dump(), threads]).encode())
    digest.update(train_pixels.cpu().numpy().tobytes())
    if weights is not None:
        digest.update(file_sha256(weights).encode())
    return digest.hexdigest()


@torch.no_grad()
def frozen_features(model: PixelClassifier, backbone: torch.nn.Module, pixels: torch.Tensor, autocast, split: str) -> torch.Tensor:
    """The frozen backbone's output (float32) for every image of a split, in batches."""
    features = []
    for start in tqdm(range(0, len(pixels), EVAL_BATCH), desc=f"{split} features", disable=None, leave=False):
        with autocast:
            batch = pixels[start : start + EVAL_BATCH].contiguous(memory_format=torch.channels_last)
            features.append(backbone(model.prepare(batch)).float())
    return torch.cat(features)


def rng_states(generator: torch.Generator, device: torch.device) -> dict:
    """Every random number generator training draws from: weights and dropout, batch order and augmentation."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0)
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(), "cuda": cuda}


def set_rng_states(states: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def load_resume_state(path: Path, fingerprint: str) -> dict | None:
    """The saved state of an interrupted run with the same fingerprint; anything else is reported and ignored."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file costs a fresh start, not the run
        print(f"ignoring {path}: not a readable training state ({gist(error)}); starting from epoch 1")
        return None
    if state.get("fingerprint") != fingerprint:
        print(f"ignoring {path}: it comes from other params, threads or data; starting from epoch 1")
        return None
    return state


def train(
    model_params: ModelParams,
    params: TrainParams,
    device: torch.device,
    on_epoch: Callable[[dict, PixelClassifier], None],
    resume_file: Path | None = None,
    weights: Path | None = None,
    cache_features: bool = True,
) -> tuple[PixelClassifier, dict, dict]:
    """Fit a new model; after each epoch, on_epoch gets its losses, accuracies and seconds, and the model.

    With resume_file, the state after each epoch is saved there, and a run with the same fingerprint
    carries on from it, replaying the saved epochs' results to on_epoch first. `weights` is the pretrained
    weights file when model_params asks for one (by default the one params.yaml names, in data/pretrained/).
    A frozen backbone's features are computed once per split when nothing augments its input, unless
    cache_features is false (to measure what that saves).
    """
    keep_freed_memory()
    threads = use_threads(params.threads)
    torch.manual_seed(params.seed)
    generator = torch.Generator(device).manual_seed(params.seed)
    meta = load_meta()
    train_pixels, train_labels = as_tensors("train", device)
    val_pixels, val_labels = as_tensors("val", device)

    architecture = architecture_for(model_params, meta["image_size"][0], len(meta["class_names"]))
    model = build_model(architecture, meta["mean"], meta["std"])
    if model_params.pretrained != "none":
        weights = weights or weights_file(load_params())
        load_pretrained(model, architecture, weights)
    else:
        weights = None
    network = model.network
    model = model.to(device, memory_format=torch.channels_last)
    backbone = frozen_backbone(model, architecture)
    augmented = params.shift_pixels or params.rotate_degrees or params.zoom_percent
    cached = backbone is not None and not augmented and cache_features
    # What the optimisation steps run: the whole model on pixels, or only the head on cached features.
    trained = output_layer(model, architecture) if cached else model
    steps_per_epoch = -(-len(train_labels) // params.batch_size)
    optimizer = make_optimizer(params, model, device)
    if resume_file:
        # Its state file holds the weights, the best epoch's weights and up to two optimiser moments per weight,
        # and model.pt the weights once more.
        weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
        require_free_space(resume_file.parent, 5 * weight_bytes, "train")
    schedule = make_schedule(params, optimizer, params.epochs * steps_per_epoch)
    autocast, scaler = autocast_for(device, params.mixed_precision)
    step_model = torch.compile(trained) if params.compile else trained
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"training on {device} ({threads} CPU threads): {len(train_labels)} images, "
          f"{sum(p.numel() for p in model.parameters())} parameters" + (f", {trainable} of them trained" if backbone else ""))

    best = {"val_accuracy": -1.0}
    history: list[dict] = []
    fingerprint = run_fingerprint(model_params, params, train_pixels, threads, weights) if resume_file else ""
    resumable = {"model": model, "optimizer": optimizer, "schedule": schedule, "scaler": scaler}
    saved = load_resume_state(resume_file, fingerprint) if resume_file else None
    if saved:
        for name, part in resumable.items():
            part.load_state_dict(saved[name])
        set_rng_states(saved["rng"], generator, device)
        best, history = saved["best"], saved["history"]
        print(f"resuming from {resume_file}: epochs 1-{len(history)} of {params.epochs} already done")
        for result in history:
            on_epoch(result, model)

    train_inputs, val_inputs, layout = train_pixels, val_pixels, torch.channels_last
    if cached and len(history) < params.epochs:
        # Frozen and fed the same images every epoch, the backbone computes the same features every epoch:
        # computed once here, each epoch then costs the head alone.
        started = time.perf_counter()
        model.eval()
        train_inputs = frozen_features(model, backbone, train_pixels, autocast, "train")
        val_inputs = frozen_features(model, backbone, val_pixels, autocast, "val")
        layout = torch.contiguous_format
        print(f"frozen backbone: features of {len(train_inputs) + len(val_inputs)} images computed once, "
              f"in {time.perf_counter() - started:.1f}s")

    for epoch in range(len(history) + 1, params.epochs + 1):
        model.train()
        if backbone is not None:
            backbone.eval()  # frozen means its batch-norm statistics too
        started = time.perf_counter()
        order = torch.randperm(len(train_labels), generator=generator, device=device)
        # Summed as tensors and read once per epoch: a .item() per step would add a host round-trip on CUDA.
        total_loss = torch.zeros((), device=device, dtype=torch.float64)
        total_correct = torch.zeros((), device=device, dtype=torch.long)
        batches = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{params.epochs}", disable=None, leave=False)
        for step in batches:
            batch = order[step * params.batch_size : (step + 1) * params.batch_size]
            inputs, labels = train_inputs[batch], train_labels[batch]
            if params.rotate_degrees or params.zoom_percent:
                inputs = random_affine(inputs, params.rotate_degrees, params.zoom_percent / 100, generator)
            if params.shift_pixels:
                inputs = random_shift(inputs, params.shift_pixels, generator)
            with autocast:
                logits = step_model(inputs.contiguous(memory_format=layout))
                loss = F.cross_entropy(logits, labels, label_smoothing=params.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            total_loss += loss.detach().double() * len(batch)
            total_correct += (logits.argmax(1) == labels).sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # once per epoch, so that the seconds include the queued steps
        seconds = time.perf_counter() - started

        val_loss, val_accuracy = evaluate(trained, val_inputs, val_labels)
        result = {
            "epoch": epoch,
            "train/loss": total_loss.item() / len(train_labels),
            "train/accuracy": total_correct.item() / len(train_labels),
            "val/loss": val_loss,
            "val/accuracy": val_accuracy,
            "seconds": seconds,
        }
        history.append(result)
        if val_accuracy > best["val_accuracy"]:
            best = {"epoch": epoch, "val_accuracy": val_accuracy, "state_dict": copy.deepcopy(network.state_dict())}
        if resume_file:
            # Through a file object: given a path, torch.save reports a full disk as an iostream error without its cause.
            with atomic_path(resume_file) as temp, temp.open("wb") as out:
                parts = {name: part.state_dict() for name, part in resumable.items()}
                state = {"fingerprint": fingerprint, "history": history, "best": best, "rng": rng_states(generator, device)}
                torch.save({**state, **parts}, out)
        on_epoch(result, model)

    network.load_state_dict(best["state_dict"])
    return model, architecture, {"epoch": best["epoch"], "val_accuracy": best["val_accuracy"], "device": device.type}


def main() -> None:
    params: Params = load_params()
    device = pick_device(params.train.device, "train.device")
    # DVCLive writes file by file: into a temp directory that replaces the last run's logs only if training ends.
    with atomic_directory(LIVE_DIR) as live_dir, Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None) as live:

        def log_epoch(result: dict, model: PixelClassifier) -> None:
            for name in ["train/loss", "train/accuracy", "val/loss", "val/accuracy"]:
                live.log_metric(name, round(result[name], 6))
            live.next_step()
            print(
                f"epoch {result['epoch']}/{params.train.epochs}: "
                f"train loss {result['train/loss']:.4f} acc {result['train/accuracy']:.4f} | "
                f"val loss {result['val/loss']:.4f} acc {result['val/accuracy']:.4f} | {result['seconds']:.1f}s"
            )

        try:
            model, architecture, best = train(params.model, params.train, device, log_epoch, RESUME_FILE, weights_file(params))
        except KeyboardInterrupt:
            hint = f"run it again with the same params to resume from {RESUME_FILE}" if RESUME_FILE.exists() else ""
            raise KeyboardInterrupt(f"training stopped; {hint}" if hint else "training stopped before its first epoch ended") from None
        # The summary (a row of `dvc metrics show`) is the kept epoch; the last epoch's numbers end the curves.
        live.summary = {"best": {"epoch": best["epoch"], "val_accuracy": round(best["val_accuracy"], 6)}}
    network = model.network.to("cpu", memory_format=torch.contiguous_format)
    with atomic_path(MODEL_FILE) as temp:
        save_checkpoint(temp, network, architecture, load_meta(), extra=best)
    RESUME_FILE.unlink(missing_ok=True)
    print(f"kept epoch {best['epoch']} (val accuracy {best['val_accuracy']:.4f}) in {MODEL_FILE}")


if __name__ == "__main__":
    run_stage(main)
