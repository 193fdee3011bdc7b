"""User-facing failures: one exception type, and the entry point that reports it without a traceback."""

import sys
from typing import Callable


class PipelineError(Exception):
    """A problem the user can fix (bad params, missing or corrupt data); its message says how."""


def gist(error: Exception, limit: int = 160) -> str:
    """A library's exception as a clause for a PipelineError: its first sentence, on one line, cut to `limit`.

    PyTorch and onnxruntime explain their errors in paragraphs; the first sentence says what went wrong.
    """
    sentence = " ".join(str(error).split()).split(". ")[0] or type(error).__name__
    return sentence if len(sentence) <= limit else sentence[: limit - 1] + "…"


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a PipelineError becomes one line on stderr and exit status 1."""
    try:
        main()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as interrupt:  # Ctrl-C; a stage may say what it leaves behind
        print(f"interrupted: {interrupt}" if str(interrupt) else "interrupted", file=sys.stderr)
        sys.exit(130)
