"""Writing a run's results so that a symlink planted in its directory is replaced, never written through.

A run directory may be shared or handed around: a ``metrics.json`` or ``log.jsonl`` there that is a symbolic link
to some other file must not make the run overwrite that file. Whole files are written to a new temporary file
beside the target and renamed over it (:func:`write_atomic`), which replaces a link, and a reader never sees half
a file; a log that grows line by line is opened without following links (:func:`append_line`).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` by a temporary file renamed over it (a symlink at ``path`` is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)  # a new file
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_link(path: str | Path) -> None:
    """Remove ``path`` if it is a symbolic link (or anything but a regular file or directory), so that what is
    written there next makes a new file of the run's own."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        path.unlink()


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` to the regular file ``path`` (created if missing); a symlink there is replaced first."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:  # ELOOP: a link; ENXIO: a FIFO without a reader
        replace_link(path)
        fd = os.open(path, flags, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file; move it away so that the run can write its log there")
        os.write(fd, line.encode())
    finally:
        os.close(fd)
