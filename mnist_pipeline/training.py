"""A training run and its loop, as named steps that stages/train.py calls: the set-up (data on the device, the model
and its pretrained weights, optimiser and schedule, mixed precision), the steps (eager, compiled or CUDA graphs, on
pixels or on a frozen backbone's features), one epoch, and the evaluation on the validation split."""

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from mnist_pipeline.augment import augment, augments
from mnist_pipeline.cpu import this_cpu
from mnist_pipeline.cuda_graphs import CapturedSteps, TrainingState
from mnist_pipeline.device import predict_logits
from mnist_pipeline.distributed import Worker, sync_batch_norm
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.model import (
    PixelClassifier,
    architecture_for,
    build_model,
    frozen_backbone,
    load_pretrained,
    output_layer,
)
from mnist_pipeline.params import ModelParams, Params, TrainParams
from mnist_pipeline.prepared import load_meta, load_split
from mnist_pipeline.pretrained import weights_file
from mnist_pipeline.runtime import autocast_dtype, autocast_for

# Images per forward pass outside the steps. On a CPU, 1,000 spill each activation out of the caches: the best
# preset's validation took 2.3 s at 1,000 and 1.3 s at 256 on an AVX2-only EPYC Milan (2 cores), every epoch.
EVAL_BATCH = 256


def as_tensors(prepared: Path, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split of the prepared data as uint8 pixels (N, 1, H, W) and int64 labels, resident on the device."""
    images, labels = load_split(split, prepared)
    return torch.from_numpy(images).unsqueeze(1).to(device), torch.from_numpy(labels).long().to(device)


def build_for_training(
    model_params: ModelParams, meta: dict, weights: Path | None, device: torch.device
) -> tuple[PixelClassifier, dict]:
    """A new model for the prepared data's image size and classes, on the device in channels-last layout, its
    initial weights drawn from torch's global generator, then the pretrained ones from `weights` if given."""
    architecture = architecture_for(model_params, meta["image_size"][0], len(meta["class_names"]))
    model = build_model(architecture, meta["mean"], meta["std"])
    if weights is not None:
        load_pretrained(model, architecture, weights)
    return model.to(device, memory_format=torch.channels_last), architecture


def make_optimizer(
    params: TrainParams, model: torch.nn.Module, device: torch.device, capturable: bool = False
) -> torch.optim.Optimizer:
    """The optimiser of the parameters that train: a frozen backbone's are not among them. A capturable one (Adam
    and AdamW only) keeps its step count and learning rate in GPU tensors, which a CUDA graph reads at each replay
    and the schedule changes in place."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            trainable, lr=params.lr, momentum=params.momentum, nesterov=True, weight_decay=params.weight_decay
        )
    optimizer = torch.optim.AdamW if params.optimizer == "adamw" else torch.optim.Adam
    return optimizer(
        trainable,
        lr=torch.tensor(params.lr, device=device) if capturable else params.lr,
        betas=tuple(params.betas),
        weight_decay=params.weight_decay,
        fused=device.type == "cuda",  # one kernel for every parameter's update instead of several per tensor
        capturable=capturable,
    )


def make_schedule(params: TrainParams, optimizer: torch.optim.Optimizer, total_steps: int):
    """A learning-rate schedule stepped once per batch."""
    if params.lr_schedule == "onecycle":
        warmup = params.warmup_fraction * total_steps
        if warmup <= 1:  # torch's OneCycleLR divides by warmup - 1, and rises backwards below it
            raise PipelineError(
                f"train.lr_schedule = onecycle needs more than 1 step of warm-up: train.warmup_fraction = "
                f"{params.warmup_fraction} of {total_steps} steps ({params.epochs} epochs of batch "
                f"{params.batch_size}) gives "
                f"{warmup:g}; train on more images or epochs, or a smaller batch, or another train.lr_schedule"
            )
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=params.lr, total_steps=total_steps, pct_start=params.warmup_fraction, cycle_momentum=False
        )
    if params.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)


@dataclasses.dataclass
class Run:
    """Everything a training loop works with, as prepare() sets it up."""

    model: PixelClassifier  # the whole classifier, on the training device
    architecture: dict
    trained: torch.nn.Module  # what the steps update: the model, or only its output layer on cached features
    step_model: torch.nn.Module  # `trained` as the steps call it: torch.compile'd with train.compile
    backbone: torch.nn.Module | None  # a frozen backbone, which stays in eval mode
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    autocast: torch.autocast
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # batch order (the first worker's) and augmentation
    train_inputs: torch.Tensor  # uint8 pixels, or the frozen backbone's features once compute_frozen_features ran
    train_labels: torch.Tensor
    val_inputs: torch.Tensor
    val_labels: torch.Tensor
    steps_per_epoch: int
    weights: Path | None  # the pretrained weights file the model started from
    cache_features: bool  # whether the frozen backbone's features are computed once instead of every step
    worker: Worker
    graph_blocker: str  # why the steps are not captured as CUDA graphs ("" where they can be)
    layout: torch.memory_format = torch.channels_last  # of the inputs the steps feed
    averaged: AveragedModel | None = None  # train.ema_decay's moving average of the model, updated after each step
    step: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = (
        None  # one training step, as prepare_steps sets it
    )

    @property
    def device(self) -> torch.device:
        return self.worker.device

    def train_mode(self) -> None:
        self.model.train()
        if self.backbone is not None:
            self.backbone.eval()  # frozen means its batch-norm statistics too

    def epoch_order(self) -> torch.Tensor:
        """The order in which an epoch takes the training images: a permutation drawn from the first worker's
        generator, the same on every worker."""
        if self.worker.writes:
            order = torch.randperm(len(self.train_labels), generator=self.generator, device=self.device)
        else:
            order = torch.empty(len(self.train_labels), dtype=torch.long, device=self.device)
        return self.worker.from_first(order)

    def kept_model(self) -> PixelClassifier:
        """The weights that validation scores and the stage keeps: their moving average with train.ema_decay, else
        the trained ones."""
        return self.averaged.module if self.averaged is not None else self.model

    def scored(self) -> torch.nn.Module:
        """kept_model() as it takes run.val_inputs: only its output layer once they are a frozen backbone's features."""
        return output_layer(self.kept_model(), self.architecture) if self.cache_features else self.kept_model()

    def resumable(self) -> dict:
        """What a resumed run loads back, by name: each has state_dict and load_state_dict."""
        parts = {"model": self.model, "optimizer": self.optimizer, "schedule": self.schedule, "scaler": self.scaler}
        return parts | ({"averaged": self.averaged} if self.averaged is not None else {})

    def summary(self) -> str:
        parameters = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        threads = torch.get_num_threads()
        threads = f"{threads} CPU thread{'s' * (threads != 1)}"
        threads = f"{self.worker.world_size} processes of {threads} each" if self.worker.distributed else threads
        return f"training on {self.device} ({threads}): {len(self.train_labels)} images, {parameters} parameters" + (
            f", {trainable} of them trained" if self.backbone else ""
        )


def batch_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float, batch_images: int, worker: Worker
) -> torch.Tensor:
    """The mean cross-entropy of a batch. A worker has only its share of the global batch: its loss is weighted so
    that DDP's average of the workers' gradients is the gradient of the global batch's mean, however it split."""
    if not worker.distributed:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    summed = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="sum")
    return summed * (worker.world_size / batch_images)


class EpochTotals:
    """An epoch's summed loss and correct predictions, kept as tensors on the device and read once at its end:
    a .item() per step would add a host round-trip to every step on CUDA."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.loss = torch.zeros((), device=worker.device, dtype=torch.float64)
        self.correct = torch.zeros((), device=worker.device, dtype=torch.long)
        self.images = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, batch_images: int) -> None:
        """A step's batch_loss, and the logits for this worker's labels, of a global batch of batch_images."""
        self.loss += loss.detach().double() * batch_images / self.worker.world_size
        self.correct += (logits.argmax(1) == labels).sum()
        self.images += len(labels)

    def means(self) -> tuple[float, float]:
        """(mean loss, accuracy) of the epoch over every worker's images, once its queued steps are done (so that
        the epoch's seconds include them)."""
        if self.worker.device.type == "cuda":
            torch.cuda.synchronize(self.worker.device)
        if not self.worker.distributed:
            return self.loss.item() / self.images, self.correct.item() / self.images
        loss, correct, images = self.worker.sum(
            torch.stack([self.loss, self.correct.double(), self.loss.new_tensor(self.images)])
        ).tolist()
        return loss / images, correct / images


def prepare(params: Params, worker: Worker, prepared: Path, pretrained: Path, cache_features: bool = True) -> Run:
    """A new run on the worker's device: both splits from the prepared directory, the model (its weights drawn from
    torch's global generator, which the caller seeds; then from the pretrained stage's directory if
    model.resnet18.pretrained asks), optimiser, schedule, mixed precision, and the weights' moving average with
    train.ema_decay. A frozen backbone's features are to be computed once when nothing augments its input, unless
    cache_features is false (to measure what that saves)."""
    device = worker.device
    generator = torch.Generator(device).manual_seed(worker.seed(params.train.seed))
    meta = load_meta(prepared)
    train_pixels, train_labels = as_tensors(prepared, "train", device)
    val_pixels, val_labels = as_tensors(prepared, "val", device)
    weights = weights_file(params, pretrained)
    model, architecture = build_for_training(params.model, meta, weights, device)
    model = sync_batch_norm(model, worker)
    if worker.rank:  # the same initial weights on every worker, then dropout masks of its own
        torch.manual_seed(worker.seed(params.train.seed))
    backbone = frozen_backbone(model, architecture)
    cached = backbone is not None and not augments(params.train) and cache_features
    trained = output_layer(model, architecture) if cached else model
    blocker = graph_blocker(params, worker)
    optimizer = make_optimizer(params.train, model, device, capturable=not blocker)
    steps_per_epoch = -(-len(train_labels) // params.train.batch_size)
    schedule = make_schedule(params.train, optimizer, params.train.epochs * steps_per_epoch)
    if not blocker and not torch.is_tensor(optimizer.param_groups[0]["lr"]):
        blocker = f"torch {torch.__version__}'s schedules replace the learning-rate tensor that a graph reads"
    autocast, scaler = autocast_for(device, params.train.mixed_precision)
    step_model = worker.wrap(trained)
    step_model = torch.compile(step_model) if params.train.compile else step_model
    return Run(
        averaged=moving_average(model, params.train.ema_decay),
        model=model,
        architecture=architecture,
        trained=trained,
        step_model=step_model,
        backbone=backbone,
        optimizer=optimizer,
        schedule=schedule,
        autocast=autocast,
        scaler=scaler,
        generator=generator,
        train_inputs=train_pixels,
        train_labels=train_labels,
        val_inputs=val_pixels,
        val_labels=val_labels,
        steps_per_epoch=steps_per_epoch,
        weights=weights,
        cache_features=cached,
        worker=worker,
        graph_blocker=blocker,
    )


def moving_average(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of the model's weights and batch-norm statistics, or None with a decay of 0.
    Each step's weights are noisy; their average generalises better (the EMA of ansh941/MnistSimpleCNN and of timm).
    """
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=debiased_ema(decay), use_buffers=True)


def debiased_ema(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """AveragedModel's update for the mean of the weights of every step so far, each weighted by decay ** its age.

    A plain EMA starts from the first step's weights and forgets them slowly: at 0.9995, 65% of the average is still
    the barely trained first step after 860 steps, and validation scores a model at chance for epochs; 2% of it
    after 7,740. Dividing by the weights' sum, as Adam corrects its moments' bias, leaves the same average over any
    window of recent steps without that start.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], models_averaged: torch.Tensor) -> None:
        if not torch.is_floating_point(averaged[0]):  # batch norm's batch counts: the latest is the count
            torch._foreach_copy_(averaged, current)
            return
        # The step's share of the new mean, kept on the device: reading the count back would stall CUDA every step.
        share = ((1 - decay) / (1 - decay ** (models_averaged + 1).double())).to(averaged[0].dtype)
        torch._foreach_mul_(averaged, 1 - share)
        torch._foreach_add_(averaged, torch._foreach_mul(current, share))

    return update


def training_step(
    run: Run, params: TrainParams, batch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step on the given rows of the training set: its loss, logits and labels (this worker's)."""
    mine = run.worker.share(batch)  # all of it, for one process
    inputs, labels = augment(run.train_inputs[mine], params, run.generator), run.train_labels[mine]
    with run.autocast:
        logits = run.step_model(inputs.contiguous(memory_format=run.layout))
        loss = batch_loss(logits, labels, params.label_smoothing, len(batch), run.worker)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss, logits, labels


def graph_blocker(params: Params, worker: Worker) -> str:
    """Why training steps with these params cannot be captured as CUDA graphs, or "" where they can: a graph
    replays the same kernels on the same tensors, so its step may draw no random numbers and read nothing back."""
    train = params.train
    if not train.cuda_graphs or worker.device.type != "cuda":
        return "not on CUDA" if train.cuda_graphs else "train.cuda_graphs is false"
    fp16 = autocast_dtype(worker.device, train.mixed_precision, this_cpu()) == torch.float16
    reasons = {
        "several processes": worker.distributed,
        "train.compile is true": train.compile,
        f"train.optimizer is {train.optimizer}; adam and adamw are captured": train.optimizer == "sgd",
        "fp16's loss scaling reads back whether the gradients are finite": fp16,
        "the step draws random numbers: train's augmentation": augments(train),
        "the step draws random numbers: model.cnn.dropout": params.model.arch == "cnn" and params.model.cnn.dropout > 0,
    }
    return next((reason for reason, blocks in reasons.items() if blocks), "")


def prepare_steps(run: Run, params: TrainParams) -> None:
    """Make run.step, once a resumed run has loaded its state and before the first epoch to train: the frozen
    backbone's features computed once where they are cached, then training_step, compiled first where
    train.compile asks, and captured as CUDA graphs where graph_blocker allows it (on the final inputs, since the
    graphs hold their address)."""
    compute_frozen_features(run)
    eager = functools.partial(training_step, run, params)
    run.step = eager
    sizes = {min(params.batch_size, len(run.train_labels)), len(run.train_labels) % params.batch_size} - {0}
    if params.compile:
        print(f"torch.compile: compiled in {compile_now(eager, run, sizes):.1f}s, before the first epoch")
    if run.graph_blocker:
        if run.device.type == "cuda" and params.cuda_graphs:
            print(f"CUDA graphs: off ({run.graph_blocker}); the steps run eagerly")
        return
    run.step = CapturedSteps(eager, sizes, run.model, run.optimizer)
    print(
        f"CUDA graphs: each step replays one graph, captured in {run.step.seconds:.2f}s for batch sizes "
        f"{', '.join(map(str, sorted(sizes)))}"
    )


def rng_states(generator: torch.Generator, device: torch.device) -> dict:
    """Every random number generator training draws from: weights and dropout, batch order and augmentation."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0)
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(), "cuda": cuda}


def set_rng_states(states: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def compile_now(step: Callable[[torch.Tensor], tuple], run: Run, batch_sizes: set[int]) -> float:
    """Seconds to compile the step for each batch size: torch.compile compiles at a step's first call, which would
    otherwise land in the first epoch's time. The trial steps are undone, loss scale and random draws included."""
    started = time.perf_counter()
    saved, scale, rng = (
        TrainingState(run.model, run.optimizer),
        run.scaler.state_dict(),
        rng_states(run.generator, run.device),
    )
    for size in sorted(batch_sizes):
        step(torch.arange(size, device=run.device))
    saved.restore()
    run.scaler.load_state_dict(scale)
    set_rng_states(rng, run.generator, run.device)
    return time.perf_counter() - started


def train_epoch(run: Run, params: TrainParams, label: str) -> tuple[float, float, float]:
    """One pass over the training set in a seeded random order: its mean loss, its accuracy and its seconds."""
    started = time.perf_counter()
    run.train_mode()
    order, totals = run.epoch_order(), EpochTotals(run.worker)
    for step in tqdm(range(run.steps_per_epoch), desc=label, disable=None if run.worker.writes else True, leave=False):
        batch = order[step * params.batch_size : (step + 1) * params.batch_size]
        loss, logits, labels = run.step(batch)
        run.schedule.step()
        if run.averaged is not None:
            run.averaged.update_parameters(run.model)
        totals.add(loss, logits, labels, len(batch))
    return *totals.means(), time.perf_counter() - started


@torch.no_grad()
def evaluate(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, worker: Worker) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the model in eval mode; several workers each evaluate a share."""
    model.eval()
    if not worker.distributed:
        logits = predict_logits(model, pixels, EVAL_BATCH)
        labels = labels.cpu()
        return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()
    logits, labels = predict_logits(model, worker.share(pixels), EVAL_BATCH), worker.share(labels).cpu()
    totals = torch.stack(
        [F.cross_entropy(logits, labels, reduction="sum").double(), (logits.argmax(1) == labels).sum().double()]
    )
    loss, correct = worker.sum(totals.to(worker.device)).tolist()
    return loss / len(pixels), correct / len(pixels)


@torch.no_grad()
def frozen_features(run: Run, pixels: torch.Tensor, split: str) -> torch.Tensor:
    """The frozen backbone's output (float32) for every image of a split, in batches; each worker computes its
    share, and all of them get every share."""
    features = []
    mine = run.worker.share(pixels)
    for start in tqdm(
        range(0, len(mine), EVAL_BATCH),
        desc=f"{split} features",
        disable=None if run.worker.writes else True,
        leave=False,
    ):
        with run.autocast:
            batch = mine[start : start + EVAL_BATCH].contiguous(memory_format=torch.channels_last)
            features.append(run.backbone(run.model.prepare(batch)).float())
    return run.worker.gather(torch.cat(features), len(pixels))


def compute_frozen_features(run: Run) -> None:
    """Frozen and fed the same images every epoch, the backbone computes the same features every epoch: computed
    once here, for both splits, each epoch then costs the head alone. Nothing to do for other runs."""
    if not run.cache_features:
        return
    started = time.perf_counter()
    run.model.eval()
    run.train_inputs = frozen_features(run, run.train_inputs, "train")
    run.val_inputs = frozen_features(run, run.val_inputs, "val")
    run.layout = torch.contiguous_format
    print(
        f"frozen backbone: features of {len(run.train_inputs) + len(run.val_inputs)} images computed once, "
        f"in {time.perf_counter() - started:.1f}s"
    )


def epoch_line(result: dict, epochs: int) -> str:
    return (
        f"epoch {result['epoch']}/{epochs}: "
        f"train loss {result['train/loss']:.4f} acc {result['train/accuracy']:.4f} | "
        f"val loss {result['val/loss']:.4f} acc {result['val/accuracy']:.4f} | {result['seconds']:.1f}s"
    )
