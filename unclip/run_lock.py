"""One run at a time per output directory: ``with run_directory(run_dir, "training"): ...``.

Every job and the Trainer take it through :func:`run_directory` (the Hydra jobs before Hydra writes anything,
in a single run and in a multirun alike; a Trainer for its run directory, re-entrantly inside a job).

Exclusion is two OS file locks (``fcntl.flock``), which the OS releases when the process dies however it dies:
one on the directory itself, so that deleting the lock file (as users do with "stale" locks) lets no second run
in, and one on ``<directory>/.run.lock``, which holds the owner's process id and host for others' errors and is
removed on a clean exit. A lock file left by a process that was killed is therefore stale: the next run takes it
over and says so. The lock file is opened without following links and must be a regular file, so a symlink
planted there cannot redirect the write. Creating it is also the first write into the directory, so an
unwritable directory is an error at the start, naming it.

Holding is re-entrant within a process (a job holding its run directory may run a Trainer in it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import ContextManager, Iterator

LOCK_FILE = ".run.lock"
_held: dict[Path, int] = {}  # directory -> how many times this process holds it


class DirectoryInUseError(RuntimeError):
    """Another running process owns the output directory."""


def launched_as_other_process() -> bool:
    """True in a process that a multi-process launcher started with a rank other than 0: those share the main
    process's run directory and do not hold it. The signal is the launcher's own beside ``RANK``: torchrun's
    ``TORCHELASTIC_RUN_ID`` (``accelerate launch`` with several processes goes through it) or accelerate's DeepSpeed
    launch (``ACCELERATE_USE_DEEPSPEED``, whose multi-node launcher is not torchrun); a bare ``RANK`` (set by some
    SLURM or MPI wrappers around a single process) is not a launch of several processes and does not count."""
    launched = "TORCHELASTIC_RUN_ID" in os.environ or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if not launched:
        return False
    try:
        return int(os.environ.get("RANK", "0")) != 0
    except ValueError:
        return False


def run_directory(directory: str | Path, what: str, *, main: bool | None = None) -> ContextManager:
    """The one way to own a run directory: held (:func:`hold_directory`) by the main process, not by the others
    of a multi-process run (``main``: whether this is the main process; None: ask the launcher's environment)."""
    if main is None:
        main = not launched_as_other_process()
    return hold_directory(directory, what) if main else nullcontext(Path(directory))


def _owner(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except ValueError:
        return {}


def _in_use(directory: Path, owner: dict) -> DirectoryInUseError:
    if not owner.get("pid"):  # the directory's own lock is held, its lock file gone
        return DirectoryInUseError(
            f"{directory} is in use by another process (its {LOCK_FILE} was deleted while that run goes on; the "
            "directory stays locked until that process ends): wait for it to finish or choose another output "
            "directory")
    return DirectoryInUseError(
        f"{directory} is in use by process {owner.get('pid', '?')} on {owner.get('host', '?')} "
        f"({owner.get('what', 'a run')}, since {owner.get('since', '?')}); wait for it to finish or "
        "choose another output directory")


def _open_lock_file(path: Path) -> int:
    """``path`` opened for reading and writing without following a link; refused unless a regular file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):  # a symlink; a FIFO; a directory
            raise PermissionError(f"{path} is not a regular file (a symbolic link or other special file); the run's "
                                  f"lock must be its own file: remove {path} and run again") from None
        raise PermissionError(f"cannot write to {path.parent} ({err.strerror}); the run could not save its "
                              "results there: choose a writable directory or fix its permissions") from err
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:  # a hard link would truncate the file it shares
        os.close(fd)
        raise PermissionError(f"{path} is not a regular file of its own (a special file, or a hard link to another "
                              f"file); the run's lock must be its own file: remove {path} and run again")
    return fd


def _lock_directory(directory: Path) -> int | None:
    """An fd of ``directory`` under our flock (None where the file system cannot lock directories)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # e.g. some network file systems: the lock file alone excludes
        os.close(fd)
        return None
    return fd


def _open_locked(path: Path) -> tuple[int, dict]:
    """(fd of ``path`` under our flock, the previous owner recorded in it); retries if it was replaced meanwhile."""
    while True:
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise _in_use(path.parent, owner) from None
        try:
            same_file = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except FileNotFoundError:  # its owner removed it between our open and our lock
            same_file = False
        if same_file:
            return fd, _owner(fd)
        os.close(fd)


def _lock_both(directory: Path) -> tuple[int | None, int, dict]:
    """(the directory's locked fd, the lock file's locked fd, the previous owner the file records)."""
    path = directory / LOCK_FILE
    try:
        dir_fd = _lock_directory(directory)
    except BlockingIOError:
        owner = {}
        try:
            fd = _open_lock_file(path)
            owner = _owner(fd)
            os.close(fd)
        except PermissionError:
            pass
        raise _in_use(directory, owner) from None
    try:
        fd, previous = _open_locked(path)
    except BaseException:
        if dir_fd is not None:
            os.close(dir_fd)
        raise
    return dir_fd, fd, previous


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
    dir_fd, fd, previous = _lock_both(directory)
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
        _release(path, fd, dir_fd)


def _release(path: Path, fd: int, dir_fd: int | None) -> None:
    """Remove the lock file if it is still ours (not a file put there since), then drop both locks."""
    try:
        if os.lstat(path).st_ino == os.fstat(fd).st_ino:
            path.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)  # releases the flocks
        if dir_fd is not None:
            os.close(dir_fd)
