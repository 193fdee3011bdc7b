"""The CPU's features, read from /proc/cpuinfo, and the training precision they choose: bf16 autocast only where the
CPU computes bf16 natively, so that no setting is fast on one kind of CPU and many times slower on another."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from mnist_pipeline import cpu
from mnist_pipeline.cpu import CPUID_NAMES, Cpu, as_emulated, parse_cpuinfo
from mnist_pipeline.runtime import autocast_dtype, autocast_for

EPYC_MILAN = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx fma avx2 bmi2 sha_ni
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx fma avx2 bmi2 sha_ni
"""
SAPPHIRE_RAPIDS_FLAGS = "avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8"
AVX2_ONLY = Cpu("an AVX2 server", frozenset({"avx2"}))
NATIVE_BF16 = Cpu("an AVX-512 server", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}))


def test_an_avx2_only_cpu_has_no_native_bf16():
    found = parse_cpuinfo(EPYC_MILAN)
    assert found == Cpu("AMD EPYC 7B13 (family 25 model 1)", frozenset({"avx2"})) and not found.native_bf16
    assert (
        found.describe()
        == "AMD EPYC 7B13 (family 25 model 1), avx2; no avx512f avx512_vnni avx_vnni avx512_bf16 amx_bf16 amx_int8"
    )


def test_avx512_bf16_or_amx_make_bf16_native():
    found = parse_cpuinfo(f"model name\t: Intel Xeon\nflags\t\t: {SAPPHIRE_RAPIDS_FLAGS}\n")
    assert (
        found.native_bf16
        and found.describe() == "Intel Xeon, avx2 avx512f avx512_vnni avx_vnni avx512_bf16 amx_bf16 amx_int8"
    )
    assert parse_cpuinfo("flags\t: avx2 amx_bf16\n").native_bf16 and NATIVE_BF16.native_bf16


def test_where_cpuid_denies_what_cpuinfo_claims_the_cpu_is_emulated_and_the_host_named():
    host = parse_cpuinfo(f"model name\t: Intel Xeon\nflags\t\t: {SAPPHIRE_RAPIDS_FLAGS}\n")
    agreeing = {"avx2": True, "avx512f": True, "avx512_vnni": True, "avx512_bf16": True}
    assert as_emulated(host, agreeing) is host
    haswell = as_emulated(host, {**agreeing, "avx512f": False, "avx512_vnni": False, "avx512_bf16": False})
    assert haswell == Cpu("an emulated CPU (/proc/cpuinfo names the host: Intel Xeon)", frozenset({"avx2"}))
    assert not haswell.native_bf16, "bf16 is not native on the CPU the program runs on"


@pytest.mark.skipif(
    shutil.which("qemu-x86_64") is None and not os.environ.get("MNIST_PIPELINE_REQUIRE_QEMU"),
    reason="no qemu-x86_64 (Debian's qemu-user) to emulate another CPU",
)
def test_under_qemu_the_emulated_cpu_is_described_not_the_host():
    """Under qemu's Haswell (AVX2, no AVX-512) the description gives Haswell's flags, and says the CPU is emulated
    where the host's /proc/cpuinfo claims more; on an AVX2-only host the two agree, and the host is the CPU."""
    describe = "from mnist_pipeline.cpu import this_cpu; print(this_cpu().describe())"
    result = subprocess.run(
        [shutil.which("qemu-x86_64") or "qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", describe],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    host = parse_cpuinfo(cpu.CPUINFO.read_text())
    beyond_haswell = host.flags & (CPUID_NAMES.keys() - {"avx2"})
    model = f"an emulated CPU (/proc/cpuinfo names the host: {host.model})" if beyond_haswell else host.model
    assert result.stdout.startswith(f"{model}, avx2; no avx512f "), result.stdout


def test_without_cpuinfo_nothing_is_assumed_native(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "none")
    cpu.this_cpu.cache_clear()
    try:
        assert cpu.this_cpu().flags == frozenset() and not cpu.this_cpu().native_bf16
    finally:
        cpu.this_cpu.cache_clear()
    arm = parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n")
    assert arm.flags == frozenset() and "none of avx2" in arm.describe()


@pytest.mark.parametrize(
    "setting, machine, expected",
    [
        ("auto", AVX2_ONLY, None),
        ("auto", NATIVE_BF16, None),
        ("never", NATIVE_BF16, None),
        ("always", NATIVE_BF16, torch.bfloat16),
        ("native", NATIVE_BF16, torch.bfloat16),
        ("native", AVX2_ONLY, None),
    ],
)
def test_auto_trains_in_fp32_on_every_cpu_and_always_or_native_in_bf16_silently_where_bf16_is_native(
    setting, machine, expected, capsys
):
    assert autocast_dtype(torch.device("cpu"), setting, machine) == expected
    assert capsys.readouterr().err == ""


def test_always_on_a_cpu_without_native_bf16_warns_in_one_line(capsys):
    assert autocast_dtype(torch.device("cpu"), "always", AVX2_ONLY) == torch.bfloat16
    warning = capsys.readouterr().err
    assert warning.startswith(
        "warning: train.mixed_precision = always on a CPU without native bf16 (an AVX2 server, avx2; no "
    )
    assert "emulated" in warning and warning.count("\n") == 1


def gpu(native_bf16: bool):
    """torch.cuda.is_bf16_supported as torch answers it on a GPU with or without native bf16: a T4 or V100 emulates
    bf16, and says yes unless asked about native support alone."""
    return lambda including_emulation=True: native_bf16 or including_emulation


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_keeps_mixed_precision_whatever_the_cpu(monkeypatch, native_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", gpu(native_bf16))
    assert autocast_dtype(torch.device("cuda"), "auto", AVX2_ONLY) == expected
    assert autocast_dtype(torch.device("cuda"), "never", NATIVE_BF16) is None
    # native never emulates: fp32 on a GPU without bf16, rather than fp16 with its loss scaling
    assert autocast_dtype(torch.device("cuda"), "native", AVX2_ONLY) == (torch.bfloat16 if native_bf16 else None)


def test_a_gpu_that_only_emulates_bf16_trains_in_fp16_with_loss_scaling(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", gpu(native_bf16=False))
    scalers = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: scalers.append((device, enabled)))
    autocast, _ = autocast_for(torch.device("cuda"), "auto")
    assert autocast.fast_dtype == torch.float16 and scalers == [("cuda", True)]
