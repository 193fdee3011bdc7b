"""User-facing failures: one exception type, and the entry point that reports it without a traceback."""

import errno
import os
import sys
from collections.abc import Callable


class PipelineError(Exception):
    """A problem the user can fix (bad params, missing or corrupt data); its message says how."""


def gist(error: Exception, limit: int = 160) -> str:
    """A library's exception as a clause for a PipelineError: its first sentence, on one line, cut to `limit`.

    PyTorch and onnxruntime explain their errors in paragraphs; the first sentence says what went wrong.
    """
    sentence = " ".join(str(error).split()).split(". ")[0] or type(error).__name__
    return sentence if len(sentence) <= limit else sentence[: limit - 1] + "…"


ACCESS_ADVICE = "make it and {directory} readable and writable for you (ls -ld shows who owns them)"
# The OSErrors that are the disk's or the file system's doing, not a bug in a stage: what each means, and what to do
# ({directory}: the directory of the path at fault). Any other OSError keeps its traceback.
DISK_FAULTS = {
    errno.ENOSPC: ("no space left on the device", "free some space (df -h {directory}) and run the stage again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space within your quota (quota -s) and run the stage again"),
    errno.EFBIG: (
        "file too large for the file system or for this process's file size limit",
        "raise the limit (ulimit -f) or write to another file system, and run the stage again",
    ),
    errno.EROFS: ("the file system is read-only", "run the pipeline in a writable copy of the repository"),
    errno.EACCES: ("permission denied", ACCESS_ADVICE),
    errno.EPERM: ("operation not permitted", ACCESS_ADVICE),
    errno.EISDIR: ("is a directory where a file should be", "move that directory away or remove it"),
    errno.ENOTDIR: ("a part of the path is a file where a directory should be", "move that file away or remove it"),
    errno.EEXIST: ("is a file where a directory should be", "move that file away or remove it"),
    errno.EIO: ("input/output error", "the disk may be failing: check it (dmesg), then run the stage again"),
}


def disk_fault(error: BaseException | None) -> OSError | None:
    """The OSError of DISK_FAULTS behind `error`: the error itself, or what a library wrapped (torch.save turns a
    failed write into a RuntimeError whose context is the OSError); None for anything else."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FAULTS:
            return error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None


def describe_disk_fault(fault: OSError) -> str:
    """One line: the path, the problem, what to do. A write reports no path: mnist_pipeline.files names its output."""
    problem, advice = DISK_FAULTS[fault.errno]
    path = os.fsdecode(fault.filename) if fault.filename is not None else "a file this stage was writing"
    return f"{path}: {problem}; {advice.format(directory=os.path.dirname(path) or '.')}"


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a PipelineError, or a disk or permission fault (DISK_FAULTS), becomes one line on
    stderr and exit status 1. Outputs are written through mnist_pipeline.files, so such a failure leaves no partial
    file."""
    try:
        main()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except Exception as error:
        fault = disk_fault(error)
        if fault is None:
            raise  # a bug, whose traceback helps
        print(f"error: {describe_disk_fault(fault)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as interrupt:  # Ctrl-C; a stage may say what it leaves behind
        print(f"interrupted: {interrupt}" if str(interrupt) else "interrupted", file=sys.stderr)
        sys.exit(130)
