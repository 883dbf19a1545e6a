"""The one boundary where the errors of the libraries llmctl calls become one-line llmctl errors.

Readers wrap their work in `reading(path)`, writers in `writing(path)`: an OSError (by its errno: "no space left on
device", "permission denied", ...), a safetensors, pickle, gzip/zlib or end-of-file error, or invalid UTF-8 becomes
the given `LlmctlError` subclass with a message that names the file and what went wrong. `cli.main` maps any OSError
that still escapes with the same `reason()`, so no library error reaches the user as a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import pickle
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from llmctl.errors import DataError, LlmctlError, OutputError, first_line

ERRNO_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "is a directory, expected a file",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error (a failing disk or a lost network mount)",
    errno.EBADF: "the stream is closed",
    errno.EPIPE: "the reader went away (broken pipe)",
    errno.ENXIO: "no such device",
}

LIBRARY_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # gzip.BadGzipFile is one
    EOFError,
    zlib.error,
    pickle.UnpicklingError,
    UnicodeDecodeError,
    SafetensorError,
)
"""What readers and writers turn into llmctl errors; anything else is a bug and keeps its traceback."""

FULL_BELOW = 1 << 20
"""A write that fails with under this many bytes free failed for want of space, whatever error the library raised
(torch.save reports a full disk as a RuntimeError without an errno)."""


def reason(exc: BaseException, where: str | Path | None = None) -> str:
    """What went wrong, in a few words, for one of LIBRARY_ERRORS (or a write's RuntimeError)."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (invalid byte at offset {exc.start})"
    if isinstance(exc, zlib.error) or type(exc).__name__ == "BadGzipFile":
        return f"corrupt gzip data ({first_line(exc)})"
    if isinstance(exc, EOFError):
        return f"ends too early, the file is truncated ({first_line(exc)})"
    if isinstance(exc, pickle.UnpicklingError):
        return "holds pickled Python objects other than tensors, which llmctl refuses to load (they could run code)"
    if isinstance(exc, SafetensorError):
        return f"not a valid safetensors file ({first_line(exc)})"
    if isinstance(exc, OSError):
        if exc.errno in ERRNO_REASONS:
            return ERRNO_REASONS[exc.errno]
        if where is not None and disk_full(where):
            return ERRNO_REASONS[errno.ENOSPC]
        return exc.strerror or first_line(exc)
    if where is not None and disk_full(where):
        return ERRNO_REASONS[errno.ENOSPC]
    return first_line(exc)


def disk_full(where: str | Path) -> bool:
    """Whether the file system holding `where` (or its nearest existing parent) has (almost) no space left."""
    path = Path(where).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free < FULL_BELOW
            except OSError:
                return False
    return False


@contextlib.contextmanager
def reading(path: str | Path, error: type[LlmctlError] = DataError, what: str = "cannot read") -> Iterator[None]:
    """Library errors while reading `path` become `error("<what> <path>: <reason>")`."""
    try:
        yield
    except LlmctlError:
        raise
    except LIBRARY_ERRORS as exc:
        raise error(f"{what} {_shown(path)}: {reason(exc)}") from None


@contextlib.contextmanager
def writing(
    path: str | Path, error: type[LlmctlError] = OutputError, what: str = "cannot write", hint: str = ""
) -> Iterator[None]:
    """Library errors while writing `path` become `error("<what> <path>: <reason><hint>")`. A RuntimeError counts
    only when the disk is full (torch's writer reports ENOSPC so); otherwise it is a bug and propagates."""
    try:
        yield
    except LlmctlError:
        raise
    except (OSError, SafetensorError, RuntimeError) as exc:  # not decoding errors: readers inside map their own
        if isinstance(exc, RuntimeError) and not disk_full(path):
            raise
        raise error(f"{what} {_shown(path)}{_inner(exc, path)}: {reason(exc, path)}{hint}") from None


def os_error_message(exc: OSError) -> str:
    """The one line `cli.main` prints for an OSError that no reader or writer mapped."""
    name = exc.filename if exc.filename is not None else None
    where = f"{name}: " if name is not None else ""
    return f"{where}{reason(exc, name)}"


def _inner(exc: BaseException, path: str | Path) -> str:
    """` (the file inside)` when the library names a file inside `path` (not a temporary one)."""
    name = getattr(exc, "filename", None)
    if not name or Path(path) not in Path(name).parents:
        return ""
    inner = Path(name).relative_to(path)
    return "" if any(part.startswith(".") for part in inner.parts) else f" ({inner})"


def _shown(path: str | Path) -> str:
    return "<stdin>" if str(path) == "-" else str(path)
