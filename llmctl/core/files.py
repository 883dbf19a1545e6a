"""Writing files so that a crash or a kill never leaves a half-written file that looks complete, and hashing them.

Temporary files and directories carry the id of the process that made them (`.<name>.p<pid>.<random>.tmp`): one
whose owner is gone was left by a kill (SIGKILL, a power cut) and is swept by the next write in the same place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmctl.core.faults import writing


def default_mode(directory: bool = False) -> int:
    """The mode a plain `open()`/`mkdir()` would give under the current umask. Temporary files and directories
    are created private (0600/0700); what is renamed into place should look like any other file the user writes."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def owner_prefix(name: str) -> str:
    """The start of a temporary name that records its owner process: `.<name>.p<pid>.`."""
    return f".{name}.p{os.getpid()}."


def sweep_orphans(directory: Path, name: str) -> list[Path]:
    """Remove the temporary files and directories beside `directory/name` whose owner process is gone."""
    directory = Path(directory)
    removed = []
    with contextlib.suppress(OSError):
        for path in directory.glob(f".{glob_escape(name)}.p*"):
            pid = path.name[len(name) + 3 :].split(".", 1)[0]
            if not pid.isdigit() or pid_alive(int(pid)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed.append(path)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts: it is not ours to sweep)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owned_tempdir(parent: Path, name: str) -> Path:
    """A new private directory `parent/.<name>.p<pid>.<random>.tmp`, after sweeping those of dead processes."""
    sweep_orphans(parent, name)
    return Path(tempfile.mkdtemp(dir=parent, prefix=owner_prefix(name), suffix=".tmp"))


@contextlib.contextmanager
def temporary_dir(parent: Path, name: str) -> Iterator[Path]:
    """An owned temporary directory (see `owned_tempdir`), removed when the block ends, however it ends."""
    path = owned_tempdir(parent, name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`. Any failure
    (a full disk, a path under a file) is an OutputError naming `path`; the old file stays as it was."""
    path = Path(path)
    with writing(path):
        check_writable_parent(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(path))
        sweep_orphans(path.parent, path.name)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=owner_prefix(path.name), suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, default_mode())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def check_writable_parent(path: Path) -> None:
    """An OutputError when a directory above `path` is a file (mkdir would say only "File exists")."""
    from llmctl.errors import OutputError

    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot write {path}: {parent} is a file, not a directory")
            return


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; when the block succeeds, it replaces `final`.

    If the block raises (or the process dies), `final` is untouched and the temporary directory is removed (or,
    after a kill, left under a dot-name that no reader mistakes for the real thing). An existing `final` is moved
    aside before the new one is renamed in and deleted after, so at every moment either the old or the new complete
    directory is reachable (the old one under `.<name>.old-*` for the instant between the two renames).
    """
    final = Path(final)
    check_writable_parent(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = owned_tempdir(final.parent, final.name)
    try:
        yield tmp
        os.chmod(tmp, default_mode(directory=True))
        fsync_dir(tmp)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=owner_prefix(final.name), suffix=".old"))
            os.rmdir(old)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new names from renames) to disk; a no-op where the OS does not allow it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: object) -> str:
    """SHA-256 of a JSON-able value, independent of key order: how settings are fingerprinted."""
    return sha256_bytes(json.dumps(obj, sort_keys=True).encode())
