"""The exceptions llmctl's library code raises, and the exit codes the CLI maps them to.

Library code raises these and never exits or prints; `llmctl.cli.main` is the one place that turns them into an
`Error: ...` line on stderr and an exit code. Anything that is not an `LlmctlError` is a bug and keeps its traceback.
"""

from __future__ import annotations

# Exit codes, documented in docs/exit-codes.md. Scripts and CI rely on them, so they never change meaning.
EXIT_OK = 0
EXIT_ERROR = 1  # runtime, data, config, model or checkpoint problem
EXIT_USAGE = 2  # bad command line (unknown flag, missing argument): Click's own convention
EXIT_GATE_FAILED = 3  # `llmctl eval` ran fine but a --fail-under/--fail-over gate failed: "the model regressed"
EXIT_INTERRUPTED = 75  # SIGINT/SIGTERM during training: a checkpoint was saved, rerun with --resume (EX_TEMPFAIL)
EXIT_TERMINATED = 143  # SIGTERM outside training: 128 + 15, as a shell reports a process the signal killed


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library messages run long), or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class LlmctlError(Exception):
    """Base class of every error the CLI reports as `Error: <message>` and exit code `exit_code`."""

    exit_code: int = EXIT_ERROR


class ConfigError(LlmctlError):
    """A config file or override is invalid. Holds every problem found, each prefixed by its dotted path."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            where = f" in {source}" if source else ""
            message = f"{len(self.problems)} config problems{where}:\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(message)


class DataError(LlmctlError):
    """Input data is missing, unreadable, malformed or empty. Messages name the file (and line where known)."""


class ModelError(LlmctlError):
    """A model or tokenizer cannot be found, loaded or built."""


class CheckpointError(ModelError):
    """A checkpoint is missing, corrupted, or belongs to a different run/config/data."""


class TrainingError(LlmctlError):
    """Training cannot start or go on: the run directory holds another run, the loss diverged, memory ran out."""


class OutputError(LlmctlError):
    """An output (stdout, a file, a checkpoint, a run or data directory) cannot be written: a full disk, no
    permission, a path that is or lies under a file. Messages name the path; earlier outputs stay whole."""


class Interrupted(LlmctlError):
    """A run stopped on SIGINT/SIGTERM after saving a checkpoint; it can be resumed."""

    exit_code = EXIT_INTERRUPTED


class Terminated(BaseException):
    """SIGTERM outside training: raised in the main thread so that cleanup (`finally`, temporary directories) runs
    as on Ctrl-C. A BaseException, like KeyboardInterrupt, so that no `except LlmctlError` swallows it."""
