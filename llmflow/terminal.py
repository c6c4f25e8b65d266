"""What `llmflow run` and `llmflow demo` show: one line per stage with its figures and a
progress bar for training steps and scored rows; the outcome in one line.

Everything else this process writes (Prefect's and Ray's log lines, library warnings, weight
loading bars, tracebacks) goes to a log file under .llmflow/logs/, at the file-descriptor
level, so output of C libraries and of child processes lands there too; the Prefect UI keeps
every log line of the run as before. `--debug` leaves the terminal as it was.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

ENV = "LLMFLOW_TERMINAL"  # "1" while a terminal watches this process's flow runs

_terminal: dict[str, TextIO] = {}


def out() -> TextIO:
    """Where the user's lines go: the terminal while ``quiet`` holds stdout, else stdout."""
    return _terminal.get("out", sys.stdout)


def err() -> TextIO:
    return _terminal.get("err", sys.stderr)


def watching() -> bool:
    """Whether a terminal shows this process's stage lines and progress bars."""
    return "out" in _terminal


@contextmanager
def quiet(log_file: Path) -> Iterator[Path]:
    """Send this process's stdout and stderr to ``log_file`` while the block runs; ``out()``
    and ``err()`` still reach the terminal. An exception escaping the block leaves its
    traceback in the log file (the caller prints its one line)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    _terminal["out"] = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    _terminal["err"] = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    log = open(log_file, "a", encoding="utf-8")  # noqa: SIM115 - open while the block runs
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    os.environ[ENV] = "1"
    try:
        yield log_file
    except BaseException:
        traceback.print_exc(file=log)  # the terminal gets the one-line reason
        raise
    finally:
        log.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (*saved,):
            os.close(f)
        for stream in (_terminal.pop("out"), _terminal.pop("err")):
            stream.close()
        os.environ.pop(ENV, None)


def stage(name: str, text: str) -> None:
    """One line for a finished stage: in the run's log (the Prefect UI) and, when a terminal
    watches, on it."""
    line = f"{name}: {text}"
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        get_run_logger().info(line)
    except MissingContextError:
        pass  # outside a flow run (a unit test): the terminal line is all there is
    if watching():
        print(f"{name:>9}  {text}", file=out(), flush=True)
