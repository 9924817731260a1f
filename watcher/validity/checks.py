"""Check one open file or one name, choosing the format from the first bytes."""

from __future__ import annotations

import errno
import os
import stat

from watcher.validity._common import (
    LEGACY_PREFIX,
    TAIL_WINDOW_BYTES,
    ZIP_LOCAL_MAGIC,
    FileReader,
    Invalid,
    Verdict,
)
from watcher.validity._legacy import check_legacy
from watcher.validity._zip import check_zip


def _file_type_name(mode: int) -> str:
    kinds = [
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISLNK, "symbolic link"),
    ]
    for test, name in kinds:
        if test(mode):
            return name
    return f"file of mode {stat.S_IFMT(mode):o}"


def _check_contents(fd: int, size: int) -> str:
    """Return the reason a non-empty regular file is valid, or raise Invalid."""
    reader = FileReader(fd)
    if size <= TAIL_WINDOW_BYTES:
        # One read serves every later read of a small file.
        reader.load_window(0, size)
    head = reader.read(4, 0)
    if head == ZIP_LOCAL_MAGIC:
        return check_zip(reader, size)
    if head == LEGACY_PREFIX or (len(head) == 4 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return check_legacy(reader, size)
    if len(head) < 4 and (ZIP_LOCAL_MAGIC.startswith(head) or LEGACY_PREFIX.startswith(head)):
        raise Invalid(f"truncated: {len(head)} bytes")
    raise Invalid("not a torch checkpoint: no zip or legacy torch signature")


def check_fd(fd: int) -> Verdict:
    """Check the regular file open as `fd`, reading with os.pread only.

    The descriptor's offset is not moved and the descriptor is not closed. OSError while
    reading gives an invalid verdict with reason ``unreadable: <strerror>``.
    """
    try:
        st = os.fstat(fd)
    except OSError as exc:
        return Verdict(False, f"unreadable: {exc.strerror}")
    return _check_open_file(fd, st)


def _check_open_file(fd: int, st: os.stat_result) -> Verdict:
    """Check the file open as `fd`, whose os.fstat result is `st`."""
    try:
        if not stat.S_ISREG(st.st_mode):
            return Verdict(False, f"not a regular file: {_file_type_name(st.st_mode)}")
        if st.st_size == 0:
            return Verdict(False, "empty file")
        return Verdict(True, _check_contents(fd, st.st_size))
    except Invalid as invalid:
        return Verdict(False, invalid.reason)
    except OSError as exc:
        return Verdict(False, f"unreadable: {exc.strerror}")


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
# O_NOATIME keeps the reads of the check from updating the file's access time, which would
# dirty the inode. Linux rejects it with EPERM unless the caller owns the file or has
# CAP_FOWNER.
_OPEN_FLAGS_NOATIME = _OPEN_FLAGS | getattr(os, "O_NOATIME", 0)


def _open_for_check(dir_fd: int | None, name: str) -> int:
    """Open `name` with O_NOATIME, or without it when the caller may not use it on this file."""
    try:
        return os.open(name, _OPEN_FLAGS_NOATIME, dir_fd=dir_fd)
    except PermissionError as exc:
        # Whether O_NOATIME is allowed depends on the owner of each file, so the retry is
        # per file and nothing is remembered.
        if exc.errno != errno.EPERM or _OPEN_FLAGS_NOATIME == _OPEN_FLAGS:
            raise
    return os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)


def stat_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """Return the identity of a file version: device, inode, size, mtime and ctime in ns."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def open_and_check(dir_fd: int | None, name: str) -> tuple[Verdict, tuple | None]:
    """Check `name` and return the verdict with the file's stat_key.

    The key is None when the file could not be opened or changed while it was checked.
    """
    try:
        fd = _open_for_check(dir_fd, name)
    except OSError as exc:
        reason = f"unreadable: {exc.strerror}"
        if exc.errno == errno.ELOOP:
            reason += " (symbolic links are not followed)"
        return Verdict(False, reason), None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return Verdict(False, f"not a regular file: {_file_type_name(before.st_mode)}"), None
        verdict = _check_open_file(fd, before)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    key = stat_key(before)
    return verdict, key if key == stat_key(after) else None


GONE = Verdict(False, "gone since the scan")
"""The result of check_unchanged for a name that no longer exists."""
CHANGED = Verdict(False, "changed since the scan")
"""The result of check_unchanged for a name that is now another file, a link or another version."""


def check_unchanged(dir_fd: int, name: str, scanned: os.stat_result) -> Verdict | None:
    """Check `name` just before its deletion, if it is still the file version `scanned`.

    `scanned` is the file's lstat result from the scan that planned the deletion. Return None
    for a valid file that is still that version, which alone may go. Return the verdict of an
    invalid file that stayed that version through the check, which is kept. Return GONE or
    CHANGED when the name is missing or is not that version: the file is not deleted, because
    a file that was away during the check, or changed, was never checked.
    Compared with open_and_check, this makes one fstat less for a valid file.
    """
    dev, ino, size, mtime_ns = (
        scanned.st_dev,
        scanned.st_ino,
        scanned.st_size,
        scanned.st_mtime_ns,
    )
    try:
        fd = _open_for_check(dir_fd, name)
    except FileNotFoundError:
        return GONE
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return CHANGED  # a symbolic link took the name
        try:
            now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return GONE
        except OSError:
            return CHANGED
        if not is_version(now, dev, ino, size, mtime_ns):
            return CHANGED
        return Verdict(False, f"unreadable: {exc.strerror}")
    try:
        before = os.fstat(fd)
        if not is_version(before, dev, ino, size, mtime_ns):
            return CHANGED
        verdict = _check_open_file(fd, before)
        if verdict.valid:
            # A change during the check shows in the size or mtime that the deletion compares.
            return None
        return verdict if is_version(os.fstat(fd), dev, ino, size, mtime_ns) else CHANGED
    finally:
        os.close(fd)


def is_version(now: os.stat_result, dev: int, ino: int, size: int, mtime_ns: int) -> bool:
    """Return whether `now` is a regular file with this device, inode, size and mtime."""
    return (
        stat.S_ISREG(now.st_mode)
        and now.st_ino == ino
        and now.st_dev == dev
        and now.st_size == size
        and now.st_mtime_ns == mtime_ns
    )


def check_file(dir_fd: int | None, name: str) -> Verdict:
    """Open `name` relative to folder `dir_fd` (None: the working directory) and check it.

    The open uses O_NOFOLLOW, so a symbolic link as the last path component is rejected, and
    O_NONBLOCK, so a FIFO does not block. Anything but a regular file is invalid.
    """
    verdict, _key = open_and_check(dir_fd, name)
    return verdict
