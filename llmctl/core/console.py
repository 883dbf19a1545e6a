"""stderr is for people: logging and rich progress bars go there, never to stdout (which carries results)."""

from __future__ import annotations

import logging
import sys
from functools import lru_cache

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@lru_cache(maxsize=1)
def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


class _Formatter(logging.Formatter):
    """`message` for info, `warning: message` for warnings: plain lines that read well in cron mail and CI logs."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        if record.levelno <= logging.DEBUG:
            return f"debug: {record.name}: {message}"
        return message


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Route the `llmctl` loggers to stderr. Quiet shows errors only; verbose shows debug lines."""
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO
    logger = logging.getLogger("llmctl")
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(handler)
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers = [handler]
    warnings_logger.propagate = False
    warnings_logger.setLevel(logging.ERROR if quiet else logging.WARNING)


def progress_enabled(quiet: bool) -> bool:
    """Progress bars only for a person watching: not when quiet, not when stderr is a file or pipe."""
    return not quiet and stderr_console().is_terminal


def make_progress(*columns, quiet: bool = False, transient: bool = False) -> Progress:
    """A rich Progress on stderr, disabled when nobody watches. Default columns: description, bar, count, times."""
    if not columns:
        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
    return Progress(*columns, console=stderr_console(), disable=not progress_enabled(quiet), transient=transient)
