"""Output files written all-or-nothing: a temp file beside the target, renamed into place only on success."""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mnist_pipeline.errors import PipelineError, disk_fault

SPACE_MARGIN = 1 << 20  # bytes on top of a free-space estimate: file-system blocks, archive headers


@contextlib.contextmanager
def naming_output(target: Path) -> Iterator[None]:
    """A disk fault (mnist_pipeline.errors.DISK_FAULTS) while writing `target` names `target`: a failed write names no
    file, and a temp file's random name means nothing to a user."""
    try:
        yield
    except Exception as error:
        fault = disk_fault(error)
        if fault is not None and (
            fault.filename is None or Path(os.fsdecode(fault.filename)).name.startswith(f".{target.name}.")
        ):
            fault.filename, fault.filename2 = str(target), None
        raise


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temp path in the target's directory; it replaces the target only if the block succeeds."""
    target = Path(target)
    with naming_output(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(target.parent, target.name)  # a killed writer's, for this same target
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        temp = target.parent / Path(temp).name  # mkstemp's path is absolute; messages read better relative
        try:
            yield temp
            os.chmod(temp, 0o644)  # mkstemp makes files private; outputs are ordinary files
            os.replace(temp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)


@contextlib.contextmanager
def atomic_directory(target: Path | str) -> Iterator[Path]:
    """atomic_path for a directory a library fills file by file (DVCLive's logs): an empty temp directory beside
    the target, which replaces the target only if the block succeeds."""
    target = Path(target)
    with naming_output(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(target.parent, target.name)
        temp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        old = temp.with_name(temp.name.replace(".tmp", ".old.tmp"))
        try:
            yield temp
            os.chmod(temp, 0o755)
            if target.exists():  # a directory cannot replace a non-empty one: move the old one aside first
                os.replace(target, old)
            os.replace(temp, target)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)


def remove_stale_temp_files(directory: Path | str, name: str = "*") -> None:
    """Delete the temp files and directories that atomic_path or atomic_directory left in `directory` for targets
    matching `name` when its process was killed: never part of an output."""
    for leftover in Path(directory).glob(f".{name}.*.tmp"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def write_json(target: Path | str, data: dict) -> None:
    with atomic_path(target) as temp:
        dump_json(temp, data)


def dump_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def require_free_space(directory: Path | str, needed: int, writer: str) -> None:
    """Stop before the work when the file system that holds `directory` has less than `needed` bytes free (plus
    5% and SPACE_MARGIN): better than a full disk half-way through."""
    directory = Path(directory)
    existing = next(path for path in (directory, *directory.parents) if path.exists())  # it may not exist yet
    needed += needed // 20 + SPACE_MARGIN
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise PipelineError(
            f"{directory}: not enough free space: {writer} needs {megabytes(needed)} there, "
            f"{megabytes(free)} are free; "
            f"free some space (df -h {existing}) and run the stage again"
        )


def file_sha256(path: Path | str) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
