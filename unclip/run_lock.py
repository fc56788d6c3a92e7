"""One run at a time per output directory: ``with hold_directory(run_dir, "training"): ...``.

The lock is ``<directory>/.run.lock``, holding the owner's process id and host. Its exclusivity is an OS file
lock (``fcntl.flock``) on that file, which the OS releases when the process dies however it dies; the file is
removed on a clean exit. A lock file left by a process that was killed is therefore stale: the next run takes
it over and says so. Creating the lock file is also the first write into the directory, so an unwritable
directory is an error at the start, naming it.

Holding is re-entrant within a process (a job holding its run directory may run a Trainer in it).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".run.lock"
_held: dict[Path, int] = {}  # directory -> how many times this process holds it


class DirectoryInUseError(RuntimeError):
    """Another running process owns the output directory."""


def _owner(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except ValueError:
        return {}


def _open_locked(path: Path) -> tuple[int, dict]:
    """(fd of ``path`` under our flock, the previous owner recorded in it); retries if it was replaced meanwhile."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise PermissionError(f"cannot write to {path.parent} ({err.strerror}); the run could not save its "
                                  "results there: choose a writable directory or fix its permissions") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise DirectoryInUseError(
                f"{path.parent} is in use by process {owner.get('pid', '?')} on {owner.get('host', '?')} "
                f"({owner.get('what', 'a run')}, since {owner.get('since', '?')}); wait for it to finish or "
                "choose another output directory"
            ) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # its owner removed it between our open and our lock
            same_file = False
        if same_file:
            return fd, _owner(fd)
        os.close(fd)


@contextmanager
def hold_directory(directory: str | Path, what: str = "a run") -> Iterator[Path]:
    """Own ``directory`` (created if missing) until the block ends; ``what`` says in others' errors who owns it.
    Raises DirectoryInUseError naming the owner's pid if another live process holds it."""
    directory = Path(directory).resolve()
    if _held.get(directory):
        _held[directory] += 1
        try:
            yield directory
        finally:
            _held[directory] -= 1
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"cannot create {directory} ({err.strerror or err}); the run could not save its results "
                              "there: choose a writable directory or fix its permissions") from err
    path = directory / LOCK_FILE
    fd, previous = _open_locked(path)
    if previous.get("pid"):
        print(f"note: taking over the stale lock {path} of process {previous['pid']} on "
              f"{previous.get('host', '?')}, which ended without releasing it", flush=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _held[directory] = 1
    try:
        yield directory
    finally:
        del _held[directory]
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # releases the flock
