"""How a training process uses its machine: CPU threads, glibc's allocator, and the precision autocast computes in,
which follows the device (native bf16 or not) so that no setting is fast on one kind of machine and slow on another."""

import ctypes
import os
import sys

import torch

from mnist_pipeline.cpu import Cpu, this_cpu

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h


def tune_process(threads: int) -> int:
    """The process-wide tunings of a training process, made by its main where they show: the allocator keeps
    freed memory, and PyTorch uses `threads` CPU threads (0: every core); returns the thread count."""
    keep_freed_memory()
    return use_threads(threads)


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


def cuda_has_native_bf16() -> bool:
    """Whether the GPU computes bf16 natively (Ampere and newer). torch's is_bf16_supported() also answers yes
    where bf16 is only emulated (a T4, a V100), which is slower than fp16 with loss scaling."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(device: torch.device, mixed_precision: str, cpu: Cpu) -> torch.dtype | None:
    """The autocast precision train.mixed_precision asks for on this device, or None for fp32.

    'auto' means on CUDA only (bf16, or fp16 without bf16). On a CPU it means fp32, whatever the CPU: the default
    run then trains the same way on every x86 server, so its dvc.lock and run-cache hold on all of them. 'native'
    means bf16 wherever the device computes it natively (a CPU with AVX512-BF16 or AMX, an Ampere or newer GPU)
    and fp32 elsewhere: the fastest precision that is never emulated, for recipes with a time budget on every
    machine. 'always' asks for bf16 on the CPU too: faster where the CPU computes it natively, but elsewhere
    PyTorch emulates it, several times slower than fp32 (96.6 s against 10.2 s for an epoch on an AVX2-only EPYC),
    so it warns there.
    """
    if mixed_precision == "native":
        native = cuda_has_native_bf16() if device.type == "cuda" else cpu.native_bf16
        return torch.bfloat16 if native else None
    if device.type == "cuda":
        wanted = mixed_precision in ("auto", "always")
        return (torch.bfloat16 if cuda_has_native_bf16() else torch.float16) if wanted else None
    if mixed_precision != "always":
        return None
    if not cpu.native_bf16:
        print(
            f"warning: train.mixed_precision = always on a CPU without native bf16 ({cpu.describe()}): bf16 is "
            f"emulated there, several times slower than fp32; 'native', 'auto' or 'never' trains in fp32 there",
            file=sys.stderr,
        )
    return torch.bfloat16


def autocast_for(device: torch.device, mixed_precision: str) -> tuple[torch.autocast, torch.amp.GradScaler]:
    """Mixed precision as autocast_dtype picks it; fp16 comes with loss scaling. Weights, optimiser state and the
    saved model stay fp32 either way."""
    dtype = autocast_dtype(device, mixed_precision, this_cpu())
    # No cache of cast weights: it would outlive a CUDA graph's capture, and each step casts each weight once anyway.
    autocast = torch.autocast(
        device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None, cache_enabled=False
    )
    return autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
