"""`mnist-gpu-kit`: a folder that lets a GPU server without internet run the pipeline: the wheels of what it needs
beyond the server's own PyTorch stack, built for the server's Python, and the MNIST files (docs/gpu.md)."""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from mnist_pipeline.download import MEGABYTE, download_file, mirrors_to_try
from mnist_pipeline.errors import PipelineError, run_stage
from mnist_pipeline.files import atomic_directory
from mnist_pipeline.params import load_params

# What a CUDA image for PyTorch has already (NVIDIA's and the cloud vendors' images; the project's GPU machine):
# these, and all they depend on, stay out of the kit. torch's CUDA wheel alone is many times the kit's size.
SERVER_HAS = "torch torchvision numpy pandas scikit-learn onnx onnxruntime pyyaml tqdm"
EXTRA = ["pytest"]  # the GPU check runs the CUDA tests too
MAX_BYTES = 50 * 2**20
# pip's tags for a manylinux x86-64 server; pip matches each manylinux version exactly.
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements() -> list[str]:
    """The pipeline's dependencies, as installed here (pip install -e .), without the optional ones."""
    return [text for text in metadata.requires("mnist-pipeline") or [] if "extra ==" not in text]


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True, text=True
    )


def closure(requirements: list[str]) -> dict[str, str]:
    """Every package these requirements install, with what they depend on: name -> version, as pip resolves
    them here (pip cannot resolve for another platform where a dependency ships no wheel, as antlr4's does not)."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        result = pip("install", "--dry-run", "--quiet", "--ignore-installed", "--report", str(report), *requirements)
        if result.returncode:
            raise PipelineError(f"pip could not resolve {' '.join(requirements)}: {last_line(result)}")
        return {
            canonical(item["metadata"]["name"]): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]
        }


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip() and "is ignored" not in line]
    return lines[-1] if lines else f"exit status {result.returncode}"


def fetch_wheels(packages: dict[str, str], python_version: str, folder: Path) -> None:
    """The wheels of these exact versions for the server's Python and platform, into folder: in one pip call, or
    one by one where that fails, building a pure-Python package that PyPI has only as source into a wheel here."""
    target = [f"--python-version={python_version}", "--implementation=cp", *(f"--platform={tag}" for tag in PLATFORMS)]
    pinned = [f"{name}=={version}" for name, version in sorted(packages.items())]
    print(f"downloading {len(pinned)} wheels for Python {python_version}", flush=True)
    if (
        pip("download", "--quiet", "--no-deps", "--only-binary=:all:", *target, "-d", str(folder), *pinned).returncode
        == 0
    ):
        return
    for requirement in pinned:
        result = pip("download", "--quiet", "--no-deps", "--only-binary=:all:", *target, "-d", str(folder), requirement)
        if result.returncode == 0:
            continue
        name, version = requirement.split("==")
        built = pip("wheel", "--quiet", "--no-deps", "-w", str(folder), requirement)
        if built.returncode or not list(folder.glob(f"{name.replace('-', '_')}-{version}-py3-none-any.whl")):
            raise PipelineError(
                f"no wheel of {requirement} for Python {python_version} on manylinux x86-64: {last_line(result)}"
            )
        print(f"{requirement}: PyPI has no wheel; built one here (pure Python)", flush=True)


def copy_dataset(folder: Path) -> None:
    """The four MNIST files, verified, from $MNIST_PIPELINE_MIRRORS (then the mirrors in params.yaml)."""
    params = load_params()
    folder.mkdir()
    for name, expected in params.dataset.files().items():
        download_file(
            name,
            expected,
            mirrors_to_try(params.download.mirrors),
            params.download.timeout,
            params.download.retries,
            max_bytes=params.download.max_megabytes * MEGABYTE,
            deadline=params.download.deadline,
            output_dir=folder,
        )


def build(out: Path, python_version: str, server_has: list[str]) -> dict:
    present = closure(server_has)
    wanted = [
        text
        for text in project_requirements() + EXTRA
        if canonical(re.match(r"[A-Za-z0-9._-]+", text).group()) not in present
    ]
    needed = {name: version for name, version in closure(wanted).items() if name not in present}
    with atomic_directory(out) as folder:
        wheels = folder / "wheels"
        wheels.mkdir()
        fetch_wheels(needed, python_version, wheels)
        copy_dataset(folder / "mnist")
        manifest = {
            "python": python_version,
            "server_has": server_has,
            "wheels": sorted(p.name for p in wheels.iterdir()),
        }
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
        if size > MAX_BYTES:
            raise PipelineError(
                f"the kit would hold {size / 2**20:.1f} MiB, over its {MAX_BYTES // 2**20} MiB; "
                f"name more of what the server has with --server-has"
            )
    print(
        f"{out}/: {len(manifest['wheels'])} wheels for Python {python_version} and the MNIST files, "
        f"{size / 2**20:.1f} MiB"
    )
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--python-version", default="3.12", help="the server's Python, major.minor (default: 3.12)")
    parser.add_argument(
        "--server-has",
        default=SERVER_HAS,
        help=f"the packages the server's Python has already, space-separated (default: {SERVER_HAS})",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("gpu-kit"), help="the kit's folder, replaced (default: gpu-kit)"
    )
    args = parser.parse_args()
    if not re.fullmatch(r"3\.\d+", args.python_version):
        raise PipelineError(f"--python-version = {args.python_version!r}: expected major.minor, such as 3.12")
    os.environ.setdefault("PIP_NO_INPUT", "1")
    build(args.out, args.python_version, args.server_has.split())


if __name__ == "__main__":
    run_stage(main)
