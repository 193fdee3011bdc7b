"""Stage 3, train: fit the CNN on data/prepared/, keep the epoch with the best validation accuracy in models/model.pt."""

import copy
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from dvclive import Live
from tqdm import tqdm

from stages.errors import run_stage
from stages.files import atomic_path
from stages.model import CNN, PixelClassifier, pick_device, predict_logits, save_checkpoint
from stages.params import ModelParams, TrainParams, load_params
from stages.prepared import load_meta, load_split

MODEL_FILE = Path("models/model.pt")
LIVE_DIR = Path("metrics/train")
EVAL_BATCH = 1000


def as_tensors(split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as uint8 pixels (N, 1, H, W) and int64 labels, resident on the training device."""
    images, labels = load_split(split)
    return torch.from_numpy(images).unsqueeze(1).to(device), torch.from_numpy(labels).long().to(device)


def random_shift(pixels: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift]² pixels, filling with black.

    Shifts only: flips or large rotations would turn some digits into others (6 and 9, 2 and 5).
    """
    n, _, height, width = pixels.shape
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator).to(pixels.device)
    rows = offsets[0] + torch.arange(height, device=pixels.device)  # (n, height)
    cols = offsets[1] + torch.arange(width, device=pixels.device)  # (n, width)
    padded = F.pad(pixels[:, 0], (max_shift,) * 4)
    batch = torch.arange(n, device=pixels.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def make_optimizer(params: TrainParams, model: torch.nn.Module) -> torch.optim.Optimizer:
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=params.lr, momentum=params.momentum, nesterov=True, weight_decay=params.weight_decay
        )
    optimizer = torch.optim.AdamW if params.optimizer == "adamw" else torch.optim.Adam
    return optimizer(model.parameters(), lr=params.lr, betas=tuple(params.betas), weight_decay=params.weight_decay)


def make_schedule(params: TrainParams, optimizer: torch.optim.Optimizer, total_steps: int):
    """A learning-rate schedule stepped once per batch."""
    if params.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=params.lr, total_steps=total_steps, pct_start=params.warmup_fraction, cycle_momentum=False
        )
    if params.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)


def autocast_for(device: torch.device) -> tuple[torch.autocast, torch.amp.GradScaler]:
    """Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling); plain fp32 on the CPU."""
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


@torch.no_grad()
def evaluate(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the model in eval mode."""
    model.eval()
    logits = predict_logits(model, pixels, EVAL_BATCH)
    labels = labels.cpu()
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def train(model_params: ModelParams, params: TrainParams, live: Live) -> tuple[PixelClassifier, dict, dict]:
    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    device = pick_device(params.device, "train.device")
    meta = load_meta()
    train_pixels, train_labels = as_tensors("train", device)
    val_pixels, val_labels = as_tensors("val", device)

    architecture = {
        "image_size": meta["image_size"][0],
        "num_classes": len(meta["class_names"]),
        **dataclasses.asdict(model_params),
    }
    network = CNN(**architecture)
    model = PixelClassifier(network, meta["mean"], meta["std"]).to(device, memory_format=torch.channels_last)
    steps_per_epoch = -(-len(train_labels) // params.batch_size)
    optimizer = make_optimizer(params, model)
    schedule = make_schedule(params, optimizer, params.epochs * steps_per_epoch)
    autocast, scaler = autocast_for(device)
    print(f"training on {device}: {len(train_labels)} images, {sum(p.numel() for p in model.parameters())} parameters")

    best = {"val_accuracy": -1.0}
    for epoch in range(1, params.epochs + 1):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(train_labels), generator=generator).to(device)
        total_loss = total_correct = 0.0
        batches = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{params.epochs}", disable=None, leave=False)
        for step in batches:
            batch = order[step * params.batch_size : (step + 1) * params.batch_size]
            pixels, labels = train_pixels[batch], train_labels[batch]
            if params.shift_pixels:
                pixels = random_shift(pixels, params.shift_pixels, generator)
            with autocast:
                logits = model(pixels.contiguous(memory_format=torch.channels_last))
                loss = F.cross_entropy(logits, labels, label_smoothing=params.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            total_loss += loss.item() * len(batch)
            total_correct += (logits.argmax(1) == labels).sum().item()
        seconds = time.perf_counter() - started

        val_loss, val_accuracy = evaluate(model, val_pixels, val_labels)
        train_loss, train_accuracy = total_loss / len(train_labels), total_correct / len(train_labels)
        for name, value in [
            ("train/loss", train_loss),
            ("train/accuracy", train_accuracy),
            ("val/loss", val_loss),
            ("val/accuracy", val_accuracy),
        ]:
            live.log_metric(name, round(value, 6))
        live.next_step()
        print(
            f"epoch {epoch}/{params.epochs}: train loss {train_loss:.4f} acc {train_accuracy:.4f} | "
            f"val loss {val_loss:.4f} acc {val_accuracy:.4f} | {seconds:.1f}s"
        )
        if val_accuracy > best["val_accuracy"]:
            best = {"epoch": epoch, "val_accuracy": val_accuracy, "state_dict": copy.deepcopy(network.state_dict())}

    network.load_state_dict(best.pop("state_dict"))
    return model, architecture, {**best, "device": device.type}


def main() -> None:
    params = load_params()
    with Live(str(LIVE_DIR), dvcyaml=False, save_dvc_exp=False, report=None) as live:
        model, architecture, best = train(params.model, params.train, live)
        live.summary["best"] = {"epoch": best["epoch"], "val_accuracy": round(best["val_accuracy"], 6)}
    network = model.network.to("cpu", memory_format=torch.contiguous_format)
    with atomic_path(MODEL_FILE) as temp:
        save_checkpoint(temp, network, architecture, load_meta(), extra=best)
    print(f"kept epoch {best['epoch']} (val accuracy {best['val_accuracy']:.4f}) in {MODEL_FILE}")


if __name__ == "__main__":
    run_stage(main)
