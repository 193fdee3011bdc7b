"""User-facing failures: one exception type, and the entry point that reports it without a traceback."""

import sys
from typing import Callable


class PipelineError(Exception):
    """A problem the user can fix (bad params, missing or corrupt data); its message says how."""


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
