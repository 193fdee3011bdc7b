"""What this machine's CPU does natively, read once from /proc/cpuinfo: the features that change the pipeline's speed.

Under an emulator such as qemu-user, /proc/cpuinfo still describes the host, while the program runs on the emulated
CPU, which answers CPUID for itself. Where numpy's reading of CPUID denies a flag that /proc/cpuinfo claims, the
emulated CPU's flags are taken, and the description says it is emulated and names the host.

The benchmark prints them beside its figures and trains its fast recipe in bf16 only where the CPU has bf16
instructions; train.mixed_precision: always warns where it has none. The int8 model's answers do not depend on
them: see onnx_export.quantize_int8.
"""

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# The x86 flags that pick a different kernel somewhere in the pipeline: AVX2 is the x86-64 baseline of PyTorch's and
# onnxruntime's fast paths; AVX-512 and its VNNI (int8 dot products into 32 bits) are the next ones; AVX512-BF16 and
# AMX make bf16 matrix products native, where without them PyTorch emulates bf16 in fp32, several times slower.
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")
# numpy's names, in the features it reads with CPUID at import, of the FLAGS it knows. Under emulation the others
# (avx_vnni, AMX) are taken to be absent: qemu's TCG emulates none of them.
CPUID_NAMES = {"avx2": "AVX2", "avx512f": "AVX512F", "avx512_vnni": "AVX512VNNI", "avx512_bf16": "AVX512BF16"}


@dataclass(frozen=True)
class Cpu:
    model: str
    flags: frozenset[str]  # those of FLAGS this CPU has

    @property
    def native_bf16(self) -> bool:
        return any(flag in self.flags for flag in NATIVE_BF16)

    def describe(self) -> str:
        """The model and which of FLAGS it has, in one line: 'AMD EPYC 7B13, avx2 avx512f; no avx512_vnni ...'."""
        has = " ".join(flag for flag in FLAGS if flag in self.flags) or "none of " + " ".join(FLAGS)
        lacks = " ".join(flag for flag in FLAGS if flag not in self.flags)
        return f"{self.model}, {has}" + (f"; no {lacks}" if lacks and self.flags else "")


def parse_cpuinfo(text: str) -> Cpu:
    """The first processor's model and flags in /proc/cpuinfo's format ('key<tabs>: value' lines)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']} model {fields['model']})"
    flags = set(fields.get("flags", "").split())
    return Cpu(model, frozenset(flag for flag in FLAGS if flag in flags))


def as_emulated(host: Cpu, cpuid: dict[str, bool]) -> Cpu:
    """The CPU this process runs on, given /proc/cpuinfo's `host` and CPUID's answer for the flags numpy knows
    (CPUID_NAMES): the host itself where they agree; otherwise an emulated CPU with CPUID's flags."""
    if all(cpuid.get(flag, False) == (flag in host.flags) for flag in CPUID_NAMES):
        return host
    return Cpu(
        f"an emulated CPU (/proc/cpuinfo names the host: {host.model})",
        frozenset(flag for flag in FLAGS if cpuid.get(flag)),
    )


def cpuid_flags() -> dict[str, bool]:
    """Which of CPUID_NAMES's flags CPUID reports to this process, as numpy read them; {} where numpy cannot say."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__  # numpy's runtime dispatch table, private
    except ImportError:
        return {}
    return {flag: bool(__cpu_features__.get(name)) for flag, name in CPUID_NAMES.items()}


@functools.cache
def this_cpu() -> Cpu:
    """The CPU this process runs on; without a readable /proc/cpuinfo (not Linux), no flags: none assumed native."""
    try:
        host = parse_cpuinfo(CPUINFO.read_text())
    except OSError:
        return Cpu(platform.processor() or platform.machine() or "unknown CPU", frozenset())
    cpuid = cpuid_flags()
    return as_emulated(host, cpuid) if cpuid else host
