"""One watcher per folder: an advisory lock on a file inside the checkpoint folder."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time

from watcher.scan import LOCK_NAME

log = logging.getLogger(__name__)


class LockError(RuntimeError):
    """Another watcher holds the folder's lock, or the lock file cannot be created."""


def acquire_lock(dir_fd: int, folder: str) -> int | None:
    """Take the folder's lock and return its handle; the lock lasts until the handle is closed.

    The lock file stores the holder's process id, so that a second watcher can name it. On a full
    disk the lock file may not be creatable: then the watcher runs without the lock, with a
    warning, because a full disk is exactly when pruning is needed.
    """
    try:
        fd = _open_lock_file(dir_fd)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            log.warning(
                "cannot create the lock file %r in %r (%s): running without the lock, so a "
                "second watcher on this folder would not be stopped",
                LOCK_NAME,
                folder,
                error.strerror,
            )
            return None
        raise LockError(
            f"cannot create the lock file {LOCK_NAME!r} in {folder!r}: {error.strerror}; "
            "the watcher needs write access to the folder"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise LockError(
            f"another watcher (process {holder}) is already watching {folder!r}; "
            "stop it first, or point this one at another folder"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as error:
        # The lock holds without the id, so a second watcher may name an earlier holder.
        log.info("cannot write the process id into the lock file in %r: %s", folder, error)
    return fd


def _open_lock_file(dir_fd: int) -> int:
    """Open or create the lock file, read-only when another user created it.

    flock() needs no write access, so a lock file left by another user (say, someone who ran a
    dry run by hand before the service started) must not keep the watcher out. A new lock file
    is made writable by all, so the next watcher of any user can record its process id in it.
    A lock file that is not a regular file with a single link is rejected, so that writing the
    process id can never change a file outside the folder through a hard link.
    """
    flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(LOCK_NAME, flags | os.O_RDWR | os.O_CREAT, 0o666, dir_fd=dir_fd)
    except PermissionError as refused:
        try:
            fd = os.open(LOCK_NAME, flags | os.O_RDONLY, dir_fd=dir_fd)
        except FileNotFoundError:
            raise refused from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise LockError(
            f"the lock file {LOCK_NAME!r} is not a regular file with a single link "
            f"({info.st_nlink} links): remove it and start the watcher again"
        )
    try:
        os.fchmod(fd, 0o666)
    except OSError:
        pass  # a lock file of another user, opened through a group or ACL grant
    return fd


def _read_holder(fd: int) -> str:
    """Return the process id of the watcher that holds the lock, as recorded in the file.

    The holder writes its id right after locking, so a watcher that lost a race by microseconds
    may read an empty file, or the id of an earlier holder that has exited. A few short retries
    wait for the id of a running process.
    """
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit() and _process_exists(int(text)):
            return text
        time.sleep(0.01)
    return "unknown"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
