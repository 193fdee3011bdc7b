"""What this machine's CPU does natively, read once from /proc/cpuinfo: the features that change the pipeline's speed.

The benchmark prints them beside its figures and trains its fast recipe in bf16 only where the CPU has bf16
instructions; train.mixed_precision: always warns where it has none. The int8 model's answers do not depend on them: see onnx_export.quantize_int8.
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


@functools.cache
def this_cpu() -> Cpu:
    """This machine's CPU; without a readable /proc/cpuinfo (not Linux), no flags, so nothing is assumed native."""
    try:
        return parse_cpuinfo(CPUINFO.read_text())
    except OSError:
        return Cpu(platform.processor() or platform.machine() or "unknown CPU", frozenset())
