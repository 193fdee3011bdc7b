"""Data-parallel training on torch.distributed: the worker processes of one machine, started through PyTorch's own
launcher (torch.distributed.launcher, the engine behind torchrun), or this process's place in a job that an outside
torchrun started on several nodes; and what the workers share: batches, gradients, batch norm, features, totals.

What the train stage uses, and why each exists:
- launch(): one call for the three ways a stage runs (alone; starting its workers; as a worker of a torchrun job),
  with every fault of a launch as one line (launch_error) instead of a traceback per worker.
- Worker: a process's rank, device and threads, with the few collectives the loop needs (share, gather, sum,
  from_first); outside a job each is the identity, so the loop has no branch for one process.
- sync_batch_norm(): batch norm over the global batch, so that N workers train as one process would. torch's
  SyncBatchNorm runs on CUDA only (its kernels are CUDA's), so the CPU gets CrossProcessBatchNorm, its sums
  all-reduced through gloo with their gradients (SummedOverWorkers).
"""

import contextlib
import datetime
import logging
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from mnist_pipeline.device import pick_device
from mnist_pipeline.errors import PipelineError, describe_disk_fault, disk_fault, gist
from mnist_pipeline.files import remove_stale_temp_files
from mnist_pipeline.params import Params, TrainParams

# Set for every worker of a torchrun job (and by job scripts that start the workers themselves, with MASTER_ADDR
# and MASTER_PORT): a process that has them is already a worker, and never starts workers of its own.
JOB_VARIABLES = ("RANK", "WORLD_SIZE")
# Seconds a worker waits for the others at the start, and for a collective operation after that.
TIMEOUT_VARIABLE = "MNIST_PIPELINE_RENDEZVOUS_TIMEOUT"
DEFAULT_TIMEOUT = 600


@dataclass(frozen=True)
class Worker:
    """One training process's place among world_size: its rank, its device and the CPU threads it may use
    (0: every core). The first one writes the outputs. Outside a torch.distributed job (distributed false: one
    process, started as usual), every method is the identity."""

    device: torch.device
    threads: int = 0
    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def seed(self, seed: int) -> int:
        """The seed of this worker's own draws (augmentation, dropout): train.seed itself for the first worker, so
        that one process draws exactly as it always did; another for each other rank."""
        return (seed + (self.rank << 40)) % (1 << 64) if self.rank else seed

    def share(self, rows: torch.Tensor) -> torch.Tensor:
        """This worker's contiguous part of rows that all the workers hold (a global batch, a split): the parts
        of the ranks, in rank order, are the rows once each."""
        return torch.tensor_split(rows, self.world_size)[self.rank] if self.distributed else rows

    def gather(self, part: torch.Tensor, rows: int) -> torch.Tensor:
        """share() backwards: every worker's part of `rows` rows, computed by each, put together on all."""
        if not self.distributed:
            return part
        sizes = [len(piece) for piece in torch.tensor_split(torch.empty(rows, 0), self.world_size)]
        padded = torch.zeros((sizes[0], *part.shape[1:]), dtype=part.dtype, device=part.device)
        padded[: len(part)] = part  # all_gather wants the same shape from every rank
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded)
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over the workers (in place)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def from_first(self, tensor: torch.Tensor) -> torch.Tensor:
        """The first worker's tensor, on every worker (in place)."""
        if self.distributed:
            dist.broadcast(tensor, src=0)
        return tensor

    def object_from_first(self, value):
        """The first worker's picklable value, on every worker."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, value) -> list | None:
        """Every worker's picklable value, in rank order, on the first worker; None on the others."""
        if not self.distributed:
            return [value]
        values = [None] * self.world_size if self.writes else None
        dist.gather_object(value, values, dst=0)
        return values

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module as the steps call it: in a torch.distributed job, under DistributedDataParallel, which
        averages the workers' gradients during the backward pass."""
        if not self.distributed:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def sync_batch_norm(model: torch.nn.Module, worker: Worker) -> torch.nn.Module:
    """The model with each batch norm normalising by the statistics of the whole global batch, as one process
    would, not of one worker's share: torch's SyncBatchNorm on GPUs, CrossProcessBatchNorm on the CPU."""
    if not worker.distributed:
        return model
    if worker.device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(model, name, CrossProcessBatchNorm.like(child))
        else:
            sync_batch_norm(child, worker)
    return model


class SummedOverWorkers(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: each worker's input reaches every worker's output, so the gradient
    of each input is the sum of the output gradients of all workers."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        return SummedOverWorkers.apply(gradient)


class CrossProcessBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of all the workers, on the CPU, where torch's SyncBatchNorm does not run:
    in training, the mean and variance are sums over every worker's images; in eval mode, the running ones."""

    @classmethod
    def like(cls, norm: torch.nn.modules.batchnorm._BatchNorm) -> "CrossProcessBatchNorm":
        synced = cls(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
        synced.load_state_dict(norm.state_dict())
        return synced.train(norm.training)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        pixels = input.float()  # under autocast too: sums of bf16 values lose the small differences
        dims, shape = [0, *range(2, pixels.dim())], (1, -1, *[1] * (pixels.dim() - 2))
        count = torch.full((1,), pixels.numel() // pixels.shape[1], dtype=pixels.dtype)
        sums = SummedOverWorkers.apply(torch.cat([pixels.sum(dims), count]))
        images = sums[-1]
        mean = sums[:-1] / images
        centred = pixels - mean.view(shape)
        variance = SummedOverWorkers.apply((centred * centred).sum(dims)) / images
        if self.track_running_stats:
            self.track(mean.detach(), variance.detach() * images / (images - 1))
        normalised = centred * torch.rsqrt(variance + self.eps).view(shape)
        return normalised * self.weight.view(shape) + self.bias.view(shape) if self.affine else normalised

    @torch.no_grad()
    def track(self, mean: torch.Tensor, unbiased_variance: torch.Tensor) -> None:
        """The running statistics, updated as nn.BatchNorm2d updates them."""
        self.num_batches_tracked += 1
        factor = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_variance.to(self.running_var.dtype), factor)


def planned_processes(params: TrainParams, device: torch.device) -> int:
    """train.processes as a number for this machine: auto is one per GPU, or 1 on a CPU. More processes than
    GPUs is an error; more than CPU cores (or train.threads) a warning, since they then take turns."""
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        processes = gpus if params.processes == "auto" else params.processes
        if processes > gpus:
            raise PipelineError(
                f"train.processes = {processes} is more than the {gpus} GPU{'s' * (gpus != 1)} "
                f"PyTorch sees on this machine; "
                f"expected at most {gpus}, or auto (one process per GPU)"
            )
        return processes
    processes = 1 if params.processes == "auto" else params.processes
    cores = params.threads or len(os.sched_getaffinity(0))
    if processes > cores:
        what = f"train.threads = {params.threads}" if params.threads else f"{cores} CPU core{'s' * (cores != 1)}"
        print(
            f"warning: train.processes = {processes} with {what}: the processes take turns on the cores, "
            f"and training is slower than with {cores}",
            file=sys.stderr,
        )
    return processes


def launch(
    worker_main: Callable[[Params, Worker], Any],
    params: Params,
    split_counts: dict[str, int],
    outputs: tuple[Path, ...] = (),
) -> Any:
    """Run worker_main(params, worker) in every training process, and return the first one's result: here, alone,
    with train.processes 1; in train.processes workers started through elastic_launch; or here as one worker of
    a job that an outside torchrun started. split_counts are the images of each split the workers share (the
    prepared data's meta.json counts). See start_workers for its failures."""
    if all(name in os.environ for name in JOB_VARIABLES):
        return join_job(worker_main, params, split_counts)  # already a worker: it never starts workers again
    device = pick_device(params.train.device, "train.device")
    processes = planned_processes(params.train, device)
    if processes == 1:
        return worker_main(params, Worker(device, params.train.threads))
    require_a_share_each(processes, split_counts)
    return start_workers(worker_main, params, processes, split_counts, outputs)


def require_a_share_each(processes: int, counts: dict[str, int]) -> None:
    """Refuse, before any worker starts, splits too small to give every process a share: a worker with no
    validation images would fail inside a collective, and take the others down with it."""
    for split, setting in (("train", "preprocess.train_limit"), ("val", "preprocess.val_size")):
        if counts[split] < processes:
            raise PipelineError(
                f"the {split} split has {counts[split]} image{'s' * (counts[split] != 1)}, "
                f"fewer than the {processes} training processes, and each needs a share; "
                f"expected train.processes <= {counts[split]}, or a larger split ({setting})"
            )


def start_workers(
    worker_main: Callable[[Params, Worker], Any],
    params: Params,
    processes: int,
    split_counts: dict[str, int],
    outputs: tuple[Path, ...] = (),
) -> Any:
    """worker_main(params, worker) in each of `processes` new processes on this machine, through PyTorch's elastic
    launcher; the first one's result. A worker that fails, or a launch that does, is one PipelineError naming the
    rank and its error (Ctrl-C a KeyboardInterrupt); the temp files the workers' atomic writes of `outputs` left
    are removed then."""
    with tempfile.TemporaryDirectory(prefix="mnist-pipeline-workers-") as logs, no_logging():
        # Each worker's stderr goes to a file: the first worker's is shown once all succeeded; after a failure,
        # the one line of the failure replaces what the dying workers wrote there.
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=processes,
            run_id=uuid.uuid4().hex,
            max_restarts=0,
            rdzv_backend="c10d",
            rdzv_endpoint=f"127.0.0.1:{os.environ.get('MASTER_PORT', 0)}",
            rdzv_configs={"timeout": rendezvous_timeout(), "is_host": True},
            monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=logs, redirects=Std.ERR),
        )
        try:
            results = elastic_launch(config, join_job)(worker_main, params, split_counts)
        except BaseException as error:
            for output in outputs:
                remove_stale_temp_files(output.parent, output.name)
            raise launch_error(error, processes) from None
        for stderr in sorted(Path(logs).rglob("stderr.log"))[:1]:  # the first worker's
            sys.stderr.write(stderr.read_text())
    return results[0]


def join_job(worker_main: Callable[[Params, Worker], Any], params: Params, split_counts: dict[str, int]) -> Any:
    """One worker of a job, as the environment describes it (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT): join the others, then run worker_main. Its PipelineErrors and disk faults name
    the rank; other exceptions are bugs and keep their type."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_size = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = pick_device(params.train.device, "train.device")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    threads = max(1, (params.train.threads or len(os.sched_getaffinity(0))) // local_size)
    place = f"rank {rank} of {world_size}"
    try:
        require_a_share_each(world_size, split_counts)
    except PipelineError as error:
        raise PipelineError(f"{place}: {error}") from None
    try:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=rendezvous_timeout()),
        )
    except Exception as error:
        raise PipelineError(f"{place}: could not join the other training processes: {launch_problem(error)}") from None
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")) if rank else contextlib.nullcontext():  # one writer
            return worker_main(params, Worker(device, threads, rank, world_size, distributed=True))
    except PipelineError as error:
        raise PipelineError(f"{place}: {error}") from None
    except Exception as error:
        fault = disk_fault(error)
        if fault is None:
            raise
        raise PipelineError(f"{place}: {describe_disk_fault(fault)}") from None
    finally:
        dist.destroy_process_group()


def launch_error(error: BaseException, processes: int) -> BaseException:
    """What elastic_launch raised, as the one-line error the stage ends with."""
    if isinstance(error, ChildFailedError):
        return PipelineError(failure_line(error, processes))
    if (
        isinstance(error, (KeyboardInterrupt, SignalException))
        and getattr(error, "sigval", signal.SIGINT) == signal.SIGINT
    ):
        return KeyboardInterrupt()  # Ctrl-C, which the workers got too: the caller says what a rerun does
    if isinstance(error, SignalException):
        return PipelineError(f"the training processes were stopped by {error.sigval.name}")
    if isinstance(error, Exception):  # the launcher's own rendezvous, before any worker ran
        return PipelineError(f"could not start {processes} training processes: {launch_problem(error)}")
    return error


def rendezvous_timeout() -> int:
    value = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT))
    if not value.isdigit() or int(value) == 0:
        raise PipelineError(f"{TIMEOUT_VARIABLE} = {value!r} is not allowed; expected a whole number of seconds >= 1")
    return int(value)


def launch_problem(error: Exception) -> str:
    """What went wrong at a rendezvous, in words a user can act on."""
    causes = [error]
    while causes[-1].__cause__ is not None:  # the launcher wraps the socket's error
        causes.append(causes[-1].__cause__)
    text = " ".join(" ".join(str(cause) for cause in causes).split())
    master = f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '?')}"
    if "address already in use" in text.lower() or "EADDRINUSE" in text:
        return (
            f"port {master} is in use by another program; "
            "choose a free port (MASTER_PORT, or torchrun's --rdzv-endpoint)"
        )
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (
            f"the rendezvous at {master} timed out after {rendezvous_timeout()} s ({TIMEOUT_VARIABLE}) waiting for "
            f"{os.environ.get('WORLD_SIZE', 'all')} processes; start every node's torchrun with the same --nnodes "
            f"and --rdzv-endpoint"
        )
    return gist(causes[-1])


def failure_line(failed: ChildFailedError, processes: int) -> str:
    """The first failure of a launch, in one line: the rank, and its error or the signal that killed it."""
    rank, failure = failed.get_first_failure()
    if failure.exitcode < 0:
        return f"training process rank {rank} of {processes} was killed by {failure.signal_name()}"
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    kind, _, text = str(message).partition(": ")
    if kind == PipelineError.__name__:
        return text  # it already names the rank
    where = traceback_origin(failure.error_file_data)
    return f"training process rank {rank} of {processes} failed: {gist(Exception(message), 300)}{where}"


def traceback_origin(error_file_data: dict) -> str:
    """' (at FILE:LINE)' for the innermost frame of a worker's traceback, or ''."""
    message = error_file_data.get("message")
    stack = message.get("extraInfo", {}).get("py_callstack", "") if isinstance(message, dict) else ""
    frames = [line.strip() for line in stack.splitlines() if line.strip().startswith('File "')]
    if not frames:
        return ""
    path, _, rest = frames[-1][len('File "') :].partition('", line ')
    return f" (at {os.path.relpath(path)}:{rest.split(',')[0]})"


@contextlib.contextmanager
def no_logging() -> Iterator[None]:
    """No log records in this process for the block: the launcher and torch.multiprocessing log a traceback per
    failed worker, and their own shutdown, which the one line of launch() replaces. Workers log as they would."""
    level = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(level)
