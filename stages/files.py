"""Output files written all-or-nothing: a temp file beside the target, renamed into place only on success."""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temp path in the target's directory; it replaces the target only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(target.parent, target.name)  # a killed writer's, for this same target
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(temp)
        os.chmod(temp, 0o644)  # mkstemp makes files private; outputs are ordinary files
        os.replace(temp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def remove_stale_temp_files(directory: Path | str, name: str = "*") -> None:
    """Delete the temp files that atomic_path left in `directory` for targets matching `name` when its
    process was killed: never part of an output."""
    for leftover in Path(directory).glob(f".{name}.*.tmp"):
        leftover.unlink(missing_ok=True)


def write_json(target: Path | str, data: dict) -> None:
    with atomic_path(target) as temp:
        temp.write_text(json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield a temp directory beside the target; it replaces the whole target directory only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):  # a killed writer's
        shutil.rmtree(leftover, ignore_errors=True)
    temp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    old = temp.with_suffix(".old.tmp")
    try:
        yield temp
        os.chmod(temp, 0o755)  # mkdtemp makes directories private; outputs are ordinary directories
        if target.exists():
            os.replace(target, old)
        os.replace(temp, target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
