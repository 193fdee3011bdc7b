"""The set-up of a training run, as named steps that stages/train.py calls before and around its loop: data on the
device, the model and its pretrained weights, optimiser and schedule, mixed precision, frozen-backbone features, and
the state a killed run resumes from. Process-wide tuning is here too, for a stage's main to call where it shows."""

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mnist_pipeline.augment import augment, augments
from mnist_pipeline.cpu import Cpu, this_cpu
from mnist_pipeline.cuda_graphs import CapturedSteps, TrainingState
from mnist_pipeline.distributed import Worker, sync_batch_norm
from mnist_pipeline.errors import PipelineError, gist
from mnist_pipeline.files import atomic_path, file_sha256, require_free_space
from mnist_pipeline.model import (
    PixelClassifier,
    architecture_for,
    build_model,
    frozen_backbone,
    load_pretrained,
    output_layer,
    predict_logits,
)
from mnist_pipeline.params import ModelParams, Params, TrainParams
from mnist_pipeline.prepared import load_meta, load_split
from mnist_pipeline.pretrained import weights_file

EVAL_BATCH = 1000
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h


def keep_freed_memory() -> None:
    """Stop glibc from returning each freed activation buffer to the OS, only to fault it back in next step.

    Its default mmap threshold makes every large tensor a fresh mmap; on a small CPU that page-fault churn
    doubled the time of the first epoch. It changes the whole process's allocator: call it from a main.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def use_threads(threads: int) -> int:
    """Set PyTorch's CPU thread count for the whole process (0: every core it may run on) and return it."""
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    return torch.get_num_threads()


def as_tensors(split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as uint8 pixels (N, 1, H, W) and int64 labels, resident on the training device."""
    images, labels = load_split(split)
    return torch.from_numpy(images).unsqueeze(1).to(device), torch.from_numpy(labels).long().to(device)


def build_for_training(model_params: ModelParams, meta: dict, weights: Path | None, device: torch.device) -> tuple[PixelClassifier, dict]:
    """A new model for the prepared data's image size and classes, on the device in channels-last layout, its
    initial weights drawn from torch's global generator, then the pretrained ones from `weights` if given."""
    architecture = architecture_for(model_params, meta["image_size"][0], len(meta["class_names"]))
    model = build_model(architecture, meta["mean"], meta["std"])
    if weights is not None:
        load_pretrained(model, architecture, weights)
    return model.to(device, memory_format=torch.channels_last), architecture


def make_optimizer(params: TrainParams, model: torch.nn.Module, device: torch.device, capturable: bool = False) -> torch.optim.Optimizer:
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
                f"{params.warmup_fraction} of {total_steps} steps ({params.epochs} epochs of batch {params.batch_size}) gives "
                f"{warmup:g}; train on more images or epochs, or a smaller batch, or another train.lr_schedule")
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=params.lr, total_steps=total_steps, pct_start=params.warmup_fraction, cycle_momentum=False
        )
    if params.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)


def cuda_has_native_bf16() -> bool:
    """Whether the GPU computes bf16 natively (Ampere and newer). torch's is_bf16_supported() also answers yes
    where bf16 is only emulated (a T4, a V100), which is slower than fp16 with loss scaling."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(device: torch.device, mixed_precision: str, cpu: Cpu) -> torch.dtype | None:
    """The autocast precision train.mixed_precision asks for on this device, or None for fp32.

    'auto' means on CUDA only (bf16, or fp16 without bf16). On a CPU it means fp32, whatever the CPU: the default
    run then trains the same way on every x86 server, so its dvc.lock and run-cache hold on all of them. 'always'
    asks for bf16 on the CPU too: faster where the CPU computes it natively (AVX512-BF16 or AMX), but elsewhere
    PyTorch emulates it, several times slower than fp32 (96.6 s against 10.2 s for an epoch on an AVX2-only EPYC),
    so it warns there.
    """
    if device.type == "cuda":
        wanted = mixed_precision in ("auto", "always")
        return (torch.bfloat16 if cuda_has_native_bf16() else torch.float16) if wanted else None
    if mixed_precision != "always":
        return None
    if not cpu.native_bf16:
        print(f"warning: train.mixed_precision = always on a CPU without native bf16 ({cpu.describe()}): bf16 is "
              f"emulated there, several times slower than fp32; 'auto' or 'never' trains in fp32", file=sys.stderr)
    return torch.bfloat16


def autocast_for(device: torch.device, mixed_precision: str) -> tuple[torch.autocast, torch.amp.GradScaler]:
    """Mixed precision as autocast_dtype picks it; fp16 comes with loss scaling. Weights, optimiser state and the
    saved model stay fp32 either way."""
    dtype = autocast_dtype(device, mixed_precision, this_cpu())
    # No cache of cast weights: it would outlive a CUDA graph's capture, and each step casts each weight once anyway.
    autocast = torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None, cache_enabled=False)
    return autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


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
    step: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None  # one training step, as prepare_steps sets it

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

    def resumable(self) -> dict:
        """What a resumed run loads back, by name: each has state_dict and load_state_dict."""
        return {"model": self.model, "optimizer": self.optimizer, "schedule": self.schedule, "scaler": self.scaler}

    def summary(self) -> str:
        parameters = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        threads = torch.get_num_threads()
        threads = f"{threads} CPU thread{'s' * (threads != 1)}"
        threads = f"{self.worker.world_size} processes of {threads} each" if self.worker.distributed else threads
        return (f"training on {self.device} ({threads}): {len(self.train_labels)} images, {parameters} parameters"
                + (f", {trainable} of them trained" if self.backbone else ""))


def batch_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float, batch_images: int, worker: Worker) -> torch.Tensor:
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
        loss, correct, images = self.worker.sum(torch.stack([self.loss, self.correct.double(), self.loss.new_tensor(self.images)])).tolist()
        return loss / images, correct / images


def prepare(params: Params, worker: Worker, cache_features: bool = True) -> Run:
    """A new run on the worker's device: both splits, the model (its weights drawn from torch's global generator,
    which the caller seeds; pretrained ones from data/pretrained/ if model.pretrained asks), optimiser, schedule
    and mixed precision. A frozen backbone's features are to be computed once when nothing augments its input,
    unless cache_features is false (to measure what that saves)."""
    device = worker.device
    generator = torch.Generator(device).manual_seed(worker.seed(params.train.seed))
    meta = load_meta()
    train_pixels, train_labels = as_tensors("train", device)
    val_pixels, val_labels = as_tensors("val", device)
    weights = weights_file(params)
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
    return Run(model, architecture, trained, step_model, backbone, optimizer, schedule, autocast, scaler, generator,
               train_pixels, train_labels, val_pixels, val_labels, steps_per_epoch, weights, cached, worker, blocker)


def training_step(run: Run, params: TrainParams, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        "the step draws random numbers: model.dropout": params.model.arch == "cnn" and params.model.dropout > 0,
    }
    return next((reason for reason, blocks in reasons.items() if blocks), "")


def prepare_steps(run: Run, params: TrainParams) -> None:
    """Make run.step: training_step, compiled first where train.compile asks, and captured as CUDA graphs where
    graph_blocker allows it. Call it once the training inputs are final (after compute_frozen_features), since
    the graphs hold their address."""
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
    print(f"CUDA graphs: each step replays one graph, captured in {run.step.seconds:.2f}s for batch sizes "
          f"{', '.join(map(str, sorted(sizes)))}")


def compile_now(step: Callable[[torch.Tensor], tuple], run: Run, batch_sizes: set[int]) -> float:
    """Seconds to compile the step for each batch size: torch.compile compiles at a step's first call, which would
    otherwise land in the first epoch's time. The trial steps are undone, loss scale and random draws included."""
    started = time.perf_counter()
    saved, scale, rng = TrainingState(run.model, run.optimizer), run.scaler.state_dict(), rng_states(run.generator, run.device)
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
    totals = torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(), (logits.argmax(1) == labels).sum().double()])
    loss, correct = worker.sum(totals.to(worker.device)).tolist()
    return loss / len(pixels), correct / len(pixels)


@torch.no_grad()
def frozen_features(run: Run, pixels: torch.Tensor, split: str) -> torch.Tensor:
    """The frozen backbone's output (float32) for every image of a split, in batches; each worker computes its
    share, and all of them get every share."""
    features = []
    mine = run.worker.share(pixels)
    for start in tqdm(range(0, len(mine), EVAL_BATCH), desc=f"{split} features", disable=None if run.worker.writes else True, leave=False):
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
    print(f"frozen backbone: features of {len(run.train_inputs) + len(run.val_inputs)} images computed once, "
          f"in {time.perf_counter() - started:.1f}s")


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
    return {"params": hashlib.sha256(settings.encode()).hexdigest(),
            "processes and threads": f"{run.worker.world_size} x {torch.get_num_threads()}",
            "device": run.device.type, "data": data.hexdigest(), "code": code_digest(code_files)}


def origin_difference(saved: dict, origin: dict) -> str:
    """How a saved state's origin differs from this run's, in words: "other params", "device cuda, not cpu"."""
    def difference(name: str) -> str:
        shown = name in ("device", "processes and threads")
        return f"{name} {saved.get(name)}, not {origin[name]}" if shown else f"other {name}"
    return ", ".join(difference(name) for name in origin if saved.get(name) != origin[name])


def rng_states(generator: torch.Generator, device: torch.device) -> dict:
    """Every random number generator training draws from: weights and dropout, batch order and augmentation."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0)
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(), "cuda": cuda}


def set_rng_states(states: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


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
            # It holds the weights, the best epoch's weights and up to two optimiser moments per weight, and
            # model.pt the weights once more: checked before the first epoch rather than found out after it.
            weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in run.model.state_dict().values())
            require_free_space(path.parent, 5 * weight_bytes, "train")
            self.origin = run_origin(params, run, list(code_files))

    def load(self, run: Run, on_epoch: Callable[[dict, PixelClassifier], None]) -> tuple[dict, list[dict]]:
        """The best epoch and the results of the epochs done, loaded into the run, and those results replayed to
        on_epoch, so that the logs hold every epoch; none for a fresh run."""
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
        return saved["best"], saved["history"]

    def save(self, run: Run, best: dict, history: list[dict]) -> None:
        if self.path is None:
            return
        rng = run.worker.gather_objects(rng_states(run.generator, run.device))  # one per worker, in rank order
        if not run.worker.writes:
            return
        # Through a file object: given a path, torch.save reports a full disk as an iostream error without its cause.
        with atomic_path(self.path) as temp, temp.open("wb") as out:
            parts = {name: part.state_dict() for name, part in run.resumable().items()}
            state = {"origin": self.origin, "history": history, "best": best, "rng": rng}
            torch.save({**state, **parts}, out)


@contextlib.contextmanager
def stopped_hint(resume_file: Path) -> Iterator[None]:
    """Ctrl-C during training says whether a rerun resumes, and from where."""
    try:
        yield
    except KeyboardInterrupt:
        hint = f"run it again with the same params to resume from {resume_file}" if resume_file.exists() else ""
        raise KeyboardInterrupt(f"training stopped; {hint}" if hint else "training stopped before its first epoch ended") from None


def epoch_line(result: dict, epochs: int) -> str:
    return (f"epoch {result['epoch']}/{epochs}: "
            f"train loss {result['train/loss']:.4f} acc {result['train/accuracy']:.4f} | "
            f"val loss {result['val/loss']:.4f} acc {result['val/accuracy']:.4f} | {result['seconds']:.1f}s")
